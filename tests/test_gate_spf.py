"""SPF (RFC 7208) vectors: the RFC's appendix A examples, macro examples of 7.4, limits and errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.mail.gate.spf import (
    SPFCheck,
    SPFEvaluator,
    SPFResult,
    SPFSettings,
    _State,
    parse_ip,
)
from appliance.mail.gate.verdict import Action
from tests.test_gate_support import FakeResolver, new_clock, result_of


def rfc_zone() -> FakeResolver:
    """RFC 7208 appendix A's example DNS data."""
    r = FakeResolver()
    r.add_mx("example.com", (10, "mail-a.example.com"), (20, "mail-b.example.com"))
    r.add_a("example.com", "192.0.2.10", "192.0.2.11")
    r.add_a("amy.example.com", "192.0.2.65")
    r.add_a("bob.example.com", "192.0.2.66")
    r.add_a("mail-a.example.com", "192.0.2.129")
    r.add_a("mail-b.example.com", "192.0.2.130")
    r.add_a("mail-c.example.org", "192.0.2.140")
    r.add_mx("example.org", (10, "mail-c.example.org"))
    for ip, name in [
        ("192.0.2.10", "example.com"),
        ("192.0.2.11", "example.com"),
        ("192.0.2.65", "amy.example.com"),
        ("192.0.2.66", "bob.example.com"),
        ("192.0.2.129", "mail-a.example.com"),
        ("192.0.2.130", "mail-b.example.com"),
        ("192.0.2.140", "mail-c.example.org"),
        ("10.0.0.4", "bob.example.com"),
    ]:
        r.add_ptr(ip, name)
    return r


def run(resolver: FakeResolver, ip: str, sender: str, helo: str = "mx.example.net") -> SPFResult:
    evaluator = SPFEvaluator(resolver, new_clock())
    outcome = result_of(evaluator.check_host(ip, sender.rpartition("@")[2], sender, helo))
    return outcome.result  # type: ignore[no-any-return]


ALL_HOSTS = [
    "192.0.2.10",
    "192.0.2.11",
    "192.0.2.65",
    "192.0.2.66",
    "192.0.2.129",
    "192.0.2.130",
    "192.0.2.140",
    "10.0.0.4",
]

# RFC 7208 A.1: record on example.com -> the hosts that pass (all others fail).
APPENDIX_A1 = [
    ("v=spf1 +all", set(ALL_HOSTS)),
    ("v=spf1 a -all", {"192.0.2.10", "192.0.2.11"}),
    ("v=spf1 a:example.org -all", set()),
    ("v=spf1 mx -all", {"192.0.2.129", "192.0.2.130"}),
    ("v=spf1 mx:example.org -all", {"192.0.2.140"}),
    ("v=spf1 mx mx:example.org -all", {"192.0.2.129", "192.0.2.130", "192.0.2.140"}),
    ("v=spf1 mx/30 mx:example.org/30 -all", {"192.0.2.129", "192.0.2.130", "192.0.2.140"}),
    (
        "v=spf1 ptr -all",
        {"192.0.2.10", "192.0.2.11", "192.0.2.65", "192.0.2.66", "192.0.2.129", "192.0.2.130"},
    ),
    ("v=spf1 ip4:192.0.2.128/28 -all", {"192.0.2.129", "192.0.2.130", "192.0.2.140"}),
]


@pytest.mark.parametrize(("record", "passing"), APPENDIX_A1)
def test_rfc7208_appendix_a1(record: str, passing: set[str]) -> None:
    r = rfc_zone().add_txt("example.com", record)
    for ip in ALL_HOSTS:
        expected = SPFResult.PASS if ip in passing else SPFResult.FAIL
        assert run(r, ip, "user@example.com") is expected, (record, ip)


def test_mx_cidr_covers_neighbours() -> None:
    r = rfc_zone().add_txt("example.com", "v=spf1 mx/30 -all")
    assert run(r, "192.0.2.131", "u@example.com") is SPFResult.PASS
    assert run(r, "192.0.2.132", "u@example.com") is SPFResult.FAIL


def test_rfc7208_appendix_a2_include_and_redirect() -> None:
    r = rfc_zone()
    r.add_txt("example.com", "v=spf1 mx -all")
    r.add_txt("example.org", "v=spf1 include:example.com include:example.net -all")
    r.add_txt("la.example.org", "v=spf1 redirect=example.org")
    # example.com's mx passes before example.net (no record) is reached.
    assert run(r, "192.0.2.129", "a@la.example.org") is SPFResult.PASS
    # For anyone else the include of example.net (no SPF record) is a permerror.
    assert run(r, "192.0.2.200", "a@la.example.org") is SPFResult.PERMERROR
    r.txts["example.net"] = [b"v=spf1 a -all"]
    r.add_a("example.net", "198.51.100.1")
    assert run(r, "198.51.100.1", "a@example.org") is SPFResult.PASS
    assert run(r, "192.0.2.200", "a@example.org") is SPFResult.FAIL


def test_rfc7208_appendix_a4_negative_include() -> None:
    r = rfc_zone()
    r.add_txt("example.com", "v=spf1 -include:ip4._spf.%{d} -include:ptr._spf.%{d} +all")
    r.add_txt("ip4._spf.example.com", "v=spf1 -ip4:192.0.2.0/24 +all")
    r.add_txt("ptr._spf.example.com", "v=spf1 -ptr:example.com +all")
    # 192.0.2.10: the ip4 include fails (no match), the ptr include fails (no match), +all.
    assert run(r, "192.0.2.10", "u@example.com") is SPFResult.PASS
    # 198.51.100.9: the ip4 include passes, so -include matches: fail.
    assert run(r, "198.51.100.9", "u@example.com") is SPFResult.FAIL
    # 192.0.2.200: right network, but no name under example.com.
    assert run(r, "192.0.2.200", "u@example.com") is SPFResult.FAIL


def test_rfc7208_appendix_a3_dnsbl_style() -> None:
    r = rfc_zone()
    r.add_txt(
        "example.com",
        "v=spf1 mx include:mobile-users._spf.%{d} include:remote-users._spf.%{d} -all",
    )
    r.add_txt("mobile-users._spf.example.com", "v=spf1 exists:%{l1r+}.%{d}")
    r.add_txt("remote-users._spf.example.com", "v=spf1 exists:%{ir}.%{l1r+}.%{d}")
    r.add_a("mary.mobile-users._spf.example.com", "127.0.0.2")
    r.add_a("15.15.168.192.joel.remote-users._spf.example.com", "127.0.0.2")
    assert run(r, "203.0.113.5", "mary@example.com") is SPFResult.PASS
    assert run(r, "203.0.113.5", "mary+lists@example.com") is SPFResult.PASS
    assert run(r, "203.0.113.5", "fred@example.com") is SPFResult.FAIL
    assert run(r, "192.168.15.15", "joel@example.com") is SPFResult.PASS
    assert run(r, "192.168.15.16", "joel@example.com") is SPFResult.FAIL
    assert run(r, "192.0.2.129", "anyone@example.com") is SPFResult.PASS


def test_rfc7208_appendix_a3_explanation() -> None:
    r = rfc_zone()
    r.add_txt("example.com", "v=spf1 mx -all exp=explain._spf.%{d}")
    r.add_txt("explain._spf.example.com", "Mail from %{i} for %{s} refused; see http://%{d}/why")
    evaluator = SPFEvaluator(r, new_clock())
    outcome = result_of(evaluator.check_host("192.0.2.77", "example.com", "joe@example.com"))
    assert outcome.result is SPFResult.FAIL
    assert (
        outcome.explanation
        == "Mail from 192.0.2.77 for joe@example.com refused; see http://example.com/why"
    )


# RFC 7208 7.4 macro examples: sender strong-bad@email.example.com, client 192.0.2.3.
MACROS = [
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
    ("%%%_%-", "% %20"),
    ("%{L}", "strong-bad"),
    ("%{S}", "strong-bad%40email.example.com"),
]


def _expand(spec: str, ip: str = "192.0.2.3", exp: bool = False) -> str:
    evaluator = SPFEvaluator(FakeResolver(), new_clock(), receiver="mx.example.org")
    address = parse_ip(ip)
    assert address is not None
    state = _State(
        address,
        "strong-bad@email.example.com",
        "strong-bad",
        "email.example.com",
        "helo.example.com",
    )
    return result_of(evaluator._expand(state, "email.example.com", spec, exp))  # type: ignore[no-any-return]


@pytest.mark.parametrize(("spec", "expected"), MACROS)
def test_rfc7208_macro_examples(spec: str, expected: str) -> None:
    assert _expand(spec) == expected


def test_macro_ipv6_nibbles() -> None:
    assert (
        _expand("%{ir}.%{v}._spf.%{d2}", ip="2001:db8::cb01").lower()
        == "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"
    )


def test_macro_exp_only_letters() -> None:
    assert _expand("%{c} %{r} %{h}", exp=True) == "192.0.2.3 mx.example.org helo.example.com"
    with pytest.raises(Exception, match="macro letter"):
        _expand("%{c}")


@pytest.mark.parametrize(
    ("record", "result"),
    [
        ("v=spf1", SPFResult.NEUTRAL),
        ("v=spf1 ?all", SPFResult.NEUTRAL),
        ("v=spf1 ~all", SPFResult.SOFTFAIL),
        ("v=spf1 -all", SPFResult.FAIL),
        ("V=SPF1 -ALL", SPFResult.FAIL),
        ("v=spf1 -all redirect=nowhere.example", SPFResult.FAIL),
        ("v=spf1 moo=bar -all", SPFResult.FAIL),
        ("v=spf1 foo -all", SPFResult.PERMERROR),
        ("v=spf1 foo:bar.example -all", SPFResult.PERMERROR),
        ("v=spf1 redirect=a.example redirect=b.example", SPFResult.PERMERROR),
        ("v=spf1 exp=a.example exp=b.example -all", SPFResult.PERMERROR),
        ("v=spf1 ip4:192.0.2.1/33 -all", SPFResult.PERMERROR),
        ("v=spf1 ip4:192.0.2.1/024 -all", SPFResult.PERMERROR),
        ("v=spf1 ip4:192.0.2 -all", SPFResult.PERMERROR),
        ("v=spf1 ip6:192.0.2.1 -all", SPFResult.PERMERROR),
        ("v=spf1 a:foo.1 -all", SPFResult.PERMERROR),
        ("v=spf1 include -all", SPFResult.PERMERROR),
        ("v=spf1 all:foo.example", SPFResult.PERMERROR),
        ("v=spf1 ptr/24 -all", SPFResult.PERMERROR),
        ("v=spf1 a/33 -all", SPFResult.PERMERROR),
        ("v=spf1 a: -all", SPFResult.PERMERROR),
        ("v=spf1 exists:%{x}.example -all", SPFResult.PERMERROR),
        ("v=spf1 exists:%a.example -all", SPFResult.PERMERROR),
        ("v=spf1 -exists:%{d0}.example +all", SPFResult.PERMERROR),
        ("v=spf1 =all", SPFResult.PERMERROR),
        ("v=spf1 ip4:198.51.100.0/24 ip4:192.0.2.0/24 -all", SPFResult.PASS),
        ("v=spf1 ip6:2001:db8::/32 -all", SPFResult.FAIL),
        ("v=spf10 -all", SPFResult.NONE),
        ("spf1 -all", SPFResult.NONE),
    ],
)
def test_record_syntax_and_results(record: str, result: SPFResult) -> None:
    r = FakeResolver().add_txt("example.net", record)
    assert run(r, "192.0.2.1", "u@example.net") is result


def test_syntax_error_after_a_matching_term_is_still_permerror() -> None:
    r = FakeResolver().add_txt("example.net", "v=spf1 +all badmech")
    assert run(r, "192.0.2.1", "u@example.net") is SPFResult.PERMERROR


def test_no_record_nxdomain_and_bad_domains_are_none() -> None:
    r = FakeResolver().add_txt("example.net", "some other text")
    assert run(r, "192.0.2.1", "u@example.net") is SPFResult.NONE
    assert run(r, "192.0.2.1", "u@nowhere.example") is SPFResult.NONE
    assert run(r, "192.0.2.1", "u@singlelabel") is SPFResult.NONE
    assert run(r, "192.0.2.1", "u@" + "a" * 64 + ".example") is SPFResult.NONE


def test_two_records_is_permerror() -> None:
    r = FakeResolver().add_txt("example.net", "v=spf1 -all", "v=spf1 +all")
    assert run(r, "192.0.2.1", "u@example.net") is SPFResult.PERMERROR


def test_ipv6_client_and_dual_cidr() -> None:
    r = FakeResolver().add_txt("example.net", "v=spf1 a//64 ip6:2001:db8:1::/48 -all")
    r.add_a("example.net", "198.51.100.1", "2001:db8:2::1")
    assert run(r, "2001:db8:2::ffff", "u@example.net") is SPFResult.PASS
    assert run(r, "2001:db8:1:5::1", "u@example.net") is SPFResult.PASS
    assert run(r, "2001:db8:3::1", "u@example.net") is SPFResult.FAIL
    assert run(r, "198.51.100.2", "u@example.net") is SPFResult.FAIL
    assert run(r, "198.51.100.1", "u@example.net") is SPFResult.PASS


def test_ipv4_mapped_client_counts_as_ipv4() -> None:
    r = FakeResolver().add_txt("example.net", "v=spf1 ip4:192.0.2.0/24 -all")
    assert run(r, "::ffff:192.0.2.9", "u@example.net") is SPFResult.PASS


def test_exists_with_ip_macro() -> None:
    r = FakeResolver().add_txt("example.net", "v=spf1 exists:%{ir}.allow.example.net -all")
    r.add_a("9.2.0.192.allow.example.net", "127.0.0.2")
    assert run(r, "192.0.2.9", "u@example.net") is SPFResult.PASS
    assert run(r, "192.0.2.8", "u@example.net") is SPFResult.FAIL


def _chain(r: FakeResolver, count: int) -> None:
    includes = " ".join(f"include:i{n}.example.net" for n in range(count))
    r.add_txt("example.net", f"v=spf1 {includes} -all")
    for n in range(count):
        r.add_txt(f"i{n}.example.net", "v=spf1 ip4:203.0.113.1")


def test_ten_lookups_allowed_eleven_permerror() -> None:
    r = FakeResolver()
    _chain(r, 10)
    assert run(r, "192.0.2.1", "u@example.net") is SPFResult.FAIL
    r = FakeResolver()
    _chain(r, 11)
    assert run(r, "192.0.2.1", "u@example.net") is SPFResult.PERMERROR


def test_limit_is_counted_during_evaluation() -> None:
    r = FakeResolver()
    includes = " ".join(f"include:i{n}.example.net" for n in range(12))
    r.add_txt("example.net", f"v=spf1 ip4:192.0.2.1 {includes} -all")
    assert run(r, "192.0.2.1", "u@example.net") is SPFResult.PASS


def test_include_loop_ends_in_permerror() -> None:
    r = FakeResolver().add_txt("example.net", "v=spf1 include:example.net -all")
    assert run(r, "192.0.2.1", "u@example.net") is SPFResult.PERMERROR


def test_void_lookup_limit() -> None:
    r = FakeResolver()
    r.add_txt("example.net", "v=spf1 a:n1.example.net a:n2.example.net -all")
    assert run(r, "192.0.2.1", "u@example.net") is SPFResult.FAIL
    r.txts["example.net"] = [b"v=spf1 a:n1.example.net a:n2.example.net a:n3.example.net -all"]
    assert run(r, "192.0.2.1", "u@example.net") is SPFResult.PERMERROR


def test_more_than_ten_mx_is_permerror() -> None:
    r = FakeResolver().add_txt("example.net", "v=spf1 mx -all")
    r.add_mx("example.net", *[(n, f"mx{n}.example.net") for n in range(11)])
    assert run(r, "192.0.2.1", "u@example.net") is SPFResult.PERMERROR


def test_include_and_redirect_targets_without_record() -> None:
    r = FakeResolver().add_txt("example.net", "v=spf1 redirect=other.example")
    r.add_a("other.example", "192.0.2.1")
    assert run(r, "192.0.2.1", "u@example.net") is SPFResult.PERMERROR
    r.txts["other.example"] = [b"v=spf1 a -all"]
    assert run(r, "192.0.2.1", "u@example.net") is SPFResult.PASS
    assert run(r, "192.0.2.2", "u@example.net") is SPFResult.FAIL


def test_dns_failures_are_temperror() -> None:
    r = FakeResolver().add_txt("example.net", "v=spf1 include:broken.example -all")
    r.servfail.add("broken.example")
    assert run(r, "192.0.2.1", "u@example.net") is SPFResult.TEMPERROR
    r = FakeResolver().add_txt("example.net", "v=spf1 a:broken.example -all")
    r.servfail.add("broken.example")
    assert run(r, "192.0.2.1", "u@example.net") is SPFResult.TEMPERROR
    r = FakeResolver()
    r.servfail.add("example.net")
    assert run(r, "192.0.2.1", "u@example.net") is SPFResult.TEMPERROR


def test_ptr_errors_just_do_not_match() -> None:
    r = FakeResolver().add_txt("example.net", "v=spf1 ptr -all")
    r.servfail.add("192.0.2.1")
    assert run(r, "192.0.2.1", "u@example.net") is SPFResult.FAIL


def test_p_macro_uses_validated_name() -> None:
    r = rfc_zone().add_txt("example.com", "v=spf1 exists:%{p}.ok.example.com -all")
    r.add_a("amy.example.com.ok.example.com", "127.0.0.2")
    assert run(r, "192.0.2.65", "u@example.com") is SPFResult.PASS
    assert run(r, "192.0.2.66", "u@example.com") is SPFResult.FAIL


def test_timeout_becomes_temperror_then_451() -> None:
    r = FakeResolver()
    r.hang.add("example.net")
    clock = new_clock()
    check = SPFCheck(SPFSettings(timeout=5.0), r, clock, "mx.example.org")
    d = check.check("192.0.2.1", "u@example.net", "helo.example.net")
    clock.advance(5.0)
    verdict, outcome = result_of(d)
    assert outcome.result is SPFResult.TEMPERROR
    assert verdict.action is Action.TEMPFAIL
    assert verdict.reply.code == 451 and verdict.reply.enhanced == "4.7.24"


def test_check_verdicts_and_authentication_results() -> None:
    r = FakeResolver()
    r.add_txt("example.net", "v=spf1 ip4:192.0.2.1 ~all")
    r.add_txt("hard.example", "v=spf1 -all")
    r.add_txt("helo.example", "v=spf1 ip4:192.0.2.1 -all")
    r.add_txt("perm.example", "v=spf1 bogus")
    clock = new_clock()
    check = SPFCheck(SPFSettings(), r, clock, "mx.example.org")
    verdict, _ = result_of(check.check("192.0.2.1", "u@example.net", "h"))
    assert verdict.action is Action.TAG
    assert verdict.headers == (
        "Authentication-Results: mx.example.org; spf=pass (matched ip4:192.0.2.1) smtp.mailfrom=u@example.net",
    )
    verdict, _ = result_of(check.check("192.0.2.2", "u@example.net", "h"))
    assert verdict.action is Action.TAG and "spf=softfail" in verdict.headers[0]
    verdict, _ = result_of(check.check("192.0.2.2", "u@hard.example", "h"))
    assert verdict.action is Action.REJECT and verdict.reply.code == 550
    assert verdict.reply.enhanced == "5.7.23"
    verdict, _ = result_of(check.check("192.0.2.2", "u@perm.example", "h"))
    assert verdict.action is Action.TAG and "spf=permerror" in verdict.headers[0]
    # The null sender: SPF on the HELO name.
    verdict, _ = result_of(check.check("192.0.2.1", "", "helo.example"))
    assert verdict.action is Action.TAG and "spf=pass" in verdict.headers[0]
    assert "smtp.helo=helo.example" in verdict.headers[0]
    verdict, _ = result_of(check.check("192.0.2.9", "", "helo.example"))
    assert verdict.action is Action.REJECT
    tagging = SPFCheck(SPFSettings(fail_action="tag", temperror_action="accept"), r, clock, "m")
    verdict, _ = result_of(tagging.check("192.0.2.2", "u@hard.example", "h"))
    assert verdict.action is Action.TAG and "spf=fail" in verdict.headers[0]
    r.servfail.add("down.example")
    verdict, _ = result_of(tagging.check("192.0.2.2", "u@down.example", "h"))
    assert verdict.action is Action.TAG and "spf=temperror" in verdict.headers[0]


def test_local_part_with_odd_characters_is_quoted_in_header() -> None:
    r = FakeResolver().add_txt("example.net", "v=spf1 -all")
    check = SPFCheck(SPFSettings(fail_action="tag"), r, new_clock(), "m")
    verdict, _ = result_of(check.check("192.0.2.2", '"a b"@example.net', "h"))
    assert 'smtp.mailfrom="\\"a b\\"@example.net"' in verdict.headers[0]


_WORDS = [
    "v=spf1",
    "a",
    "mx",
    "ptr",
    "all",
    "-all",
    "~all",
    "?all",
    "include:",
    "exists:",
    "ip4:",
    "ip6:",
    "redirect=",
    "exp=",
    "/24",
    "//64",
    "%{d}",
    "%{i}",
    "%{ir}",
    "%{l1r-}",
    "%%",
    "%",
    "example.net",
    "x.example.net",
    "192.0.2.1",
    "2001:db8::",
    ":",
    "=",
    "{",
    "}",
    ".",
    "..",
    "\u00e9",
    " ",
    "  ",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_WORDS), max_size=12))
def test_any_record_gives_a_result_never_an_internal_error(parts: list[str]) -> None:
    record = "v=spf1 " + "".join(parts)
    r = FakeResolver().add_txt("example.net", record.encode("utf-8"))
    r.add_txt("x.example.net", "v=spf1 include:example.net")
    r.add_a("x.example.net", "192.0.2.1")
    evaluator = SPFEvaluator(r, new_clock())
    outcome = result_of(evaluator.check_host("192.0.2.1", "example.net", "u@example.net"))
    assert isinstance(outcome.result, SPFResult)
    assert "internal error" not in outcome.reason, (record, outcome)
