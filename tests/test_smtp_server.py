"""Tests for appliance.mail.smtp: every command path on an in-memory transport.

The tests named ``test_regression_twisted_*`` each pin one defect of
``twisted.mail.smtp.ESMTP`` listed in research/twisted-notes.md 1.1.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from appliance.mail.interfaces import Reply
from tests.test_mail_relay import MATRIX, ROW_IDS
from tests.test_smtp_support import (
    HOSTNAME,
    INSIDE_CLIENT,
    OUTSIDE_CLIENT,
    Session,
    body_of,
    received_of,
    transaction,
)

REPLY_LINE = re.compile(r"\A[2-5][0-9][0-9][ -]")


# ---------------------------------------------------------------- greeting, EHLO, HELO


def test_greeting_names_the_host() -> None:
    session = Session()
    assert session.lines() == [f"220 {HOSTNAME} ESMTP ready"]


def test_tcp_nodelay_is_set() -> None:
    assert Session().transport.nodelay


def test_ehlo_advertises_extensions() -> None:
    session = Session(max_message_size=12345)
    session.output()
    assert session.ehlo() == [
        f"250-{HOSTNAME}",
        "250-PIPELINING",
        "250-SIZE 12345",
        "250-8BITMIME",
        "250 ENHANCEDSTATUSCODES",
    ]


def test_ehlo_advertises_starttls_only_with_tls_options() -> None:
    session = Session(tls_options=object())
    session.output()
    assert session.ehlo()[-1] == "250 STARTTLS"
    implicit = Session(tls_options=object(), implicit_tls=True)
    implicit.output()
    assert "STARTTLS" not in " ".join(implicit.ehlo())


def test_helo() -> None:
    session = Session()
    session.output()
    assert session.send(b"HELO client.remote.test\r\n") == [f"250 {HOSTNAME}"]
    assert session.codes(b"HELO\r\n") == ["501"]
    assert session.codes(b"EHLO\r\n") == ["501"]
    assert session.codes(b"EHLO a b\r\n") == ["501"]


def test_helo_session_without_parameters_works_and_is_logged_as_smtp() -> None:
    session = Session()
    session.output()
    session.send(b"HELO client.remote.test\r\n")
    assert session.codes(transaction()) == ["250", "250", "354", "250"]
    assert session.store.committed[0].envelope is not None
    assert session.store.committed[0].envelope.protocol == "SMTP"
    # ESMTP parameters need EHLO.
    assert session.send(b"MAIL FROM:<a@remote.test> SIZE=10\r\n") == [
        "555 5.5.4 Error: parameters need EHLO"
    ]


# ---------------------------------------------------------------- a full transaction


def test_full_transaction() -> None:
    session = Session()
    session.output()
    session.ehlo("Client.Remote.Test")
    replies = session.send(transaction(body=b"Subject: hi\r\n\r\nhello\r\n"))
    assert replies == [
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 Ok: queued as Q0001",
    ]
    [message] = session.store.committed
    assert body_of(message) == b"Subject: hi\r\n\r\nhello\r\n"
    envelope = message.envelope
    assert envelope is not None
    assert envelope.sender == "someone@remote.test"
    assert envelope.recipients == ("bob@example.test",)
    assert envelope.client_address == OUTSIDE_CLIENT
    assert envelope.client_helo == "Client.Remote.Test"
    assert envelope.listener == "outside"
    assert envelope.protocol == "ESMTP"
    assert envelope.received_at == session.clock.seconds()
    assert envelope.authenticated_user is None
    assert not session.closed
    assert session.send(b"QUIT\r\n") == ["221 2.0.0 Bye"]
    assert session.closed


def test_received_header() -> None:
    session = Session()
    session.output()
    session.ehlo("Client.Remote.Test")
    session.send(transaction())
    header = received_of(session.store.committed[0])
    assert header == (
        f"Received: from client.remote.test ([{OUTSIDE_CLIENT}]) by {HOSTNAME} with ESMTP id Q0001"
        " for <bob@example.test>; Wed, 18 Nov 2026 11:06:40 +0000\r\n"
    )


def test_received_header_without_for_when_several_recipients_and_bad_helo() -> None:
    session = Session(client="::1", listener="inside")
    session.output()
    session.ehlo("not_a(domain)")
    session.send(transaction(rcpts=("bob@example.test", "alice@example.test")))
    header = received_of(session.store.committed[0])
    assert header.startswith("Received: from [IPv6:::1] (helo=not_a?domain?) by ")
    assert " for " not in header
    assert session.store.committed[0].envelope.recipients == (  # type: ignore[union-attr]
        "bob@example.test",
        "alice@example.test",
    )


def test_duplicate_recipient_is_kept_once() -> None:
    session = Session()
    session.ehlo()
    session.send(transaction(rcpts=("bob@example.test", "bob@example.test")))
    assert session.store.committed[0].envelope.recipients == ("bob@example.test",)  # type: ignore[union-attr]


def test_null_sender_and_body_parameters() -> None:
    session = Session()
    session.ehlo()
    assert session.codes(b"MAIL FROM:<> BODY=8BITMIME SIZE=100\r\n") == ["250"]
    session.send(b"RCPT TO:<bob@example.test>\r\nDATA\r\n\xe9t\xe9\r\n.\r\n")
    [message] = session.store.committed
    assert message.envelope is not None
    assert message.envelope.sender == ""
    assert message.envelope.mail_parameters == {"BODY": "8BITMIME", "SIZE": "100"}
    assert body_of(message) == b"\xe9t\xe9\r\n"


def test_two_transactions_in_one_session() -> None:
    session = Session()
    session.ehlo()
    assert session.codes(transaction() + transaction()) == ["250", "250", "354", "250"] * 2
    assert [m.queue_id for m in session.store.committed] == ["Q0001", "Q0002"]


# ---------------------------------------------------------------- sequencing and simple commands


@pytest.mark.parametrize(
    ("setup", "command", "expected"),
    [
        (b"", b"MAIL FROM:<a@remote.test>", "503 5.5.1 Error: send HELO/EHLO first"),
        (b"EHLO x\r\n", b"RCPT TO:<bob@example.test>", "503 5.5.1 Error: need MAIL command"),
        (b"EHLO x\r\n", b"DATA", "503 5.5.1 Error: need MAIL command"),
        (
            b"EHLO x\r\nMAIL FROM:<a@remote.test>\r\n",
            b"DATA",
            "554 5.5.1 Error: no valid recipients",
        ),
        (
            b"EHLO x\r\nMAIL FROM:<a@remote.test>\r\n",
            b"MAIL FROM:<a@remote.test>",
            "503 5.5.1 Error: nested MAIL command",
        ),
        (
            b"EHLO x\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<nobody@example.test>\r\n",
            b"DATA",
            "554 5.5.1 Error: no valid recipients",
        ),
        (
            b"EHLO x\r\nMAIL FROM:<a@remote.test>\r\nRSET\r\n",
            b"RCPT TO:<bob@example.test>",
            "503 5.5.1 Error: need MAIL command",
        ),
        (
            b"EHLO x\r\nMAIL FROM:<a@remote.test>\r\nEHLO y\r\n",
            b"RCPT TO:<bob@example.test>",
            "503 5.5.1 Error: need MAIL command",
        ),
        (b"", b"DATA x", "501 5.5.4 Syntax: DATA"),
        (b"", b"RSET x", "501 5.5.4 Syntax: RSET"),
        (b"", b"NOOP", "250 2.0.0 Ok"),
        (b"", b"noop whatever", "250 2.0.0 Ok"),
        (b"", b"RSET", "250 2.0.0 Ok"),
        (
            b"",
            b"VRFY bob",
            "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
        ),
        (
            b"",
            b"VRFY nobody@example.test",
            "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
        ),
        (b"", b"VRFY", "501 5.5.4 Syntax: VRFY address"),
        (b"", b"EXPN staff", "502 5.5.1 Error: command not implemented"),
        (
            b"",
            b"HELP",
            "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS",
        ),
        (b"", b"XYZZY", "500 5.5.2 Error: command not recognized"),
        (b"", b"", "500 5.5.2 Error: command not recognized"),
        (b"", b"MAIL-FROM:<a@b>", "500 5.5.2 Error: command not recognized"),
        (b"", b"BDAT 10 LAST", "500 5.5.2 Error: command not recognized"),
        (b"", b"AUTH PLAIN AGFsaWNlAHB3", "500 5.5.2 Error: command not recognized"),
        (b"", b"STARTTLS", "502 5.5.1 Error: command not implemented"),
        (b"", b"NOOP\nMAIL FROM:<a@b.test>", "500 5.5.2 Error: bare CR, LF or NUL in command"),
        (b"", b"NO\x00OP", "500 5.5.2 Error: bare CR, LF or NUL in command"),
        (
            b"EHLO x\r\n",
            b"MAIL FROM:<a@remote.test> SIZE=99999999999",
            "552 5.3.4 Message size exceeds fixed limit",
        ),
        (
            b"EHLO x\r\n",
            b"MAIL FROM:<a@remote.test> FOO=bar",
            "555 5.5.4 Unsupported parameter FOO",
        ),
        (b"EHLO x\r\n", b"MAIL FROM:a@remote.test", "501 5.1.7 Address must be enclosed in <>"),
        (
            b"EHLO x\r\n",
            b"MAIL FROM:<\xe4@remote.test>",
            "553 5.6.7 Non-ASCII addresses are not supported",
        ),
        (
            b"EHLO x\r\nMAIL FROM:<>\r\n",
            b"RCPT TO:<bob@example.test> NOTIFY=NEVER",
            "555 5.5.4 Unsupported parameter NOTIFY",
        ),
        (b"EHLO x\r\nMAIL FROM:<>\r\n", b"RCPT TO:<>", "501 5.1.3 Empty recipient address"),
    ],
)
def test_command(setup: bytes, command: bytes, expected: str) -> None:
    session = Session()
    session.send(setup)
    session.output()
    assert session.send(command + b"\r\n") == [expected]
    assert not session.closed


def test_commands_are_case_insensitive() -> None:
    session = Session()
    session.output()
    assert session.codes(
        b"ehlo x\r\nmail from:<a@remote.test>\r\nrcpt to:<bob@example.test>\r\n"
    ) == [
        "250",
        "250",
        "250",
        "250",
        "250",
        "250",
        "250",
    ]


def test_quit_ignores_what_follows() -> None:
    session = Session()
    session.output()
    assert session.send(b"QUIT\r\nNOOP\r\n") == ["221 2.0.0 Bye"]
    assert session.closed
    assert session.send(b"NOOP\r\n") == []


def test_forbidden_http_command_closes() -> None:
    session = Session()
    session.output()
    assert session.send(b"GET / HTTP/1.0\r\n") == [
        f"421 4.7.0 {HOSTNAME} Error: not an SMTP client"
    ]
    assert session.closed


def test_postmaster_without_domain() -> None:
    session = Session()
    session.ehlo()
    session.output()
    assert session.codes(b"MAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\n") == ["250", "250"]
    assert session.recipients.asked == [f"postmaster@{HOSTNAME}"]


# ---------------------------------------------------------------- recipients and relay


@pytest.mark.parametrize("listener", ["outside", "inside"])
@pytest.mark.parametrize(("client", "sender", "recipient", "accepted"), MATRIX, ids=ROW_IDS)
def test_relay_matrix_through_the_protocol(
    listener: str, client: str, sender: str, recipient: str, accepted: bool
) -> None:
    session = Session(client=client, listener=listener)
    session.recipients.known.add("friend@elsewhere.test")
    session.ehlo()
    session.send(f"MAIL FROM:<{sender}>\r\n".encode())
    replies = session.send(f"RCPT TO:<{recipient}>\r\n".encode())
    if accepted:
        assert replies == ["250 2.1.5 Ok"]
    else:
        assert replies == ["550 5.7.1 Relaying denied"]


def test_recipient_check_only_for_domains_we_accept_for() -> None:
    session = Session(client=INSIDE_CLIENT)
    session.ehlo()
    session.send(b"MAIL FROM:<alice@example.test>\r\n")
    assert session.codes(b"RCPT TO:<x@elsewhere.test>\r\nRCPT TO:<y@backup.test>\r\n") == [
        "250",
        "550",
    ]
    assert session.recipients.asked == ["y@backup.test"]


def test_recipient_check_reply_is_sent_as_is() -> None:
    session = Session()
    session.recipients.answers["busy@example.test"] = Reply(451, "4.4.3", "Directory unavailable")
    session.ehlo()
    session.send(b"MAIL FROM:<a@remote.test>\r\n")
    assert session.send(b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<busy@example.test>\r\n") == [
        "550 5.1.1 User unknown",
        "451 4.4.3 Directory unavailable",
    ]


def test_authenticated_user_may_relay() -> None:
    session = Session()
    session.ehlo()
    session.protocol.authenticated_user = "alice@example.test"
    session.send(b"MAIL FROM:<alice@example.test>\r\n")
    assert session.codes(b"RCPT TO:<x@elsewhere.test>\r\n") == ["250"]
    assert session.protocol.protocol_name() == "ESMTPA"


def test_recipient_limit() -> None:
    session = Session(max_recipients=2)
    session.ehlo()
    session.send(b"MAIL FROM:<a@remote.test>\r\n")
    assert session.send(
        b"RCPT TO:<bob@example.test>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
    ) == ["250 2.1.5 Ok", "250 2.1.5 Ok", "452 4.5.3 Error: too many recipients"]


def test_regression_twisted_no_recipient_limit() -> None:
    session = Session()
    session.recipients.known |= {f"u{i}@example.test" for i in range(150)}
    session.ehlo()
    session.send(b"MAIL FROM:<a@remote.test>\r\n")
    replies = session.send(
        b"".join(f"RCPT TO:<u{i}@example.test>\r\n".encode() for i in range(101))
    )
    assert replies[:100] == ["250 2.1.5 Ok"] * 100
    assert replies[100] == "452 4.5.3 Error: too many recipients"


# ---------------------------------------------------------------- limits


def test_command_line_limit() -> None:
    session = Session()
    session.output()
    ok = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    assert len(ok) == 512
    assert session.codes(ok) == ["250"]
    too_long = b"NOOP " + b"x" * (512 - 6) + b"\r\n"
    assert session.send(too_long) == ["500 5.5.2 Error: line too long"]
    assert session.send(b"NOOP " + b"x" * 100_000) == []
    assert session.send(b"y" * 1000 + b"\r\nNOOP\r\n") == [
        "500 5.5.2 Error: line too long",
        "250 2.0.0 Ok",
    ]


def test_long_line_split_at_cr_lf() -> None:
    session = Session()
    session.output()
    assert session.send(b"NOOP " + b"x" * 600 + b"\r") == []
    assert session.send(b"\nNOOP\r\n") == ["500 5.5.2 Error: line too long", "250 2.0.0 Ok"]


def test_error_limit_closes_with_421() -> None:
    session = Session(max_errors=3)
    session.output()
    assert session.send(b"A\r\nB\r\nC\r\nNOOP\r\n") == [
        "500 5.5.2 Error: command not recognized",
        "500 5.5.2 Error: command not recognized",
        "500 5.5.2 Error: command not recognized",
        f"421 4.7.0 {HOSTNAME} Error: too many errors",
    ]
    assert session.closed


def test_idle_timeout() -> None:
    session = Session(idle_timeout=60)
    session.output()
    session.clock.advance(59)
    session.send(b"NOOP\r\n")
    session.clock.advance(59)
    assert not session.closed
    session.clock.advance(1)
    assert session.lines() == [f"421 4.4.2 {HOSTNAME} Error: timeout exceeded"]
    assert session.closed


def test_idle_timeout_in_data_aborts_the_message() -> None:
    session = Session(idle_timeout=60)
    session.ehlo()
    session.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\npartial")
    session.clock.advance(61)
    assert session.lines() == [f"421 4.4.2 {HOSTNAME} Error: timeout exceeded"]
    [message] = session.store.messages
    assert message.aborted and not message.committed


def test_timer_cancelled_on_connection_lost() -> None:
    session = Session()
    session.protocol.connectionLost()
    assert session.clock.getDelayedCalls() == []


def test_size_limit_after_data() -> None:
    session = Session(max_message_size=100)
    session.ehlo()
    replies = session.send(transaction(body=b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n"))
    assert replies[-1] == "552 5.3.4 Error: message too big for system"
    [message] = session.store.messages
    assert message.aborted and not message.committed
    assert session.store.committed == []
    # The session goes on.
    assert session.codes(transaction(body=b"small\r\n")) == ["250", "250", "354", "250"]


def test_size_exactly_at_limit_is_accepted() -> None:
    session = Session(max_message_size=10)
    session.ehlo()
    assert session.codes(transaction(body=b"12345678\r\n"))[-1] == "250"
    assert session.codes(transaction(body=b"123456789\r\n"))[-1] == "552"


@pytest.mark.parametrize("length", [998, 999, 5000, 100_000])
def test_data_line_limit(length: int) -> None:
    session = Session()
    session.ehlo()
    replies = session.send(transaction(body=b"a\r\n" + b"x" * length + b"\r\nb\r\n"))
    if length <= 998:
        assert replies[-1] == "250 2.0.0 Ok: queued as Q0001"
    else:
        assert replies[-1] == "500 5.5.2 Error: message line too long"
        assert session.store.committed == []


def test_data_line_limit_across_chunks() -> None:
    session = Session()
    session.ehlo()
    session.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
    for _ in range(10):
        assert session.send(b"x" * 100) == []
    assert session.send(b"\r\n.\r\n") == ["500 5.5.2 Error: message line too long"]
    session.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
    for _ in range(9):
        session.send(b"x" * 110 + b"\r\n" + b"y" * 100)
    assert session.send(b"\r\n.\r\n") == ["250 2.0.0 Ok: queued as Q0002"]


def test_regression_twisted_long_data_line_does_not_turn_body_into_commands() -> None:
    session = Session()
    session.ehlo()
    body = (
        b"x" * 20_000
        + b"\r\nMAIL FROM:<evil@remote.test>\r\nRCPT TO:<victim@elsewhere.test>\r\nDATA\r\nspam\r\n"
    )
    replies = session.send(transaction(body=body))
    assert replies == [
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>",
        "500 5.5.2 Error: message line too long",
    ]
    assert session.store.committed == []


# ---------------------------------------------------------------- DATA content


@pytest.mark.parametrize(
    ("body", "stored"),
    [
        (b"", b""),
        (b"..\r\n", b".\r\n"),
        (b"..hidden\r\n", b".hidden\r\n"),
        (b"a\r\n...\r\nb\r\n", b"a\r\n..\r\nb\r\n"),
        (b". \r\n", b" \r\n"),
        (b"a.\r\n.b\r\n", b"a.\r\nb\r\n"),
        (b"bare\nlf\r\n", b"bare\r\nlf\r\n"),
        (b"bare\rcr\r\n", b"bare\r\ncr\r\n"),
        (b"crcr\r\r\n", b"crcr\r\n\r\n"),
        (b"\n\n\r\n", b"\r\n\r\n\r\n"),
        (b"8bit \xff\x00\r\n", b"8bit \xff\x00\r\n"),
    ],
)
def test_dot_unstuffing_and_line_ends(body: bytes, stored: bytes) -> None:
    for send in ("send", "send_slowly"):
        session = Session()
        session.ehlo()
        replies = getattr(session, send)(transaction(body=body))
        assert replies[-1] == "250 2.0.0 Ok: queued as Q0001"
        assert body_of(session.store.committed[0]) == stored


def test_terminator_first_line_is_an_empty_message() -> None:
    session = Session()
    session.ehlo()
    session.send(b"MAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
    assert session.send(b".\r\nNOOP\r\n") == ["250 2.0.0 Ok: queued as Q0001", "250 2.0.0 Ok"]
    assert body_of(session.store.committed[0]) == b""


SMUGGLING_VARIANTS = [
    b"\n.\n",
    b"\r.\r",
    b"\r\n.\n",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\n.\r",
    b"\r.\n",
    b"\r\n.\x00\r\n",
    b"\r\n. \r\n",
    b"\r\r\n.\r\r\n",
    b"\n\r\n.\n\r\n",
]


@pytest.mark.parametrize("variant", SMUGGLING_VARIANTS, ids=[repr(v) for v in SMUGGLING_VARIANTS])
@pytest.mark.parametrize("mode", ["send", "send_slowly"])
def test_smuggling_variants_stay_inside_one_message(variant: bytes, mode: str) -> None:
    session = Session(client=OUTSIDE_CLIENT)
    session.ehlo()
    smuggled = (
        b"MAIL FROM:<ceo@example.test>\r\nRCPT TO:<victim@elsewhere.test>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nsmuggled\r\n"
    )
    body = b"Subject: innocent\r\n\r\nhello" + variant + smuggled
    replies = getattr(session, mode)(transaction(body=body))
    assert replies == [
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 Ok: queued as Q0001",
    ]
    [message] = session.store.messages
    assert message.committed
    content = body_of(message)
    assert content.startswith(b"Subject: innocent\r\n\r\nhello")
    assert b"victim@elsewhere.test" in content and content.endswith(b"smuggled\r\n")
    # The stored form only has CRLF line ends.
    assert content.count(b"\r") == content.count(b"\n") == content.count(b"\r\n")


def test_chunk_boundaries_inside_the_terminator() -> None:
    wire = transaction(body=b"a\r\n..b\r\n")
    start = wire.index(b"DATA\r\n") + 6
    for cut in range(start, len(wire)):
        for cut2 in range(cut, len(wire)):
            session = Session()
            session.ehlo()
            session.send(wire[:cut])
            session.send(wire[cut:cut2])
            replies = session.send(wire[cut2:] + b"NOOP\r\n")
            assert session.store.committed, (cut, cut2)
            assert body_of(session.store.committed[0]) == b"a\r\n.b\r\n"
            assert replies[-1] == "250 2.0.0 Ok"


# ---------------------------------------------------------------- pipelining and async checks


def test_regression_twisted_pipelining_replies_in_order_with_async_checks() -> None:
    session = Session()
    session.recipients.manual = True
    session.ehlo()
    session.send(b"MAIL FROM:<a@remote.test>\r\n")
    replies = session.send(
        b"RCPT TO:<bob@example.test>\r\nRCPT TO:<alice@example.test>\r\n"
        b"RCPT TO:<nobody@example.test>\r\nDATA\r\n"
    )
    assert replies == []
    assert session.transport.producerState == "paused"
    # Only the first recipient has been asked: commands run one at a time.
    assert list(session.recipients.pending) == ["bob@example.test"]
    session.recipients.pending["bob@example.test"].callback(None)
    assert session.lines() == ["250 2.1.5 Ok"]
    session.recipients.pending["alice@example.test"].callback(None)
    assert session.lines() == ["250 2.1.5 Ok"]
    session.recipients.pending["nobody@example.test"].callback(Reply(550, "5.1.1", "User unknown"))
    assert session.lines() == ["550 5.1.1 User unknown", "354 End data with <CR><LF>.<CR><LF>"]
    assert session.transport.producerState == "producing"
    assert session.send(b"hi\r\n.\r\n") == ["250 2.0.0 Ok: queued as Q0001"]
    assert session.store.committed[0].envelope.recipients == (  # type: ignore[union-attr]
        "bob@example.test",
        "alice@example.test",
    )


def test_async_checks_fired_out_of_order_by_the_backend() -> None:
    """Two sessions share a slow directory that answers the later question first."""
    first, second = Session(), Session()
    for session in (first, second):
        session.recipients.manual = True
        session.ehlo()
        session.send(b"MAIL FROM:<a@remote.test>\r\n")
        session.send(b"RCPT TO:<bob@example.test>\r\nNOOP\r\nRCPT TO:<alice@example.test>\r\n")
    second.recipients.pending["bob@example.test"].callback(Reply(451, "4.4.3", "later"))
    first.recipients.pending["bob@example.test"].callback(None)
    assert second.lines() == ["451 4.4.3 later", "250 2.0.0 Ok"]
    assert first.lines() == ["250 2.1.5 Ok", "250 2.0.0 Ok"]


def test_replies_wait_for_the_commit() -> None:
    session = Session()
    session.store.commit_mode = "manual"
    session.ehlo()
    replies = session.send(transaction() + b"NOOP\r\nQUIT\r\n")
    assert replies[-1] == "354 End data with <CR><LF>.<CR><LF>"
    assert session.store.committed == []
    [(message, d)] = session.store.pending_commits
    d.callback(message.queue_id)
    assert session.lines() == ["250 2.0.0 Ok: queued as Q0001", "250 2.0.0 Ok", "221 2.0.0 Bye"]


def test_connection_lost_while_a_check_is_pending() -> None:
    session = Session()
    session.recipients.manual = True
    session.ehlo()
    session.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\nNOOP\r\n")
    session.protocol.connectionLost()
    session.recipients.pending["bob@example.test"].callback(None)
    assert session.lines() == []


def test_connection_lost_while_commit_is_pending() -> None:
    session = Session()
    session.store.commit_mode = "manual"
    session.ehlo()
    session.send(transaction())
    session.protocol.connectionLost()
    [(message, d)] = session.store.pending_commits
    d.callback(message.queue_id)
    assert session.lines() == []


def test_check_sender_hook_can_be_async() -> None:
    refusals: dict[str, Deferred[Reply | None]] = {}

    class Strict(type(Session().protocol)):  # type: ignore[misc]
        def check_sender(self, path: Any) -> Deferred[Reply | None]:
            d: Deferred[Reply | None] = Deferred()
            refusals[path.address] = d
            return d

    session = Session()
    session.factory.protocol = Strict
    session.protocol = session.factory.buildProtocol(None)
    session.protocol.makeConnection(session.transport)
    session.output()
    session.ehlo()
    assert session.send(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<bob@example.test>\r\n") == []
    refusals["x@remote.test"].callback(Reply(553, "5.7.1", "Sender not owned"))
    assert session.lines() == ["553 5.7.1 Sender not owned", "503 5.5.1 Error: need MAIL command"]


# ---------------------------------------------------------------- failures never escape


def test_regression_twisted_exception_in_check_does_not_escape() -> None:
    session = Session()
    session.recipients.raise_error = True
    session.ehlo()
    session.send(b"MAIL FROM:<a@remote.test>\r\n")
    assert session.send(b"RCPT TO:<bob@example.test>\r\nNOOP\r\n") == [
        "451 4.3.0 Error: internal error, try again later",
        "250 2.0.0 Ok",
    ]
    assert not session.closed


def test_failing_deferred_in_check_gives_451() -> None:
    session = Session()
    session.recipients.manual = True
    session.ehlo()
    session.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\n")
    session.recipients.pending["bob@example.test"].errback(RuntimeError("boom"))
    assert session.lines() == ["451 4.3.0 Error: internal error, try again later"]


def test_exception_in_data_received_gives_421(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session()
    session.output()

    def explode() -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(session.protocol, "_process", explode)
    session.protocol.dataReceived(b"NOOP\r\n")
    assert session.lines() == [f"421 4.3.0 {HOSTNAME} Internal error, closing"]
    assert session.closed


def test_spool_begin_failure() -> None:
    session = Session()
    session.store.fail_begin = True
    session.ehlo()
    session.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\n")
    assert session.send(b"DATA\r\n") == ["452 4.3.1 Error: insufficient system storage"]
    assert session.send(b"NOOP\r\n") == ["250 2.0.0 Ok"]


@pytest.mark.parametrize("mode", ["fail", "raise"])
def test_commit_failure(mode: str) -> None:
    session = Session()
    session.store.commit_mode = mode
    session.ehlo()
    replies = session.send(transaction())
    assert replies[-1] == "452 4.3.1 Error: insufficient system storage"
    [message] = session.store.messages
    assert message.aborted and not message.committed


def test_write_failure_reads_to_the_end_then_452() -> None:
    session = Session()
    session.ehlo()
    session.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
    session.store.fail_write = True
    assert session.send(b"line\r\nRCPT TO:<x@y.test>\r\n") == []
    assert session.send(b".\r\n") == ["452 4.3.1 Error: insufficient system storage"]
    assert session.store.messages[0].aborted


# ---------------------------------------------------------------- STARTTLS (in memory)


def test_regression_twisted_starttls_discards_pipelined_plaintext() -> None:
    options = object()
    session = Session(tls_options=options)
    session.ehlo()
    replies = session.send(
        b"STARTTLS\r\nMAIL FROM:<evil@remote.test>\r\nRCPT TO:<x@elsewhere.test>\r\n"
    )
    assert replies == ["220 2.0.0 Ready to start TLS"]
    assert session.transport.tls_options is options
    # The 220 went out before the handshake started.
    assert session.transport.written_before_tls is not None
    assert session.transport.written_before_tls.endswith(b"220 2.0.0 Ready to start TLS\r\n")
    # Nothing of the injected plaintext survived: a new EHLO is needed and no MAIL is active.
    assert session.send(b"RCPT TO:<bob@example.test>\r\n") == ["503 5.5.1 Error: need MAIL command"]


def test_regression_twisted_state_reset_after_starttls() -> None:
    session = Session(tls_options=object())
    session.ehlo()
    session.protocol.authenticated_user = "mallory"
    session.send(b"MAIL FROM:<a@remote.test>\r\n")
    assert session.send(b"STARTTLS\r\n") == ["220 2.0.0 Ready to start TLS"]
    assert session.protocol.authenticated_user is None
    assert session.send(b"MAIL FROM:<a@remote.test>\r\n") == [
        "503 5.5.1 Error: send HELO/EHLO first"
    ]
    replies = session.ehlo()
    assert "250-STARTTLS" not in replies and "250 STARTTLS" not in replies
    assert session.send(b"STARTTLS\r\n") == ["503 5.5.1 Error: TLS already active"]
    session.send(transaction())
    assert session.store.committed[0].envelope.protocol == "ESMTPS"  # type: ignore[union-attr]
    assert " with ESMTPS id " in received_of(session.store.committed[0])


def test_starttls_with_parameters() -> None:
    session = Session(tls_options=object())
    session.output()
    assert session.send(b"STARTTLS now\r\n") == ["501 5.5.4 Syntax: STARTTLS"]
    assert session.transport.tls_options is None


def test_require_tls() -> None:
    session = Session(tls_options=object(), require_tls=True)
    session.ehlo()
    assert session.send(b"MAIL FROM:<a@remote.test>\r\n") == [
        "530 5.7.0 Must issue a STARTTLS command first"
    ]
    session.send(b"STARTTLS\r\n")
    session.ehlo()
    assert session.codes(b"MAIL FROM:<a@remote.test>\r\n") == ["250"]


def test_regression_twisted_auth_not_offered_before_tls() -> None:
    session = Session(tls_options=object())
    session.output()
    assert not any("AUTH" in line for line in session.ehlo())
    assert session.codes(b"AUTH PLAIN\r\n") == ["500"]


def test_regression_twisted_size_and_enhanced_codes() -> None:
    session = Session(max_message_size=1000)
    session.output()
    replies = session.ehlo()
    assert "250-SIZE 1000" in replies and "250 ENHANCEDSTATUSCODES" in replies
    assert session.send(b"MAIL FROM:<a@remote.test> SIZE=1001\r\n") == [
        "552 5.3.4 Message size exceeds fixed limit"
    ]


# ---------------------------------------------------------------- interception hook, logging


def test_intercept_next_line_hook() -> None:
    session = Session()
    session.output()
    seen: list[bytes] = []

    def handler(line: bytes) -> None:
        seen.append(line)
        session.protocol.reply(235, "2.7.0", "Ok")

    session.protocol.intercept_next_line(handler)
    assert session.send(b"dGVzdA==\r\nNOOP\r\n") == ["235 2.7.0 Ok", "250 2.0.0 Ok"]
    assert seen == [b"dGVzdA=="]


def test_every_reply_is_well_formed_and_enhanced() -> None:
    session = Session(tls_options=object())
    data = (
        b"EHLO x\r\nHELO x\r\nFOO\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\n"
        b"RCPT TO:<x@elsewhere.test>\r\nRSET\r\nNOOP\r\nVRFY x\r\nHELP\r\nEXPN x\r\n"
        + transaction()
        + b"QUIT\r\n"
    )
    lines = session.send(data)
    for line in lines:
        assert REPLY_LINE.match(line), line
        code = line[:3]
        if code not in ("220", "354") and not line.startswith("250-") and line != f"250 {HOSTNAME}":
            if not line.startswith("250 ") or "Ok" in line:
                assert re.match(r"\A\d{3} [245]\.\d{1,3}\.\d{1,3} ", line), line


def test_log_lines() -> None:
    events: list[LogEvent] = []
    observer: Any = events.append
    globalLogPublisher.addObserver(observer)
    try:
        session = Session()
        session.ehlo()
        session.send(transaction() + b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<x@elsewhere.test>\r\n")
    finally:
        globalLogPublisher.removeObserver(observer)
    texts = [formatEvent(e) for e in events if e.get("log_namespace") == "appliance.mail.smtp"]
    assert (
        f"Q0001: client={OUTSIDE_CLIENT} listener=outside from=<someone@remote.test> "
        "to=<bob@example.test> size=22 reply=250 2.0.0"
    ) in texts
    assert (
        f"reject: RCPT from {OUTSIDE_CLIENT}: 550 5.7.1 Relaying denied; "
        "sender=<a@remote.test> recipient=<x@elsewhere.test>"
    ) in texts


def test_junk_commands_count_as_errors_past_the_limit() -> None:
    session = Session(max_junk_commands=5, max_errors=3)
    session.output()
    replies = session.send(b"NOOP\r\n" * 5 + b"RSET\r\nVRFY x\r\nHELP\r\nNOOP\r\n")
    assert replies == ["250 2.0.0 Ok"] * 6 + [
        "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
        "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS",
        f"421 4.7.0 {HOSTNAME} Error: too many errors",
    ]
    assert session.closed


def test_large_pipelined_burst_is_linear() -> None:
    session = Session(max_junk_commands=10**9)
    session.output()
    burst = b"NOOP\r\n" * 50_000
    assert session.send(burst) == ["250 2.0.0 Ok"] * 50_000


def test_refused_message_is_logged_with_its_queue_id() -> None:
    events: list[LogEvent] = []
    observer: Any = events.append
    globalLogPublisher.addObserver(observer)
    try:
        session = Session(max_message_size=3)
        session.ehlo()
        session.send(transaction(body=b"too big\r\n"))
    finally:
        globalLogPublisher.removeObserver(observer)
    texts = [formatEvent(e) for e in events if e.get("log_namespace") == "appliance.mail.smtp"]
    assert (
        f"Q0001: client={OUTSIDE_CLIENT} listener=outside from=<someone@remote.test> "
        "to=<bob@example.test> size=9 reply=552 5.3.4"
    ) in texts


def test_regression_twisted_helo_is_required() -> None:
    # twisted.mail never enforced HELO and then crashed building the Received header.
    session = Session()
    session.output()
    assert session.send(transaction()) == [
        "503 5.5.1 Error: send HELO/EHLO first",
        "503 5.5.1 Error: need MAIL command",
        "503 5.5.1 Error: need MAIL command",
        "500 5.5.2 Error: command not recognized",
        "500 5.5.2 Error: command not recognized",
        "500 5.5.2 Error: command not recognized",
        "500 5.5.2 Error: command not recognized",
    ]
    assert session.store.messages == []


def test_connection_limits() -> None:
    first = Session(max_connections=3, max_connections_per_client=2)
    factory = first.factory

    def connect(client: str) -> Session:
        session = object.__new__(Session)
        session.__dict__.update(first.__dict__)
        session.protocol = factory.buildProtocol(None)
        session.transport = type(first.transport)(peerAddress=IPv4Address("TCP", client, 1))
        session._seen = 0
        session.protocol.makeConnection(session.transport)
        return session

    second = connect(OUTSIDE_CLIENT)
    assert second.lines() == [f"220 {HOSTNAME} ESMTP ready"]
    third = connect(OUTSIDE_CLIENT)
    assert third.lines() == [f"421 4.7.0 {HOSTNAME} Error: too many connections"]
    assert third.closed
    third.protocol.connectionLost()
    other = connect(INSIDE_CLIENT)
    assert other.lines() == [f"220 {HOSTNAME} ESMTP ready"]
    assert connect("127.0.2.99").lines() == [f"421 4.7.0 {HOSTNAME} Error: too many connections"]
    assert factory.connections == 3
    second.protocol.connectionLost()
    second.protocol.connectionLost()
    assert factory.connections == 2
    assert factory.connections_by_client == {OUTSIDE_CLIENT: 1, INSIDE_CLIENT: 1}
    assert connect(OUTSIDE_CLIENT).lines() == [f"220 {HOSTNAME} ESMTP ready"]


def test_disconnect_in_data_aborts_the_message() -> None:
    session = Session()
    session.ehlo()
    session.send(
        b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nhalf a message\r\n"
    )
    session.protocol.connectionLost()
    [message] = session.store.messages
    assert message.aborted and not message.committed
    assert session.send(b".\r\n") == []


def test_input_held_during_a_check_is_bounded() -> None:
    session = Session()
    session.recipients.manual = True
    session.ehlo()
    session.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\n")
    assert session.send(b"NOOP\r\n" * 100_000) == []
    assert session.send(b"NOOP\r\n" * 100_000) == [f"421 4.7.0 {HOSTNAME} Error: too much input"]
    assert session.closed


@pytest.mark.parametrize("verb", [b"AUTH", b"MAIL", b"RCPT", b"EHLO", b"HELO", b"VRFY", b"DATA"])
def test_regression_twisted_bare_commands_do_not_raise(verb: bytes) -> None:
    # twisted.mail raised IndexError out of dataReceived for a bare "AUTH".
    session = Session(tls_options=object())
    session.ehlo()
    session.send(b"MAIL FROM:<>\r\n" if verb == b"RCPT" else b"")
    replies = session.send(verb + b"\r\n" + verb + b" \r\n")
    assert [r[:1] for r in replies] == ["5", "5"]
    assert not any(" 4.3.0 " in r for r in replies)
    assert not session.closed
