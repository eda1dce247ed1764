"""Tests for appliance.dns.listener: screening, error replies, size limits, UDP and TCP protocols.

Protocols are driven with fake transports and a task.Clock; the last test
starts real UDP and TCP listeners on 127.0.0.1 in a child process and
queries them with dnspython.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import dns.zone
import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import Logger

from appliance.dns import listener, wire
from appliance.dns.rr import RR, LookupResult, Opcode, RCode
from appliance.dns.wire import Edns, Message, Question, decode, encode

CLIENT = ("192.0.2.7", 4242)
LOCAL = ("127.0.0.10", 53)


def n(text: str) -> bytes:
    return dns.name.from_text(text).to_wire()


class Recorder:
    """A responder answering every query with ``records`` A records, remembering its calls."""

    def __init__(self, records: int = 1, result: Any = None) -> None:
        self.calls: list[tuple[Message, tuple[str, int], str, tuple[str, int]]] = []
        self.records = records
        self.result = result

    def __call__(
        self, query: Message, client: tuple[str, int], transport: str, local: tuple[str, int]
    ) -> Any:
        self.calls.append((query, client, transport, local))
        if self.result is not None:
            return self.result
        qname = query.question[0].name
        answer = tuple(
            RR(qname, 1, 1, 60, bytes([10, 0, i // 256, i % 256])) for i in range(self.records)
        )
        return wire.make_response(query, LookupResult(RCode.NOERROR, True, answer=answer))


class LogCollector:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.log = Logger(namespace="test", observer=self.events.append)

    def failures(self) -> list[Any]:
        return [e["log_failure"] for e in self.events if "log_failure" in e]


class FakeUDPTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", *LOCAL)


def udp(responder: Any, **kwargs: Any) -> tuple[listener.DNSDatagramProtocol, FakeUDPTransport]:
    proto = listener.make_udp_protocol(responder, **kwargs)
    transport = FakeUDPTransport()
    proto.makeConnection(transport)  # type: ignore[arg-type]
    return proto, transport


def ask_udp(
    proto: listener.DNSDatagramProtocol, transport: FakeUDPTransport, data: bytes
) -> bytes | None:
    before = len(transport.sent)
    proto.datagramReceived(data, CLIENT)
    if len(transport.sent) == before:
        return None
    assert len(transport.sent) == before + 1
    reply, addr = transport.sent[-1]
    assert addr == CLIENT
    return reply


def query(name: str = "WwW.Example.COM", rdtype: str = "A", **kwargs: Any) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, **kwargs)


# --------------------------------------------------------------------------- UDP and the core


def test_udp_answers_with_responder_and_passes_addresses() -> None:
    rec = Recorder()
    proto, transport = udp(rec)
    q = query(use_edns=0, payload=4096)
    reply = ask_udp(proto, transport, q.to_wire())
    assert reply is not None
    parsed = dns.message.from_wire(reply)
    assert q.is_response(parsed)
    assert parsed.question[0].name.to_wire() == n("WwW.Example.COM.")
    assert parsed.payload == 1232 and parsed.edns == 0
    (call,) = rec.calls
    assert call[1:] == (CLIENT, "udp", LOCAL)
    assert call[0].id == q.id


def test_none_means_silence() -> None:
    proto, transport = udp(lambda *a: None)
    assert ask_udp(proto, transport, query().to_wire()) is None


def test_qr_set_is_dropped_without_calling_responder() -> None:
    rec = Recorder()
    proto, transport = udp(rec)
    q = query()
    r = dns.message.make_response(q)
    assert ask_udp(proto, transport, r.to_wire()) is None
    assert rec.calls == []


def test_source_port_zero_is_ignored() -> None:
    rec = Recorder()
    proto, transport = udp(rec)
    proto.datagramReceived(query().to_wire(), ("192.0.2.7", 0))
    assert transport.sent == [] and rec.calls == []


def test_malformed_with_header_gets_formerr_with_question() -> None:
    rec = Recorder()
    proto, transport = udp(rec)
    q = query(use_edns=0)
    data = q.to_wire() + b"\x00"  # trailing garbage
    reply = ask_udp(proto, transport, data)
    assert reply is not None
    parsed = dns.message.from_wire(reply)
    assert parsed.rcode() == dns.rcode.FORMERR
    assert parsed.id == q.id and parsed.flags & dns.flags.QR and parsed.flags & dns.flags.RD
    assert parsed.question == q.question
    assert rec.calls == []


def test_malformed_question_gets_formerr_without_question() -> None:
    proto, transport = udp(Recorder())
    data = struct.pack("!HHHHHH", 77, 0, 1, 0, 0, 0) + b"\x41abc"
    reply = ask_udp(proto, transport, data)
    assert reply is not None
    m = decode(reply)
    assert (m.id, m.qr, m.rcode, m.question) == (77, True, RCode.FORMERR, ())


@pytest.mark.parametrize(
    "data",
    [b"", b"\x12", b"\x00" * 11, struct.pack("!HHHHHH", 1, 0x8000, 1, 0, 0, 0) + b"\xc0\x0c"],
    ids=["empty", "one-byte", "short-header", "malformed-response"],
)
def test_unanswerable_garbage_is_silent(data: bytes) -> None:
    proto, transport = udp(Recorder())
    assert ask_udp(proto, transport, data) is None


def test_unknown_opcode_gets_notimp() -> None:
    rec = Recorder()
    proto, transport = udp(rec)
    q = query()
    q.set_opcode(dns.opcode.UPDATE)
    reply = ask_udp(proto, transport, q.to_wire())
    assert reply is not None
    m = decode(reply)
    assert m.rcode == RCode.NOTIMP and m.opcode == Opcode.UPDATE and m.qr and m.id == q.id
    assert rec.calls == []


def test_notify_passed_through_when_enabled() -> None:
    rec = Recorder()
    proto, transport = udp(rec, opcodes={Opcode.QUERY, Opcode.NOTIFY})
    q = query("example.com", "SOA")
    q.set_opcode(dns.opcode.NOTIFY)
    ask_udp(proto, transport, q.to_wire())
    assert len(rec.calls) == 1 and rec.calls[0][0].opcode == Opcode.NOTIFY


def test_edns_version_1_gets_badvers() -> None:
    rec = Recorder()
    proto, transport = udp(rec)
    q = query(use_edns=1, payload=4096)
    reply = ask_udp(proto, transport, q.to_wire())
    assert reply is not None
    parsed = dns.message.from_wire(reply)
    assert parsed.rcode() == dns.rcode.BADVERS
    assert parsed.edns == 0
    assert rec.calls == []


@pytest.mark.parametrize("qdcount", [0, 2])
def test_query_without_exactly_one_question_is_formerr(qdcount: int) -> None:
    rec = Recorder()
    proto, transport = udp(rec)
    qs = tuple(Question(n(f"q{i}.example."), 1, 1) for i in range(qdcount))
    reply = ask_udp(proto, transport, encode(Message(id=9, rd=True, question=qs)))
    assert reply is not None
    m = decode(reply)
    assert m.rcode == RCode.FORMERR and m.id == 9 and m.question == qs
    assert rec.calls == []


def test_responder_exception_gives_servfail_and_is_logged() -> None:
    logs = LogCollector()

    def boom(*args: Any) -> Message:
        raise RuntimeError("kaboom")

    proto, transport = udp(boom, log=logs.log)
    q = query(use_edns=0)
    reply = ask_udp(proto, transport, q.to_wire())
    assert reply is not None
    parsed = dns.message.from_wire(reply)
    assert parsed.rcode() == dns.rcode.SERVFAIL and q.is_response(parsed)
    assert parsed.edns == 0
    (failure,) = logs.failures()
    assert failure.check(RuntimeError)


def test_deferred_responder_and_deferred_failure() -> None:
    logs = LogCollector()
    pending: list[defer.Deferred[Message | None]] = []

    def later(q: Message, *args: Any) -> defer.Deferred[Message | None]:
        d: defer.Deferred[Message | None] = defer.Deferred()
        pending.append(d)
        return d

    proto, transport = udp(later, log=logs.log)
    q1, q2 = query("a.example"), query("b.example")
    assert ask_udp(proto, transport, q1.to_wire()) is None
    assert ask_udp(proto, transport, q2.to_wire()) is None
    # Answers in the opposite order to the queries.
    pending[1].errback(ValueError("lookup broke"))
    pending[0].callback(
        wire.make_response(decode(q1.to_wire()), LookupResult(RCode.NXDOMAIN, True))
    )
    r2, r1 = (dns.message.from_wire(data) for data, _ in transport.sent)
    assert q2.is_response(r2) and r2.rcode() == dns.rcode.SERVFAIL
    assert q1.is_response(r1) and r1.rcode() == dns.rcode.NXDOMAIN
    (failure,) = logs.failures()
    assert failure.check(ValueError)


def test_coroutine_responder() -> None:
    async def answer(q: Message, *a: Any) -> Message:
        return wire.make_response(q, LookupResult(RCode.NXDOMAIN, True))

    proto, transport = udp(answer)
    reply = ask_udp(proto, transport, query().to_wire())
    assert reply is not None and decode(reply).rcode == RCode.NXDOMAIN


@pytest.mark.parametrize(
    "bad_reply",
    ["not a message", Message(id=1, qr=True, question=(Question(b"\x03bad", 1, 1),))],
    ids=["wrong-type", "unencodable"],
)
def test_bad_responder_result_gives_servfail(bad_reply: Any) -> None:
    logs = LogCollector()
    proto, transport = udp(lambda *a: bad_reply, log=logs.log)
    q = query()
    reply = ask_udp(proto, transport, q.to_wire())
    assert reply is not None
    assert dns.message.from_wire(reply).rcode() == dns.rcode.SERVFAIL
    assert len(logs.failures()) == 1


def test_failing_udp_write_is_logged_not_raised() -> None:
    logs = LogCollector()
    proto, transport = udp(Recorder(), log=logs.log)

    def refuse(data: bytes, addr: Any) -> None:
        raise OSError("connection refused")

    transport.write = refuse  # type: ignore[method-assign]
    proto.datagramReceived(query().to_wire(), CLIENT)
    assert len(logs.failures()) == 1


@pytest.mark.parametrize(
    ("edns_payload", "limit"),
    [(None, 512), (256, 512), (800, 800), (1232, 1232), (4096, 1232)],
)
def test_udp_size_limit(edns_payload: int | None, limit: int) -> None:
    proto, transport = udp(Recorder(records=200))
    q = query(use_edns=0, payload=edns_payload) if edns_payload else query()
    reply = ask_udp(proto, transport, q.to_wire())
    assert reply is not None
    assert len(reply) <= limit
    parsed = dns.message.from_wire(reply)
    assert parsed.flags & dns.flags.TC
    assert not parsed.answer
    # Smaller answers that fit go out whole.
    proto, transport = udp(Recorder(records=(limit - 60) // 16))
    parsed = dns.message.from_wire(ask_udp(proto, transport, q.to_wire()) or b"")
    assert not parsed.flags & dns.flags.TC and len(parsed.answer[0]) == (limit - 60) // 16


def test_advertised_size_is_configurable() -> None:
    proto, transport = udp(Recorder(records=200), udp_size=4000)
    reply = ask_udp(proto, transport, query(use_edns=0, payload=4096).to_wire())
    assert reply is not None
    parsed = dns.message.from_wire(reply)
    assert parsed.payload == 4000 and not parsed.flags & dns.flags.TC and len(reply) > 3000


def test_opt_follows_the_query() -> None:
    """No OPT to a query without one; OPT added to a query with one (RFC 6891 7)."""
    with_opt = Message(id=1, qr=True, edns=Edns(4096))
    proto, transport = udp(lambda q, *a: with_opt._replace(id=q.id, question=q.question))
    assert decode(ask_udp(proto, transport, query().to_wire()) or b"").edns is None
    plain = Message(id=1, qr=True)
    proto, transport = udp(lambda q, *a: plain._replace(id=q.id, question=q.question))
    got = decode(ask_udp(proto, transport, query(use_edns=0, want_dnssec=True).to_wire()) or b"")
    assert got.edns == Edns(1232, 0, True)


def test_core_reply_limit() -> None:
    core = listener.DNSServerCore(Recorder(), udp_size=100)
    assert core.udp_size == 512
    core = listener.DNSServerCore(Recorder())
    assert core.reply_limit(None, "tcp") == 65535
    assert core.reply_limit(Message(edns=Edns(65000)), "udp") == 1232


# --------------------------------------------------------------------------- TCP


def frame(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def unframe(stream: bytes) -> list[bytes]:
    out = []
    while stream:
        (length,) = struct.unpack_from("!H", stream)
        assert len(stream) >= 2 + length
        out.append(stream[2 : 2 + length])
        stream = stream[2 + length :]
    return out


def tcp(
    responder: Any, clock: task.Clock | None = None, **kwargs: Any
) -> tuple[listener.DNSStreamProtocol, StringTransport, task.Clock, listener.DNSStreamFactory]:
    clock = clock or task.Clock()
    factory = listener.make_tcp_factory(responder, clock, **kwargs)
    proto = factory.buildProtocol(IPv4Address("TCP", *CLIENT))
    assert isinstance(proto, listener.DNSStreamProtocol)
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", *LOCAL), peerAddress=IPv4Address("TCP", *CLIENT)
    )
    proto.makeConnection(transport)
    return proto, transport, clock, factory


def test_tcp_pipelined_queries_split_anywhere() -> None:
    rec = Recorder()
    proto, transport, _, _ = tcp(rec)
    qs = [query(f"h{i}.example") for i in range(3)]
    stream = b"".join(frame(q.to_wire()) for q in qs)
    for i in range(len(stream)):
        proto.dataReceived(stream[i : i + 1])
    replies = [dns.message.from_wire(r) for r in unframe(transport.value())]
    assert len(replies) == 3
    assert all(q.is_response(r) for q, r in zip(qs, replies, strict=True))
    assert [c[1:] for c in rec.calls] == [(CLIENT, "tcp", LOCAL)] * 3
    assert not transport.disconnecting


def test_tcp_is_not_truncated_below_64k() -> None:
    proto, transport, _, _ = tcp(Recorder(records=3000))
    q = query(use_edns=0, payload=512)
    proto.dataReceived(frame(q.to_wire()))
    (reply,) = unframe(transport.value())
    assert len(reply) > 30000
    parsed = dns.message.from_wire(reply)
    assert not parsed.flags & dns.flags.TC and len(parsed.answer[0]) == 3000


def test_tcp_over_64k_sets_tc() -> None:
    proto, transport, _, _ = tcp(Recorder(records=5000))
    proto.dataReceived(frame(query().to_wire()))
    (reply,) = unframe(transport.value())
    assert decode(reply).tc


@pytest.mark.parametrize("length", [0, 1, 11])
def test_tcp_short_frame_closes(length: int) -> None:
    rec = Recorder()
    proto, transport, _, _ = tcp(rec)
    proto.dataReceived(struct.pack("!H", length) + b"\x00" * length + frame(query().to_wire()))
    assert transport.disconnecting
    assert transport.value() == b"" and rec.calls == []


def test_tcp_malformed_query_gets_formerr_then_close() -> None:
    rec = Recorder()
    proto, transport, _, _ = tcp(rec)
    good = query("ok.example")
    bad = query("bad.example").to_wire() + b"junk"
    proto.dataReceived(frame(good.to_wire()) + frame(bad) + frame(query().to_wire()))
    replies = [decode(r) for r in unframe(transport.value())]
    assert [r.rcode for r in replies] == [RCode.NOERROR, RCode.FORMERR]
    assert transport.disconnecting
    assert len(rec.calls) == 1


def test_tcp_malformed_waits_for_pending_replies_before_closing() -> None:
    pending: list[defer.Deferred[Message | None]] = []

    def later(q: Message, *a: Any) -> defer.Deferred[Message | None]:
        d: defer.Deferred[Message | None] = defer.Deferred()
        d.addCallback(lambda _: wire.make_response(q, LookupResult(RCode.NOERROR, True)))
        pending.append(d)
        return d

    proto, transport, _, _ = tcp(later)
    proto.dataReceived(frame(query().to_wire()) + frame(b"\x00" * 12 + b"x"))
    assert not transport.disconnecting
    pending[0].callback(None)
    assert [decode(r).rcode for r in unframe(transport.value())] == [RCode.FORMERR, RCode.NOERROR]
    assert transport.disconnecting


def test_tcp_response_packets_ignored() -> None:
    rec = Recorder()
    proto, transport, _, _ = tcp(rec)
    proto.dataReceived(frame(dns.message.make_response(query()).to_wire()))
    assert transport.value() == b"" and not transport.disconnecting and rec.calls == []


def test_tcp_idle_timeout() -> None:
    proto, transport, clock, _ = tcp(Recorder(), idle_timeout=10)
    clock.advance(9)
    proto.dataReceived(frame(query().to_wire()))
    clock.advance(9)
    assert not transport.disconnecting
    clock.advance(1.5)
    assert transport.disconnecting
    # Unregistered, or a real transport would wait for its producer before closing.
    assert transport.producer is None


def test_tcp_idle_timeout_closes_a_client_that_does_not_read() -> None:
    proto, transport, clock, _ = tcp(Recorder(), idle_timeout=10)
    proto.dataReceived(frame(query().to_wire()))
    proto.pauseProducing()
    clock.advance(11)
    assert transport.disconnecting and transport.producer is None


def test_tcp_idle_timeout_waits_for_pending_queries() -> None:
    pending: list[defer.Deferred[Message | None]] = []

    def later(q: Message, *a: Any) -> defer.Deferred[Message | None]:
        d: defer.Deferred[Message | None] = defer.Deferred()
        pending.append(d)
        return d

    proto, transport, clock, _ = tcp(later, idle_timeout=5)
    proto.dataReceived(frame(query().to_wire()))
    clock.advance(12)
    assert not transport.disconnecting
    pending[0].callback(None)
    clock.advance(4)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting


def test_tcp_pipeline_limit_pauses_reading() -> None:
    pending: list[defer.Deferred[Message | None]] = []

    def later(q: Message, *a: Any) -> defer.Deferred[Message | None]:
        d: defer.Deferred[Message | None] = defer.Deferred()
        d.addCallback(lambda _: wire.make_response(q, LookupResult(RCode.NOERROR, True)))
        pending.append(d)
        return d

    proto, transport, _, _ = tcp(later, pipeline=2)
    proto.dataReceived(frame(query("a.x").to_wire()))
    assert transport.producerState == "producing"
    # Two more in one segment: only one fits the pipeline, the other waits in the buffer.
    proto.dataReceived(frame(query("b.x").to_wire()) + frame(query("c.x").to_wire()))
    assert transport.producerState == "paused"
    assert len(pending) == 2
    pending[1].callback(None)
    assert len(pending) == 3  # the buffered query was taken up
    assert transport.producerState == "paused"
    pending[0].callback(None)
    pending[2].callback(None)
    assert transport.producerState == "producing"
    names = [decode(r).question[0].name for r in unframe(transport.value())]
    assert names == [n("b.x."), n("a.x."), n("c.x.")]


def test_tcp_stops_taking_queries_while_the_write_buffer_is_full() -> None:
    rec = Recorder()
    proto, transport, _, _ = tcp(rec)
    assert transport.producer is proto and transport.streaming
    proto.pauseProducing()  # what the transport does when its buffer is full
    assert transport.producerState == "paused"
    proto.dataReceived(frame(query("a.x").to_wire()) + frame(query("b.x").to_wire()))
    assert rec.calls == [] and transport.value() == b""
    proto.resumeProducing()
    assert len(rec.calls) == 2 and len(unframe(transport.value())) == 2
    assert transport.producerState == "producing"


def test_tcp_reply_after_disconnect_is_dropped() -> None:
    pending: list[defer.Deferred[Message | None]] = []

    def later(q: Message, *a: Any) -> defer.Deferred[Message | None]:
        d: defer.Deferred[Message | None] = defer.Deferred()
        d.addCallback(lambda _: wire.make_response(q, LookupResult(RCode.NOERROR, True)))
        pending.append(d)
        return d

    proto, transport, clock, _ = tcp(later)
    proto.dataReceived(frame(query().to_wire()))
    proto.connectionLost(None)  # type: ignore[arg-type]
    pending[0].callback(None)
    assert transport.value() == b""
    assert clock.getDelayedCalls() == []


def test_tcp_zone_transfer_streams_several_messages() -> None:
    body = tuple(RR(n(f"h{i}.example."), 16, 1, 60, b"\x40" + b"t" * 64) for i in range(2000))

    def axfr(q: Message, *a: Any) -> Message:
        return wire.make_response(q, LookupResult(RCode.NOERROR, True, answer=body))

    proto, transport, _, _ = tcp(axfr)
    proto.dataReceived(frame(query("example", "AXFR").to_wire()))
    replies = [decode(r) for r in unframe(transport.value())]
    assert len(replies) > 1
    assert all(len(r) <= 65535 for r in unframe(transport.value()))
    assert not any(r.tc for r in replies)
    assert tuple(rr for r in replies for rr in r.answer) == body
    # The same answer to an ordinary query is truncated, and over UDP an AXFR is too.
    proto, transport, _, _ = tcp(axfr)
    proto.dataReceived(frame(query("example", "TXT").to_wire()))
    (single,) = unframe(transport.value())
    assert decode(single).tc


def test_tcp_connection_cap() -> None:
    proto, _, _, factory = tcp(Recorder(), max_connections=1)
    assert factory.connections == 1
    assert factory.buildProtocol(IPv4Address("TCP", *CLIENT)) is None
    proto.connectionLost(None)  # type: ignore[arg-type]
    assert factory.connections == 0
    assert factory.buildProtocol(IPv4Address("TCP", *CLIENT)) is not None


def test_tcp_garbage_stream_never_raises() -> None:
    import random

    rnd = random.Random(7)
    logs = LogCollector()
    for _ in range(300):
        proto, transport, clock, _ = tcp(Recorder(), log=logs.log)
        stream = frame(query().to_wire()) + bytes(
            rnd.getrandbits(8) for _ in range(rnd.randrange(200))
        )
        pos = 0
        while pos < len(stream):
            step = rnd.randrange(1, 40)
            proto.dataReceived(stream[pos : pos + step])
            pos += step
        for reply in unframe(transport.value()):
            assert decode(reply).qr
        clock.advance(60)
        assert transport.disconnecting
    assert logs.failures() == []


# --------------------------------------------------------------------------- real sockets

SERVER = textwrap.dedent(
    """
    import sys
    from twisted.internet import reactor, stdio
    from twisted.internet.protocol import Protocol
    from appliance.dns import listener, wire
    from appliance.dns.rr import RR, LookupResult

    def responder(query, client, transport, local):
        qname = query.question[0].name
        if query.question[0].qtype == 252:
            soa = RR(qname, 6, 1, 60, b"\x02ns" + qname + b"\x02hm" + qname + bytes(range(20)))
            body = tuple(
                RR(b"\x06host%02d" % (i % 100) + qname, 16, 1, 60, b"\x20" + b"%032d" % i)
                for i in range(4000)
            )
            return wire.make_response(query, LookupResult(0, True, answer=(soa, *body, soa)))
        count = 100 if qname.lower().startswith(b"\\x03big") else 1
        answer = tuple(
            RR(qname, 16, 1, 60, bytes([20]) + b"%s record %05d...." % (transport.encode(), i))
            for i in range(count)
        )
        return wire.make_response(query, LookupResult(0, True, answer=answer))

    udp = listener.listen_udp(reactor, 0, responder, interface="127.0.0.1")
    try:
        # Same port number as UDP, as a real server has, so TCP fallback finds it.
        tcp = listener.listen_tcp(reactor, reactor, udp.getHost().port, responder, interface="127.0.0.1")
    except Exception:
        tcp = listener.listen_tcp(reactor, reactor, 0, responder, interface="127.0.0.1")

    class Stop(Protocol):
        def connectionLost(self, reason):
            reactor.stop()

    stdio.StandardIO(Stop())
    reactor.callWhenRunning(
        lambda: (print(udp.getHost().port, tcp.getHost().port), sys.stdout.flush())
    )
    reactor.run()
    """
)


@pytest.mark.integration
def test_loopback_udp_and_tcp_with_dnspython() -> None:
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        udp_port, tcp_port = (int(x) for x in line.split())
        q = query("Small.Example.TEST", "TXT", use_edns=0)
        r = dns.query.udp(q, "127.0.0.1", port=udp_port, timeout=5)
        assert r.rcode() == dns.rcode.NOERROR and len(r.answer[0]) == 1
        assert r.question[0].name.to_text() == "Small.Example.TEST."
        assert b"udp" in r.answer[0][0].strings[0]

        big = query("big.example.test", "TXT")
        r = dns.query.udp(big, "127.0.0.1", port=udp_port, timeout=5)
        assert r.flags & dns.flags.TC and not r.answer
        r = dns.query.tcp(big, "127.0.0.1", port=tcp_port, timeout=5)
        assert not r.flags & dns.flags.TC and len(r.answer[0]) == 100
        assert b"tcp" in next(iter(r.answer[0])).strings[0]

        # A zone transfer over 64 KiB comes in several messages dnspython puts back together.
        zone = dns.zone.Zone("example.test.")
        dns.query.inbound_xfr("127.0.0.1", zone, port=tcp_port, timeout=10)
        assert sum(len(rds) for _, rds in zone.iterate_rdatasets()) == 4001

        if tcp_port == udp_port:
            r, used_tcp = dns.query.udp_with_fallback(big, "127.0.0.1", port=udp_port, timeout=5)
            assert used_tcp and len(r.answer[0]) == 100
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
