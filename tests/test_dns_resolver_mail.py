"""MailResolverAdapter: inside zones without a network hop, then the resolver; R-1 error mapping."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from twisted.internet import defer

from appliance.dns.lookup import NoSuchDomain, TemporaryFailure
from appliance.dns.resolver import MailResolverAdapter
from appliance.dns.rr import RR, LookupResult, RCode
from appliance.dns.view import View
from tests.test_dns_resolver_fakes import (
    make_zone,
    n,
    rr_a,
    rr_aaaa,
    rr_cname,
    rr_mx,
    rr_ns,
    rr_ptr,
    rr_soa,
    rr_txt,
)

INSIDE = make_zone(
    "example.test",
    rr_mx("example.test", 10, "Mail.example.test"),
    rr_a("mail.example.test", "127.0.1.25"),
    rr_aaaa("mail.example.test", "fd00::25"),
    rr_txt("example.test", b"v=spf1 ", b"-all"),
    rr_cname("relay.example.test", "smtp.remote.test"),
    rr_ns("sub.example.test", "ns.sub.example.test"),
    rr_a("ns.sub.example.test", "127.0.1.53"),
)
REVERSE = make_zone("1.0.127.in-addr.arpa", rr_ptr("25.1.0.127.in-addr.arpa", "mail.example.test"))


def ok(*records: RR) -> LookupResult:
    return LookupResult(RCode.NOERROR, False, records)


class FakeResolver:
    def __init__(self) -> None:
        self.table: dict[tuple[bytes, int], Any] = {
            (n("remote.test"), 15): ok(
                rr_mx("remote.test", 5, "mx1.remote.test"),
                rr_mx("remote.test", 20, "mx2.remote.test"),
            ),
            (n("nullmx.test"), 15): ok(RR(n("nullmx.test"), 15, 1, 300, b"\x00\x00\x00")),
            (n("nomx.test"), 15): LookupResult(RCode.NOERROR, False, (), (rr_soa("nomx.test"),)),
            (n("gone.test"), 15): LookupResult(RCode.NXDOMAIN, False, (), (rr_soa("test"),)),
            (n("gone.test"), 1): LookupResult(RCode.NXDOMAIN, False),
            (n("gone.test"), 28): LookupResult(RCode.NXDOMAIN, False),
            (n("broken.test"), 15): LookupResult(RCode.SERVFAIL, False),
            (n("refused.test"), 15): LookupResult(RCode.REFUSED, False),
            (n("smtp.remote.test"), 1): ok(rr_a("smtp.remote.test", "192.0.2.25")),
            (n("smtp.remote.test"), 28): ok(),
            (n("half.test"), 1): LookupResult(RCode.SERVFAIL, False),
            (n("half.test"), 28): ok(rr_aaaa("half.test", "2001:db8::1")),
            (n("none.test"), 1): LookupResult(RCode.SERVFAIL, False),
            (n("none.test"), 28): ok(),
            (n("host.sub.example.test"), 1): ok(rr_a("host.sub.example.test", "127.0.1.99")),
            (n("host.sub.example.test"), 28): ok(),
            (n("7.2.0.192.in-addr.arpa"), 12): ok(
                rr_ptr("7.2.0.192.in-addr.arpa", "Host.Remote.Test")
            ),
        }
        self.asked: list[tuple[bytes, int]] = []
        self.delegations: list[LookupResult | None] = []

    def resolve(
        self, qname: bytes, qtype: int, qclass: int = 1, delegation: LookupResult | None = None
    ) -> defer.Deferred[LookupResult]:
        self.asked.append((qname.lower(), qtype))
        self.delegations.append(delegation)
        return defer.succeed(
            self.table.get((qname.lower(), qtype), LookupResult(RCode.SERVFAIL, False))
        )


def make() -> tuple[MailResolverAdapter, FakeResolver]:
    resolver = FakeResolver()
    view = View("inside", {n("example.test"): INSIDE, n("1.0.127.in-addr.arpa"): REVERSE})
    return MailResolverAdapter(resolver, view), resolver  # type: ignore[arg-type]


def result(d: defer.Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "did not fire"
    if isinstance(out[0], Exception) or hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def test_inside_names_need_no_network() -> None:
    adapter, resolver = make()
    assert result(adapter.mx("example.test")) == [(10, "mail.example.test")]
    assert result(adapter.addresses("mail.example.test")) == ["127.0.1.25", "fd00::25"]
    assert result(adapter.txt("EXAMPLE.test")) == [b"v=spf1 -all"]
    assert result(adapter.ptr("127.0.1.25")) == ["mail.example.test"]
    assert resolver.asked == []


def test_inside_nxdomain_and_nodata() -> None:
    adapter, resolver = make()
    with pytest.raises(NoSuchDomain):
        result(adapter.mx("nothere.example.test"))
    assert result(adapter.mx("mail.example.test")) == []
    assert resolver.asked == []


def test_outside_names_go_to_the_resolver() -> None:
    adapter, _ = make()
    assert result(adapter.mx("remote.test.")) == [(5, "mx1.remote.test"), (20, "mx2.remote.test")]
    assert result(adapter.mx("nullmx.test")) == [(0, "")]
    assert result(adapter.mx("nomx.test")) == []
    assert result(adapter.ptr("192.0.2.7")) == ["host.remote.test"]


def test_r1_mapping_of_failures() -> None:
    adapter, _ = make()
    with pytest.raises(NoSuchDomain):
        result(adapter.mx("gone.test"))
    with pytest.raises(NoSuchDomain):
        result(adapter.addresses("gone.test"))
    for name in ("broken.test", "refused.test", "unknown.test"):
        with pytest.raises(TemporaryFailure):
            result(adapter.mx(name))


def test_addresses_with_one_type_failing() -> None:
    adapter, _ = make()
    assert result(adapter.addresses("half.test")) == ["2001:db8::1"]
    with pytest.raises(TemporaryFailure):
        result(adapter.addresses("none.test"))


def test_chain_out_of_inside_zone_and_delegated_subzone_use_the_resolver() -> None:
    adapter, resolver = make()
    assert result(adapter.addresses("relay.example.test")) == ["192.0.2.25"]
    assert (n("smtp.remote.test"), 1) in resolver.asked
    assert result(adapter.addresses("host.sub.example.test")) == ["127.0.1.99"]
    delegation = resolver.delegations[-1]
    assert delegation is not None
    assert [rr.rdata for rr in delegation.authority] == [n("ns.sub.example.test")]
    assert [rr.name for rr in delegation.additional] == [n("ns.sub.example.test")]


def test_bad_names_and_addresses() -> None:
    adapter, resolver = make()
    with pytest.raises(NoSuchDomain):
        result(adapter.mx("a..b"))
    with pytest.raises(NoSuchDomain):
        result(adapter.mx("x" * 300))
    with pytest.raises(NoSuchDomain):
        result(adapter.ptr("not-an-ip"))
    assert resolver.asked == []


def test_without_a_view_everything_goes_to_the_resolver() -> None:
    resolver = FakeResolver()
    adapter = MailResolverAdapter(resolver)  # type: ignore[arg-type]
    assert result(adapter.mx("remote.test")) == [(5, "mx1.remote.test"), (20, "mx2.remote.test")]
    assert ipaddress.ip_address(result(adapter.addresses("smtp.remote.test"))[0])
