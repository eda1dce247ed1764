"""MX selection per RFC 5321 5.1 and RFC 7505 against a fake resolver (MISSION M-6, R-1)."""

from __future__ import annotations

import random
from collections import Counter
from typing import TypeVar

from twisted.internet import defer

from appliance.dns.lookup import NoSuchDomain, TemporaryFailure
from appliance.mail import mx
from appliance.mail.mx import (
    Destination,
    Destinations,
    PermanentFailure,
    SelfIsBestMX,
    destinations,
)
from appliance.mail.routing import MX, SMART_HOST, STATIC, Route

T = TypeVar("T")

OWN_NAMES = ("mail.example.test",)
OWN_ADDRESSES = ("127.0.0.10", "2001:db8::10")


class FakeResolver:
    """Answers from dictionaries; an exception instance as a value is raised (as an errback)."""

    def __init__(
        self,
        mx_records: dict[str, object] | None = None,
        addresses: dict[str, object] | None = None,
    ) -> None:
        self.mx_records = mx_records or {}
        self.address_records = addresses or {}
        self.queries: list[tuple[str, str]] = []

    def _answer(self, table: dict[str, object], name: str) -> defer.Deferred[object]:
        value = table.get(name, NoSuchDomain(name))
        if isinstance(value, Exception):
            return defer.fail(value)
        return defer.succeed(value)

    def mx(self, domain: str) -> defer.Deferred[object]:
        self.queries.append(("MX", domain))
        return self._answer(self.mx_records, domain)

    def addresses(self, host: str) -> defer.Deferred[object]:
        self.queries.append(("A/AAAA", host))
        return self._answer(self.address_records, host)

    def txt(self, name: str) -> defer.Deferred[list[bytes]]:
        raise NotImplementedError

    def ptr(self, address: str) -> defer.Deferred[list[str]]:
        raise NotImplementedError


def fired(d: defer.Deferred[T]) -> T:
    results: list[T] = []
    d.addCallback(results.append)
    assert results, "the Deferred did not fire"
    return results[0]


def run(
    resolver: FakeResolver,
    route: Route | None = None,
    seed: int = 1,
    **kw: int,
) -> mx.Result:
    route = route or Route(MX, "remote.test", 25, True)
    return fired(destinations(route, resolver, OWN_NAMES, OWN_ADDRESSES, random.Random(seed), **kw))


def addresses_of(result: mx.Result) -> list[str]:
    assert isinstance(result, Destinations), result
    return [d.address for d in result.hosts]


def test_sorted_by_preference_with_every_address_in_order() -> None:
    resolver = FakeResolver(
        {"remote.test": [(20, "mx2.remote.test"), (10, "mx1.remote.test.")]},
        {
            "mx1.remote.test": ["127.0.2.1", "2001:db8::1"],
            "mx2.remote.test": ["127.0.2.2"],
        },
    )
    result = run(resolver)
    assert isinstance(result, Destinations)
    assert result.hosts == (
        Destination("mx1.remote.test", "127.0.2.1", 25, 10),
        Destination("mx1.remote.test", "2001:db8::1", 25, 10),
        Destination("mx2.remote.test", "127.0.2.2", 25, 20),
    )


def test_equal_preferences_are_shuffled_fairly() -> None:
    hosts = ["a.remote.test", "b.remote.test", "c.remote.test"]
    resolver = FakeResolver(
        {"remote.test": [(10, h) for h in hosts] + [(5, "best.remote.test")]},
        {h: [f"127.0.2.{i}"] for i, h in enumerate([*hosts, "best.remote.test"], 1)},
    )
    rng = random.Random(20261122)
    firsts: Counter[str] = Counter()
    orders: set[tuple[str, ...]] = set()
    for _ in range(200):
        result = fired(
            destinations(
                Route(MX, "remote.test", 25, True), resolver, OWN_NAMES, OWN_ADDRESSES, rng
            )
        )
        assert isinstance(result, Destinations)
        names = tuple(d.host for d in result.hosts)
        assert names[0] == "best.remote.test"  # the lower preference always comes first
        assert sorted(names[1:]) == hosts
        firsts[names[1]] += 1
        orders.add(names[1:])
    # each of three hosts leads about 1/3 of the time (expected 66.7, sd 6.7)
    assert set(firsts) == set(hosts)
    assert all(45 <= n <= 90 for n in firsts.values()), firsts
    assert len(orders) == 6  # every permutation occurs


def test_implicit_mx_when_there_is_no_mx() -> None:
    resolver = FakeResolver({"remote.test": []}, {"remote.test": ["127.0.2.9", "2001:db8::9"]})
    result = run(resolver)
    assert isinstance(result, Destinations)
    assert [(d.host, d.address) for d in result.hosts] == [
        ("remote.test", "127.0.2.9"),
        ("remote.test", "2001:db8::9"),
    ]


def test_implicit_mx_without_addresses_is_permanent() -> None:
    result = run(FakeResolver({"remote.test": []}, {"remote.test": []}))
    assert isinstance(result, PermanentFailure)
    assert result.reply.code == 550 and result.reply.enhanced == "5.4.4"


def test_null_mx_fails_permanently_without_trying() -> None:
    resolver = FakeResolver({"remote.test": [(0, "")]}, {"remote.test": ["127.0.2.9"]})
    result = run(resolver)
    assert isinstance(result, PermanentFailure)
    assert result.reply.enhanced == "5.1.10" and result.reply.permanent
    assert resolver.queries == [("MX", "remote.test")]  # no address lookup, no connection
    dot = run(FakeResolver({"remote.test": [(0, ".")]}))
    assert isinstance(dot, PermanentFailure) and dot.reply.enhanced == "5.1.10"


def test_null_mx_next_to_real_mx_is_ignored() -> None:
    resolver = FakeResolver(
        {"remote.test": [(0, ""), (10, "mx.remote.test")]}, {"mx.remote.test": ["127.0.2.1"]}
    )
    assert addresses_of(run(resolver)) == ["127.0.2.1"]


def test_no_such_domain_is_permanent_5_1_2() -> None:
    result = run(FakeResolver())
    assert isinstance(result, PermanentFailure)
    assert (result.reply.code, result.reply.enhanced) == (550, "5.1.2")


def test_temporary_dns_failure_is_never_permanent() -> None:
    result = run(FakeResolver({"remote.test": TemporaryFailure("SERVFAIL")}))
    assert isinstance(result, mx.TemporaryFailure) and result.reply.temporary
    # address lookups timing out: temporary too
    result = run(
        FakeResolver(
            {"remote.test": [(10, "mx1.remote.test"), (20, "mx2.remote.test")]},
            {"mx1.remote.test": TemporaryFailure("t"), "mx2.remote.test": TemporaryFailure("t")},
        )
    )
    assert isinstance(result, mx.TemporaryFailure)
    # one MX host missing, the other timing out: still temporary
    result = run(
        FakeResolver(
            {"remote.test": [(10, "mx1.remote.test"), (20, "mx2.remote.test")]},
            {"mx2.remote.test": TemporaryFailure("t")},
        )
    )
    assert isinstance(result, mx.TemporaryFailure)
    # an unexpected exception from the resolver: temporary as well
    result = run(FakeResolver({"remote.test": RuntimeError("bug")}))
    assert isinstance(result, mx.TemporaryFailure)


def test_a_resolver_that_raises_synchronously_is_a_temporary_failure() -> None:
    class Broken(FakeResolver):
        def addresses(self, host: str) -> defer.Deferred[object]:
            raise RuntimeError("boom")

    result = run(Broken({"remote.test": [(10, "mx.remote.test")]}))
    assert isinstance(result, mx.TemporaryFailure)


def test_one_mx_host_missing_others_used() -> None:
    resolver = FakeResolver(
        {"remote.test": [(10, "gone.remote.test"), (20, "mx2.remote.test")]},
        {"mx2.remote.test": ["127.0.2.2"]},
    )
    assert addresses_of(run(resolver)) == ["127.0.2.2"]


def test_all_mx_hosts_missing_is_permanent_5_4_4() -> None:
    result = run(FakeResolver({"remote.test": [(10, "gone.remote.test")]}))
    assert isinstance(result, PermanentFailure) and result.reply.enhanced == "5.4.4"


def test_lower_mx_rule_by_name_drops_equal_and_higher() -> None:
    resolver = FakeResolver(
        {
            "remote.test": [
                (10, "mx1.remote.test"),
                (20, "mail.example.test"),
                (20, "peer.remote.test"),
                (30, "mx3.remote.test"),
            ]
        },
        {
            "mx1.remote.test": ["127.0.2.1"],
            "mail.example.test": ["127.0.0.10"],
            "peer.remote.test": ["127.0.2.20"],
            "mx3.remote.test": ["127.0.2.3"],
        },
    )
    for seed in range(20):  # whatever order the equal MX 20s come in
        assert addresses_of(run(resolver, seed=seed)) == ["127.0.2.1"]


def test_lower_mx_rule_by_address() -> None:
    resolver = FakeResolver(
        {"remote.test": [(10, "mx1.remote.test"), (20, "alias-of-me.remote.test")]},
        {"mx1.remote.test": ["127.0.2.1"], "alias-of-me.remote.test": ["2001:DB8:0::10"]},
    )
    assert addresses_of(run(resolver)) == ["127.0.2.1"]


def test_self_is_best_mx() -> None:
    resolver = FakeResolver(
        {"remote.test": [(10, "mail.example.test"), (10, "peer.remote.test"), (20, "x.test")]},
        {"peer.remote.test": ["127.0.2.1"], "x.test": ["127.0.2.2"]},
    )
    result = run(resolver)
    assert result == SelfIsBestMX("remote.test")
    assert isinstance(result, SelfIsBestMX) and result.reply.enhanced == "5.4.6"
    # the implicit MX is this box
    result = run(FakeResolver({"remote.test": []}, {"remote.test": ["127.0.0.10"]}))
    assert isinstance(result, SelfIsBestMX)


def test_lower_mx_rule_when_the_better_mx_is_down_in_dns() -> None:
    resolver = FakeResolver(
        {"remote.test": [(10, "mx1.remote.test"), (20, "mail.example.test")]},
        {"mx1.remote.test": TemporaryFailure("t")},
    )
    assert isinstance(run(resolver), mx.TemporaryFailure)


def test_never_connects_to_itself_or_to_the_unspecified_address() -> None:
    resolver = FakeResolver(
        {"remote.test": [(10, "mx1.remote.test"), (10, "mx2.remote.test")]},
        {"mx1.remote.test": ["0.0.0.0", "127.0.2.1"], "mx2.remote.test": ["::ffff:127.0.0.10"]},
    )
    # mx2 resolves to this box (IPv4-mapped): the rule drops everything at preference >= 10
    assert isinstance(run(resolver), SelfIsBestMX)
    resolver = FakeResolver(
        {"remote.test": [(10, "mx1.remote.test")]},
        {"mx1.remote.test": ["0.0.0.0", "127.0.2.1", "::", "127.0.2.1", "bogus"]},
    )
    assert addresses_of(run(resolver)) == ["127.0.2.1"]
    only_zero = FakeResolver(
        {"remote.test": [(10, "z.remote.test")]}, {"z.remote.test": ["0.0.0.0"]}
    )
    result = run(only_zero)
    assert isinstance(result, PermanentFailure) and result.reply.enhanced == "5.4.4"


def test_duplicates_and_address_limit() -> None:
    resolver = FakeResolver(
        {"remote.test": [(10, "a.remote.test"), (20, "b.remote.test"), (10, "a.remote.test")]},
        {
            "a.remote.test": ["127.0.2.1", "127.0.2.1"],
            "b.remote.test": [f"127.0.2.{i}" for i in range(1, 30)],
        },
    )
    result = addresses_of(run(resolver, max_addresses=5))
    assert result == ["127.0.2.1", "127.0.2.2", "127.0.2.3", "127.0.2.4", "127.0.2.5"]


def test_direct_routes() -> None:
    resolver = FakeResolver({}, {"relay.isp.test": ["127.0.2.50"]})
    result = run(resolver, Route(SMART_HOST, "relay.isp.test", 587, False))
    assert isinstance(result, Destinations)
    assert result.hosts == (Destination("relay.isp.test", "127.0.2.50", 587, 0),)
    assert ("MX", "relay.isp.test") not in resolver.queries
    literal = run(FakeResolver(), Route(STATIC, "127.0.2.7", 2525, False))
    assert isinstance(literal, Destinations) and literal.hosts[0].address == "127.0.2.7"
    assert isinstance(run(FakeResolver(), Route(STATIC, "127.0.0.10", 25, False)), SelfIsBestMX)
    assert isinstance(
        run(FakeResolver(), Route(STATIC, "mail.example.test", 25, False)), SelfIsBestMX
    )


def test_route_with_mx_lookup_of_another_name() -> None:
    resolver = FakeResolver({"hub.test": [(5, "mx.hub.test")]}, {"mx.hub.test": ["127.0.2.5"]})
    assert addresses_of(run(resolver, Route(STATIC, "hub.test", 2525, True))) == ["127.0.2.5"]


def test_configured_route_to_a_missing_name_waits_instead_of_bouncing() -> None:
    for route in (
        Route(SMART_HOST, "typo.isp.test", 25, False),
        Route(SMART_HOST, "typo.isp.test", 25, True),
        Route(STATIC, "typo.isp.test", 25, True),
    ):
        result = run(FakeResolver(), route)
        assert isinstance(result, mx.TemporaryFailure), route
        assert result.reply.enhanced == "4.4.4"
    result = run(FakeResolver({"hub.test": [(0, "")]}), Route(STATIC, "hub.test", 25, True))
    assert isinstance(result, mx.TemporaryFailure)
