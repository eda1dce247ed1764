"""RecursiveView: inside zones win, recursion only for allowed clients with RD=1, RA, SERVFAIL."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from appliance.dns import wire
from appliance.dns.cache import POSITIVE, CachedAnswer, DNSCache
from appliance.dns.client import DNSClient
from appliance.dns.listener import DNSServerCore, listen_udp
from appliance.dns.recursion import RecursiveView
from appliance.dns.resolver import Resolver
from appliance.dns.rr import LookupResult, RCode
from appliance.dns.view import View
from appliance.dns.wire import Edns, Message, Question
from tests.test_dns_resolver_fakes import (
    FakeUpstream,
    R,
    make_zone,
    n,
    rr_a,
    rr_cname,
    rr_ns,
    rr_soa,
    zone_answerer,
)

INSIDE = make_zone(
    "example.test",
    rr_a("www.example.test", "127.0.1.80"),
    rr_cname("ext.example.test", "www.remote.test"),
    rr_cname("hop.example.test", "host.corp.test"),
    rr_ns("ad.example.test", "dc.ad.example.test"),
    rr_a("dc.ad.example.test", "127.0.1.53"),
)
CORP = make_zone("corp.test", rr_a("host.corp.test", "127.0.1.5"))
REMOTE = make_zone("remote.test", rr_a("www.remote.test", "192.0.2.7"))
LAN = (ipaddress.ip_network("127.0.1.0/24"),)
LAN_CLIENT = ("127.0.1.9", 5000)
STRANGER = ("127.0.2.99", 5000)
LOCAL = ("127.0.0.20", 53)


def A(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed


class FakeResolver:
    """Answers from a table; ``cache`` entries are answered synchronously."""

    def __init__(self) -> None:
        self.table: dict[tuple[bytes, int], LookupResult] = {
            (n("www.remote.test"), 1): LookupResult(
                RCode.NOERROR, False, (rr_a("www.remote.test", "192.0.2.7"),)
            ),
            (n("gone.remote.test"), 1): LookupResult(
                RCode.NXDOMAIN, False, (), (rr_soa("remote.test"),)
            ),
            (n("broken.test"), 1): LookupResult(RCode.SERVFAIL, False),
        }
        self.cache: dict[tuple[bytes, int], LookupResult] = {}
        self.asked: list[tuple[bytes, int]] = []
        self.delegations: list[LookupResult | None] = []
        self.explode = False

    def cached(self, qname: bytes, qtype: int, qclass: int = 1) -> LookupResult | None:
        return self.cache.get((qname.lower(), qtype))

    def cached_hit(self, qname: bytes, qtype: int, qclass: int = 1) -> CachedAnswer | None:
        found = self.cached(qname, qtype, qclass)
        if found is None or found.rcode != 0 or not found.answer:
            return None
        return CachedAnswer(POSITIVE, found.answer, 3)

    def resolve(
        self, qname: bytes, qtype: int, qclass: int = 1, delegation: LookupResult | None = None
    ) -> defer.Deferred[LookupResult]:
        self.asked.append((qname.lower(), qtype))
        self.delegations.append(delegation)
        if self.explode:
            return defer.fail(RuntimeError("resolver bug"))
        return defer.succeed(
            self.table.get((qname.lower(), qtype), LookupResult(RCode.SERVFAIL, False))
        )


def query(name: str, qtype: int = 1, rd: bool = True, edns: bool = False) -> Message:
    return Message(
        id=77, rd=rd, question=(Question(n(name), qtype, 1),), edns=Edns() if edns else None
    )


def make(**view_kwargs: Any) -> tuple[RecursiveView, FakeResolver]:
    view = View("inside", {n("example.test"): INSIDE, n("corp.test"): CORP}, **view_kwargs)
    resolver = FakeResolver()
    return RecursiveView(view, resolver, LAN), resolver


def settle(result: Message | defer.Deferred[Message | None] | None) -> Message:
    if isinstance(result, defer.Deferred):
        out: list[Any] = []
        result.addBoth(out.append)
        assert out, "the reply did not fire"
        assert isinstance(out[0], Message), out[0]
        return out[0]
    assert isinstance(result, Message)
    return result


def test_inside_zone_wins_and_resolver_is_not_asked() -> None:
    rv, resolver = make()
    reply = settle(rv(query("www.example.test"), LAN_CLIENT, "udp", LOCAL))
    assert reply.aa and reply.ra and reply.rcode == RCode.NOERROR
    assert [rr.rdata for rr in reply.answer] == [A("127.0.1.80")]
    assert resolver.asked == []
    # Even a name the resolver would know is answered NXDOMAIN from the zone.
    resolver.table[(n("nothere.example.test"), 1)] = LookupResult(
        RCode.NOERROR, False, (rr_a("nothere.example.test", "127.66.66.66"),)
    )
    reply = settle(rv(query("nothere.example.test"), LAN_CLIENT, "udp", LOCAL))
    assert reply.rcode == RCode.NXDOMAIN and reply.aa
    assert resolver.asked == []


def test_stranger_gets_zone_data_without_ra_and_refused_outside() -> None:
    rv, resolver = make()
    reply = settle(rv(query("www.example.test"), STRANGER, "udp", LOCAL))
    assert reply.aa and not reply.ra
    reply = settle(rv(query("www.remote.test"), STRANGER, "udp", LOCAL))
    assert reply.rcode == RCode.REFUSED and not reply.ra
    assert resolver.asked == []


def test_allowed_client_recurses_with_ra() -> None:
    rv, resolver = make()
    reply = settle(rv(query("www.remote.test", edns=True), LAN_CLIENT, "udp", LOCAL))
    assert reply.rcode == RCode.NOERROR and reply.ra and not reply.aa and reply.qr
    assert reply.id == 77 and reply.question == query("www.remote.test").question
    assert [rr.rdata for rr in reply.answer] == [A("192.0.2.7")]
    assert reply.edns is not None
    assert resolver.asked == [(n("www.remote.test"), 1)]


def test_rd_clear_is_refused_even_for_allowed_clients() -> None:
    rv, resolver = make()
    reply = settle(rv(query("www.remote.test", rd=False), LAN_CLIENT, "udp", LOCAL))
    assert reply.rcode == RCode.REFUSED and reply.ra
    assert resolver.asked == []


def test_nxdomain_passes_through_with_soa() -> None:
    rv, _ = make()
    reply = settle(rv(query("gone.remote.test"), LAN_CLIENT, "udp", LOCAL))
    assert reply.rcode == RCode.NXDOMAIN and reply.authority[0].rtype == 6


def test_resolver_failures_are_servfail() -> None:
    rv, resolver = make()
    reply = settle(rv(query("broken.test"), LAN_CLIENT, "udp", LOCAL))
    assert reply.rcode == RCode.SERVFAIL and reply.ra
    resolver.explode = True
    reply = settle(rv(query("www.remote.test"), LAN_CLIENT, "udp", LOCAL))
    assert reply.rcode == RCode.SERVFAIL and reply.ra and reply.answer == ()


def test_cache_hit_is_answered_synchronously() -> None:
    rv, resolver = make()
    resolver.cache[(n("www.remote.test"), 1)] = LookupResult(
        RCode.NOERROR, False, (rr_a("www.remote.test", "192.0.2.7", 99),)
    )
    reply = rv(query("WWW.remote.test"), LAN_CLIENT, "udp", LOCAL)
    assert isinstance(reply, Message)
    assert reply.answer[0].ttl == 99
    assert resolver.asked == []


def test_cname_leaving_the_inside_zone_is_completed_by_the_resolver() -> None:
    rv, resolver = make()
    reply = settle(rv(query("ext.example.test"), LAN_CLIENT, "udp", LOCAL))
    assert reply.rcode == RCode.NOERROR and reply.aa and reply.ra
    assert [rr.rtype for rr in reply.answer] == [5, 1]
    assert reply.answer[1].rdata == A("192.0.2.7")
    # Into another inside zone: no resolver.
    resolver.asked.clear()
    reply = settle(rv(query("hop.example.test"), LAN_CLIENT, "udp", LOCAL))
    assert [rr.rdata for rr in reply.answer][1] == A("127.0.1.5")
    assert resolver.asked == []
    # Strangers only get the local part of the chain.
    reply = settle(rv(query("ext.example.test"), STRANGER, "udp", LOCAL))
    assert [rr.rtype for rr in reply.answer] == [5]


def test_delegation_below_an_inside_zone_is_recursed_into_for_allowed_clients() -> None:
    rv, resolver = make()
    resolver.table[(n("pc.ad.example.test"), 1)] = LookupResult(
        RCode.NOERROR, False, (rr_a("pc.ad.example.test", "127.0.1.77"),)
    )
    reply = settle(rv(query("pc.ad.example.test"), LAN_CLIENT, "udp", LOCAL))
    assert reply.ra and [rr.rdata for rr in reply.answer] == [A("127.0.1.77")]
    delegation = resolver.delegations[-1]
    assert delegation is not None and delegation.authority[0].rdata == n("dc.ad.example.test")
    # Strangers and RD=0 get the referral itself.
    for q, who in (
        (query("pc.ad.example.test"), STRANGER),
        (query("pc.ad.example.test", rd=False), LAN_CLIENT),
    ):
        reply = settle(rv(q, who, "udp", LOCAL))
        assert not reply.aa and reply.answer == () and reply.authority[0].rtype == 2
    assert len(resolver.asked) == 1


def test_view_allow_query_still_applies() -> None:
    rv, resolver = make(allow_query=(ipaddress.ip_network("127.0.1.128/25"),))
    reply = settle(rv(query("www.remote.test"), LAN_CLIENT, "udp", LOCAL))
    assert reply.rcode == RCode.REFUSED
    reply = settle(rv(query("www.example.test"), LAN_CLIENT, "udp", LOCAL))
    assert reply.rcode == RCode.REFUSED
    assert resolver.asked == []


def test_other_classes_are_refused_and_transfers_go_to_the_view() -> None:
    rv, resolver = make()
    chaos = Message(id=1, rd=True, question=(Question(n("version.bind"), 16, 3),))
    assert settle(rv(chaos, LAN_CLIENT, "udp", LOCAL)).rcode == RCode.REFUSED
    axfr = Message(id=2, question=(Question(n("example.test"), 252, 1),))
    reply = settle(rv(axfr, LAN_CLIENT, "tcp", LOCAL))
    assert reply.rcode == RCode.REFUSED  # no allow_transfer configured
    assert resolver.asked == []


def test_through_the_listener_core() -> None:
    rv, _ = make()
    core = DNSServerCore(rv)
    data = wire.encode(query("www.remote.test", edns=True))
    out = core.handle(data, LAN_CLIENT, "udp", LOCAL)
    if isinstance(out, defer.Deferred):
        got: list[Any] = []
        out.addBoth(got.append)
        out = got[0]
    assert isinstance(out, bytes)
    reply = wire.decode(out)
    assert reply.ra and [rr.rdata for rr in reply.answer] == [A("192.0.2.7")]


class EndToEnd(unittest.TestCase):
    """The real Resolver behind RecursiveView, forwarding to a fake forwarder on loopback."""

    timeout = 20

    def test_forwarded_answer_and_then_cache(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._scenario())

    async def _scenario(self) -> None:
        def recursive(q: Message) -> Message | None:
            reply = zone_answerer(REMOTE)(q)
            return None if reply is None else reply._replace(ra=True, aa=False)

        forwarder = FakeUpstream("127.0.2.10", recursive)
        forwarder.start()
        self.addCleanup(forwarder.stop)
        clock = Clock()
        resolver = Resolver(
            DNSCache(clock),
            DNSClient(R, clock),
            clock,
            forwarders=[forwarder.address],
            forward_only=True,
        )
        view = View("inside", {n("example.test"): INSIDE})
        rv = RecursiveView(view, resolver, LAN)
        first = rv(query("www.remote.test"), LAN_CLIENT, "udp", LOCAL)
        assert isinstance(first, defer.Deferred)
        reply = await first
        assert reply is not None
        self.assertEqual([rr.rdata for rr in reply.answer], [A("192.0.2.7")])
        self.assertTrue(reply.ra)
        clock.advance(10)
        second = rv(query("www.remote.test"), LAN_CLIENT, "udp", LOCAL)
        assert isinstance(second, Message)
        self.assertEqual(second.answer[0].ttl, 290)
        self.assertEqual(len(forwarder.queries), 1)
        # A chain out of the inside zone completes through the real resolver.
        chained = rv(query("ext.example.test"), LAN_CLIENT, "udp", LOCAL)
        assert isinstance(chained, defer.Deferred)
        reply = await chained
        assert reply is not None
        self.assertEqual([rr.rtype for rr in reply.answer], [5, 1])

    def test_lan_client_over_udp_through_the_listener(self) -> defer.Deferred[None]:
        return defer.ensureDeferred(self._over_udp())

    async def _over_udp(self) -> None:
        def recursive(q: Message) -> Message | None:
            reply = zone_answerer(REMOTE)(q)
            return None if reply is None else reply._replace(ra=True, aa=False)

        forwarder = FakeUpstream("127.0.2.10", recursive)
        forwarder.start()
        self.addCleanup(forwarder.stop)
        clock = Clock()
        resolver = Resolver(
            DNSCache(clock),
            DNSClient(R, clock, "127.0.0.1"),
            clock,
            forwarders=[forwarder.address],
            forward_only=True,
        )
        view = View("inside", {n("example.test"): INSIDE})
        allowed = (ipaddress.ip_network("127.0.1.0/24"),)
        port = listen_udp(R, 0, RecursiveView(view, resolver, allowed), interface="127.0.0.20")
        self.addCleanup(port.stopListening)
        server = ("127.0.0.20", port.getHost().port)
        lan = DNSClient(R, clock, "127.0.1.9")
        reply = await lan.query(server, n("www.remote.test"), 1, rd=True)
        self.assertEqual((reply.rcode, reply.ra, reply.aa), (RCode.NOERROR, True, False))
        self.assertEqual([rr.rdata for rr in reply.answer], [A("192.0.2.7")])
        self.assertIsNotNone(reply.edns)
        local = await lan.query(server, n("www.example.test"), 1, rd=True)
        self.assertTrue(local.aa and local.ra)
        # A client outside allow_recursion is refused.
        stranger = DNSClient(R, clock, "127.0.2.99")
        refused = await stranger.query(server, n("www.remote.test"), 1, rd=True)
        self.assertEqual((refused.rcode, refused.ra), (RCode.REFUSED, False))
        self.assertEqual(len(forwarder.queries), 1)


def test_cached_answers_of_every_kind_are_synchronous() -> None:
    clock = Clock()
    cache = DNSCache(clock)
    cache.put_rrset([rr_a("www.remote.test", "192.0.2.7", 300)])
    cache.put_negative(n("gone.remote.test"), 1, 1, True, rr_soa("remote.test", minimum=60))
    cache.put_negative(n("www.remote.test"), 28, 1, False, rr_soa("remote.test", minimum=60))
    cache.put_rrset([rr_cname("alias.remote.test", "www.remote.test")])
    resolver = Resolver(cache, None, clock, forwarders=[("127.0.2.10", 53)], forward_only=True)  # type: ignore[arg-type]
    rv = RecursiveView(View("inside", {n("example.test"): INSIDE}), resolver, LAN)
    clock.advance(10)
    cache.put_servfail(n("broken.test"), 1)
    expected = {
        ("www.remote.test", 1): (RCode.NOERROR, [1], []),
        ("gone.remote.test", 15): (RCode.NXDOMAIN, [], [6]),
        ("www.remote.test", 28): (RCode.NOERROR, [], [6]),
        ("broken.test", 1): (RCode.SERVFAIL, [], []),
        ("alias.remote.test", 1): (RCode.NOERROR, [5, 1], []),
    }
    for (name, qtype), (rcode, answer, authority) in expected.items():
        reply = rv(query(name, qtype, edns=True), LAN_CLIENT, "udp", LOCAL)
        assert isinstance(reply, Message), name
        assert (reply.rcode, reply.ra, reply.aa) == (rcode, True, False), name
        assert [rr.rtype for rr in reply.answer] == answer, name
        assert [rr.rtype for rr in reply.authority] == authority, name
        assert reply.edns is not None
    negative = rv(query("gone.remote.test"), LAN_CLIENT, "udp", LOCAL)
    assert isinstance(negative, Message) and negative.authority[0].ttl == 50
    assert negative.edns is None
