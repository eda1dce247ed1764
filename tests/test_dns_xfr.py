"""The transfer client (appliance.dns.xfr) against in-process masters on real loopback sockets.

The master is our own View behind our own listeners (AXFR, SOA), or a
responder that plays a master sending IXFR differences, refusing, lying or
going silent; timeouts run on a task.Clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from appliance.dns import names
from appliance.dns.listener import listen_tcp, listen_udp
from appliance.dns.notify import soa_serial
from appliance.dns.rr import CLASS_IN, RR, LookupResult, RCode, RRType
from appliance.dns.secondary import apply_differences
from appliance.dns.view import View
from appliance.dns.wire import Message, Question, encode, error_response, make_response
from appliance.dns.xfr import XfrClient, XfrError
from appliance.dns.zone import Zone
from tests.harness import async_test, free_port

R: Any = _reactor

ORIGIN = names.from_text("example.test.")
MASTER_HOST = "127.0.3.1"
SOURCE = "127.0.3.31"


def n(text: str) -> bytes:
    return names.from_text(text)


def soa(serial: int, refresh: int = 3600, retry: int = 900, expire: int = 86400) -> RR:
    rdata = (
        n("ns.example.test.")
        + n("hostmaster.example.test.")
        + b"".join(v.to_bytes(4, "big") for v in (serial, refresh, retry, expire, 300))
    )
    return RR(ORIGIN, RRType.SOA, CLASS_IN, 3600, rdata)


def a(name: str, last: int, ttl: int = 300) -> RR:
    return RR(n(name), RRType.A, CLASS_IN, ttl, bytes([192, 0, 2, last]))


def make_zone(serial: int, *extra: RR) -> Zone:
    ns = RR(ORIGIN, RRType.NS, CLASS_IN, 3600, n("ns.example.test."))
    return Zone(ORIGIN, [soa(serial), ns, a("ns.example.test.", 1), *extra])






class Master:
    """A responder on UDP and TCP at one address:port that records who asked what."""

    def __init__(self, responder: Callable[..., Message | None]) -> None:
        self.responder = responder
        self.queries: list[tuple[str, str, Message]] = []
        self.ports: list[Any] = []
        self.address = (MASTER_HOST, 0)

    def __call__(
        self, query: Message, client: tuple[str, int], transport: str, local: tuple[str, int]
    ) -> Message | None:
        self.queries.append((client[0], transport, query))
        return self.responder(query, client, transport, local)

    def start(self) -> None:
        port = free_port(MASTER_HOST)
        self.ports.append(listen_tcp(R, R, port, self, interface=MASTER_HOST))
        self.ports.append(listen_udp(R, port, self, interface=MASTER_HOST))
        self.address = (MASTER_HOST, port)

    def stop(self) -> defer.Deferred[Any]:
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports])


def view_master(zone: Zone) -> View:
    return View("outside", {ORIGIN: zone}, allow_transfer={ORIGIN: ()})


def ixfr_responder(
    zone: Zone, answer: tuple[RR, ...]
) -> Callable[[Message, tuple[str, int], str, tuple[str, int]], Message]:
    """A master answering IXFR with ``answer`` and everything else from ``zone``."""
    view = View("outside", {ORIGIN: zone}, allow_transfer={ORIGIN: (_any(),)})

    def respond(
        query: Message, client: tuple[str, int], transport: str, local: tuple[str, int]
    ) -> Message:
        if query.question[0].qtype == RRType.IXFR:
            return make_response(query, LookupResult(RCode.NOERROR, True, answer))
        reply = view(query, client, transport, local)
        assert reply is not None
        return reply

    return respond


def _any() -> Any:
    import ipaddress

    return ipaddress.ip_network("0.0.0.0/0")


class TransferTests(unittest.TestCase):
    def master(self, responder: Callable[..., Message | None]) -> Master:
        master = Master(responder)
        master.start()
        self.addCleanup(master.stop)
        return master

    def setUp(self) -> None:
        self.client = XfrClient(R, R, SOURCE, soa_timeout=2.0, transfer_timeout=10.0)

    def allowed_view(self, zone: Zone) -> View:
        return View("outside", {ORIGIN: zone}, allow_transfer={ORIGIN: (_any(),)})

    @async_test
    async def test_axfr_from_our_own_view_brings_every_record_from_the_transfer_source(
        self,
    ) -> None:
        zone = make_zone(7, a("www.example.test.", 80), a("mail.example.test.", 25))
        master = self.master(self.allowed_view(zone))
        result = await self.client.transfer(master.address, ORIGIN)
        self.assertEqual(result.kind, "axfr")
        self.assertEqual(result.records[0], zone.soa)
        self.assertEqual(set(result.records), set(zone))
        self.assertEqual(len(result.records), len(zone))
        client, transport, query = master.queries[0]
        self.assertEqual((client, transport), (SOURCE, "tcp"))
        self.assertEqual(query.question[0].qtype, RRType.AXFR)

    @async_test
    async def test_soa_query_over_udp_gives_the_masters_soa(self) -> None:
        master = self.master(self.allowed_view(make_zone(42)))
        record = await self.client.query_soa(master.address, ORIGIN)
        self.assertEqual(soa_serial(record), 42)
        self.assertEqual(master.queries[0][:2], (SOURCE, "udp"))

    @async_test
    async def test_soa_query_for_a_zone_the_master_lacks_fails(self) -> None:
        master = self.master(self.allowed_view(make_zone(42)))
        with self.assertRaises(XfrError):
            await self.client.query_soa(master.address, n("other.test."))

    @async_test
    async def test_large_zone_spans_many_messages(self) -> None:
        extra = [
            RR(n(f"h{i}.example.test."), RRType.TXT, CLASS_IN, 60, b"\xff" + b"x" * 255)
            for i in range(600)
        ]
        zone = make_zone(3, *extra)
        master = self.master(self.allowed_view(zone))
        result = await self.client.transfer(master.address, ORIGIN)
        self.assertEqual(set(result.records), set(zone))

    @async_test
    async def test_refused_transfer_fails_with_the_rcode(self) -> None:
        master = self.master(view_master(make_zone(1)))  # allow_transfer empty: REFUSED
        with self.assertRaises(XfrError) as caught:
            await self.client.transfer(master.address, ORIGIN)
        self.assertEqual(caught.exception.rcode, RCode.REFUSED)

    @async_test
    async def test_record_outside_the_zone_is_rejected(self) -> None:
        zone = make_zone(5)
        bad = (zone.soa, a("www.elsewhere.test.", 1), zone.soa)
        master = self.master(lambda q, *_: make_response(q, LookupResult(0, True, bad)))
        with self.assertRaises(XfrError):
            await self.client.transfer(master.address, ORIGIN)

    @async_test
    async def test_axfr_must_start_with_soa(self) -> None:
        zone = make_zone(5)
        bad = (a("www.example.test.", 1), zone.soa)
        master = self.master(lambda q, *_: make_response(q, LookupResult(0, True, bad)))
        with self.assertRaises(XfrError):
            await self.client.transfer(master.address, ORIGIN)

    @async_test
    async def test_axfr_cut_short_fails_when_the_time_is_up(self) -> None:
        self.client = XfrClient(R, R, SOURCE, transfer_timeout=0.3)
        zone = make_zone(5)
        master = self.master(
            lambda q, *_: make_response(
                q, LookupResult(0, True, (zone.soa, a("x.example.test.", 2)))
            )
        )
        with self.assertRaises(XfrError):
            await self.client.transfer(master.address, ORIGIN)

    @async_test
    async def test_ixfr_differences_are_parsed_and_applied(self) -> None:
        old = make_zone(10, a("www.example.test.", 80))
        # 10 -> 11: www changes address; 11 -> 12: mail added (RFC 1995 4 layout).
        answer = (
            soa(12),
            soa(10),
            a("www.example.test.", 80),
            soa(11),
            a("www.example.test.", 81),
            soa(11),
            soa(12),
            a("mail.example.test.", 25),
            soa(12),
        )
        master = self.master(ixfr_responder(old, answer))
        result = await self.client.transfer(master.address, ORIGIN, old.soa)
        self.assertEqual(result.kind, "ixfr")
        self.assertEqual(len(result.differences), 2)
        query = master.queries[0][2]
        self.assertEqual(query.question[0].qtype, RRType.IXFR)
        self.assertEqual(query.authority, (old.soa,))
        records = apply_differences(old, result.differences)
        expected = set(make_zone(12, a("www.example.test.", 81), a("mail.example.test.", 25)))
        self.assertEqual(set(records), expected)

    @async_test
    async def test_ixfr_answered_with_a_full_zone_is_an_axfr(self) -> None:
        zone = make_zone(20, a("www.example.test.", 80))
        # Our own View answers IXFR with the whole zone (RFC 1995 4 allows it).
        master = self.master(self.allowed_view(zone))
        result = await self.client.transfer(master.address, ORIGIN, soa(19))
        self.assertEqual(result.kind, "axfr")
        self.assertEqual(set(result.records), set(zone))

    @async_test
    async def test_single_soa_ixfr_reply_means_current_or_use_axfr(self) -> None:
        zone = make_zone(30)
        master = self.master(ixfr_responder(zone, (soa(30),)))
        result = await self.client.transfer(master.address, ORIGIN, soa(30))
        self.assertEqual(result.kind, "current")
        newer = self.master(ixfr_responder(zone, (soa(31),)))
        with self.assertRaises(XfrError):
            await self.client.transfer(newer.address, ORIGIN, soa(30))

    @async_test
    async def test_ixfr_notimp_fails_with_the_rcode(self) -> None:
        master = self.master(lambda q, *_: error_response(q, RCode.NOTIMP))
        with self.assertRaises(XfrError) as caught:
            await self.client.transfer(master.address, ORIGIN, soa(1))
        self.assertEqual(caught.exception.rcode, RCode.NOTIMP)

    @async_test
    async def test_connection_refused_fails(self) -> None:
        port = free_port(MASTER_HOST)
        with self.assertRaises(XfrError):
            await self.client.transfer((MASTER_HOST, port), ORIGIN)

    @async_test
    async def test_silent_master_times_out_on_the_clock(self) -> None:
        clock = Clock()
        client = XfrClient(R, clock, SOURCE, transfer_timeout=30.0)
        factory = protocol.ServerFactory.forProtocol(protocol.Protocol)  # accepts, never answers
        port = R.listenTCP(0, factory, interface=MASTER_HOST)
        self.addCleanup(port.stopListening)
        d = client.transfer((MASTER_HOST, port.getHost().port), ORIGIN)
        clock.advance(29)
        self.assertNoResult(d)
        clock.advance(1)
        self.failureResultOf(d, XfrError)
        self.assertFalse(clock.getDelayedCalls())


class _Garbage(protocol.Protocol):
    """Answers any query with one framed message: ``self.factory.reply``."""

    def dataReceived(self, data: bytes) -> None:
        reply: bytes = self.factory.reply  # type: ignore[attr-defined]
        self.transport.write(len(reply).to_bytes(2, "big") + reply)  # type: ignore[union-attr,misc,call-arg]


class HostileMasterTests(unittest.TestCase):
    def serve(self, reply: bytes) -> tuple[str, int]:
        factory = protocol.ServerFactory.forProtocol(_Garbage)
        factory.reply = reply  # type: ignore[attr-defined]
        port = R.listenTCP(0, factory, interface=MASTER_HOST)
        self.addCleanup(port.stopListening)
        return (MASTER_HOST, port.getHost().port)

    @async_test
    async def test_malformed_reply_fails_cleanly(self) -> None:
        client = XfrClient(R, R, SOURCE, transfer_timeout=5)
        address = self.serve(b"\x12\x34\x80\x00\x00\x01\x00\x05" + b"\xff" * 20)
        with self.assertRaises(XfrError):
            await client.transfer(address, ORIGIN)

    @async_test
    async def test_reply_to_another_query_fails(self) -> None:
        zone = make_zone(1)
        # Ids are random (1 in 65536 could match), so the question is wrong too.
        reply = Message(
            id=1,
            qr=True,
            aa=True,
            question=(Question(n("other.test."), RRType.AXFR, CLASS_IN),),
            answer=(zone.soa, zone.soa),
        )
        client = XfrClient(R, R, SOURCE, transfer_timeout=5)
        with self.assertRaises(XfrError):
            await client.transfer(self.serve(encode(reply)), ORIGIN)


def _rr_sets() -> Any:
    from hypothesis import strategies as st

    hosts = st.sampled_from([f"h{i}.example.test." for i in range(6)])
    return st.lists(st.tuples(hosts, st.integers(0, 3)), max_size=8).map(
        lambda items: frozenset(a(host, last) for host, last in items)
    )


def test_ixfr_stream_parse_and_apply_matches_the_final_version() -> None:
    """Any chain of versions, sent as RFC 1995 differences, rebuilds the last version."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from appliance.dns.xfr import _Stream

    @settings(max_examples=150, deadline=None)
    @given(st.lists(_rr_sets(), min_size=2, max_size=5), st.integers(0, 2**32 - 1))
    def check(versions: list[frozenset[RR]], start: int) -> None:
        serials = [(start + i) % 2**32 for i in range(len(versions))]
        base = make_zone(serials[0], *sorted(versions[0]))
        body: list[RR] = [soa(serials[-1])]
        for i in range(1, len(versions)):
            old, new = versions[i - 1], versions[i]
            body += [soa(serials[i - 1]), *sorted(old - new), soa(serials[i]), *sorted(new - old)]
        body.append(soa(serials[-1]))
        stream = _Stream(RRType.IXFR, ORIGIN, serials[0], 10_000)
        # Split the answer over messages at arbitrary points, as a master may.
        chunks = [body[i : i + 3] for i in range(0, len(body), 3)]
        for index, chunk in enumerate(chunks):
            q = (Question(ORIGIN, RRType.IXFR, CLASS_IN),)
            message = Message(id=9, qr=True, question=q, answer=tuple(chunk))
            stream.message(message, 9, index == 0)
        assert stream.done
        result = stream.result()
        assert result.kind == "ixfr"
        records = apply_differences(base, result.differences)
        assert set(records) == set(make_zone(serials[-1], *sorted(versions[-1])))

    check()
