"""Zone lookup semantics (RFC 1034 4.3.2, RFC 4592, RFC 6672, RFC 2308), Ferret conformance."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.dns import names, rdata, zonefile
from appliance.dns.rr import RR, LookupResult
from appliance.dns.zone import MAX_CHAIN, Zone, ZoneSet, load_zone

ZONES = Path(__file__).parent / "data" / "zones"
A, NS, CNAME, SOA, MX, TXT, AAAA, SRV, DNAME, DS, ANY = 1, 2, 5, 6, 15, 16, 28, 33, 39, 43, 255


def w(text: str) -> bytes:
    return names.from_text(text if text.endswith(".") else text + ".example.test.")


@pytest.fixture(scope="module")
def zone() -> Zone:
    return load_zone(str(ZONES / "dname-delegation.zone"), "example.test")


def zone_from(body: str, origin: str = "example.test.") -> Zone:
    head = "$TTL 3600\n@ SOA ns hm 7 3600 900 604800 300\n  NS ns\nns A 192.0.2.1\n"
    loaded = zonefile.load_text(head + body, names.from_text(origin))
    return Zone(names.from_text(origin), loaded.records)


def summary(rrs: tuple[RR, ...]) -> list[tuple[str, str, str]]:
    return sorted(
        (
            names.to_text(r.name).lower(),
            rdata.type_to_text(r.rtype),
            rdata.to_text(r.rtype, r.rdata),
        )
        for r in rrs
    )


def apex_ns(z: Zone) -> list[tuple[str, str, str]]:
    return summary(z.apex_ns)


def test_exact_match_with_authority_and_additional(zone: Zone) -> None:
    r = zone.lookup(w("ns1"), A)
    assert (r.rcode, r.authoritative) == (0, True)
    assert summary(r.answer) == [("ns1.example.test.", "A", "192.0.2.1")]
    assert summary(r.authority) == apex_ns(zone)
    # The NS target's AAAA is added; its A is already in the answer.
    assert summary(r.additional) == [("ns1.example.test.", "AAAA", "2001:db8::1")]


def test_qname_case_is_preserved(zone: Zone) -> None:
    q = names.from_text("NS1.Example.TEST.")
    r = zone.lookup(q, A)
    assert r.answer[0].name == q
    r = zone.lookup(names.from_text("X.Wild.example.test."), A)
    assert r.answer[0].name == names.from_text("X.Wild.example.test.")


def test_mx_and_srv_targets_get_addresses(zone: Zone) -> None:
    r = zone.lookup(w("example.test."), MX)
    assert summary(r.answer) == [("example.test.", "MX", "10 mail.example.test.")]
    assert ("mail.example.test.", "A", "192.0.2.25") in summary(r.additional)
    assert ("ns1.example.test.", "A", "192.0.2.1") in summary(r.additional)
    r = zone.lookup(w("_xmpp._tcp"), SRV)
    assert ("mail.example.test.", "A", "192.0.2.25") in summary(r.additional)


def test_apex_ns_query_has_no_duplicate_authority(zone: Zone) -> None:
    r = zone.lookup(w("example.test."), NS)
    assert summary(r.answer) == apex_ns(zone)
    assert r.authority == ()
    assert summary(r.additional) == [
        ("ns1.example.test.", "A", "192.0.2.1"),
        ("ns1.example.test.", "AAAA", "2001:db8::1"),
    ]


def test_cname_chain_is_followed_and_kept(zone: Zone) -> None:
    r = zone.lookup(w("www"), A)
    assert summary(r.answer) == [
        ("host.deep.ent.example.test.", "A", "192.0.2.80"),
        ("web.example.test.", "CNAME", "host.deep.ent.example.test."),
        ("www.example.test.", "CNAME", "web.example.test."),
    ]
    assert r.authoritative and r.rcode == 0
    # Asking for the CNAME itself does not follow it.
    r = zone.lookup(w("www"), CNAME)
    assert summary(r.answer) == [("www.example.test.", "CNAME", "web.example.test.")]


def test_nxdomain_and_nodata_carry_the_soa_with_negative_ttl(zone: Zone) -> None:
    r = zone.lookup(w("nope"), A)
    assert (r.rcode, r.authoritative, r.answer) == (3, True, ())
    assert [(x.rtype, x.ttl) for x in r.authority] == [(SOA, 300)]  # min(3600, MINIMUM 300)
    r = zone.lookup(w("mail"), AAAA)
    assert (r.rcode, r.authoritative, r.answer) == (0, True, ())
    assert [(x.rtype, x.ttl) for x in r.authority] == [(SOA, 300)]


def test_nxdomain_for_soa_query_has_zero_ttl_soa(zone: Zone) -> None:
    # As BIND: the negative SOA must not be cached as the answer to an SOA query.
    r = zone.lookup(w("nope"), SOA)
    assert r.rcode == 3 and [(x.rtype, x.ttl) for x in r.authority] == [(SOA, 0)]
    r = zone.lookup(w("mail"), SOA)
    assert r.rcode == 0 and [(x.rtype, x.ttl) for x in r.authority] == [(SOA, 300)]


def test_empty_non_terminal_is_nodata(zone: Zone) -> None:
    for q in ("deep.ent", "ent"):
        r = zone.lookup(w(q), A)
        assert (r.rcode, r.answer, [x.rtype for x in r.authority]) == (0, (), [SOA])


def test_cname_to_missing_name_is_nxdomain_with_the_chain() -> None:
    z = zone_from("a CNAME nowhere\n")
    r = z.lookup(w("a"), A)
    assert r.rcode == 3
    assert summary(r.answer) == [("a.example.test.", "CNAME", "nowhere.example.test.")]
    assert [x.rtype for x in r.authority] == [SOA]


def test_cname_leaving_the_zone_stops_without_authority() -> None:
    z = zone_from("a CNAME www.elsewhere.\n")
    r = z.lookup(w("a"), A)
    assert (r.rcode, r.authoritative, r.authority) == (0, True, ())
    assert r.extra["chain_out"] == names.from_text("www.elsewhere.")


def test_names_outside_the_zone_are_refused(zone: Zone) -> None:
    r = zone.lookup(names.from_text("www.example.org."), A)
    assert (r.rcode, r.authoritative, r.answer) == (5, False, ())


def test_cname_loop_and_long_chain_are_bounded() -> None:
    # As BIND 9.18: the chain so far, SERVFAIL, no authority.
    z = zone_from("a CNAME b\nb CNAME a\nself CNAME self\n")
    r = z.lookup(w("a"), A)
    assert (r.rcode, len(r.answer), r.authority) == (2, 2, ())
    r = z.lookup(w("self"), A)
    assert (r.rcode, len(r.answer)) == (2, 1)
    assert z.lookup(w("self"), CNAME).rcode == 0
    chain = "".join(f"c{i} CNAME c{i + 1}\n" for i in range(30)) + "c11 A 192.0.2.1\n"
    z = zone_from(chain.replace("c11 CNAME c12\n", ""))
    r = z.lookup(w("c0"), A)  # 11 CNAMEs, then the address: answered
    assert (r.rcode, len(r.answer)) == (0, 12)
    r = z.lookup(w("c12"), A)  # 12 CNAMEs and more to go: given up
    assert (r.rcode, len(r.answer), r.authority) == (2, MAX_CHAIN, ())
    assert MAX_CHAIN == 12


def test_dname_synthesises_a_cname(zone: Zone) -> None:
    r = zone.lookup(w("a.old"), A)
    assert r.rcode == 0 and r.authoritative
    assert summary(r.answer) == [
        ("a.new.example.test.", "A", "192.0.2.82"),
        ("a.old.example.test.", "CNAME", "a.new.example.test."),
        ("old.example.test.", "DNAME", "new.example.test."),
    ]
    cname = next(x for x in r.answer if x.rtype == CNAME)
    dname = next(x for x in r.answer if x.rtype == DNAME)
    assert cname.ttl == dname.ttl  # RFC 6672 3.3
    # The synthesised owner is the qname as asked.
    q = names.from_text("A.OLD.example.test.")
    assert any(x.name == q for x in zone.lookup(q, A).answer)


def test_dname_owner_itself_and_cname_qtype(zone: Zone) -> None:
    r = zone.lookup(w("old"), DNAME)
    assert summary(r.answer) == [("old.example.test.", "DNAME", "new.example.test.")]
    r = zone.lookup(w("old"), A)
    assert r.answer == () and [x.rtype for x in r.authority] == [SOA]
    r = zone.lookup(w("x.old"), CNAME)
    assert [x.rtype for x in r.answer] == [DNAME, CNAME]


def test_dname_overflow_is_yxdomain() -> None:
    z = zone_from("d DNAME " + ".".join(["a" * 63] * 3) + ".\n")
    q = names.from_text("b" * 50 + "." + "b" * 50 + ".d.example.test.")
    r = z.lookup(q, A)
    assert r.rcode == 6
    assert [x.rtype for x in r.answer] == [DNAME]


def test_referral_below_a_cut(zone: Zone) -> None:
    for q, t in (("host.child", A), ("child", A), ("child", NS), ("deep.host.child", MX)):
        r = zone.lookup(w(q), t)
        assert (r.rcode, r.authoritative, r.answer) == (0, False, ()), q
        assert summary(r.authority) == [
            ("child.example.test.", "NS", "ns.child.example.test."),
            ("child.example.test.", "NS", "ns.other."),
        ]
        assert summary(r.additional) == [("ns.child.example.test.", "A", "192.0.2.53")]


def test_ds_at_a_cut_is_answered_by_the_parent(zone: Zone) -> None:
    r = zone.lookup(w("child"), DS)
    assert r.authoritative and [x.rtype for x in r.authority] == [SOA]


def test_glue_is_not_answered_authoritatively(zone: Zone) -> None:
    r = zone.lookup(w("ns.child"), A)
    assert not r.authoritative and r.answer == ()


def test_cname_into_a_delegation_gives_chain_plus_referral() -> None:
    z = zone_from("sub NS ns.sub\nns.sub A 192.0.2.7\nalias CNAME www.sub\n")
    r = z.lookup(w("alias"), A)
    assert [x.rtype for x in r.answer] == [CNAME]
    assert [x.rtype for x in r.authority] == [NS]
    assert summary(r.additional) == [("ns.sub.example.test.", "A", "192.0.2.7")]


def test_wildcard_synthesis(zone: Zone) -> None:
    r = zone.lookup(w("anything.wild"), A)
    assert summary(r.answer) == [("anything.wild.example.test.", "A", "192.0.2.99")]
    r = zone.lookup(w("a.b.wild"), A)
    assert summary(r.answer) == [("a.b.wild.example.test.", "A", "192.0.2.99")]
    r = zone.lookup(w("anything.wild"), TXT)
    assert (r.rcode, r.answer, [x.rtype for x in r.authority]) == (0, (), [SOA])
    # The wildcard owner itself is an ordinary name.
    r = zone.lookup(w("*.wild"), A)
    assert summary(r.answer) == [("*.wild.example.test.", "A", "192.0.2.99")]
    # The parent of the wildcard exists (an empty non-terminal): NODATA, not synthesis.
    r = zone.lookup(w("wild"), A)
    assert r.answer == () and r.rcode == 0


def test_specific_names_and_empty_non_terminals_block_wildcards() -> None:
    z = zone_from("*.w MX 10 mail\nmail A 192.0.2.25\nhost.w A 192.0.2.3\nx.y.w A 192.0.2.4\n")
    assert z.lookup(w("other.w"), MX).answer  # synthesised
    r = z.lookup(w("host.w"), MX)  # a specific name shadows the wildcard
    assert r.answer == () and r.rcode == 0
    r = z.lookup(w("y.w"), MX)  # an empty non-terminal also blocks it
    assert r.answer == () and r.rcode == 0
    r = z.lookup(w("z.y.w"), MX)  # closest encloser y.w has no wildcard
    assert r.rcode == 3


def test_wildcard_cname_is_followed() -> None:
    z = zone_from("*.c CNAME target\ntarget A 192.0.2.9\n")
    r = z.lookup(w("x.c"), A)
    assert summary(r.answer) == [
        ("target.example.test.", "A", "192.0.2.9"),
        ("x.c.example.test.", "CNAME", "target.example.test."),
    ]


def test_any_returns_every_rrset(zone: Zone) -> None:
    r = zone.lookup(w("example.test."), ANY)
    assert {x.rtype for x in r.answer} == {SOA, NS, MX}
    r = zone.lookup(w("ns1"), ANY)
    assert {x.rtype for x in r.answer} == {A, AAAA}


def test_rfc2317_classless_reverse_lookup() -> None:
    parent = load_zone(str(ZONES / "rfc2317-parent.zone"), "2.0.192.in-addr.arpa")
    r = parent.lookup(names.from_text("5.2.0.192.in-addr.arpa."), 12)
    assert [x.rtype for x in r.answer] == [CNAME]
    assert not r.authoritative or r.authority[0].rtype == NS
    assert summary(r.authority) == [("0/25.2.0.192.in-addr.arpa.", "NS", "ns.A.domain.jp.")]
    child = load_zone(str(ZONES / "rfc2317-child.zone"), "0/25.2.0.192.in-addr.arpa")
    r = child.lookup(names.from_text("1.0/25.2.0.192.in-addr.arpa."), 12)
    assert summary(r.answer) == [("1.0/25.2.0.192.in-addr.arpa.", "PTR", "host1.A.domain.jp.")]


def test_serial_len_and_canonical_iteration() -> None:
    z = zone_from("B A 192.0.2.2\na A 192.0.2.3\nz.a A 192.0.2.4\n\\001 TXT x\n")
    assert z.serial == 7
    assert len(z) == 7
    order = [(names.to_text(r.name), r.rtype) for r in z]
    assert order[0] == ("example.test.", SOA)
    assert order[1] == ("example.test.", NS)
    owners = [o for o, _ in order[2:]]
    # RFC 4034 6.1: \001 < a < z.a < B(=b) < ns.
    assert owners == [
        "\\001.example.test.",
        "a.example.test.",
        "z.a.example.test.",
        "B.example.test.",
        "ns.example.test.",
    ]


def test_records_outside_the_origin_are_ignored(zone: Zone) -> None:
    stray = RR(names.from_text("a.example.org."), A, 1, 60, b"\x01\x02\x03\x04")
    z = Zone(zone.origin, [*zone, stray])
    assert len(z) == len(zone)
    assert stray not in list(z)


def test_zone_requires_soa() -> None:
    with pytest.raises(ValueError):
        Zone(w("example.test."), [RR(w("a"), A, 1, 1, b"\x01\x02\x03\x04")])


def test_zoneset_finds_closest_enclosing_zone(zone: Zone) -> None:
    child = zone_from("", origin="child.example.test.")
    zs = ZoneSet([zone, child])
    assert zs.find(names.from_text("a.b.CHILD.example.test.")) is child
    assert zs.find(names.from_text("child.example.test.")) is child
    assert zs.find(names.from_text("www.example.test.")) is zone
    assert zs.find(names.from_text("example.org.")) is None
    assert zs.get(names.from_text("EXAMPLE.test.")) is zone
    zs.remove(names.from_text("child.example.test."))
    assert zs.find(names.from_text("a.child.example.test.")) is zone
    assert len(zs) == 1 and list(zs) == [zone]


def test_lookup_result_is_hashable_and_comparable(zone: Zone) -> None:
    a = zone.lookup(w("ns1"), A)
    b = zone.lookup(w("ns1"), A)
    assert isinstance(a, LookupResult) and a == b
