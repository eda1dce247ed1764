"""Message submission policy (RFC 6409): who may send as whom, and headers a submitted message lacks.

Sender ownership follows Postfix's ``reject_authenticated_sender_login_mismatch``
with ``smtpd_sender_login_maps`` built from the directory: an authenticated
user may put in MAIL FROM only their login or one of their addresses
(optionally with an address extension, ``alice+lists@``); anything else is
``553 5.7.1``.  The null sender ``<>`` is allowed, as in Postfix (the owner
lookup is skipped for it): clients send delivery and read receipts with it.

RFC 6409 8.3 and 8.4 let a submission server add ``Date`` and
``Message-ID`` when a message lacks them.  The SMTP server streams message
bodies into the spool, so :class:`HeaderCompleter` holds back only the
header block (up to a bound), adds what is missing at its end, and then
passes everything else straight through.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

from appliance.directory.base import User
from appliance.mail.interfaces import Reply

#: Past this many octets without the end of the header block, headers are left alone.
MAX_HEADER_BLOCK = 256 * 1024


def not_owned(login: str) -> Reply:
    """The MAIL refusal for an address the user does not own."""
    return Reply(553, "5.7.1", f"Sender address rejected: not owned by user {login}")


class SenderPolicy:
    """Decides whether an authenticated :class:`User` may use an envelope sender.

    ``allow_any_sender`` turns the check off (a trusted relay client, an
    ``smtpd_sender_login_maps``-less Postfix).  ``extension_separators`` are
    the characters that start an address extension (``+-``): ``alice+x@``
    is owned by whoever owns ``alice@``.
    """

    def __init__(self, allow_any_sender: bool = False, extension_separators: str = "") -> None:
        self.allow_any_sender = allow_any_sender
        self.extension_separators = extension_separators

    def owns(self, user: User, sender: str) -> bool:
        """Whether ``sender`` is the user's login or one of the user's addresses."""
        owned = {user.login.lower(), *(a.lower() for a in user.addresses)}
        local, at, domain = sender.lower().rpartition("@")
        candidate = sender.lower()
        while True:
            if candidate in owned:
                return True
            cut = max((local.rfind(c) for c in self.extension_separators), default=-1)
            if cut <= 0 or not at:
                return False
            local = local[:cut]
            candidate = f"{local}@{domain}"

    def check(self, user: User, sender: str) -> Reply | None:
        """None when ``user`` may send with reverse-path ``sender`` (``""`` is ``<>``), else 553."""
        if self.allow_any_sender or sender == "" or self.owns(user, sender):
            return None
        return not_owned(user.login)


def _is_field_name(name: bytes) -> bool:
    """RFC 5322 2.2: printable US-ASCII except colon, at least one character."""
    return bool(name) and all(33 <= c <= 126 and c != 58 for c in name)


class HeaderCompleter:
    """Adds ``Message-ID`` and ``Date`` to the header block of a message streamed through it.

    Feed the dot-unstuffed, CRLF-normalised message in chunks; :meth:`feed`
    returns what may be written now (nothing while the header block is
    still being read), :meth:`finish` what remains at the end.  The header
    block ends at the first empty line, or at the first line that is not a
    header field (then a blank line is inserted after the added fields so
    that line stays in the body).
    """

    def __init__(
        self, hostname: str, now: float, queue_id: str, max_header: int = MAX_HEADER_BLOCK
    ) -> None:
        self.hostname = hostname
        self.now = now
        self.queue_id = queue_id
        self.max_header = max_header
        self.added: tuple[str, ...] = ()
        self._buffer = bytearray()
        self._scan = 0
        self._seen: set[bytes] = set()
        self._done = False
        self._first_line = True

    def _missing(self) -> bytes:
        stamp = datetime.fromtimestamp(self.now, UTC)
        fields: list[str] = []
        if b"message-id" not in self._seen:
            token = stamp.strftime("%Y%m%d%H%M%S")
            fields.append(f"Message-ID: <{token}.{self.queue_id}@{self.hostname}>")
        if b"date" not in self._seen:
            fields.append(f"Date: {format_datetime(stamp)}")
        self.added = tuple(f.partition(":")[0] for f in fields)
        return "".join(f + "\r\n" for f in fields).encode("ascii", "replace")

    def _release(self, at: int | None) -> bytes:
        """Everything buffered, with the missing fields inserted at ``at`` (None: do not add)."""
        self._done = True
        data = bytes(self._buffer)
        self._buffer = bytearray()
        if at is None:
            return data
        missing = self._missing()
        if not missing:
            return data
        head, tail = data[:at], data[at:]
        if head and not head.endswith(b"\r\n"):
            head += b"\r\n"
        separator = b"" if tail.startswith(b"\r\n") or not tail else b"\r\n"
        return head + missing + separator + tail

    def feed(self, chunk: bytes) -> bytes:
        """Take the next piece of the message; return what can be written to the spool now."""
        if self._done:
            return chunk
        self._buffer += chunk
        buf = self._buffer
        while True:
            end = buf.find(b"\r\n", self._scan)
            if end < 0:
                break
            line = bytes(buf[self._scan : end])
            if not line:
                return self._release(self._scan)
            if line[:1] in (b" ", b"\t"):
                if self._first_line:
                    return self._release(self._scan)
            else:
                name, colon, _ = line.partition(b":")
                if not colon or not _is_field_name(name):
                    return self._release(self._scan)
                self._seen.add(name.lower())
            self._first_line = False
            self._scan = end + 2
        if len(buf) > self.max_header:
            return self._release(None)
        return b""

    def finish(self) -> bytes:
        """The end of the message: whatever is still held, completed (a message of headers only)."""
        if self._done:
            return b""
        return self._release(len(self._buffer))


__all__ = ["MAX_HEADER_BLOCK", "HeaderCompleter", "SenderPolicy", "not_owned"]
