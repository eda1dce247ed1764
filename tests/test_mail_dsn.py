"""RFC 3464 delivery status notifications and the rule for where they go."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import Message

import pytest

from appliance.mail.dsn import (
    DELAYED,
    bounce_recipient,
    build_bounce,
    original_headers,
    status_of,
)
from appliance.mail.interfaces import Envelope, Reply

ORIGINAL = (
    b"Received: from client by mx; Mon, 1 Jan 2026 00:00:00 +0000\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@remote.test\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <orig-1@example.test>\r\n"
    b"\r\n"
    b"secret body text\r\n"
)
ARRIVAL = 1767225600.0  # 2026-01-01 00:00:00 UTC
NOW = ARRIVAL + 5 * 86400


def envelope(sender: str = "alice@example.test", **params: str) -> Envelope:
    return Envelope(
        sender=sender,
        recipients=("bob@remote.test", "carol@remote.test"),
        client_address="127.0.1.5",
        client_helo="client",
        listener="inside",
        protocol="ESMTP",
        received_at=ARRIVAL,
        mail_parameters=dict(params),
    )


FAILURES = [
    ("bob@remote.test", Reply(550, "5.1.1", "<bob@remote.test>: User unknown"), "mx.remote.test"),
    ("carol@remote.test", Reply(451, "4.4.1", "connect to mx.remote.test: refused"), None),
]


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def status_groups(report: Message) -> list[Message]:
    part = report.get_payload()[1]
    assert part.get_content_type() == "message/delivery-status"
    groups = part.get_payload()
    assert isinstance(groups, list)
    return groups


def test_failed_report_structure_parses_as_multipart_report() -> None:
    raw = build_bounce(envelope(), ORIGINAL, FAILURES, "mail.example.test", ARRIVAL, now=NOW)
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.test>"
    assert msg["To"] == "<alice@example.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"] == "Tue, 06 Jan 2026 00:00:00 +0000"
    assert re.fullmatch(r"<[^<>@\s]+@mail\.example\.test>", msg["Message-ID"])
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    text = parts[0].get_payload()
    assert "bob@remote.test" in text and "User unknown" in text
    returned = parts[2].get_payload()
    assert "Subject: lunch" in returned and "Message-ID: <orig-1@example.test>" in returned
    assert "secret body text" not in raw.decode()
    assert msg.defects == [] and all(p.defects == [] for p in parts)
    assert raw.endswith(b"--\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"")


def test_delivery_status_fields() -> None:
    raw = build_bounce(envelope(), ORIGINAL, FAILURES, "mail.example.test", ARRIVAL, now=NOW)
    per_message, bob, carol = status_groups(parse(raw))
    assert per_message["Reporting-MTA"] == "dns; mail.example.test"
    assert per_message["Arrival-Date"] == "Thu, 01 Jan 2026 00:00:00 +0000"
    assert bob["Final-Recipient"] == "rfc822; bob@remote.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.remote.test"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@remote.test>: User unknown"
    assert bob["Last-Attempt-Date"] == "Tue, 06 Jan 2026 00:00:00 +0000"
    assert carol["Status"] == "4.4.1"
    assert carol["Remote-MTA"] is None
    for group in (bob, carol):
        assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", group["Status"])
        assert group["Action"] in ("failed", "delayed", "delivered", "relayed", "expanded")


def test_delayed_report() -> None:
    raw = build_bounce(
        envelope(),
        ORIGINAL,
        FAILURES[1:],
        "mail.example.test",
        ARRIVAL,
        DELAYED,
        now=ARRIVAL + 4 * 3600,
        retry_until=ARRIVAL + 5 * 86400,
    )
    msg = parse(raw)
    assert "Delayed" in msg["Subject"]
    _, carol = status_groups(msg)
    assert carol["Action"] == "delayed"
    assert carol["Status"] == "4.4.1"
    assert carol["Will-Retry-Until"] == "Tue, 06 Jan 2026 00:00:00 +0000"
    assert "only a warning" in msg.get_payload()[0].get_payload()


def test_envid_and_explicit_recipient_and_message_id() -> None:
    raw = build_bounce(
        envelope("", ENVID="abc123"),
        ORIGINAL,
        FAILURES[:1],
        "mail.example.test.",
        ARRIVAL,
        to="postmaster@example.test",
        now=NOW,
        message_id="<fixed@mail.example.test>",
    )
    msg = parse(raw)
    assert msg["To"] == "<postmaster@example.test>"
    assert msg["Message-ID"] == "<fixed@mail.example.test>"
    per_message, _ = status_groups(msg)
    assert per_message["Original-Envelope-Id"] == "abc123"
    assert per_message["Reporting-MTA"] == "dns; mail.example.test"


def test_invalid_or_mismatched_enhanced_code_is_replaced() -> None:
    assert status_of(Reply(550, "", "no")) == "5.0.0"
    assert status_of(Reply(450, "5.1.1", "class mismatch")) == "4.0.0"
    assert status_of(Reply(554, "5.7.1", "x")) == "5.7.1"
    assert status_of(Reply(421, "4.4.2", "x")) == "4.4.2"
    assert status_of(Reply(550, "5.1.1; rm -rf", "x")) == "5.0.0"


def test_hostile_reply_text_cannot_inject_fields_or_break_the_mime() -> None:
    evil = Reply(550, "5.7.1", "bad\r\nStatus: 2.0.0\r\n\r\n--boundary\r\n\xe9\x00 " + "x" * 3000)
    raw = build_bounce(
        envelope(), ORIGINAL, [("bob@remote.test", evil, "mx")], "h", ARRIVAL, now=NOW
    )
    msg = parse(raw)
    _, bob = status_groups(msg)
    assert bob["Status"] == "5.7.1"
    assert bob.get_all("Status") == ["5.7.1"]
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    raw.decode("ascii")  # the report itself is pure ASCII here


def test_eight_bit_original_headers_are_marked() -> None:
    original = "Subject: caf\u00e9\r\n\r\nbody\r\n".encode()
    raw = build_bounce(envelope(), original, FAILURES[:1], "h", ARRIVAL, now=NOW)
    part = parse(raw).get_payload()[2]
    assert part["Content-Transfer-Encoding"] == "8bit"


def test_original_headers_extraction() -> None:
    assert original_headers(b"A: 1\nB: 2\n\nbody\n") == b"A: 1\r\nB: 2\r\n"
    assert original_headers(b"A: 1\r\nB: 2") == b"A: 1\r\nB: 2\r\n"
    assert original_headers(b"\r\nbody only\r\n") == b""
    assert original_headers(b"") == b""
    big = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50) for i in range(3000)) + b"\r\nbody"
    cut = original_headers(big, limit=1000)
    assert len(cut) <= 1000 and cut.endswith(b"\r\n") and cut.startswith(b"X-H0: ")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        build_bounce(envelope(), ORIGINAL, [], "h", ARRIVAL)
    with pytest.raises(ValueError):
        build_bounce(envelope(), ORIGINAL, FAILURES, "h", ARRIVAL, "bogus")


def test_bounce_recipient_rules() -> None:
    pm = "postmaster@example.test"
    # a normal message: the report goes to its sender
    assert bounce_recipient("alice@example.test", pm, ["bob@remote.test"]) == "alice@example.test"
    assert bounce_recipient("alice@example.test", pm, ["bob@x"], DELAYED) == "alice@example.test"
    # a bounce that bounced: never to <>, to the postmaster instead
    assert bounce_recipient("", pm, ["alice@remote.test"]) == pm
    # a bounce to the postmaster that failed: it stops there
    assert bounce_recipient("", pm, ["Postmaster@Example.test"]) is None
    # no delay warnings about bounces
    assert bounce_recipient("", pm, ["alice@remote.test"], DELAYED) is None
