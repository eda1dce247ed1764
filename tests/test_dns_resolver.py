"""Resolver: forwarding, iteration through a fake root -> TLD -> domain hierarchy on loopback.

The hierarchy (all on one common port, as real servers share port 53):
127.0.2.1 serves the root, 127.0.2.2 the ``test.`` and ``net.`` TLDs,
127.0.2.3 ``example.test``, ``other.test``, ``glueless.test`` (delegated to
an NS name under ``net.``, with no glue) and ``provider.net``.  Timeouts run
on a task.Clock, advanced only once a silent server has provably received
its query, so nothing depends on wall-clock timing.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from appliance.dns import wire
from appliance.dns.cache import DNSCache
from appliance.dns.client import DNSClient
from appliance.dns.resolver import Resolver, load_root_hints
from appliance.dns.rr import LookupResult, RCode
from appliance.dns.wire import Message
from tests.harness import async_test
from tests.test_dns_resolver_fakes import (
    FakeUpstream,
    R,
    free_common_port,
    make_zone,
    n,
    rr_a,
    rr_cname,
    rr_mx,
    rr_ns,
    turns,
    until,
    zone_answerer,
)

ROOT_ZONE = make_zone(
    ".",
    rr_ns(".", "a.root-servers.net"),
    rr_ns("test", "ns.test"),
    rr_a("ns.test", "127.0.2.2"),
    rr_ns("net", "ns.nic.net"),
    rr_a("ns.nic.net", "127.0.2.2"),
)
TEST_ZONE = make_zone(
    "test",
    rr_ns("test", "ns.test"),
    rr_a("ns.test", "127.0.2.2"),
    rr_ns("example.test", "ns.example.test"),
    rr_a("ns.example.test", "127.0.2.3"),
    rr_ns("other.test", "ns.other.test"),
    rr_a("ns.other.test", "127.0.2.3"),
    rr_ns("glueless.test", "ns.provider.net"),
    rr_ns("twodns.test", "ns1.twodns.test"),
    rr_ns("twodns.test", "ns2.twodns.test"),
    rr_a("ns1.twodns.test", "127.0.2.5"),
    rr_a("ns2.twodns.test", "127.0.2.3"),
    rr_ns("tcponly.test", "ns.tcponly.test"),
    rr_a("ns.tcponly.test", "127.0.2.6"),
    rr_ns("loopa.test", "ns.loopb.test"),
    rr_ns("loopb.test", "ns.loopa.test"),
)
NET_ZONE = make_zone(
    "net",
    rr_ns("net", "ns.nic.net"),
    rr_a("ns.nic.net", "127.0.2.2"),
    rr_ns("provider.net", "ns.provider.net"),
    rr_a("ns.provider.net", "127.0.2.3"),
)
EXAMPLE = make_zone(
    "example.test",
    rr_ns("example.test", "ns.example.test"),
    rr_a("ns.example.test", "127.0.2.3"),
    rr_a("www.example.test", "192.0.2.80"),
    rr_a("mail.example.test", "192.0.2.25"),
    rr_mx("example.test", 10, "mail.example.test"),
    rr_cname("alias.example.test", "www.other.test"),
    rr_cname("loop1.example.test", "loop2.example.test"),
    rr_cname("loop2.example.test", "loop1.example.test"),
    rr_a("poison.example.test", "192.0.2.99"),
    *[rr_cname(f"long{i}.example.test", f"long{i + 1}.example.test") for i in range(11)],
    rr_cname("long11.example.test", "www.example.test"),
    rr_cname("s0.example.test", "s1.example.test"),
    rr_cname("s1.example.test", "s2.example.test"),
    rr_cname("s2.example.test", "www.example.test"),
    minimum=60,
)
OTHER = make_zone(
    "other.test", rr_ns("other.test", "ns.other.test"), rr_a("www.other.test", "192.0.2.81")
)
GLUELESS = make_zone(
    "glueless.test",
    rr_ns("glueless.test", "ns.provider.net"),
    rr_a("host.glueless.test", "192.0.2.90"),
)
TWODNS = make_zone(
    "twodns.test",
    rr_ns("twodns.test", "ns1.twodns.test"),
    rr_ns("twodns.test", "ns2.twodns.test"),
    rr_a("www.twodns.test", "192.0.2.70"),
)
TCPONLY = make_zone(
    "tcponly.test",
    rr_ns("tcponly.test", "ns.tcponly.test"),
    rr_a("www.tcponly.test", "192.0.2.66"),
)
PROVIDER = make_zone(
    "provider.net", rr_ns("provider.net", "ns.provider.net"), rr_a("ns.provider.net", "127.0.2.3")
)

POISON = (
    rr_a("www.other.test", "127.66.66.66"),  # out of bailiwick in the answer section
)
POISON_AUTHORITY = (rr_ns("other.test", "ns.evil.net"),)
POISON_ADDITIONAL = (
    rr_a("ns.evil.net", "127.66.66.66"),
    rr_a("ns.provider.net", "127.66.66.66"),
    rr_a("www.other.test", "127.66.66.66"),
)


def domain_answerer() -> Callable[[Message], Message | None]:
    honest = zone_answerer(EXAMPLE, OTHER, GLUELESS, PROVIDER, TWODNS)

    def answer(query: Message) -> Message | None:
        reply = honest(query)
        if reply is not None and query.question[0].name.lower() == n("poison.example.test"):
            reply = reply._replace(
                answer=reply.answer + POISON,
                authority=reply.authority + POISON_AUTHORITY,
                additional=reply.additional + POISON_ADDITIONAL,
            )
        return reply

    return answer


def recursive_answerer(*zones: Any) -> Callable[[Message], Message | None]:
    """A forwarder: answers with RA=1 from the given zones (as if it had recursed)."""
    inner = zone_answerer(*zones)

    def answer(query: Message) -> Message | None:
        reply = inner(query)
        return None if reply is None else reply._replace(ra=True, aa=False)

    return answer


class InOrder(random.Random):
    """Keeps servers in the order given, so tests know which one is asked first."""

    def shuffle(self, x: Any, *args: Any) -> None:
        return None


class RecordingClient:
    """Wraps DNSClient and records every destination, so 'nothing sent elsewhere' is checkable."""

    def __init__(self, inner: DNSClient) -> None:
        self.inner = inner
        self.sent: list[tuple[tuple[str, int], bytes, int, bool]] = []

    def query(
        self,
        server: tuple[str, int],
        qname: bytes,
        qtype: int,
        qclass: int = 1,
        *,
        rd: bool = False,
        timeout: float = 2.0,
    ) -> defer.Deferred[Message]:
        self.sent.append((server, qname, qtype, rd))
        return self.inner.query(server, qname, qtype, qclass, rd=rd, timeout=timeout)




def addresses(result: LookupResult) -> list[str]:
    return [".".join(str(b) for b in rr.rdata) for rr in result.answer if rr.rtype == 1]


class Hierarchy(unittest.TestCase):
    """Starts the fake hierarchy; subclasses build resolvers on it."""

    timeout = 20

    def setUp(self) -> None:
        hosts = [
            "127.0.2.1",
            "127.0.2.2",
            "127.0.2.3",
            "127.0.2.5",
            "127.0.2.6",
            "127.0.2.10",
            "127.0.2.11",
        ]
        self.port = free_common_port(hosts)
        self.root = self.server("127.0.2.1", zone_answerer(ROOT_ZONE))
        self.tld = self.server("127.0.2.2", zone_answerer(TEST_ZONE, NET_ZONE))
        self.domain = self.server("127.0.2.3", domain_answerer())
        self.dead = self.server("127.0.2.5", zone_answerer(TWODNS), mode="silent")
        self.truncating = self.server("127.0.2.6", zone_answerer(TCPONLY), mode="truncate")
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.cache = DNSCache(self.clock, 1000)
        self.client = RecordingClient(DNSClient(R, self.clock, "127.0.0.1"))

    def server(self, host: str, answer: Any, mode: str = "normal") -> FakeUpstream:
        server = FakeUpstream(host, answer, mode)
        server.start(self.port)
        self.addCleanup(server.stop)
        return server

    def iterator(self, **kwargs: Any) -> Resolver:
        kwargs.setdefault("root_hints", (("a.root-servers.net", "127.0.2.1", self.port),))
        return Resolver(
            self.cache,
            self.client,
            self.clock,
            server_port=self.port,
            query_timeout=2,
            timeout=10,
            rng=InOrder(),
            **kwargs,
        )

    async def wait_silent(
        self, server: FakeUpstream, d: defer.Deferred[Any], seconds: float = 2
    ) -> None:
        """Let ``server`` receive one more query, then run the clock past the query timeout."""
        seen = len(server.queries)
        await until(lambda: len(server.queries) > seen or d.called)
        if not d.called:
            self.clock.advance(seconds)


class IterationTests(Hierarchy):
    @async_test
    async def test_referrals_from_root_to_domain_then_cache(self) -> None:
        resolver = self.iterator()
        result = await resolver.resolve(n("WWW.example.test"), 1)
        self.assertEqual(result.rcode, RCode.NOERROR)
        self.assertEqual(addresses(result), ["192.0.2.80"])
        self.assertEqual(
            (len(self.root.queries), len(self.tld.queries), len(self.domain.queries)), (1, 1, 1)
        )
        self.assertTrue(
            all(not q.rd for s in (self.root, self.tld, self.domain) for _, q in s.queries)
        )
        # Cached: no more packets, TTL counting down.
        self.clock.advance(100)
        again = await resolver.resolve(n("www.example.test"), 1)
        self.assertEqual(addresses(again), ["192.0.2.80"])
        self.assertEqual(again.answer[0].ttl, 200)
        self.assertEqual(len(self.domain.queries), 1)
        # The delegation is cached too: a sibling name goes straight to the domain server.
        await resolver.resolve(n("mail.example.test"), 1)
        self.assertEqual(
            (len(self.root.queries), len(self.tld.queries), len(self.domain.queries)), (1, 1, 2)
        )

    @async_test
    async def test_glueless_delegation_fetches_the_ns_address(self) -> None:
        resolver = self.iterator()
        result = await resolver.resolve(n("host.glueless.test"), 1)
        self.assertEqual(addresses(result), ["192.0.2.90"])
        asked = [q.question[0].name.lower() for _, q in self.domain.queries]
        self.assertIn(n("ns.provider.net"), asked)

    @async_test
    async def test_cname_chain_across_zones(self) -> None:
        resolver = self.iterator()
        result = await resolver.resolve(n("alias.example.test"), 1)
        self.assertEqual(result.rcode, RCode.NOERROR)
        self.assertEqual([rr.rtype for rr in result.answer], [5, 1])
        self.assertEqual(result.answer[0].rdata, n("www.other.test"))
        self.assertEqual(addresses(result), ["192.0.2.81"])
        # And the whole chain now comes from the cache alone.
        cached = resolver.cached(n("alias.example.test"), 1)
        assert cached is not None
        self.assertEqual([rr.rtype for rr in cached.answer], [5, 1])

    @async_test
    async def test_truncated_answer_is_fetched_over_tcp(self) -> None:
        resolver = self.iterator()
        result = await resolver.resolve(n("www.tcponly.test"), 1)
        self.assertEqual(addresses(result), ["192.0.2.66"])
        self.assertEqual([t for t, _ in self.truncating.queries], ["udp", "tcp"])

    @async_test
    async def test_cname_loop_is_servfail(self) -> None:
        resolver = self.iterator()
        result = await resolver.resolve(n("loop1.example.test"), 1)
        self.assertEqual(result.rcode, RCode.SERVFAIL)

    @async_test
    async def test_cname_chain_length_is_bounded(self) -> None:
        resolver = self.iterator()
        short = await resolver.resolve(n("s0.example.test"), 1)
        self.assertEqual([rr.rtype for rr in short.answer], [5, 5, 5, 1])
        result = await resolver.resolve(n("long0.example.test"), 1)
        self.assertEqual(result.rcode, RCode.SERVFAIL)

    @async_test
    async def test_glueless_ns_loop_ends_in_servfail_within_budget(self) -> None:
        resolver = self.iterator()
        result = await resolver.resolve(n("www.loopa.test"), 1)
        self.assertEqual(result.rcode, RCode.SERVFAIL)
        # Far below the budget: each NS name is looked up at most once at a time.
        self.assertLessEqual(len(self.client.sent), 12)

    @async_test
    async def test_nxdomain_cached_for_soa_minimum_then_asked_again(self) -> None:
        resolver = self.iterator()
        result = await resolver.resolve(n("nope.example.test"), 1)
        self.assertEqual(result.rcode, RCode.NXDOMAIN)
        self.assertEqual(result.authority[0].rtype, 6)
        self.assertEqual(result.authority[0].ttl, 60)
        before = len(self.domain.queries)
        self.clock.advance(59)
        again = await resolver.resolve(n("nope.example.test"), 28)  # NXDOMAIN covers every type
        self.assertEqual(again.rcode, RCode.NXDOMAIN)
        self.assertEqual(again.authority[0].ttl, 1)
        self.assertEqual(len(self.domain.queries), before)
        self.clock.advance(2)
        third = await resolver.resolve(n("nope.example.test"), 1)
        self.assertEqual(third.rcode, RCode.NXDOMAIN)
        self.assertEqual(len(self.domain.queries), before + 1)

    @async_test
    async def test_nodata_has_soa_and_is_cached(self) -> None:
        resolver = self.iterator()
        result = await resolver.resolve(n("www.example.test"), 28)
        self.assertEqual((result.rcode, result.answer), (RCode.NOERROR, ()))
        self.assertEqual(result.authority[0].rtype, 6)
        count = len(self.domain.queries)
        await resolver.resolve(n("www.example.test"), 28)
        self.assertEqual(len(self.domain.queries), count)

    @async_test
    async def test_poisoning_attempt_is_neither_cached_nor_used(self) -> None:
        resolver = self.iterator()
        result = await resolver.resolve(n("poison.example.test"), 1)
        self.assertEqual(addresses(result), ["192.0.2.99"])
        for name in ("www.other.test", "ns.evil.net", "ns.provider.net"):
            self.assertIsNone(self.cache.get(n(name), 1), name)
        self.assertIsNone(self.cache.get(n("other.test"), 2))
        honest = await resolver.resolve(n("www.other.test"), 1)
        self.assertEqual(addresses(honest), ["192.0.2.81"])

    @async_test
    async def test_dead_server_is_skipped_after_its_timeout(self) -> None:
        resolver = self.iterator()
        d = resolver.resolve(n("www.twodns.test"), 1)
        await self.wait_silent(self.dead, d)
        result = await d
        self.assertEqual(addresses(result), ["192.0.2.70"])
        self.assertEqual(len(self.dead.queries), 1)

    @async_test
    async def test_dead_root_gives_servfail_within_timeout_and_is_cached_briefly(self) -> None:
        resolver = self.iterator(root_hints=(("a.root-servers.net", "127.0.2.5", self.port),))
        d = resolver.resolve(n("www.example.test"), 1)
        start = self.clock.seconds()
        while not d.called:
            await self.wait_silent(self.dead, d)
        result = await d
        self.assertEqual(result.rcode, RCode.SERVFAIL)
        self.assertLessEqual(self.clock.seconds() - start, 10)
        sent = len(self.client.sent)
        again = await resolver.resolve(n("www.example.test"), 1)
        self.assertEqual(again.rcode, RCode.SERVFAIL)
        self.assertEqual(len(self.client.sent), sent)

    @async_test
    async def test_identical_questions_in_flight_share_one_resolution(self) -> None:
        resolver = self.iterator()
        first = resolver.resolve(n("www.example.test"), 1)
        second = resolver.resolve(n("WWW.EXAMPLE.TEST"), 1)
        results = [await first, await second]
        self.assertEqual([addresses(r) for r in results], [["192.0.2.80"]] * 2)
        self.assertEqual(len(self.domain.queries), 1)

    @async_test
    async def test_local_delegation_is_asked_directly_not_forwarders_or_root(self) -> None:
        resolver = self.iterator(forwarders=[self.dead.address], forward_only=True)
        referral = LookupResult(
            RCode.NOERROR,
            False,
            (),
            (rr_ns("example.test", "ns.example.test"),),
            (rr_a("ns.example.test", "127.0.2.3"),),
        )
        result = await resolver.resolve(n("www.example.test"), 1, delegation=referral)
        self.assertEqual(addresses(result), ["192.0.2.80"])
        self.assertEqual(self.dead.queries, [])
        self.assertEqual(self.root.queries, [])
        self.assertEqual([s for s, *_ in self.client.sent], [("127.0.2.3", self.port)])

    def test_meta_types_are_not_implemented(self) -> None:
        resolver = self.iterator()
        result = self.successResultOf(resolver.resolve(n("www.example.test"), 252))
        self.assertEqual(result.rcode, RCode.NOTIMP)
        self.assertEqual(self.client.sent, [])


class ForwardingTests(Hierarchy):
    def setUp(self) -> None:
        super().setUp()
        self.forwarder = self.server("127.0.2.10", recursive_answerer(EXAMPLE, OTHER))

    @async_test
    async def test_forwarder_gets_rd_and_root_gets_nothing(self) -> None:
        resolver = self.iterator(forwarders=[self.forwarder.address], forward_only=True)
        result = await resolver.resolve(n("www.example.test"), 1)
        self.assertEqual(addresses(result), ["192.0.2.80"])
        self.assertTrue(self.forwarder.queries[0][1].rd)
        self.assertEqual(self.root.queries, [])
        nx = await resolver.resolve(n("nope.example.test"), 1)
        self.assertEqual(nx.rcode, RCode.NXDOMAIN)

    @async_test
    async def test_forward_only_with_dead_forwarders_is_servfail_and_nothing_else_is_sent(
        self,
    ) -> None:
        dead1 = self.server("127.0.2.11", recursive_answerer(EXAMPLE), mode="silent")
        resolver = self.iterator(forwarders=[dead1.address, self.dead.address], forward_only=True)
        start = self.clock.seconds()
        d = resolver.resolve(n("www.example.test"), 1)
        await self.wait_silent(dead1, d)
        await self.wait_silent(self.dead, d)
        result = await d
        self.assertEqual(result.rcode, RCode.SERVFAIL)
        self.assertLessEqual(self.clock.seconds() - start, resolver.timeout)
        await turns()
        self.assertEqual(self.root.queries, [])
        self.assertEqual(self.tld.queries, [])
        self.assertEqual({s for s, *_ in self.client.sent}, {dead1.address, self.dead.address})

    @async_test
    async def test_a_failed_forwarder_is_asked_last_for_a_while(self) -> None:
        resolver = self.iterator(
            forwarders=[self.dead.address, self.forwarder.address], forward_only=True
        )
        d = resolver.resolve(n("www.example.test"), 1)
        await self.wait_silent(self.dead, d)
        self.assertEqual(addresses(await d), ["192.0.2.80"])
        # The next question goes to the live forwarder first: no clock advance needed.
        result = await resolver.resolve(n("mail.example.test"), 1)
        self.assertEqual(addresses(result), ["192.0.2.25"])
        self.assertEqual(len(self.dead.queries), 1)
        self.assertEqual(resolver.stats["upstream_failures"], 1)

    @async_test
    async def test_chain_into_a_local_zone_ends_in_local_data(self) -> None:
        def public_view(query: Message) -> Message:
            q = query.question[0]
            reply = wire.error_response(query, RCode.NOERROR, ra=True)
            if q.name.lower() == n("alias.remote.test"):
                reply = reply._replace(
                    answer=(
                        rr_cname("alias.remote.test", "www.inside.test"),
                        rr_a("www.inside.test", "127.66.66.66"),
                    )
                )
            return reply

        public = self.server("127.0.2.11", public_view)
        inside = make_zone("inside.test", rr_a("www.inside.test", "127.0.1.80"))

        def local_zones(name: bytes) -> Any:
            return inside if inside.contains(name) else None

        resolver = self.iterator(
            forwarders=[public.address], forward_only=True, local_zones=local_zones
        )
        result = await resolver.resolve(n("alias.remote.test"), 1)
        self.assertEqual([rr.rtype for rr in result.answer], [5, 1])
        self.assertEqual(addresses(result), ["127.0.1.80"])
        self.assertIsNone(self.cache.get(n("www.inside.test"), 1))
        self.assertEqual(len(public.queries), 1)
        again = await resolver.resolve(n("alias.remote.test"), 1)
        self.assertEqual(addresses(again), ["127.0.1.80"])
        self.assertEqual(len(public.queries), 1)

    @async_test
    async def test_too_many_resolutions_in_flight_fail_fast(self) -> None:
        resolver = self.iterator(forwarders=[self.dead.address], forward_only=True)
        resolver.max_recursions = 1
        first = resolver.resolve(n("www.example.test"), 1)
        second = await resolver.resolve(n("mail.example.test"), 1)
        self.assertEqual(second.rcode, RCode.SERVFAIL)
        self.assertEqual(resolver.stats["overload"], 1)
        self.assertFalse(first.called)
        await self.wait_silent(self.dead, first)
        self.assertEqual((await first).rcode, RCode.SERVFAIL)
        # Not cached as a failure: the overload was ours, not the name's.
        self.assertIsNone(self.cache.get(n("mail.example.test"), 1))

    @async_test
    async def test_forward_first_falls_back_to_iteration(self) -> None:
        resolver = self.iterator(forwarders=[self.dead.address], forward_only=False)
        d = resolver.resolve(n("www.example.test"), 1)
        await self.wait_silent(self.dead, d)
        result = await d
        self.assertEqual(addresses(result), ["192.0.2.80"])
        self.assertEqual(len(self.root.queries), 1)

    @async_test
    async def test_servfail_from_a_forwarder_moves_to_the_next(self) -> None:
        def servfail(query: Message) -> Message:
            return wire.error_response(query, RCode.SERVFAIL, ra=True)

        broken = self.server("127.0.2.11", servfail)
        resolver = self.iterator(
            forwarders=[broken.address, self.forwarder.address], forward_only=True
        )
        result = await resolver.resolve(n("www.example.test"), 1)
        self.assertEqual(addresses(result), ["192.0.2.80"])
        self.assertEqual(len(broken.queries), 1)

    @async_test
    async def test_forward_only_all_servfail_is_servfail_not_nxdomain(self) -> None:
        def servfail(query: Message) -> Message:
            return wire.error_response(query, RCode.SERVFAIL, ra=True)

        broken = self.server("127.0.2.11", servfail)
        resolver = self.iterator(forwarders=[broken.address], forward_only=True)
        result = await resolver.resolve(n("www.example.test"), 15)
        self.assertEqual(result.rcode, RCode.SERVFAIL)
        self.assertEqual(self.root.queries, [])


def test_root_hints_file_in_named_root_format(tmp_path: Path) -> None:
    path = tmp_path / "named.root"
    path.write_text(
        ";       This file holds the information on root name servers\n"
        ".                        3600000      NS    A.ROOT-SERVERS.NET.\n"
        "A.ROOT-SERVERS.NET.      3600000      A     127.0.2.1\n"
        "A.ROOT-SERVERS.NET.      3600000      AAAA  ::1\n"
        ".                        3600000      NS    B.ROOT-SERVERS.NET.\n"
        "B.ROOT-SERVERS.NET.      3600000      A     127.0.2.2 ; comment\n"
        "stray.example.           3600000      A     127.0.2.9\n"
        "; End of file\n"
    )
    hints = load_root_hints(path, port=5353)
    assert hints == (
        (n("a.root-servers.net"), "127.0.2.1", 5353),
        (n("a.root-servers.net"), "::1", 5353),
        (n("b.root-servers.net"), "127.0.2.2", 5353),
    )
    clock = Clock()
    resolver = Resolver(
        DNSCache(clock),
        RecordingClient(DNSClient(R, clock)),
        clock,
        root_hints=str(path),
        server_port=5353,
    )
    assert len(resolver.hints) == 3


def test_debian_root_hints_parse_but_are_never_queried_here() -> None:
    path = Path("/usr/share/dns/root.hints")
    if not path.exists():
        pytest.skip("dns-root-data not installed")
    hints = load_root_hints(path)
    assert len({name for name, _, _ in hints}) == 13
    clock = Clock()
    resolver = Resolver(
        DNSCache(clock), RecordingClient(DNSClient(R, clock)), clock, root_hints=path
    )
    zone, ns, glue = resolver._hints()
    # IPv6 addresses are left out unless use_ipv6.
    assert all(":" not in address for servers in glue.values() for address, _ in servers)
    assert zone == b"\x00" and len(ns) == 13


def test_root_hints_file_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.root"
    bad.write_text(".  3600000 NS A.ROOT.\nA.ROOT. 3600000 A 999.1.1.1\n")
    with pytest.raises(ValueError, match=r"bad\.root:2"):
        load_root_hints(bad)
    empty = tmp_path / "empty.root"
    empty.write_text("; nothing\n")
    with pytest.raises(ValueError, match="no root server"):
        load_root_hints(empty)
