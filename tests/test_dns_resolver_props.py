"""Property tests: whatever a server sends, nothing outside its bailiwick enters the cache."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from appliance.dns import names
from appliance.dns.cache import DNSCache
from appliance.dns.resolver import Resolver
from appliance.dns.rr import RR
from appliance.dns.wire import Message, Question
from tests.test_dns_resolver_fakes import n

BAILIWICK = n("example.test")
NAMES = [
    n(t)
    for t in (
        "example.test",
        "www.example.test",
        "A.B.Example.Test",
        "test",
        ".",
        "victim.test",
        "www.victim.test",
        "xexample.test",
        "ns.evil.net",
    )
]


def rdata_for(rtype: int, target: bytes) -> bytes:
    if rtype == 1:
        return b"\x7f\x00\x00\x01"
    if rtype == 6:
        return target + target + struct.pack("!IIIII", 1, 2, 3, 4, 60)
    return target


records = st.builds(
    lambda name, rtype, target, ttl: RR(name, rtype, 1, ttl, rdata_for(rtype, target)),
    st.sampled_from(NAMES),
    st.sampled_from([1, 2, 5, 6]),
    st.sampled_from(NAMES),
    st.integers(0, 100000),
)


@settings(max_examples=300, deadline=None)
@given(
    qname=st.sampled_from(NAMES[:3]),
    qtype=st.sampled_from([1, 2, 5, 15, 255]),
    rcode=st.sampled_from([0, 2, 3, 5]),
    aa=st.booleans(),
    answer=st.lists(records, max_size=6),
    authority=st.lists(records, max_size=4),
    additional=st.lists(records, max_size=4),
    poison=st.booleans(),
)
def test_nothing_outside_the_bailiwick_is_cached(
    qname: bytes,
    qtype: int,
    rcode: int,
    aa: bool,
    answer: list[RR],
    authority: list[RR],
    additional: list[RR],
    poison: bool,
) -> None:
    if poison:
        # The classic: chain the question into someone else's zone and answer for it too.
        answer = [
            RR(qname, 5, 1, 300, n("www.victim.test")),
            RR(n("www.victim.test"), qtype, 1, 300, b"\x7f\x00\x00\x01"),
            *answer,
        ]
        additional = [RR(n("ns.evil.net"), 1, 1, 300, b"\x06\x06\x06\x06"), *additional]
    clock = Clock()
    cache = DNSCache(clock)
    resolver = Resolver(cache, None, clock, root_hints=(("a.root", "127.0.2.1", 53),))  # type: ignore[arg-type]
    reply = Message(
        id=1,
        qr=True,
        aa=aa,
        rcode=rcode,
        question=(Question(qname, qtype, 1),),
        answer=tuple(answer),
        authority=tuple(authority),
        additional=tuple(additional),
    )
    step = resolver._digest(qname, qtype, 1, reply, BAILIWICK)
    assert step.kind in ("answer", "nodata", "nxdomain", "cname", "referral", "fail")
    for owner, _rtype, _rclass in cache._data:
        assert names.is_subdomain(owner, BAILIWICK), owner
    for rr in step.chain:
        assert names.is_subdomain(rr.name, BAILIWICK), rr
