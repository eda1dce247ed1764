"""The outbound ESMTP session driver, scripted in memory with a Clock (every reply path, every timeout)."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from appliance.mail.interfaces import Reply
from appliance.mail.smtp_client import (
    REFUSE_8BIT,
    DeliveryResult,
    DotStuffer,
    Session,
    Timeouts,
    deliver,
)

EHLO_FULL = b"250-mx.remote.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
EHLO_PLAIN = b"250-mx.remote.test\r\n250 ENHANCEDSTATUSCODES\r\n"
MESSAGE = b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n"


# -- reference implementations ------------------------------------------------------------------


def reference_stuff(message: bytes) -> bytes:
    """Whole-message dot-stuffing, the obvious way: normalise, split, stuff, join."""
    text = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if text and not text.endswith(b"\n"):
        text += b"\n"
    lines = text.split(b"\n")[:-1] if text else []
    return (
        b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
        + b".\r\n"
    )


def unstuff(wire: bytes) -> bytes:
    """What an SMTP server stores from DATA bytes that end with the final dot."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire.split(b"\r\n")[:-2]
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)


def stuff_in_chunks(message: bytes, cuts: list[int]) -> bytes:
    stuffer = DotStuffer()
    out = b""
    start = 0
    for cut in sorted(set(cuts)):
        out += stuffer.feed(message[start:cut])
        start = cut
    return out + stuffer.feed(message[start:]) + stuffer.finish()


# -- DotStuffer ----------------------------------------------------------------------------------


def test_dot_stuffing_basics() -> None:
    assert stuff_in_chunks(b"", []) == b".\r\n"
    assert stuff_in_chunks(b".", []) == b"..\r\n.\r\n"
    assert stuff_in_chunks(b"a\n.\nb", []) == b"a\r\n..\r\nb\r\n.\r\n"
    assert stuff_in_chunks(b"a\r\n.b\r\n", [3]) == b"a\r\n..b\r\n.\r\n"
    assert stuff_in_chunks(b"a\r\n.b\r\n", [2]) == b"a\r\n..b\r\n.\r\n"  # cut between CR and LF
    assert stuff_in_chunks(b"a\r.b", [2]) == b"a\r\n..b\r\n.\r\n"  # bare CR is a line end
    assert stuff_in_chunks(b"x\r", [2]) == b"x\r\n.\r\n"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..", b"\r\n.", b"b.c"]), max_size=40
    ),
    st.lists(st.integers(min_value=0, max_value=200), max_size=10),
)
def test_dot_stuffing_is_independent_of_chunking(pieces: list[bytes], cuts: list[int]) -> None:
    message = b"".join(pieces)
    cuts = [c for c in cuts if c <= len(message)]
    assert stuff_in_chunks(message, cuts) == reference_stuff(message)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from([b".", b"\r\n", b"a", b"..", b"\r\n.", b"b.c"]), max_size=40),
    st.lists(st.integers(min_value=0, max_value=200), max_size=10),
)
def test_dot_stuffing_of_crlf_text_in_any_chunks(pieces: list[bytes], cuts: list[int]) -> None:
    """Text already in CRLF form (as the spool keeps it) takes the short path: same bytes."""
    message = b"".join(pieces)
    cuts = [c for c in cuts if c <= len(message)]
    assert stuff_in_chunks(message, cuts) == reference_stuff(message)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([b".", b"a", b"\r\n", b".."]), max_size=60))
def test_unstuffing_gives_back_the_crlf_message(pieces: list[bytes]) -> None:
    message = b"".join(pieces)
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    assert unstuff(stuff_in_chunks(message, [1, 7, 8, 16])) == message


def test_dots_at_every_offset_around_a_16k_boundary() -> None:
    for offset in range(16384 - 6, 16384 + 6):
        message = b"x" * (offset - 2) + b"\r\n.line\r\n..two\r\n"
        for chunk in (16384, 4096, 1):
            if chunk == 1 and offset % 5:
                continue
            cuts = list(range(chunk, len(message), chunk))
            assert unstuff(stuff_in_chunks(message, cuts)) == message


# -- a scripted peer -----------------------------------------------------------------------------


class Transport(StringTransport):
    """A StringTransport whose close reaches the protocol, as a socket's would."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        self.protocol: Any = None
        self.tls: object = None

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.protocol.connectionLost(Failure(ConnectionDone()))

    def loseConnection(self) -> None:
        self._close()

    def abortConnection(self) -> None:
        self._close()

    def startTLS(self, options: object) -> None:
        self.tls = options


class Endpoint:
    """An endpoint that connects at once to a :class:`Transport` (or fails, or never answers)."""

    def __init__(self, fail: Exception | None = None, hang: bool = False) -> None:
        self.fail = fail
        self.hang = hang
        self.transport = Transport()
        self.protocol: Any = None
        self.cancelled = False

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        if self.fail is not None:
            return defer.fail(self.fail)
        if self.hang:

            def cancel(d: defer.Deferred[Any]) -> None:
                self.cancelled = True

            return defer.Deferred(cancel)
        self.protocol = factory.buildProtocol(None)
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        return defer.succeed(self.protocol)


class Peer:
    """Drives one session: feed server replies, read what the client wrote."""

    def __init__(self, **session_kw: Any) -> None:
        self.clock = Clock()
        self.endpoint = Endpoint()
        self.session = Session(
            self.endpoint,
            "gw.example.test",
            self.clock,
            remote="mx.remote.test[127.0.2.1]:25",
            **session_kw,
        )
        self.results: list[DeliveryResult] = []

    def send(
        self,
        recipients: list[str],
        message: bytes = MESSAGE,
        sender: str = "alice@example.test",
        close: bool = False,
        **kw: Any,
    ) -> None:
        """Start a transaction; with ``close``, QUIT afterwards and only then record the result."""
        d = self.session.send(sender, recipients, message, **kw)
        if close:
            d.addCallback(lambda r: self.session.close().addCallback(lambda _: r))
        d.addCallback(self.results.append)

    def reply(self, data: bytes) -> None:
        self.endpoint.protocol.dataReceived(data)

    def written(self) -> bytes:
        data = self.endpoint.transport.value()
        self.endpoint.transport.clear()
        return data

    def pump(self) -> bytes:
        """Let the data producer run to the end; return what was written."""
        transport = self.endpoint.transport
        while transport.producer is not None:
            transport.producer.resumeProducing()
        return self.written()

    @property
    def result(self) -> DeliveryResult:
        assert len(self.results) == 1, "no result yet"
        return self.results[0]

    def greet(self, ehlo: bytes = EHLO_FULL) -> None:
        self.reply(b"220 mx.remote.test ESMTP\r\n")
        assert self.written() == b"EHLO gw.example.test\r\n"
        self.reply(ehlo)


def codes(result: DeliveryResult) -> dict[str, int]:
    return {r: reply.code for r, reply in result.replies.items()}


def test_pipelined_transaction_with_mixed_recipient_replies() -> None:
    peer = Peer()
    peer.send(["ok@remote.test", "later@remote.test", "gone@remote.test", "ok2@remote.test"])
    peer.greet()
    # MAIL, every RCPT and DATA in one write, before any reply (RFC 2920 3.1)
    assert peer.written() == (
        (b"MAIL FROM:<alice@example.test> SIZE=%d\r\n" % len(MESSAGE))
        + b"RCPT TO:<ok@remote.test>\r\n"
        b"RCPT TO:<later@remote.test>\r\n"
        b"RCPT TO:<gone@remote.test>\r\n"
        b"RCPT TO:<ok2@remote.test>\r\n"
        b"DATA\r\n"
    )
    peer.reply(
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n451 4.2.0 try later\r\n550 5.1.1 no such user\r\n250 2.1.5 Ok\r\n"
    )
    assert peer.written() == b""
    peer.reply(b"354 go ahead\r\n")
    data = peer.pump()
    assert data == b"Subject: hi\r\n\r\n..leading dot\r\nbody\r\n.\r\n"
    assert unstuff(data) == MESSAGE
    assert not peer.results
    peer.reply(b"250 2.0.0 Ok: queued as 1234\r\n")
    result = peer.result
    assert list(result.replies) == [
        "ok@remote.test",
        "later@remote.test",
        "gone@remote.test",
        "ok2@remote.test",
    ]
    assert result.replies["ok@remote.test"] == Reply(250, "2.0.0", "Ok: queued as 1234")
    assert result.replies["later@remote.test"] == Reply(451, "4.2.0", "try later")
    assert result.replies["gone@remote.test"] == Reply(550, "5.1.1", "no such user")
    assert result.delivered == ["ok@remote.test", "ok2@remote.test"]
    assert result.deferred == ["later@remote.test"]
    assert result.bounced == ["gone@remote.test"]
    assert result.error is None and not result.tls
    assert "S: 250 2.0.0 Ok: queued as 1234" in result.transcript


def test_without_pipelining_one_command_at_a_time_and_quit() -> None:
    clock = Clock()
    endpoint = Endpoint()
    results: list[DeliveryResult] = []
    deliver(
        endpoint,
        "gw.example.test",
        "a@example.test",
        ["b@remote.test", "c@remote.test"],
        b"hi\r\n",
        None,
        clock,
    ).addCallback(results.append)
    proto = endpoint.protocol
    transport = endpoint.transport
    proto.dataReceived(b"220 hi\r\n")
    proto.dataReceived(EHLO_PLAIN)
    assert transport.value() == b"EHLO gw.example.test\r\nMAIL FROM:<a@example.test>\r\n"
    transport.clear()
    proto.dataReceived(b"250 ok\r\n")
    assert transport.value() == b"RCPT TO:<b@remote.test>\r\n"
    transport.clear()
    proto.dataReceived(b"250 ok\r\n")
    assert transport.value() == b"RCPT TO:<c@remote.test>\r\n"
    transport.clear()
    proto.dataReceived(b"550 no\r\n")
    assert transport.value() == b"DATA\r\n"
    transport.clear()
    proto.dataReceived(b"354 go\r\n")
    while transport.producer is not None:
        transport.producer.resumeProducing()
    assert transport.value() == b"hi\r\n.\r\n"
    transport.clear()
    proto.dataReceived(b"250 queued\r\n")
    assert transport.value() == b"QUIT\r\n"
    assert not results  # waits for the QUIT reply and the close
    proto.dataReceived(b"221 bye\r\n")
    assert transport.closed
    assert codes(results[0]) == {"b@remote.test": 250, "c@remote.test": 550}
    # without an enhanced code in the reply, the class is filled in
    assert results[0].replies["c@remote.test"].enhanced == "5.0.0"


def test_ehlo_refused_falls_back_to_helo() -> None:
    peer = Peer()
    peer.send(["b@remote.test"])
    peer.reply(b"220 old\r\n")
    peer.written()
    peer.reply(b"502 what\r\n")
    assert peer.written() == b"HELO gw.example.test\r\n"
    peer.reply(b"250 hello\r\n")
    assert peer.written() == b"MAIL FROM:<alice@example.test>\r\n"  # no ESMTP parameters
    assert not peer.session.esmtp


def test_helo_refused_too_is_temporary_and_tries_next() -> None:
    peer = Peer()
    peer.send(["b@remote.test"])
    peer.reply(b"220 old\r\n")
    peer.reply(b"500 no\r\n")
    peer.reply(b"550 go away\r\n")
    assert peer.written() == b"EHLO gw.example.test\r\nHELO gw.example.test\r\nQUIT\r\n"
    peer.reply(b"221 bye\r\n")
    result = peer.result
    assert result.error is not None and result.error.temporary and result.try_next
    assert result.replies["b@remote.test"].temporary


def test_ehlo_421_is_temporary() -> None:
    peer = Peer()
    peer.send(["b@remote.test"])
    peer.reply(b"220 hi\r\n421 4.3.2 shutting down\r\n")
    peer.reply(b"221 x\r\n")
    assert peer.result.replies["b@remote.test"].code == 421
    assert peer.result.try_next


def test_refused_greeting_is_temporary_and_tries_next() -> None:
    peer = Peer()
    peer.send(["b@remote.test", "c@remote.test"])
    peer.reply(b"554 5.7.1 no mail from you\r\n")
    assert peer.written() == b"QUIT\r\n"
    peer.reply(b"221 bye\r\n")
    result = peer.result
    assert result.try_next
    for reply in result.replies.values():
        assert reply.temporary and reply.enhanced == "4.7.1" and "no mail from you" in reply.text


def test_size_limit_is_respected() -> None:
    peer = Peer()
    big = b"x" * 2000 + b"\r\n"
    peer.send(["b@remote.test", "c@remote.test"], big)
    peer.greet(b"250-mx\r\n250-PIPELINING\r\n250 SIZE 1000\r\n")
    assert peer.written() == b""  # nothing sent: no MAIL
    result_d = peer.session.close()
    assert peer.written() == b"QUIT\r\n"
    peer.reply(b"221 bye\r\n")
    assert result_d.called
    for reply in peer.result.replies.values():
        assert (reply.code, reply.enhanced) == (552, "5.3.4")


def test_eight_bit_declared_sent_or_refused() -> None:
    eight = "Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode()
    peer = Peer()
    peer.send(["b@remote.test"], eight)
    peer.greet()
    assert b"BODY=8BITMIME" in peer.written()

    peer = Peer()  # no 8BITMIME: sent as it is, like Postfix
    peer.send(["b@remote.test"], eight)
    peer.greet(EHLO_PLAIN)
    assert peer.written() == b"MAIL FROM:<alice@example.test>\r\n"

    peer = Peer(eight_bit=REFUSE_8BIT)
    peer.send(["b@remote.test"], eight)
    peer.greet(EHLO_PLAIN)
    assert peer.written() == b""
    assert peer.result.replies["b@remote.test"] == Reply(
        554, "5.6.3", "mx.remote.test[127.0.2.1]:25 does not accept 8-bit data (no 8BITMIME)"
    )

    peer = Peer(eight_bit=REFUSE_8BIT)  # the caller may know better than a scan
    peer.send(["b@remote.test"], eight, body_8bit=False)
    peer.greet(EHLO_PLAIN)
    assert peer.written().startswith(b"MAIL FROM:")


def test_utf8_addresses_need_smtputf8() -> None:
    peer = Peer()
    peer.send(["j\u00fcrgen@remote.test"])
    peer.greet()
    assert peer.written() == b""
    assert peer.result.replies["j\u00fcrgen@remote.test"].enhanced == "5.6.7"
    peer = Peer()
    peer.send(["j\u00fcrgen@remote.test"])
    peer.greet(b"250-mx\r\n250 SMTPUTF8\r\n")
    assert peer.written() == b"MAIL FROM:<alice@example.test> SMTPUTF8\r\n"


def test_mail_rejected_applies_to_every_recipient() -> None:
    for code, permanent in ((553, True), (451, False)):
        peer = Peer()
        peer.send(["b@remote.test", "c@remote.test"], close=True)
        peer.greet()
        peer.written()
        peer.reply(b"%d sender refused\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n" % code)
        assert peer.written() == b""  # the pipelined DATA's answer is still to come
        peer.reply(b"503 5.5.1 need RCPT\r\n")
        assert peer.written() == b"QUIT\r\n"  # no message
        peer.reply(b"221 bye\r\n")
        result = peer.result
        assert codes(result) == {"b@remote.test": code, "c@remote.test": code}
        assert all(r.permanent == permanent for r in result.replies.values())


def test_all_recipients_refused_means_no_data() -> None:
    peer = Peer()
    peer.send(["b@remote.test", "c@remote.test"], close=True)
    peer.greet()
    peer.written()
    peer.reply(b"250 ok\r\n550 no\r\n450 busy\r\n554 5.5.1 no valid recipients\r\n")
    assert peer.written() == b"QUIT\r\n"


def test_pipelined_data_accepted_without_recipients_gets_an_empty_message() -> None:
    # RFC 2920 3.1 says a server must refuse it; one that says 354 gets only the dot.
    peer = Peer()
    peer.send(["b@remote.test"], close=True)
    peer.greet()
    peer.written()
    peer.reply(b"250 ok\r\n550 no\r\n354 go ahead\r\n")
    assert peer.written() == b".\r\n"
    peer.reply(b"554 5.5.1 no valid recipients\r\n")
    assert peer.written() == b"QUIT\r\n"
    peer.reply(b"221 bye\r\n")
    assert codes(peer.result) == {"b@remote.test": 550}


def test_data_refused() -> None:
    peer = Peer()
    peer.send(["b@remote.test", "c@remote.test"], close=True)
    peer.greet()
    assert peer.written().endswith(b"DATA\r\n")
    peer.reply(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n")
    peer.reply(b"554 5.5.1 no valid recipients\r\n")
    assert peer.written() == b"QUIT\r\n"
    peer.reply(b"221 bye\r\n")
    assert peer.result.replies["b@remote.test"] == Reply(554, "5.5.1", "no valid recipients")
    assert peer.result.replies["c@remote.test"] == Reply(550, "5.1.1", "no")


def test_multiline_reply_and_enhanced_code_on_every_line() -> None:
    peer = Peer()
    peer.send(["b@remote.test"])
    peer.greet()
    peer.written()
    peer.reply(b"250 ok\r\n550-5.7.1 first line\r\n550-5.7.1 second\r\n550 5.7.1 third\r\n")
    peer.reply(b"221 bye\r\n")
    assert peer.result.replies["b@remote.test"] == Reply(550, "5.7.1", "first line second third")


def test_bad_addresses_never_reach_the_wire() -> None:
    peer = Peer()
    peer.send(["evil@remote.test>\r\nRCPT TO:<victim@x", "good@remote.test", ""])
    peer.greet()
    wire = peer.written()
    assert wire.count(b"RCPT TO:") == 1 and b"victim" not in wire
    peer.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
    result_codes = peer.results
    assert not result_codes
    peer = Peer()
    peer.send(["b@remote.test"], sender="a@x\r\nQUIT")
    peer.greet()
    assert peer.written() == b""
    assert peer.result.replies["b@remote.test"].enhanced == "5.1.7"


def test_duplicate_recipients_sent_once() -> None:
    peer = Peer()
    peer.send(["b@remote.test", "b@remote.test"])
    peer.greet()
    assert peer.written().count(b"RCPT TO:") == 1


def test_malformed_reply_breaks_the_session_temporarily() -> None:
    peer = Peer()
    peer.send(["b@remote.test"])
    peer.reply(b"220 hi\r\n")
    peer.reply(b"HTTP/1.1 400 Bad Request\r\n")
    result = peer.result
    assert (
        result.replies["b@remote.test"].temporary
        and "malformed" in result.replies["b@remote.test"].text
    )
    assert peer.endpoint.transport.closed


def test_overlong_reply_line() -> None:
    peer = Peer()
    peer.send(["b@remote.test"])
    peer.reply(b"220 " + b"x" * 20000)
    assert peer.result.replies["b@remote.test"].temporary


# -- timeouts (RFC 5321 4.5.3.2) on the injected clock --------------------------------------------


def test_greeting_timeout() -> None:
    peer = Peer()
    peer.send(["b@remote.test"])
    peer.clock.advance(299)
    assert not peer.results
    peer.clock.advance(2)
    result = peer.result
    assert (
        result.try_next
        and "timed out while reading the greeting" in result.replies["b@remote.test"].text
    )
    assert result.replies["b@remote.test"].temporary
    assert peer.endpoint.transport.closed
    assert not peer.clock.getDelayedCalls()


def test_rcpt_timeout_keeps_earlier_answers_and_defers_the_rest() -> None:
    peer = Peer(timeouts=Timeouts(rcpt=10))
    peer.send(["gone@remote.test", "ok@remote.test", "silent@remote.test"])
    peer.greet(EHLO_PLAIN)
    peer.reply(b"250 ok\r\n550 5.1.1 gone\r\n250 ok\r\n")
    peer.clock.advance(11)
    result = peer.result
    assert result.replies["gone@remote.test"].code == 550
    # accepted, but the transaction never finished: temporary, never 250
    assert result.replies["ok@remote.test"].temporary
    assert result.replies["silent@remote.test"].temporary
    assert result.try_next


def test_data_init_timeout_is_two_minutes() -> None:
    peer = Peer()
    peer.send(["b@remote.test"])
    peer.greet()
    peer.reply(b"250 ok\r\n250 ok\r\n")
    peer.clock.advance(119)
    assert not peer.results
    peer.clock.advance(2)
    assert peer.result.replies["b@remote.test"].temporary


def test_data_block_timeout_when_the_server_stops_reading() -> None:
    peer = Peer()
    peer.send(["b@remote.test"], b"x" * 300_000)
    peer.greet()
    peer.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
    peer.endpoint.transport.producer.resumeProducing()  # one block, then the socket is full
    peer.clock.advance(179)
    assert not peer.results
    peer.clock.advance(2)
    reply = peer.result.replies["b@remote.test"]
    assert reply.temporary and "sending the message" in reply.text and peer.result.try_next


def test_final_dot_timeout_is_ten_minutes_and_a_possible_duplicate() -> None:
    peer = Peer()
    peer.send(["b@remote.test"])
    peer.greet()
    peer.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
    peer.pump()
    peer.clock.advance(599)
    assert not peer.results
    peer.clock.advance(2)
    result = peer.result
    reply = result.replies["b@remote.test"]
    assert reply.temporary and "possible duplicate" in reply.text
    assert not result.try_next  # the next MX could duplicate the message at once


def test_connection_closed_after_the_dot_before_the_reply() -> None:
    peer = Peer()
    peer.send(["b@remote.test", "c@remote.test"])
    peer.greet()
    peer.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    peer.pump()
    peer.endpoint.transport.loseConnection()
    result = peer.result
    assert all(r.temporary and "possible duplicate" in r.text for r in result.replies.values())
    assert not result.try_next


def test_connection_closed_mid_data() -> None:
    peer = Peer()
    peer.send(["b@remote.test"], b"y" * 300_000)
    peer.greet()
    peer.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
    peer.endpoint.transport.producer.resumeProducing()
    peer.endpoint.transport.loseConnection()
    result = peer.result
    assert result.replies["b@remote.test"].temporary and result.try_next
    assert peer.endpoint.transport.producer is None


def test_connect_failure_and_connect_timeout() -> None:
    clock = Clock()
    results: list[DeliveryResult] = []
    endpoint = Endpoint(fail=ConnectionRefusedError())
    deliver(endpoint, "gw", "a@x", ["b@y"], b"m\r\n", None, clock).addCallback(results.append)
    reply = results[0].replies["b@y"]
    assert (reply.code, reply.enhanced) == (451, "4.4.1") and results[0].try_next

    hanging = Endpoint(hang=True)
    deliver(
        hanging, "gw", "a@x", ["b@y"], b"m\r\n", None, clock, timeouts=Timeouts(connect=30)
    ).addCallback(results.append)
    clock.advance(29)
    assert len(results) == 1
    clock.advance(2)
    assert hanging.cancelled
    assert "connect timed out" in results[1].replies["b@y"].text


def test_unreadable_message_file_is_temporary_without_a_transaction(tmp_path: Any) -> None:
    peer = Peer()
    peer.session.send("a@x", ["b@remote.test"], str(tmp_path / "missing")).addCallback(
        peer.results.append
    )
    peer.greet()
    assert peer.written() == b""
    assert peer.result.replies["b@remote.test"].enhanced == "4.3.0"


def test_message_from_a_file_with_lf_line_ends(tmp_path: Any) -> None:
    path = tmp_path / "msg"
    path.write_bytes(b"Subject: x\n\n.dot\nend")
    peer = Peer()
    peer.session.send("a@x", ["b@remote.test"], str(path)).addCallback(peer.results.append)
    peer.greet()
    peer.written()
    peer.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert peer.pump() == b"Subject: x\r\n\r\n..dot\r\nend\r\n.\r\n"


def test_starttls_is_opportunistic() -> None:
    options = object()
    peer = Peer(tls_options=options)
    peer.send(["b@remote.test"])
    peer.greet(b"250-mx\r\n250-STARTTLS\r\n250 PIPELINING\r\n")
    assert peer.written() == b"STARTTLS\r\n"
    peer.reply(b"220 2.0.0 ready\r\n")
    assert peer.endpoint.transport.tls is options
    assert peer.written() == b"EHLO gw.example.test\r\n"  # RFC 3207 4.2: forget, ask again
    peer.reply(b"250-mx\r\n250 PIPELINING\r\n")
    assert peer.written().startswith(b"MAIL FROM:")
    assert peer.session.tls

    # STARTTLS refused: carry on in the clear
    peer = Peer(tls_options=options)
    peer.send(["b@remote.test"])
    peer.greet(b"250-mx\r\n250 STARTTLS\r\n")
    peer.written()
    peer.reply(b"454 4.7.0 TLS not available\r\n")
    assert peer.written() == b"MAIL FROM:<alice@example.test>\r\n"
    assert not peer.session.tls

    # no options: never STARTTLS
    peer = Peer()
    peer.send(["b@remote.test"])
    peer.greet(b"250-mx\r\n250 STARTTLS\r\n")
    assert peer.written() == b"MAIL FROM:<alice@example.test>\r\n"


def test_connection_lost_after_starttls_is_reported_as_tls_failure() -> None:
    peer = Peer(tls_options=object())
    peer.send(["b@remote.test"])
    peer.greet(b"250-mx\r\n250 STARTTLS\r\n")
    peer.reply(b"220 go\r\n")
    peer.endpoint.transport.loseConnection()
    result = peer.result
    assert result.tls_failed and result.replies["b@remote.test"].enhanced == "4.7.5"


def test_connection_reuse_after_a_complete_transaction_needs_no_rset() -> None:
    peer = Peer()
    peer.send(["b@remote.test"])
    peer.greet()
    peer.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
    peer.pump()
    peer.reply(b"250 queued\r\n")
    assert peer.session.usable
    peer.send(["c@remote.test"], b"second\r\n")
    # RFC 5321 4.1.1.4: the end of data closed the transaction; the next MAIL may follow.
    assert peer.written() == (
        b"MAIL FROM:<alice@example.test> SIZE=8\r\nRCPT TO:<c@remote.test>\r\nDATA\r\n"
    )
    peer.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert peer.pump() == b"second\r\n.\r\n"
    peer.reply(b"250 queued 2\r\n")
    assert [codes(r) for r in peer.results] == [{"b@remote.test": 250}, {"c@remote.test": 250}]
    closing = peer.session.close()
    peer.reply(b"221 bye\r\n")
    assert closing.called and peer.endpoint.transport.closed
    assert not peer.clock.getDelayedCalls()


def test_connection_reuse_after_an_unfinished_transaction_starts_with_rset() -> None:
    peer = Peer()
    peer.send(["b@remote.test"])
    peer.greet()
    peer.written()
    peer.reply(b"250 ok\r\n550 5.1.1 no\r\n554 5.5.1 no valid recipients\r\n")
    assert codes(peer.results[0]) == {"b@remote.test": 550}
    assert peer.session.usable
    peer.send(["c@remote.test"], b"second\r\n")
    assert peer.written() == b"RSET\r\n"  # MAIL was accepted: the transaction is open
    peer.reply(b"250 reset\r\n")
    assert peer.written().startswith(b"MAIL FROM:<alice@example.test> SIZE=8\r\n")
    peer.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert peer.pump() == b"second\r\n.\r\n"
    peer.reply(b"250 queued 2\r\n")
    assert codes(peer.results[1]) == {"c@remote.test": 250}


def test_after_a_broken_session_every_send_gets_the_error() -> None:
    peer = Peer()
    peer.send(["b@remote.test"])
    peer.reply(b"220 hi\r\n")
    peer.endpoint.transport.loseConnection()
    assert not peer.session.usable
    peer.send(["c@remote.test"])
    assert peer.results[1].replies["c@remote.test"].temporary


def test_rcpt_replies_outside_2xx_4xx_5xx_are_temporary() -> None:
    peer = Peer()
    peer.send(["b@remote.test"], close=True)
    peer.greet()
    peer.reply(b"250 ok\r\n354 what\r\n503 5.5.1 no recipients\r\n")
    assert peer.written().endswith(b"QUIT\r\n")
    peer.reply(b"221 bye\r\n")
    assert peer.result.replies["b@remote.test"].temporary


def test_session_rejects_unknown_eight_bit_policy() -> None:
    try:
        Session(Endpoint(), "gw", Clock(), eight_bit="convert")
    except ValueError:
        return
    raise AssertionError("accepted a bad policy")


def test_random_replies_always_give_one_reply_per_recipient() -> None:
    rng = random.Random(7)
    choices = [b"250 ok\r\n", b"451 later\r\n", b"550 no\r\n", b"354 go\r\n", b"221 bye\r\n"]
    for _ in range(300):
        peer = Peer()
        rcpts = [f"r{i}@remote.test" for i in range(rng.randint(1, 4))]
        peer.send(rcpts)
        peer.greet(rng.choice([EHLO_FULL, EHLO_PLAIN]))
        for _ in range(12):
            if peer.results:
                break
            peer.reply(rng.choice(choices))
            transport = peer.endpoint.transport
            if transport.producer is not None:
                peer.pump()
        if not peer.results:
            peer.endpoint.transport.loseConnection()
        assert len(peer.results) == 1
        assert list(peer.result.replies) == rcpts


def test_require_tls() -> None:
    peer = Peer(tls_options=object(), require_tls=True)
    peer.send(["b@remote.test"])
    peer.greet(b"250-mx\r\n250 PIPELINING\r\n")
    assert peer.written() == b"QUIT\r\n"
    peer.reply(b"221 bye\r\n")
    reply = peer.result.replies["b@remote.test"]
    assert (reply.code, reply.enhanced) == (451, "4.7.4") and peer.result.try_next


def test_server_refusing_mid_data_and_closing_gives_its_reply() -> None:
    peer = Peer()
    peer.send(["b@remote.test", "c@remote.test"], b"z" * 300_000)
    peer.greet()
    peer.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    peer.endpoint.transport.producer.resumeProducing()
    peer.reply(b"552 5.3.4 message too big for me\r\n")
    peer.endpoint.transport.loseConnection()
    replies = peer.result.replies
    assert replies["b@remote.test"] == Reply(552, "5.3.4", "message too big for me")
    assert replies["c@remote.test"] == replies["b@remote.test"]


def test_reply_flood_is_cut_off() -> None:
    peer = Peer()
    peer.send(["b@remote.test"])
    peer.reply(b"220 hi\r\n" + b"250 spam\r\n" * 20_000)
    assert peer.result.replies["b@remote.test"].temporary
    assert peer.endpoint.transport.closed


def test_replies_split_anywhere_are_reassembled() -> None:
    peer = Peer()
    peer.send(["b@remote.test"])
    for byte in b"220 hi\r\n":
        peer.reply(bytes([byte]))
    assert peer.written() == b"EHLO gw.example.test\r\n"
    for byte in EHLO_FULL:
        peer.reply(bytes([byte]))
    assert peer.written().startswith(b"MAIL FROM:<alice@example.test> SIZE=")
