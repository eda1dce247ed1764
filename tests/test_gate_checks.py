"""Unit tests of the single gate checks: greet pause, DNSBL, domains, access map, headers, greylist."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.mail.gate.access import AccessMap, AccessMapError, check_access_file, parse_access
from appliance.mail.gate.dnsbl import DNSBL, DNSBLSettings, DNSBLZone, reverse_name
from appliance.mail.gate.domains import DomainExistence, DomainSettings, Existence
from appliance.mail.gate.greet import GreetPause, GreetPauseSettings
from appliance.mail.gate.greylist import Greylist, GreylistSettings
from appliance.mail.gate.headers import HeaderCheck, HeaderRule, HeaderSettings, split_headers
from appliance.mail.gate.verdict import Action, network_of
from tests.test_gate_support import FakeResolver, LogCapture, new_clock, result_of

DATA = Path(__file__).parent / "data" / "gate"

# ---------------------------------------------------------------- greet pause


def test_greet_pause_per_listener_and_exemptions() -> None:
    greet = GreetPause(
        GreetPauseSettings(
            per_listener={"outside": 5.0}, default=1.0, exempt_networks=("198.51.100.0/24",)
        )
    )
    assert greet.delay("192.0.2.1", "outside", inside=False) == 5.0
    assert greet.delay("192.0.2.1", "submission", inside=False) == 1.0
    assert greet.delay("192.0.2.1", "outside", inside=True) == 0.0
    assert greet.delay("198.51.100.7", "outside", inside=False) == 0.0
    assert greet.delay("2001:db8::1", "outside", inside=False) == 5.0


# ---------------------------------------------------------------- DNSBL


def test_reverse_names() -> None:
    assert reverse_name("192.0.2.99") == "99.2.0.192"
    assert reverse_name("::ffff:192.0.2.99") == "99.2.0.192"
    assert (
        reverse_name("2001:db8:1:2:3:4:567:89ab")
        == "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2"
    )
    assert reverse_name("not an address") is None


def _dnsbl(r: FakeResolver, *zones: DNSBLZone, timeout: float = 5.0) -> tuple[DNSBL, object]:
    clock = new_clock()
    return DNSBL(DNSBLSettings(zones=zones, timeout=timeout), r, clock), clock


def test_dnsbl_listed_rejects_with_txt_reason() -> None:
    r = FakeResolver().add_a("2.0.0.127.bl.example", "127.0.0.2")
    r.add_txt("2.0.0.127.bl.example", "Listed: see https://bl.example/?127.0.0.2")
    dnsbl, _ = _dnsbl(r, DNSBLZone("bl.example", ("127.0.0.2-127.0.0.11",)))
    verdict = result_of(dnsbl.check("127.0.0.2"))
    assert verdict.action is Action.REJECT
    assert verdict.reply.code == 554 and verdict.reply.enhanced == "5.7.1"
    assert (
        "bl.example" in verdict.reply.text and "https://bl.example/?127.0.0.2" in verdict.reply.text
    )


def test_dnsbl_code_outside_the_configured_ones_does_not_count() -> None:
    r = FakeResolver().add_a("2.0.0.127.bl.example", "127.0.0.12")
    dnsbl, _ = _dnsbl(r, DNSBLZone("bl.example", ("127.0.0.2-127.0.0.11",)))
    assert result_of(dnsbl.check("127.0.0.2")).action is Action.ACCEPT


def test_dnsbl_not_listed_and_nxdomain() -> None:
    r = FakeResolver().add_a("9.9.9.9.bl.example", "127.0.0.2")  # the zone exists
    dnsbl, _ = _dnsbl(r, DNSBLZone("bl.example"))
    with LogCapture() as logs:
        assert result_of(dnsbl.check("192.0.2.1")).action is Action.ACCEPT
    assert logs.errors() == []


def test_dnsbl_error_code_is_not_listed_and_logged() -> None:
    r = FakeResolver().add_a("1.2.0.192.zen.example", "127.255.255.254")
    dnsbl, _ = _dnsbl(r, DNSBLZone("zen.example", ("127.0.0.0/8",)))
    with LogCapture() as logs:
        verdict = result_of(dnsbl.check("192.0.2.1"))
    assert verdict.action is Action.ACCEPT
    assert any("127.255.255.254" in e and "zen.example" in e for e in logs.errors())


def test_dnsbl_servfail_and_timeout_are_not_listed_and_logged() -> None:
    r = FakeResolver()
    r.servfail.add("1.2.0.192.dead.example")
    r.hang.add("1.2.0.192.slow.example")
    r.add_a("1.2.0.192.good.example", "127.0.0.4")
    dnsbl, clock = _dnsbl(
        r,
        DNSBLZone("dead.example"),
        DNSBLZone("slow.example"),
        DNSBLZone("good.example", action="tag"),
        timeout=3.0,
    )
    with LogCapture() as logs:
        d = dnsbl.check("192.0.2.1")
        clock.advance(3.0)  # type: ignore[attr-defined]
        verdict = result_of(d)
    assert verdict.action is Action.TAG
    assert verdict.headers[0].startswith("X-DNSBL: good.example 127.0.0.4 client=[192.0.2.1];")
    errors = logs.errors()
    assert any("dead.example" in e for e in errors) and any("slow.example" in e for e in errors)


def test_dnsbl_first_rejecting_zone_wins_and_ipv6_query() -> None:
    name = reverse_name("2001:db8::1")
    r = (
        FakeResolver()
        .add_a(f"{name}.b.example", "127.0.0.3")
        .add_a(f"{name}.a.example", "127.0.0.2")
    )
    dnsbl, _ = _dnsbl(r, DNSBLZone("a.example", action="tag"), DNSBLZone("b.example"))
    verdict = result_of(dnsbl.check("2001:db8::1"))
    assert verdict.action is Action.REJECT and "b.example" in verdict.reply.text


def test_dnsbl_zone_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        DNSBLZone("bl.example", action="drop")
    with pytest.raises(ValueError):
        DNSBLZone("bl.example", codes=("127.0.0.300",))


# ---------------------------------------------------------------- domains


def _domains(r: FakeResolver, **kw: object) -> tuple[DomainExistence, object]:
    clock = new_clock()
    return DomainExistence(DomainSettings(**kw), r, clock), clock  # type: ignore[arg-type]


def test_domain_existence_answers() -> None:
    r = FakeResolver().add_mx("mx.example", (10, "mail.mx.example")).add_a("a.example", "192.0.2.1")
    r.add_txt("txtonly.example", "hello").add_mx("null.example", (0, ""))
    r.servfail.add("down.example")
    domains, _ = _domains(r)
    assert result_of(domains.lookup("MX.example.")) is Existence.EXISTS
    assert result_of(domains.lookup("a.example")) is Existence.EXISTS
    assert result_of(domains.lookup("txtonly.example")) is Existence.NO_MAIL_RECORDS
    assert result_of(domains.lookup("null.example")) is Existence.NULL_MX
    assert result_of(domains.lookup("nowhere.example")) is Existence.NO_SUCH_DOMAIN
    assert result_of(domains.lookup("down.example")) is Existence.TEMPORARY
    assert result_of(domains.lookup("[192.0.2.1]")) is Existence.EXISTS


def test_domain_timeout_is_temporary() -> None:
    r = FakeResolver()
    r.hang.add("slow.example")
    domains, clock = _domains(r, timeout=4.0)
    d = domains.lookup("slow.example")
    clock.advance(4.0)  # type: ignore[attr-defined]
    assert result_of(d) is Existence.TEMPORARY


def test_always_wrong_list_and_file(tmp_path: Path) -> None:
    listing = tmp_path / "wrong"
    listing.write_text("# typing mistakes\nexmaple.com\n  Gmial.COM.  # comment\n")
    r = FakeResolver()
    domains, _ = _domains(r, always_wrong_file=str(listing))
    for domain in (
        "localhost.localdomain",
        "localhost",
        "host.localdomain",
        "exmaple.com",
        "a.gmial.com",
    ):
        assert result_of(domains.lookup(domain)) is Existence.ALWAYS_WRONG
    assert not r.queries
    assert not domains.is_always_wrong("example.com")


# ---------------------------------------------------------------- access map


def test_access_file_parses_and_orders() -> None:
    amap = AccessMap(str(DATA / "access"))
    assert amap.client("192.0.2.5") is not None
    assert amap.client("192.0.2.5").action is Action.REJECT  # type: ignore[union-attr]
    assert amap.client("192.0.2.20").action is Action.OK  # type: ignore[union-attr]
    assert amap.client("192.0.3.1") is None
    assert amap.client("2001:db8::5").action is Action.RELAY  # type: ignore[union-attr]
    assert amap.client("198.51.100.1", "mx.spammer.example").action is Action.REJECT  # type: ignore[union-attr]
    assert amap.client("198.51.100.1", "spammer.example").action is Action.REJECT  # type: ignore[union-attr]
    assert amap.client("198.51.100.1", "notspammer.example") is None
    assert amap.has_host_names
    sender = amap.sender("boss@partner.example")
    assert sender is not None and sender.action is Action.OK
    assert amap.sender("x@partner.example").action is Action.TEMPFAIL  # type: ignore[union-attr]
    assert amap.sender("x@sub.partner.example").action is Action.TEMPFAIL  # type: ignore[union-attr]
    assert amap.sender("Root@anywhere.example").action is Action.DISCARD  # type: ignore[union-attr]
    assert amap.sender("").action is Action.REJECT  # type: ignore[union-attr]
    error = amap.recipient("abuse@ours.example")
    assert error is not None and error.reply is not None
    assert (error.reply.code, error.reply.enhanced, error.reply.text) == (
        550,
        "5.7.1",
        "No mail for abuse here",
    )
    assert amap.recipient("tmp@ours.example").reply.code == 451  # type: ignore[union-attr]
    assert amap.recipient("other@ours.example") is None


def test_access_errors_name_file_line_and_reason() -> None:
    path = str(DATA / "access-bad")
    errors = check_access_file(path)
    assert errors == [
        f"{path}:2: expected 'key action', got 'From:lonely.example'",
        f"{path}:3: unknown action 'ACCEPT' (OK, RELAY, REJECT, DISCARD, TEMPFAIL or ERROR:code text)",
        f"{path}:4: key 'spammer.example' needs Connect:, From: or To: (or is an IP address/CIDR)",
        f"{path}:5: bad network '192.0.2.0/33': '192.0.2.0/33' does not appear to be an IPv4 or IPv6 network",
        f"{path}:6: ERROR needs a reply code: ERROR:5xx x.y.z text or ERROR:4xx x.y.z text",
        f"{path}:7: enhanced code 4.7.1 does not match reply code 550",
        f"{path}:9: duplicate key 'From:dup.example'",
        f"{path}:10: bad domain 'bad..example'",
    ]
    with pytest.raises(AccessMapError) as info:
        AccessMap(path)
    assert info.value.errors == errors
    assert check_access_file(str(DATA / "missing"))[0].startswith(str(DATA / "missing"))


def test_access_reload_keeps_old_map_on_error(tmp_path: Path) -> None:
    path = tmp_path / "access"
    path.write_text("Connect:192.0.2.1 REJECT\n")
    amap = AccessMap(str(path))
    path.write_text("Connect:192.0.2.1 OK\nFrom:x BOGUS\n")
    with LogCapture() as logs:
        errors = amap.reload()
    assert errors and "BOGUS" in errors[0] and any(":2:" in e for e in logs.errors())
    assert amap.client("192.0.2.1").action is Action.REJECT  # type: ignore[union-attr]
    path.write_text("Connect:192.0.2.1 OK\n")
    assert amap.reload() == []
    assert amap.client("192.0.2.1").action is Action.OK  # type: ignore[union-attr]
    path.unlink()
    assert amap.reload() and amap.client("192.0.2.1").action is Action.OK  # type: ignore[union-attr]


def test_access_parser_odd_lines() -> None:
    networks, hosts, senders, recipients, errors = parse_access(
        "  # comment only\n\n192.0.2.1\tOK   # trailing\nTo:user@ REJECT\nfrom:<> ok\n"
    )
    assert errors == []
    assert len(networks) == 1 and "user@" in recipients and "<>" in senders and not hosts


def test_access_reply_for_each_step() -> None:
    amap = AccessMap(text="192.0.2.1 REJECT\n192.0.2.2 TEMPFAIL\n")
    reject = amap.client("192.0.2.1")
    temp = amap.client("192.0.2.2")
    assert reject is not None and temp is not None
    assert reject.reply_for("connect").code == 554  # type: ignore[union-attr]
    assert reject.reply_for("rcpt").code == 550  # type: ignore[union-attr]
    assert temp.reply_for("connect").code == 421  # type: ignore[union-attr]
    assert temp.reply_for("mail").code == 451  # type: ignore[union-attr]


# ---------------------------------------------------------------- headers

GOOD = (
    b"Received: from x by y; Sun, 22 Nov 2026 07:00:00 +0000\r\n"
    b"From: Alice <alice@example.net>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: hello\r\n"
    b" folded part\r\n"
    b"Message-ID: <1@example.net>\r\n"
    b"\r\n"
)


def test_split_headers_unfolds() -> None:
    fields = split_headers(GOOD + b"body: not a header\r\n")
    assert ("Subject", "hello folded part") in fields
    assert all(name != "body" for name, _ in fields)


def test_header_checks() -> None:
    check = HeaderCheck(
        HeaderSettings(
            rules=(
                HeaderRule("Subject", r"viagra", "reject", "Spam subject"),
                HeaderRule("Subject", r"folded", "tag", "suspicious subject"),
            ),
            require_message_id_at=True,
            max_header_bytes=400,
        )
    )
    verdict = check.check(GOOD)
    assert verdict.action is Action.TAG and verdict.headers == (
        "X-Header-Check: suspicious subject",
    )
    spam = GOOD.replace(b"hello", b"cheap VIAGRA")
    verdict = check.check(spam)
    assert verdict.action is Action.REJECT and verdict.reply.text == "Spam subject"
    assert check.check(GOOD.replace(b"<1@example.net>", b"<12345>")).reply.enhanced == "5.6.0"
    assert (
        check.check(GOOD.replace(b"From: Alice <alice@example.net>\r\n", b"")).action
        is Action.REJECT
    )
    assert check.check(GOOD.replace(b"<alice@example.net>", b"<alice>")).action is Action.REJECT
    two_froms = GOOD.replace(b"To:", b"From: x@example.net\r\nTo:")
    assert check.check(two_froms).action is Action.REJECT
    big = GOOD.replace(b"Subject: hello", b"Subject: " + b"x" * 400)
    verdict = check.check(big)
    assert verdict.action is Action.REJECT and verdict.reply.code == 552
    plain = HeaderCheck(HeaderSettings())
    assert plain.check(GOOD.replace(b"<1@example.net>", b"<12345>")).action is Action.ACCEPT
    assert plain.check(b"From: a@b.example, c@d.example\r\n\r\n").action is Action.ACCEPT


# ---------------------------------------------------------------- greylist


def test_network_of() -> None:
    assert network_of("192.0.2.77") == "192.0.2.0/24"
    assert network_of("2001:db8:1:2:3::1") == "2001:db8:1:2::/64"
    assert network_of("::ffff:192.0.2.1") == "192.0.2.0/24"


def _greylist(path: Path | None, clock: object, **kw: object) -> Greylist:
    settings = GreylistSettings(enabled=True, path=str(path) if path else None, **kw)  # type: ignore[arg-type]
    return Greylist(settings, clock)  # type: ignore[arg-type]


def test_greylist_first_refused_then_accepted_after_delay(tmp_path: Path) -> None:
    clock = new_clock()
    grey = _greylist(tmp_path / "grey.db", clock, delay=300.0)
    verdict = grey.check("192.0.2.7", "a@example.net", "b@example.org")
    assert verdict.action is Action.TEMPFAIL
    assert (verdict.reply.code, verdict.reply.enhanced) == (451, "4.7.1")
    clock.advance(100)
    assert grey.check("192.0.2.8", "A@example.net", "b@example.org").action is Action.TEMPFAIL
    clock.advance(200)
    # The same /24, case-insensitive addresses: the retry passes.
    assert grey.check("192.0.2.9", "a@example.net", "B@example.org").action is Action.ACCEPT
    # Other triples are still new.
    assert grey.check("192.0.2.7", "a@example.net", "c@example.org").action is Action.TEMPFAIL
    assert grey.check("192.0.3.7", "a@example.net", "b@example.org").action is Action.TEMPFAIL


def test_greylist_survives_restart(tmp_path: Path) -> None:
    clock = new_clock()
    path = tmp_path / "grey.db"
    grey = _greylist(path, clock)
    assert grey.check("192.0.2.7", "a@example.net", "b@example.org").action is Action.TEMPFAIL
    grey.close()
    clock.advance(400)
    grey = _greylist(path, clock)
    assert grey.check("192.0.2.7", "a@example.net", "b@example.org").action is Action.ACCEPT
    grey.close()
    clock.advance(86400)
    grey = _greylist(path, clock)
    assert grey.check("192.0.2.7", "a@example.net", "b@example.org").reason == "known triple"
    grey.close()


def test_greylist_forgets_after_remember_and_retry_window(tmp_path: Path) -> None:
    clock = new_clock()
    grey = _greylist(tmp_path / "g.db", clock, remember=1000.0, retry_window=600.0, delay=60.0)
    grey.check("192.0.2.7", "a@x.example", "b@y.example")
    clock.advance(700)  # retry window over: starts again
    assert grey.check("192.0.2.7", "a@x.example", "b@y.example").action is Action.TEMPFAIL
    clock.advance(61)
    assert grey.check("192.0.2.7", "a@x.example", "b@y.example").action is Action.ACCEPT
    clock.advance(1001)
    assert grey.check("192.0.2.7", "a@x.example", "b@y.example").action is Action.TEMPFAIL


def test_greylist_allow_lists_and_auto_allow() -> None:
    clock = new_clock()
    grey = _greylist(
        None,
        clock,
        allow_networks=("198.51.100.0/24",),
        allow_senders=("partner.example",),
        allow_recipients=("postmaster@ours.example",),
        auto_allow_after=2,
    )
    assert grey.check("198.51.100.3", "a@x.example", "b@ours.example").action is Action.ACCEPT
    assert (
        grey.check("192.0.2.3", "a@mail.partner.example", "b@ours.example").action is Action.ACCEPT
    )
    assert grey.check("192.0.2.3", "a@x.example", "postmaster@ours.example").action is Action.ACCEPT
    for n in range(2):
        assert (
            grey.check("192.0.2.3", f"s{n}@x.example", "b@ours.example").action is Action.TEMPFAIL
        )
    clock.advance(301)
    for n in range(2):
        assert grey.check("192.0.2.3", f"s{n}@x.example", "b@ours.example").action is Action.ACCEPT
    verdict = grey.check("192.0.2.200", "new@z.example", "c@ours.example")
    assert verdict.action is Action.ACCEPT and "auto-allowed" in verdict.reason


def test_greylist_dry_run_records_nothing() -> None:
    clock = new_clock()
    grey = _greylist(None, clock)
    assert (
        grey.check("192.0.2.3", "a@x.example", "b@y.example", dry_run=True).action
        is Action.TEMPFAIL
    )
    clock.advance(400)
    assert grey.check("192.0.2.3", "a@x.example", "b@y.example").action is Action.TEMPFAIL


def test_greylist_database_error_lets_mail_through(tmp_path: Path) -> None:
    clock = new_clock()
    grey = _greylist(tmp_path / "g.db", clock)
    grey._db.execute("DROP TABLE triples")
    with LogCapture() as logs:
        verdict = grey.check("192.0.2.3", "a@x.example", "b@y.example")
    assert verdict.action is Action.ACCEPT and logs.errors()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_access_parser_never_raises(text: str) -> None:
    errors = parse_access(text, "fuzz")[4]
    assert all(e.startswith("fuzz:") for e in errors)
    if not errors:
        amap = AccessMap(text=text)
        amap.client("192.0.2.1", "host.example")
        amap.sender("a@b.example")
        amap.recipient("a@b.example")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_header_check_never_raises(block: bytes) -> None:
    verdict = HeaderCheck(HeaderSettings(require_message_id_at=True)).check(block)
    assert verdict.action in (Action.ACCEPT, Action.REJECT, Action.TAG)


def test_dnsbl_verdict_is_reused_for_the_ttl_but_failures_are_not() -> None:
    from twisted.internet.task import Clock

    from appliance.mail.gate.dnsbl import DNSBL, DNSBLSettings, DNSBLZone
    from tests.test_gate_support import FakeResolver

    clock = Clock()
    resolver = FakeResolver()
    resolver.add_a("2.0.0.127.bl.test", "127.0.0.2")
    check = DNSBL(DNSBLSettings(zones=(DNSBLZone("bl.test"),), cache_ttl=60), resolver, clock)
    results = []
    check.check("127.0.0.2").addCallback(results.append)
    check.check("127.0.0.2").addCallback(results.append)
    assert [v.action.value for v in results] == ["reject", "reject"]
    assert resolver.queries[("a", "2.0.0.127.bl.test")] == 1
    clock.advance(61)
    check.check("127.0.0.2").addCallback(results.append)
    assert resolver.queries[("a", "2.0.0.127.bl.test")] == 2

    resolver.servfail.add("9.0.0.127.bl.test")
    check.check("127.0.0.9")
    check.check("127.0.0.9")
    assert resolver.queries[("a", "9.0.0.127.bl.test")] == 2
