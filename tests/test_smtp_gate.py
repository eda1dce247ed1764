"""The anti-spam gate inside the SMTP protocol: each check refuses at its step, with its code.

The gate's checks themselves are tested in tests/test_gate_*.py; here the
point is the protocol's part: the banner waits for the greet pause and the
connect checks, an early talker is refused, MAIL/RCPT verdicts become
replies, header checks judge the header block before it is stored, tag lines
go in front of it, DISCARD answers 250 and stores nothing, and a neighbour
that fails never turns into a 5xx (R-1, R-3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from appliance.mail.gate import GateSettings
from appliance.mail.gate.access import AccessSettings
from appliance.mail.gate.dnsbl import DNSBLSettings, DNSBLZone
from appliance.mail.gate.domains import DomainSettings
from appliance.mail.gate.gate import Gate
from appliance.mail.gate.greet import GreetPauseSettings
from appliance.mail.gate.headers import HeaderRule, HeaderSettings
from appliance.mail.gate.spf import SPFSettings
from tests.test_gate_support import FakeResolver
from tests.test_smtp_support import INSIDE_CLIENT, OUTSIDE_CLIENT, Session, body_of, transaction

NO_SPF = SPFSettings(enabled=False)
NO_DOMAINS = DomainSettings(check_sender=False, check_recipients=False)


def gated(
    settings: GateSettings, resolver: FakeResolver | None = None, client: str = OUTSIDE_CLIENT
) -> Session:
    resolver = resolver or FakeResolver()
    relay_for_gate = Session().relay
    gate = Gate(
        settings,
        resolver,  # type: ignore[arg-type]
        Clock(),
        is_inside=lambda ip: relay_for_gate.is_inside_client(ip, False),
        is_local_domain=relay_for_gate.accepts_for,
    )
    return Session(client=client, gate=gate)


def plain(**kwargs: Any) -> GateSettings:
    kwargs.setdefault("spf", NO_SPF)
    kwargs.setdefault("domains", NO_DOMAINS)
    return GateSettings(**kwargs)


def test_greet_pause_delays_the_banner_and_refuses_early_talkers() -> None:
    settings = plain(greet=GreetPauseSettings(per_listener={"outside": 5.0}))
    patient = gated(settings)
    assert patient.output() == b""
    patient.clock.advance(5)
    assert patient.lines() == ["220 mail.example.test ESMTP ready"]
    assert patient.ehlo()[0].startswith("250")

    eager = gated(settings)
    eager.clock.advance(1)
    assert eager.send(b"EHLO bot.test\r\n") == [
        "554 5.5.0 Protocol error: talking before the greeting"
    ]
    assert eager.closed


def test_inside_clients_are_not_delayed() -> None:
    session = gated(
        plain(greet=GreetPauseSettings(per_listener={"outside": 5.0})), client=INSIDE_CLIENT
    )
    assert session.lines() == ["220 mail.example.test ESMTP ready"]


def test_dnsbl_listing_refuses_at_connect_and_dead_list_does_not() -> None:
    resolver = FakeResolver()
    reversed_ip = ".".join(reversed(OUTSIDE_CLIENT.split(".")))
    resolver.add_a(f"{reversed_ip}.bl.test", "127.0.0.2")
    resolver.add_txt(f"{reversed_ip}.bl.test", "listed for spam")
    settings = plain(dnsbl=DNSBLSettings(zones=(DNSBLZone("bl.test"),)))
    listed = gated(settings, resolver)
    (line,) = listed.lines()
    assert line.startswith("554 5.7.1") and "listed for spam" in line
    assert listed.closed

    dead = FakeResolver()
    dead.servfail.add(f"{reversed_ip}.bl.test")
    ok = gated(settings, dead)
    assert ok.lines() == ["220 mail.example.test ESMTP ready"]


def test_sender_domain_checks_at_mail_with_temporary_failures_never_5xx() -> None:
    resolver = FakeResolver().add_mx("remote.test", (10, "mx.remote.test"))
    resolver.servfail.add("flaky.test")
    session = gated(plain(domains=DomainSettings(check_recipients=False)), resolver)
    session.output()
    session.ehlo()
    assert session.send(b"MAIL FROM:<a@nowhere.test>\r\n")[0].startswith("553 5.1.8")
    assert session.send(b"MAIL FROM:<a@flaky.test>\r\n")[0].startswith("451 4.4.3")
    assert session.send(b"MAIL FROM:<a@localhost>\r\n")[0][0] == "5"
    assert session.send(b"MAIL FROM:<a@remote.test>\r\n") == ["250 2.1.0 Ok"]


def test_access_map_reject_relay_and_discard(tmp_path: Path) -> None:
    access = tmp_path / "access"
    access.write_text(
        f"Connect:{OUTSIDE_CLIENT} RELAY\n"
        "From:spammer@remote.test REJECT\n"
        "From:quiet@remote.test DISCARD\n"
    )
    session = gated(plain(access=AccessSettings(path=str(access))))
    session.output()
    session.ehlo()
    assert session.send(b"MAIL FROM:<spammer@remote.test>\r\n")[0].startswith("5")
    # RELAY for this client: mail to another domain is relayed, as for an inside client.
    replies = session.send(transaction(sender="someone@remote.test", rcpts=("x@elsewhere.test",)))
    assert replies[-1].startswith("250 2.0.0")
    replies = session.send(transaction(sender="quiet@remote.test"))
    assert replies[-1] == "250 2.0.0 Ok: discarded"
    assert len(session.store.committed) == 1


def test_header_checks_judge_the_block_before_it_is_stored() -> None:
    rule = HeaderRule(name="Subject", pattern="(?i)viagra", action="reject", text="Spam")
    tag_rule = HeaderRule(
        name="Subject", pattern="(?i)offer", action="tag", text="X-Spam-Flag: YES"
    )
    session = gated(plain(headers=HeaderSettings(rules=(rule, tag_rule))))
    session.output()
    session.ehlo()
    refused = session.send(
        transaction(body=b"From: a@remote.test\r\nSubject: cheap VIAGRA\r\n\r\nbuy\r\n")
    )
    assert refused[-1].startswith("5") and "Spam" in refused[-1]
    assert session.store.committed == []
    accepted = session.send(
        transaction(
            body=b"From: a@remote.test\r\nSubject: an offer\r\n\r\n.\r\nbody line\r\n".replace(
                b"\r\n.\r\n", b"\r\n..\r\n"
            )
        )
    )
    assert accepted[-1].startswith("250 2.0.0")
    (message,) = session.store.committed
    body = body_of(message)
    assert body.startswith(b"X-Header-Check: X-Spam-Flag: YES\r\nFrom: a@remote.test\r\n")
    assert body.endswith(b"Subject: an offer\r\n\r\n.\r\nbody line\r\n")


def test_message_without_blank_line_is_still_judged_and_stored() -> None:
    session = gated(plain())
    session.output()
    session.ehlo()
    assert session.send(transaction(body=b"From: a@remote.test\r\nSubject: no body\r\n"))[
        -1
    ].startswith("250")
    (message,) = session.store.committed
    assert body_of(message) == b"From: a@remote.test\r\nSubject: no body\r\n"
