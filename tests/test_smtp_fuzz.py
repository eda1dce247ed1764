"""Property tests for appliance.mail.smtp: random input never breaks the session.

Every input, however it is split into TCP segments, must produce only
well-formed reply lines, no internal error, and DATA must store exactly what a
simple line-by-line reference of RFC 5321 4.1.1.4 / 4.5.2 says.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.mail.interfaces import Reply
from tests.test_smtp_support import Session, body_of

REPLY_LINE = re.compile(rb"\A[2-5][0-9][0-9](?:[ -][\x20-\x7e]*)?\Z")

COMMANDS = [
    b"EHLO client.test",
    b"HELO client.test",
    b"EHLO",
    b"MAIL FROM:<someone@remote.test>",
    b"MAIL FROM:<>",
    b"MAIL FROM:<a@remote.test> SIZE=100 BODY=8BITMIME",
    b"MAIL FROM:<a@remote.test> SIZE=999999999999",
    b'MAIL FROM:<"q\\"x"@[127.0.0.1]>',
    b"MAIL FROM:<@a,@b:c@d.test>",
    b"MAIL FROM:bad",
    b"RCPT TO:<bob@example.test>",
    b"RCPT TO:<nobody@example.test>",
    b"RCPT TO:<x@elsewhere.test>",
    b"RCPT TO:<Postmaster>",
    b"RCPT TO:<y@backup.test>",
    b"RCPT TO:<bob@example.test> NOTIFY=NEVER",
    b"DATA",
    b"hello",
    b".",
    b"..",
    b"RSET",
    b"NOOP",
    b"VRFY bob",
    b"EXPN x",
    b"HELP",
    b"STARTTLS",
    b"AUTH PLAIN",
    b"QUIT",
    b"\xff\xfe",
    b"MAIL FROM:<\xc3\xa9@x.test>",
    b"x" * 600,
    b"y" * 1200,
    b"",
]
SEPARATORS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""]


def check_output(session: Session) -> None:
    output = session.transport.value()
    assert output == b"" or output.endswith(b"\r\n")
    for line in output.split(b"\r\n")[:-1]:
        assert REPLY_LINE.match(line), line
        assert len(line) <= 510
        # 4.3.0 is only ever an internal error: nothing may have gone wrong inside.
        assert b" 4.3.0 " not in line, line


def feed(session: Session, data: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(data) + 1) for c in cuts})
    start = 0
    for point in [*points, len(data)]:
        session.protocol.dataReceived(data[start:point])
        start = point


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.sampled_from(COMMANDS), st.sampled_from(SEPARATORS)), max_size=40),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
    st.sampled_from(["outside", "inside"]),
    st.booleans(),
)
def test_random_command_sequences(
    commands: list[tuple[bytes, bytes]], cuts: list[int], listener: str, tls: bool
) -> None:
    client = "127.0.1.9" if listener == "inside" else "127.0.2.9"
    session = Session(
        client=client,
        listener=listener,
        tls_options=object() if tls else None,
        max_message_size=2000,
        max_errors=15,
    )
    data = b"".join(command + separator for command, separator in commands)
    feed(session, data, cuts)
    check_output(session)
    for message in session.store.committed:
        assert message.envelope is not None and message.envelope.recipients
        content = body_of(message)
        assert content.count(b"\r") == content.count(b"\n") == content.count(b"\r\n")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.lists(st.integers(min_value=0, max_value=3000), max_size=8))
def test_random_bytes(data: bytes, cuts: list[int]) -> None:
    session = Session(tls_options=object())
    feed(session, data, cuts)
    check_output(session)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.lists(st.integers(min_value=0, max_value=3000), max_size=8))
def test_random_bytes_in_data(data: bytes, cuts: list[int]) -> None:
    session = Session()
    session.send(b"EHLO c.test\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
    feed(session, data, cuts)
    check_output(session)


def reference_data(wire: bytes) -> bytes | None:
    """What RFC 5321 says DATA stores, by plain line splitting; None if not terminated."""
    lines: list[bytes] = []
    rest = wire
    while True:
        end = rest.find(b"\r\n")
        if end < 0:
            return None
        line, rest = rest[:end], rest[end + 2 :]
        if line == b".":
            break
        lines.append((line[1:] if line.startswith(b".") else line) + b"\r\n")
    content = b"".join(lines)
    return content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n."]), max_size=60),
    st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_data_matches_the_reference_however_it_is_split(
    pieces: list[bytes], cuts: list[int]
) -> None:
    wire = b"".join(pieces) + b"\r\n.\r\n"
    expected = reference_data(wire)
    assert expected is not None
    session = Session()
    session.send(b"EHLO c.test\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
    feed(session, wire, cuts)
    check_output(session)
    [message] = session.store.messages
    assert message.committed
    assert body_of(message) == expected


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(COMMANDS), st.sampled_from(SEPARATORS)), max_size=30),
    st.lists(st.integers(min_value=0, max_value=5_000), max_size=8),
    st.lists(st.sampled_from(["ok", "refuse", "fail", "later"]), max_size=40),
)
def test_random_sequences_with_a_slow_directory(
    commands: list[tuple[bytes, bytes]], cuts: list[int], answers: list[str]
) -> None:
    """Recipient checks answer late (or never), with any outcome, between any two segments."""
    session = Session(max_errors=15)
    session.recipients.manual = True
    data = b"".join(command + separator for command, separator in commands)
    points = sorted({c % (len(data) + 1) for c in cuts})
    start = 0
    pending_answers = list(answers)

    def answer_pending() -> None:
        while session.recipients.pending and pending_answers:
            address, d = session.recipients.pending.popitem()
            how = pending_answers.pop(0)
            if how == "ok":
                d.callback(None)
            elif how == "refuse":
                d.callback(Reply(550, "5.1.1", "User unknown"))
            elif how == "fail":
                d.errback(RuntimeError("directory down"))
            else:
                session.recipients.pending[address] = d
                return

    for point in [*points, len(data)]:
        session.protocol.dataReceived(data[start:point])
        start = point
        answer_pending()
    output = session.transport.value()
    for line in output.split(b"\r\n")[:-1]:
        assert REPLY_LINE.match(line), line
    # At most one check is ever outstanding: commands are handled one at a time.
    assert len(session.recipients.pending) <= 1
