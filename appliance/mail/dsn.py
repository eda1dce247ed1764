"""Delivery status notifications (RFC 3464) and the rule for where one may go (MISSION M-5).

A bounce is a ``multipart/report; report-type=delivery-status`` message with
three parts: a human-readable explanation, the machine-readable
``message/delivery-status`` part and the original message's headers as
``text/rfc822-headers`` (the body is not returned: it may be large and it is
the sender's own anyway).  The message is assembled as bytes by hand rather
than with :mod:`email`, because the delivery-status part has a field syntax of
its own that the email package would fold or re-encode.  Status codes are RFC
3463 enhanced codes taken from the reply that caused the failure.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from appliance.mail.interfaces import Envelope, Reply

#: Kinds of report: the message could not be delivered, or it is still being retried.
FAILED = "failed"
DELAYED = "delayed"

#: Longest field value kept on one line of the delivery-status part (RFC 5322 2.1.1 allows 998).
_MAX_FIELD = 900
#: The original headers returned are cut at this size, on a line boundary.
MAX_RETURNED_HEADERS = 64 * 1024

_STATUS_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\xff]")


def bounce_recipient(
    envelope_sender: str,
    postmaster: str,
    failed_recipients: Iterable[str] = (),
    kind: str = FAILED,
) -> str | None:
    """Where the report about a message from ``envelope_sender`` goes, or None for nowhere.

    A normal message's report goes to its sender.  A message with the null
    sender ``<>`` is itself a report (RFC 5321 4.5.5): it never gets one sent
    back to ``<>``; a failure report about it goes to ``postmaster`` instead,
    except when the undeliverable recipient *was* the postmaster (the report
    about a report to the postmaster failed: it stops there, no loop), and no
    delay warning is sent about it at all.
    """
    if envelope_sender:
        return envelope_sender
    if kind != FAILED:
        return None
    targets = {r.lower() for r in failed_recipients}
    if targets and targets <= {postmaster.lower()}:
        return None
    return postmaster


def status_of(reply: Reply) -> str:
    """The RFC 3463 status for ``reply``: its enhanced code when it is valid, else ``X.0.0``."""
    match = _STATUS_RE.match(reply.enhanced.strip())
    klass = "5" if reply.permanent else "4" if reply.temporary else "2"
    if match and match.group(1) == klass:
        return reply.enhanced.strip()
    return f"{klass}.0.0"


def _clean(text: str) -> str:
    """One line of printable ASCII: control characters and 8-bit characters become '?'."""
    text = " ".join(text.split())
    return _UNSAFE.sub("?", text.encode("ascii", "replace").decode("ascii"))


def _fold(name: str, value: str) -> str:
    """``name: value`` folded at spaces near 78 columns (RFC 5322 2.2.3), value cut to fit."""
    value = _clean(value)[:_MAX_FIELD]
    line = f"{name}: "
    out: list[str] = []
    for word in value.split(" "):
        if len(line) + len(word) > 78 and line.strip() and not line.endswith(": "):
            out.append(line.rstrip(" "))
            line = " "
        line += word + " "
    out.append(line.rstrip(" "))
    return "\r\n".join(out)


def _date(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")


def original_headers(message: bytes, limit: int = MAX_RETURNED_HEADERS) -> bytes:
    """The header section of ``message`` with CRLF line ends, cut at ``limit`` on a line boundary."""
    normalised = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    head = normalised.partition(b"\n\n")[0] if not normalised.startswith(b"\n") else b""
    if head and not head.endswith(b"\n"):
        head += b"\n"
    if len(head) > limit:
        head = head[: head.rfind(b"\n", 0, limit) + 1]
    return head.replace(b"\n", b"\r\n")


def _human_text(
    kind: str,
    reporting_mta: str,
    failed: Sequence[tuple[str, Reply, str | None]],
    sender: str | None = None,
) -> str:
    if kind == FAILED:
        intro = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "Your message could not be delivered to one or more recipients.",
            "It is attached below (headers only). The reasons are listed here.",
        ]
    else:
        intro = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "Your message could not be delivered yet to one or more recipients.",
            "It will be retried; you do not need to send it again.",
            "This is only a warning.",
        ]
    lines = [*intro, ""]
    if sender is not None:
        # A copy for someone else (postmaster): the headers below may not say who sent it.
        lines += [f"The message was sent by <{_clean(sender)}>.", ""]
    for recipient, reply, remote in failed:
        where = f" (remote host {_clean(remote)} said)" if remote else ""
        lines.append(f"<{_clean(recipient)}>{where}:")
        lines.append(f"    {reply.code} {_clean(reply.enhanced)} {_clean(reply.text)}"[:_MAX_FIELD])
        lines.append("")
    return "\r\n".join(lines) + "\r\n"


def _status_part(
    envelope: Envelope,
    failed: Sequence[tuple[str, Reply, str | None]],
    reporting_mta: str,
    arrival_date: float,
    last_attempt: float,
    kind: str,
    retry_until: float | None,
) -> str:
    action = "failed" if kind == FAILED else "delayed"
    groups: list[str] = []
    message_fields = [_fold("Reporting-MTA", f"dns; {reporting_mta}")]
    envid = envelope.mail_parameters.get("ENVID")
    if envid:
        message_fields.append(_fold("Original-Envelope-Id", envid))
    message_fields.append(_fold("Arrival-Date", _date(arrival_date)))
    groups.append("\r\n".join(message_fields))
    for recipient, reply, remote in failed:
        fields = [
            _fold("Final-Recipient", f"rfc822; {recipient}"),
            f"Action: {action}",
            f"Status: {status_of(reply)}",
        ]
        if remote:
            fields.append(_fold("Remote-MTA", f"dns; {remote}"))
        diagnostic = f"{reply.code} {reply.enhanced} {reply.text}".strip()
        fields.append(_fold("Diagnostic-Code", f"smtp; {diagnostic}"))
        fields.append(_fold("Last-Attempt-Date", _date(last_attempt)))
        if kind == DELAYED and retry_until is not None:
            fields.append(_fold("Will-Retry-Until", _date(retry_until)))
        groups.append("\r\n".join(fields))
    return "\r\n\r\n".join(groups) + "\r\n"


def build_bounce(
    original_envelope: Envelope,
    original: bytes,
    failed: Sequence[tuple[str, Reply, str | None]],
    reporting_mta: str,
    arrival_date: float,
    kind: str = FAILED,
    *,
    to: str | None = None,
    now: float | None = None,
    last_attempt: float | None = None,
    retry_until: float | None = None,
    message_id: str | None = None,
    subject: str | None = None,
) -> bytes:
    """An RFC 3464 report about ``failed`` recipients of a message, as CRLF-terminated bytes.

    ``original`` is the original message or just its headers (only the
    header section is returned).  ``failed`` holds ``(recipient, reply,
    remote_mta)`` with ``remote_mta`` the host name that gave the reply, or
    None when the failure was decided here.  ``kind`` is :data:`FAILED` or
    :data:`DELAYED`.  ``to`` is the report's recipient, by default the original
    sender (see :func:`bounce_recipient` for the rule; the report is sent with
    the null envelope sender ``<>``).  Times are POSIX timestamps.
    ``retry_until`` is the Will-Retry-Until of a :data:`DELAYED` report (RFC
    3464 2.3.8); ``subject`` replaces the usual one (a postmaster copy's).
    """
    if kind not in (FAILED, DELAYED):
        raise ValueError(f"unknown report kind {kind!r}")
    if not failed:
        raise ValueError("a report needs at least one recipient")
    now = time.time() if now is None else now
    last_attempt = now if last_attempt is None else last_attempt
    reporting_mta = _clean(reporting_mta).strip(".") or "localhost"
    rcpt = to if to is not None else (original_envelope.sender or f"postmaster@{reporting_mta}")
    token = secrets.token_hex(12)
    boundary = f"=_report_{token}"
    if message_id is None:
        message_id = f"<{int(now)}.{token}@{reporting_mta}>"
    if subject is None:
        subject = (
            "Undelivered Mail Returned to Sender"
            if kind == FAILED
            else "Delayed Mail (still being retried)"
        )
    sender = original_envelope.sender
    about = sender if sender and sender.lower() != rcpt.lower() else None
    headers = original_headers(original)
    headers_8bit = any(b > 0x7F for b in headers)
    head = "\r\n".join(
        [
            f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
            _fold("To", f"<{rcpt}>"),
            _fold("Subject", subject),
            f"Date: {_date(now)}",
            f"Message-ID: {_clean(message_id)}",
            "Auto-Submitted: auto-replied",
            "MIME-Version: 1.0",
            "Content-Type: multipart/report; report-type=delivery-status;",
            f'\tboundary="{boundary}"',
            "",
            "This is a MIME-encapsulated message.",
            "",
        ]
    )
    parts = [
        "Content-Description: Notification\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        + _human_text(kind, reporting_mta, failed, about),
        "Content-Description: Delivery report\r\n"
        "Content-Type: message/delivery-status\r\n\r\n"
        + _status_part(
            original_envelope, failed, reporting_mta, arrival_date, last_attempt, kind, retry_until
        ),
    ]
    out = head.encode("ascii") + b"\r\n"
    for part in parts:
        out += f"--{boundary}\r\n".encode("ascii") + part.encode("ascii") + b"\r\n"
    out += (
        f"--{boundary}\r\n"
        "Content-Description: Undelivered Message Headers\r\n"
        "Content-Type: text/rfc822-headers\r\n"
        + ("Content-Transfer-Encoding: 8bit\r\n" if headers_8bit else "")
        + "\r\n"
    ).encode("ascii")
    out += headers + b"\r\n"
    out += f"--{boundary}--\r\n".encode("ascii")
    return out
