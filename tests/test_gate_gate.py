"""The Gate as the SMTP protocol drives it: order of checks, exemptions, neighbour failures, explain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.mail.gate import (
    AccessSettings,
    Action,
    DNSBLSettings,
    DNSBLZone,
    DomainSettings,
    Gate,
    GateSettings,
    GreetPauseSettings,
    GreylistSettings,
    HeaderSettings,
    SPFSettings,
    explain,
)
from appliance.mail.gate.verdict import Session, Verdict
from tests.test_gate_support import FakeResolver, LogCapture, new_clock, result_of

HEADERS = b"From: a@sender.example\r\nTo: b@ours.example\r\nMessage-ID: <x@y>\r\n\r\n"
SPAM_IP = "203.0.113.66"
GOOD_IP = "198.51.100.10"


def world() -> FakeResolver:
    """Sender domains, a block list and SPF records of a small outside world."""
    r = FakeResolver()
    r.add_mx("sender.example", (10, "mx.sender.example")).add_a("mx.sender.example", GOOD_IP)
    r.add_txt("sender.example", "v=spf1 ip4:198.51.100.0/24 -all")
    r.add_a("66.113.0.203.bl.example", "127.0.0.2").add_txt(
        "66.113.0.203.bl.example", "Spam source"
    )
    r.add_a("1.0.0.127.bl.example", "127.0.0.2")  # the zone exists
    r.add_mx("ours.example", (10, "mx.ours.example"))
    r.add_mx("far.example", (10, "mx.far.example"))
    r.add_a("nospf.example", "192.0.2.1")
    return r


def make_gate(r: FakeResolver, tmp_path: Path | None = None, **overrides: Any) -> tuple[Gate, Any]:
    clock = new_clock()
    settings: dict[str, Any] = {
        "authserv_id": "mx.ours.example",
        "greet": GreetPauseSettings(per_listener={"outside": 5.0}),
        "dnsbl": DNSBLSettings(
            zones=(DNSBLZone("bl.example", ("127.0.0.2-127.0.0.11",)),), timeout=5.0
        ),
        "domains": DomainSettings(timeout=5.0),
        "spf": SPFSettings(timeout=5.0),
    }
    settings.update(overrides)
    gate = Gate(
        GateSettings(**settings),
        r,
        clock,
        is_inside=lambda ip: ip.startswith("10."),
        is_local_domain=lambda domain: domain == "ours.example",
    )
    return gate, clock


def steps(gate: Gate, session: Session, sender: str, *recipients: str) -> list[Verdict]:
    out = [result_of(gate.connect(session)), result_of(gate.helo(session, "mx.sender.example"))]
    out.append(result_of(gate.mail(session, sender)))
    out.extend(result_of(gate.rcpt(session, rcpt)) for rcpt in recipients)
    return out


def test_clean_outside_mail_is_tagged_with_spf_pass() -> None:
    gate, _ = make_gate(world())
    session = gate.session(GOOD_IP, "outside")
    verdicts = steps(gate, session, "a@sender.example", "b@ours.example", "c@ours.example")
    assert [v.refused for v in verdicts] == [False] * 5
    final = result_of(gate.data(session, HEADERS))
    assert final.action is Action.TAG
    assert final.headers == (
        "Authentication-Results: mx.ours.example; spf=pass (matched ip4:198.51.100.0/24) smtp.mailfrom=a@sender.example",
    )
    assert session.recipients == ["b@ours.example", "c@ours.example"]


def test_greet_delay() -> None:
    gate, _ = make_gate(world())
    assert gate.greet_delay(GOOD_IP, "outside") == 5.0
    assert gate.greet_delay("10.1.2.3", "outside") == 0.0
    assert gate.greet_delay(GOOD_IP, "inside") == 0.0


def test_dnsbl_rejects_at_connect_and_logs() -> None:
    gate, _ = make_gate(world())
    with LogCapture() as logs:
        verdict = result_of(gate.connect(gate.session(SPAM_IP, "outside")))
    assert verdict.action is Action.REJECT and verdict.reply.code == 554
    assert "Spam source" in verdict.reply.text
    assert any("dnsbl" in t and SPAM_IP in t and "Spam source" in t for t in logs.texts())


def test_inside_and_authenticated_clients_skip_the_checks() -> None:
    r = world()
    gate, _ = make_gate(r)
    inside = gate.session("10.0.0.5", "inside")
    verdicts = steps(gate, inside, "a@nonexistent.example", "x@far.example")
    assert not any(v.refused for v in verdicts)
    assert result_of(gate.data(inside, b"no headers at all\r\n\r\n")).action is Action.ACCEPT
    auth = gate.session(SPAM_IP, "submission", authenticated=True)
    assert not any(v.refused for v in steps(gate, auth, "a@sender.example", "x@far.example"))
    assert ("txt", "sender.example") not in r.queries


def test_sender_domain_checks() -> None:
    r = world()
    r.servfail.add("down.example")
    r.add_mx("null.example", (0, ""))
    gate, _ = make_gate(r)
    session = gate.session(GOOD_IP, "outside")
    result_of(gate.connect(session))

    def mail(sender: str) -> Verdict:
        return result_of(gate.mail(session, sender))  # type: ignore[no-any-return]

    nx = mail("a@nonexistent.example")
    assert nx.action is Action.REJECT and (nx.reply.code, nx.reply.enhanced) == (553, "5.1.8")
    wrong = mail("root@localhost.localdomain")
    assert wrong.action is Action.REJECT and wrong.reply.code == 553
    with LogCapture() as logs:
        down = mail("a@down.example")
    assert down.action is Action.TEMPFAIL and (down.reply.code, down.reply.enhanced) == (
        451,
        "4.4.3",
    )
    assert any("down.example" in e for e in logs.errors())
    assert mail("a@null.example").reply.enhanced == "5.7.27"  # type: ignore[union-attr]
    assert mail("").action is Action.ACCEPT


def test_sender_domain_nxdomain_action_settings() -> None:
    for action, expected in (("tempfail", Action.TEMPFAIL), ("tag", Action.TAG)):
        gate, _ = make_gate(world(), domains=DomainSettings(nxdomain_action=action))
        session = gate.session(GOOD_IP, "outside")
        verdict = result_of(gate.mail(session, "a@nonexistent.example"))
        assert verdict.action is expected
        if expected is Action.TEMPFAIL:
            assert verdict.reply.code == 451
    # Always-wrong domains fail at once whatever the setting.
    gate, _ = make_gate(world(), domains=DomainSettings(nxdomain_action="tempfail"))
    verdict = result_of(gate.mail(gate.session(GOOD_IP, "outside"), "a@localhost"))
    assert verdict.action is Action.REJECT


def test_recipient_domain_checked_for_relayed_mail_only() -> None:
    r = world()
    r.servfail.add("down.example")
    gate, _ = make_gate(r)
    inside = gate.session("10.0.0.5", "inside")
    result_of(gate.mail(inside, "a@ours.example"))
    nx = result_of(gate.rcpt(inside, "x@typo.example"))
    assert nx.action is Action.REJECT and (nx.reply.code, nx.reply.enhanced) == (550, "5.1.2")
    assert result_of(gate.rcpt(inside, "x@down.example")).reply.code == 451  # type: ignore[union-attr]
    assert result_of(gate.rcpt(inside, "x@far.example")).action is Action.ACCEPT
    assert result_of(gate.rcpt(inside, "x@localhost.localdomain")).reply.code == 550  # type: ignore[union-attr]
    assert inside.recipients == ["x@far.example"]
    assert ("mx", "ours.example") not in r.queries
    result_of(gate.rcpt(inside, "x@ours.example"))
    assert ("mx", "ours.example") not in r.queries


def test_neighbour_failures_never_give_5xx(tmp_path: Path) -> None:
    """DNSBL dead or answering 127.255.255.254, domain DNS timing out, SPF timing out."""
    r = world()
    r.servfail.add("10.2.0.192.bl.example")
    r.add_a("11.2.0.192.bl.example", "127.255.255.254")
    r.hang.add("12.2.0.192.bl.example")
    r.hang.add("slowdomain.example")
    gate, clock = make_gate(r)
    with LogCapture() as logs:
        for ip in ("192.0.2.10", "192.0.2.11", "192.0.2.12"):
            session = gate.session(ip, "outside")
            d = gate.connect(session)
            clock.advance(5.0)
            assert result_of(d).action is Action.ACCEPT
        d = gate.mail(session, "a@slowdomain.example")
        clock.advance(5.0)
        verdict = result_of(d)
        assert verdict.action is Action.TEMPFAIL and verdict.reply.code == 451
    errors = logs.errors()
    assert any("192.0.2.10" in e for e in errors)
    assert any("127.255.255.254" in e for e in errors)
    assert any("192.0.2.12" in e and "bl.example" in e for e in errors)
    assert any("slowdomain.example" in e for e in errors)


def test_spf_timeout_is_451_and_logged() -> None:
    r = world()
    r.add_mx("slowspf.example", (10, "mx.slowspf.example"))
    gate, clock = make_gate(r)
    r.hang.add("txt:slowspf.example")
    session = gate.session(GOOD_IP, "outside")
    result_of(gate.mail(session, "a@slowspf.example"))
    with LogCapture() as logs:
        d = gate.rcpt(session, "b@ours.example")
        clock.advance(5.0)
        verdict = result_of(d)
    assert verdict.action is Action.TEMPFAIL and (verdict.reply.code, verdict.reply.enhanced) == (
        451,
        "4.7.24",
    )
    assert any("SPF" in e and GOOD_IP in e for e in logs.errors())
    # The result is kept for the transaction: the next RCPT gets the same answer at once.
    assert result_of(gate.rcpt(session, "c@ours.example")).reply.code == 451  # type: ignore[union-attr]
    gate2, clock2 = make_gate(r, spf=SPFSettings(timeout=5.0, temperror_action="accept"))
    session = gate2.session(GOOD_IP, "outside")
    result_of(gate2.mail(session, "a@slowspf.example"))
    d = gate2.rcpt(session, "b@ours.example")
    clock2.advance(5.0)
    assert result_of(d).action is Action.TAG


def test_spf_fail_rejects_at_rcpt_once_per_transaction() -> None:
    r = world()
    gate, _ = make_gate(r)
    session = gate.session("192.0.2.99", "outside")
    verdicts = steps(gate, session, "a@sender.example", "b@ours.example", "c@ours.example")
    assert [v.action for v in verdicts[3:]] == [Action.REJECT, Action.REJECT]
    assert verdicts[3].reply.enhanced == "5.7.23"  # type: ignore[union-attr]
    assert r.queries[("txt", "sender.example")] == 1
    assert session.recipients == []


def test_access_map_ok_skips_checks_and_reject_refuses(tmp_path: Path) -> None:
    access = tmp_path / "access"
    access.write_text(
        f"{SPAM_IP} OK\n"
        "Connect:bad.example REJECT\n"
        "From:partner.example OK\n"
        "From:spam.example ERROR:550 5.7.1 Go away\n"
        "From:bin@ DISCARD\n"
        "To:nobody@ours.example REJECT\n"
    )
    r = world()
    r.add_ptr("192.0.2.50", "host.bad.example").add_a("host.bad.example", "192.0.2.50")
    r.add_ptr("192.0.2.51", "host.bad.example")  # not forward-confirmed
    gate, _ = make_gate(r, access=AccessSettings(path=str(access)))
    listed = gate.session(SPAM_IP, "outside")
    assert result_of(gate.connect(listed)).action is Action.OK
    assert not any(
        v.refused for v in steps(gate, listed, "a@nonexistent.example", "b@ours.example")
    )
    assert result_of(gate.data(listed, b"junk\r\n\r\n")).action is Action.ACCEPT
    named = gate.session("192.0.2.50", "outside")
    verdict = result_of(gate.connect(named))
    assert verdict.action is Action.REJECT and verdict.reply.code == 554
    assert named.client_name == "host.bad.example"
    assert result_of(gate.connect(gate.session("192.0.2.51", "outside"))).action is Action.ACCEPT
    session = gate.session("192.0.2.60", "outside")
    assert result_of(gate.mail(session, "x@spam.example")).reply.text == "Go away"  # type: ignore[union-attr]
    # A sender the map says OK for skips domain existence and SPF.
    assert result_of(gate.mail(session, "x@nowhere.partner.example")).action is Action.OK
    assert result_of(gate.rcpt(session, "b@ours.example")).action is Action.ACCEPT
    assert result_of(gate.rcpt(session, "nobody@ours.example")).reply.code == 550  # type: ignore[union-attr]
    assert result_of(gate.mail(session, "bin@sender.example")).action is Action.DISCARD
    assert result_of(gate.data(session, HEADERS)).action is Action.DISCARD
    # A new transaction is not discarded.
    result_of(gate.mail(session, "a@sender.example"))
    assert result_of(gate.data(session, HEADERS)).action is not Action.DISCARD


def test_greylisting_in_the_gate(tmp_path: Path) -> None:
    r = world()
    gate, clock = make_gate(
        r, greylist=GreylistSettings(enabled=True, path=str(tmp_path / "grey.db"), delay=60.0)
    )
    session = gate.session(GOOD_IP, "outside")
    verdicts = steps(gate, session, "a@sender.example", "b@ours.example")
    assert verdicts[-1].action is Action.TEMPFAIL and verdicts[-1].check == "greylist"
    assert ("txt", "sender.example") not in r.queries  # SPF comes after greylisting
    clock.advance(61)
    gate.close()
    gate, _ = make_gate(
        r, greylist=GreylistSettings(enabled=True, path=str(tmp_path / "grey.db"), delay=60.0)
    )
    gate.clock = clock
    gate.greylist.clock = clock  # type: ignore[union-attr]
    session = gate.session(GOOD_IP, "outside")
    verdicts = steps(gate, session, "a@sender.example", "b@ours.example")
    assert verdicts[-1].action is Action.TAG
    gate.close()


def test_header_checks_at_data() -> None:
    gate, _ = make_gate(world(), headers=HeaderSettings(require_message_id_at=True))
    session = gate.session(GOOD_IP, "outside")
    steps(gate, session, "a@sender.example", "b@ours.example")
    verdict = result_of(gate.data(session, b"From: nobody\r\n\r\n"))
    assert verdict.action is Action.REJECT and verdict.reply.enhanced == "5.6.0"


def test_dnsbl_tag_is_carried_to_data_for_every_transaction() -> None:
    r = world()
    gate, _ = make_gate(
        r,
        dnsbl=DNSBLSettings(zones=(DNSBLZone("bl.example", action="tag"),)),
        spf=SPFSettings(enabled=False),
    )
    session = gate.session(SPAM_IP, "outside")
    steps(gate, session, "a@sender.example", "b@ours.example")
    first = result_of(gate.data(session, HEADERS))
    result_of(gate.mail(session, "a@sender.example"))
    result_of(gate.rcpt(session, "b@ours.example"))
    second = result_of(gate.data(session, HEADERS))
    assert first.headers == second.headers and first.headers[0].startswith("X-DNSBL: bl.example")


def test_a_crashing_check_gives_451_not_an_exception() -> None:
    class Broken(FakeResolver):
        def mx(self, domain: str) -> Any:
            raise RuntimeError("boom")

    gate, _ = make_gate(Broken())
    with LogCapture() as logs:
        verdict = result_of(gate.mail(gate.session(GOOD_IP, "outside"), "a@sender.example"))
    assert verdict.action is Action.TEMPFAIL and verdict.reply.code == 451
    assert logs.errors()


def test_every_decision_is_logged() -> None:
    gate, _ = make_gate(world())
    with LogCapture() as logs:
        session = gate.session(GOOD_IP, "outside")
        steps(gate, session, "a@sender.example", "b@ours.example")
    texts = logs.texts()
    for check in ("dnsbl", "domain", "spf"):
        assert any(f" {check}: client={GOOD_IP}" in t for t in texts), check


def test_explain_reports_each_check_without_recording(tmp_path: Path) -> None:
    r = world()
    gate, _ = make_gate(r, greylist=GreylistSettings(enabled=True, path=str(tmp_path / "grey.db")))
    rows = result_of(
        explain(gate, GOOD_IP, "mx.sender.example", "a@sender.example", ["b@ours.example"])
    )
    assert rows[0] == ("connect", "greet_pause", "delay", "5s before the banner")
    checks = [(step, check) for step, check, _, _ in rows]
    assert ("connect", "dnsbl") in checks and ("mail", "domain") in checks
    assert ("rcpt", "greylist") in checks
    grey = next(row for row in rows if row[1] == "greylist")
    assert grey[2].startswith("tempfail 451 4.7.1")
    # Nothing was recorded: a real session still sees a new triple.
    session = gate.session(GOOD_IP, "outside")
    assert steps(gate, session, "a@sender.example", "b@ours.example")[-1].reason == "new triple"
    rows = result_of(explain(gate, SPAM_IP, "h.example", "a@sender.example", ["b@ours.example"]))
    assert rows[-1][0] == "connect" and rows[-1][2].startswith("reject 554")
    gate.close()


def test_check_gate_settings_reports_problems(tmp_path: Path) -> None:
    from appliance.mail.gate import check_gate_settings

    bad_access = tmp_path / "access"
    bad_access.write_text("From:x.example NOPE\n")
    settings = GateSettings(
        access=AccessSettings(path=str(bad_access)),
        domains=DomainSettings(always_wrong_file=str(tmp_path / "missing")),
        greylist=GreylistSettings(enabled=True, path=str(tmp_path / "no" / "such" / "grey.db")),
        dnsbl=DNSBLSettings(zones=(DNSBLZone("bad..zone"),)),
    )
    problems = check_gate_settings(settings)
    assert len(problems) == 4
    assert problems[0].startswith(f"{bad_access}:1: unknown action 'NOPE'")
    assert check_gate_settings(GateSettings()) == []


def test_no_timers_left_behind_after_answered_lookups() -> None:
    gate, clock = make_gate(world())
    session = gate.session(GOOD_IP, "outside")
    steps(gate, session, "a@sender.example", "b@ours.example")
    result_of(gate.data(session, HEADERS))
    assert clock.getDelayedCalls() == []


def test_early_talker_is_refused_and_logged() -> None:
    gate, _ = make_gate(world())
    with LogCapture() as logs:
        verdict = gate.early_talker(gate.session(SPAM_IP, "outside"))
    assert verdict.action is Action.REJECT
    assert (verdict.reply.code, verdict.reply.enhanced) == (554, "5.5.0")  # type: ignore[union-attr]
    assert any("greet_pause" in t and SPAM_IP in t for t in logs.texts())


def test_recipient_check_runs_before_greylisting() -> None:
    from twisted.internet.defer import succeed

    from appliance.mail.interfaces import Reply

    class Directory:
        def __init__(self) -> None:
            self.asked: list[str] = []

        def check_recipient(self, address: str) -> Any:
            self.asked.append(address)
            if address.startswith("unknown"):
                return succeed(Reply(550, "5.1.1", "User unknown"))
            if address.startswith("ldapdown"):
                return succeed(Reply(451, "4.4.3", "Directory unavailable"))
            return succeed(None)

    directory = Directory()
    clock = new_clock()
    gate = Gate(
        GateSettings(greylist=GreylistSettings(enabled=True), spf=SPFSettings(enabled=False)),
        world(),
        clock,
        is_local_domain=lambda d: d == "ours.example",
        recipients=directory,
    )
    session = gate.session(GOOD_IP, "outside")
    result_of(gate.mail(session, "a@sender.example"))
    unknown = result_of(gate.rcpt(session, "unknown@ours.example"))
    assert unknown.check == "recipient" and unknown.reply.code == 550  # type: ignore[union-attr]
    down = result_of(gate.rcpt(session, "ldapdown@ours.example"))
    assert down.action is Action.TEMPFAIL and down.check == "recipient"
    grey = result_of(gate.rcpt(session, "b@ours.example"))
    assert grey.check == "greylist"
    # Not asked for a domain this box does not accept mail for.
    result_of(gate.rcpt(session, "x@far.example"))
    assert directory.asked == ["unknown@ours.example", "ldapdown@ours.example", "b@ours.example"]
    gate.close()
