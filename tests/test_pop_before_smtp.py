"""POP-before-SMTP: a POP3 login opens relaying on port 25 for that address, for a while."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock

from appliance.directory.popbeforesmtp import PopBeforeSMTP
from tests.test_pop3_server import Env
from tests.test_smtp_support import OUTSIDE_CLIENT, Session


def test_login_opens_relaying_until_it_expires() -> None:
    clock = Clock()
    pbs = PopBeforeSMTP(clock, 600)
    assert not pbs("192.0.2.1")
    pbs.on_login("192.0.2.1")
    assert pbs("192.0.2.1") and pbs("::ffff:192.0.2.1")
    assert not pbs("192.0.2.2")
    clock.advance(599)
    assert pbs("192.0.2.1")
    pbs.on_login("192.0.2.1")  # a new login extends it
    clock.advance(599)
    assert pbs("192.0.2.1")
    clock.advance(1)
    assert not pbs("192.0.2.1")


def test_zero_duration_is_off() -> None:
    pbs = PopBeforeSMTP(Clock(), 0)
    pbs.on_login("192.0.2.1")
    assert not pbs.enabled and not pbs("192.0.2.1")


def test_memory_is_bounded() -> None:
    clock = Clock()
    pbs = PopBeforeSMTP(clock, 60, max_clients=10)
    for index in range(50):
        pbs.on_login(f"192.0.2.{index}")
    assert len(pbs._until) <= 10
    assert pbs("192.0.2.49") and not pbs("192.0.2.0")


def test_pop3_login_lets_the_address_relay_on_port_25(tmp_path: Path) -> None:
    smtp = Session(client=OUTSIDE_CLIENT)
    pbs = PopBeforeSMTP(smtp.clock, 300)
    smtp.relay.add_inside_predicate(pbs)
    smtp.ehlo()
    smtp.send(b"MAIL FROM:<alice@example.test>\r\n")
    assert smtp.send(b"RCPT TO:<friend@elsewhere.test>\r\n") == ["550 5.7.1 Relaying denied"]

    pop = Env(tmp_path, on_login=pbs.on_login)
    pop_session = pop.connect(OUTSIDE_CLIENT)
    assert pop_session.cmd("STLS").startswith("+OK")
    pop_session.proto.secure = True  # the fake transport only records STARTTLS
    assert pop_session.login().startswith("+OK")

    assert smtp.send(b"RCPT TO:<friend@elsewhere.test>\r\n") == ["250 2.1.5 Ok"]
    # Someone else is still refused, and the window closes after 300 s.
    other = Session(client="127.0.2.99")
    other.relay.add_inside_predicate(pbs)
    other.ehlo()
    other.send(b"MAIL FROM:<x@remote.test>\r\n")
    assert other.codes(b"RCPT TO:<friend@elsewhere.test>\r\n") == ["550"]
    smtp.clock.advance(300)
    later = Session(client=OUTSIDE_CLIENT)
    later.relay.add_inside_predicate(pbs)
    later.ehlo()
    later.send(b"MAIL FROM:<alice@example.test>\r\n")
    assert later.codes(b"RCPT TO:<friend@elsewhere.test>\r\n") == ["550"]


def test_failed_pop3_login_opens_nothing(tmp_path: Path) -> None:
    clock = Clock()
    pbs = PopBeforeSMTP(clock, 300)
    pop = Env(tmp_path, on_login=pbs.on_login)
    session = pop.connect("127.0.1.5")
    session.cmd("USER alice@example.test")
    assert session.cmd("PASS nope").startswith("-ERR")
    assert not pbs("127.0.1.5")
