"""DNSCache: TTL countdown, RFC 2308 negative caching, ranks, bailiwick, bounds and flush."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from appliance.dns.cache import (
    NODATA,
    NXDOMAIN,
    POSITIVE,
    RANK_ANSWER,
    RANK_AUTHORITY,
    RANK_GLUE,
    SERVFAIL,
    DNSCache,
    negative_ttl,
)
from tests.test_dns_resolver_fakes import n, rr_a, rr_cname, rr_soa


def make(**kwargs: int) -> tuple[Clock, DNSCache]:
    clock = Clock()
    clock.advance(1000)
    return clock, DNSCache(clock, **kwargs)


def test_positive_rrset_ttl_counts_down_and_expires() -> None:
    clock, cache = make()
    rrset = [rr_a("www.example.test", "192.0.2.1", 300), rr_a("www.example.test", "192.0.2.2", 300)]
    assert cache.put_rrset(rrset)
    hit = cache.get(n("WWW.Example.TEST"), 1)
    assert hit is not None and hit.kind == POSITIVE and hit.rank == RANK_ANSWER
    assert [r.ttl for r in hit.records] == [300, 300]
    assert [r.rdata for r in hit.records] == [r.rdata for r in rrset]
    clock.advance(100.5)
    hit = cache.get(n("www.example.test"), 1)
    assert hit is not None and [r.ttl for r in hit.records] == [199, 199]
    assert cache.get(n("www.example.test"), 28) is None
    clock.advance(199.6)
    assert cache.get(n("www.example.test"), 1) is None
    assert len(cache) == 0


def test_rrset_ttl_is_the_smallest_and_capped() -> None:
    _, cache = make(max_ttl=1000)
    cache.put_rrset([rr_a("a.test", "192.0.2.1", 50), rr_a("a.test", "192.0.2.2", 70)])
    hit = cache.get(n("a.test"), 1)
    assert hit is not None and {r.ttl for r in hit.records} == {50}
    cache.put_rrset([rr_a("b.test", "192.0.2.1", 999999)])
    hit = cache.get(n("b.test"), 1)
    assert hit is not None and hit.records[0].ttl == 1000


def test_zero_ttl_and_mixed_sets_are_not_cached() -> None:
    _, cache = make()
    assert not cache.put_rrset([rr_a("a.test", "192.0.2.1", 0)])
    # RFC 2181 8: a TTL with the top bit set counts as zero, not as "forever".
    assert not cache.put_rrset([rr_a("a.test", "192.0.2.1", 0x80000000)])
    assert not cache.put_negative(n("x.test"), 1, 1, True, rr_soa("test", ttl=0xFFFFFFFF))
    assert cache.get(n("a.test"), 1) is None
    with pytest.raises(ValueError):
        cache.put_rrset([rr_a("a.test", "192.0.2.1"), rr_a("b.test", "192.0.2.1")])


def test_out_of_bailiwick_data_is_refused() -> None:
    _, cache = make()
    assert not cache.put_rrset(
        [rr_a("www.victim.test", "192.0.2.66")], bailiwick=n("attacker.test")
    )
    assert cache.get(n("www.victim.test"), 1) is None
    assert cache.put_rrset([rr_a("ns.Attacker.test", "192.0.2.5")], bailiwick=n("attacker.TEST"))
    # A sibling zone sharing a suffix string is not within the bailiwick.
    assert not cache.put_rrset([rr_a("xattacker.test", "192.0.2.5")], bailiwick=n("attacker.test"))


def test_nxdomain_covers_every_type_for_soa_minimum() -> None:
    clock, cache = make()
    soa = rr_soa("example.test", ttl=3600, minimum=60)
    assert cache.put_negative(n("gone.example.test"), 1, 1, True, soa, bailiwick=n("example.test"))
    for qtype in (1, 28, 15):
        hit = cache.get(n("GONE.example.test"), qtype)
        assert hit is not None and hit.kind == NXDOMAIN
        assert hit.records[0].rtype == 6 and hit.records[0].ttl == 60
    clock.advance(30)
    hit = cache.get(n("gone.example.test"), 1)
    assert hit is not None and hit.records[0].ttl == 30
    clock.advance(30)
    assert cache.get(n("gone.example.test"), 1) is None


def test_nodata_is_per_type_and_uses_soa_ttl_when_smaller() -> None:
    _, cache = make()
    soa = rr_soa("example.test", ttl=20, minimum=600)
    assert negative_ttl(soa) == 20
    assert cache.put_negative(n("www.example.test"), 28, 1, False, soa)
    hit = cache.get(n("www.example.test"), 28)
    assert hit is not None and hit.kind == NODATA and hit.records[0].ttl == 20
    assert cache.get(n("www.example.test"), 1) is None


def test_negative_ttl_capped_and_soa_must_enclose_name_within_bailiwick() -> None:
    _, cache = make(max_ncache_ttl=100)
    soa = rr_soa("example.test", ttl=86400, minimum=86400)
    assert cache.put_negative(n("x.example.test"), 1, 1, True, soa)
    hit = cache.get(n("x.example.test"), 1)
    assert hit is not None and hit.records[0].ttl == 100
    # SOA of an unrelated zone, or a zone outside the server's bailiwick: refused.
    assert not cache.put_negative(n("www.victim.test"), 1, 1, True, soa)
    assert not cache.put_negative(n("x.example.test"), 1, 1, True, soa, bailiwick=n("other.test"))
    assert not cache.put_negative(
        n("x.example.test"), 1, 1, True, rr_a("example.test", "192.0.2.1")
    )


def test_positive_data_replaces_nxdomain() -> None:
    _, cache = make()
    cache.put_negative(n("new.example.test"), 1, 1, True, rr_soa("example.test"))
    cache.put_rrset([rr_a("new.example.test", "192.0.2.9")])
    hit = cache.get(n("new.example.test"), 28)
    assert hit is None
    hit = cache.get(n("new.example.test"), 1)
    assert hit is not None and hit.kind == POSITIVE


def test_servfail_is_remembered_briefly() -> None:
    clock, cache = make(servfail_ttl=5)
    assert cache.put_servfail(n("broken.test"), 1)
    hit = cache.get(n("broken.test"), 1)
    assert hit is not None and hit.kind == SERVFAIL and hit.records == ()
    clock.advance(5)
    assert cache.get(n("broken.test"), 1) is None
    _, off = make(servfail_ttl=0)
    assert not off.put_servfail(n("broken.test"), 1)


def test_glue_never_replaces_answers_and_is_not_served_as_answer() -> None:
    _, cache = make()
    cache.put_rrset([rr_a("ns.example.test", "192.0.2.1")], rank=RANK_ANSWER)
    assert not cache.put_rrset([rr_a("ns.example.test", "192.0.2.99")], rank=RANK_GLUE)
    hit = cache.get(n("ns.example.test"), 1)
    assert hit is not None and hit.records[0].rdata == bytes([192, 0, 2, 1])
    cache.put_rrset([rr_a("ns2.example.test", "192.0.2.2")], rank=RANK_GLUE)
    assert cache.get(n("ns2.example.test"), 1, min_rank=RANK_AUTHORITY) is None
    assert cache.get(n("ns2.example.test"), 1) is not None
    # An answer replaces glue.
    assert cache.put_rrset([rr_a("ns2.example.test", "192.0.2.3")], rank=RANK_ANSWER)
    hit = cache.get(n("ns2.example.test"), 1, min_rank=RANK_AUTHORITY)
    assert hit is not None and hit.records[0].rdata == bytes([192, 0, 2, 3])


def test_expired_higher_rank_entry_can_be_replaced() -> None:
    clock, cache = make()
    cache.put_rrset([rr_a("ns.example.test", "192.0.2.1", 10)], rank=RANK_ANSWER)
    clock.advance(11)
    assert cache.put_rrset([rr_a("ns.example.test", "192.0.2.2")], rank=RANK_GLUE)


def test_size_is_bounded_and_least_recently_used_goes_first() -> None:
    _, cache = make(max_entries=3)
    for i in range(3):
        cache.put_rrset([rr_a(f"h{i}.test", "192.0.2.1")])
    assert cache.get(n("h0.test"), 1) is not None  # h0 is now most recently used
    cache.put_rrset([rr_a("h3.test", "192.0.2.1")])
    assert len(cache) == 3
    assert cache.evictions == 1
    assert cache.get(n("h1.test"), 1) is None
    assert cache.get(n("h0.test"), 1) is not None
    assert cache.get(n("h3.test"), 1) is not None


def test_flush_all_and_by_name_and_below() -> None:
    _, cache = make()
    cache.put_rrset([rr_a("example.test", "192.0.2.1")])
    cache.put_rrset([rr_a("www.example.test", "192.0.2.1")])
    cache.put_rrset([rr_cname("a.b.example.test", "www.example.test")])
    cache.put_negative(n("gone.example.test"), 1, 1, True, rr_soa("example.test"))
    cache.put_rrset([rr_a("www.otherexample.test", "192.0.2.1")])
    assert cache.flush(n("EXAMPLE.test")) == 4
    assert cache.get(n("www.otherexample.test"), 1) is not None
    assert cache.get(n("www.example.test"), 1) is None
    assert cache.flush() == 1
    assert len(cache) == 0


def test_expire_sweeps_dead_entries() -> None:
    clock, cache = make()
    cache.put_rrset([rr_a("short.test", "192.0.2.1", 10)])
    cache.put_rrset([rr_a("long.test", "192.0.2.1", 1000)])
    clock.advance(20)
    assert cache.expire() == 1
    assert len(cache) == 1


def test_returned_records_are_memoised_within_a_second() -> None:
    clock, cache = make()
    cache.put_rrset([rr_a("a.test", "192.0.2.1", 100)])
    clock.advance(0.1)
    first = cache.get(n("a.test"), 1)
    clock.advance(0.2)
    assert cache.get(n("a.test"), 1) is first
    clock.advance(1)
    second = cache.get(n("a.test"), 1)
    assert second is not first and second is not None and second.records[0].ttl == 98
