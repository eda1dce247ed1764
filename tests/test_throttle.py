"""LoginThrottle: delays, cool-down, per-address buckets, bounded memory, and its POP3 hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from appliance.directory.throttle import POP3_LOCKED_OUT, LockedOutGate, LoginThrottle, client_key
from appliance.pop3.server import POP3Server
from tests.test_pop3_server import Env, Transport


def make(**kwargs: object) -> tuple[Clock, LoginThrottle]:
    clock = Clock()
    clock.advance(1_000_000)
    return clock, LoginThrottle(clock, **kwargs)  # type: ignore[arg-type]


def test_delays_grow_then_the_address_is_refused() -> None:
    clock, throttle = make(delays=(0, 1, 2, 4), max_failures=6, cooldown=300)
    delays = [throttle.record_failure("192.0.2.1", "alice", "smtp") for _ in range(6)]
    assert delays == [0, 1, 2, 4, 4, 4]
    assert throttle.blocked("192.0.2.1")
    assert throttle.cooldown_remaining("192.0.2.1") == 300
    assert not throttle.blocked("192.0.2.2")
    clock.advance(299)
    assert throttle.blocked("192.0.2.1")
    clock.advance(1)
    assert not throttle.blocked("192.0.2.1")
    # The count started again after the lock-out.
    assert throttle.record_failure("192.0.2.1", "alice", "smtp") == 0


def test_failures_outside_the_window_are_forgotten() -> None:
    clock, throttle = make(delays=(0, 1, 2), max_failures=3, window=60)
    throttle.record_failure("192.0.2.1", "a", "pop3")
    throttle.record_failure("192.0.2.1", "a", "pop3")
    clock.advance(61)
    assert throttle.failures("192.0.2.1") == 0
    assert throttle.record_failure("192.0.2.1", "a", "pop3") == 0
    assert not throttle.blocked("192.0.2.1")


def test_success_does_not_reset_the_count() -> None:
    _, throttle = make(max_failures=3)
    throttle.record_failure("192.0.2.1", "a", "smtp")
    throttle.record_failure("192.0.2.1", "a", "smtp")
    throttle.record_success("192.0.2.1", "b", "smtp")
    throttle.record_failure("192.0.2.1", "a", "smtp")
    assert throttle.blocked("192.0.2.1")


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() -> None:
    _, throttle = make(max_failures=2)
    throttle.record_failure("2001:db8:1:2::1", "a", "smtp")
    throttle.record_failure("2001:db8:1:2:ffff::9", "a", "smtp")
    assert throttle.blocked("2001:db8:1:2::77")
    assert not throttle.blocked("2001:db8:1:3::1")
    throttle.record_failure("::ffff:192.0.2.9", "a", "smtp")
    assert throttle.failures("192.0.2.9") == 1
    assert client_key("not an address") == "not an address"


def test_memory_is_bounded() -> None:
    clock, throttle = make(max_clients=100, max_failures=5)
    for index in range(1000):
        clock.advance(0.001)
        throttle.record_failure(f"10.0.{index // 256}.{index % 256}", "a", "smtp")
    assert len(throttle._records) <= 100
    # The most recent addresses are the ones kept.
    assert throttle.failures("10.0.3.231") == 1


def test_every_failure_is_logged() -> None:
    _, throttle = make(max_failures=2, cooldown=60)
    events: list[LogEvent] = []
    observer: Any = events.append
    globalLogPublisher.addObserver(observer)
    try:
        throttle.record_failure("192.0.2.1", "alice@example.test", "smtp")
        throttle.on_auth_failure("192.0.2.1", "bob@example.test")
    finally:
        globalLogPublisher.removeObserver(observer)
    text = [formatEvent(e) for e in events if e.get("log_namespace") == "appliance.auth"]
    assert text[0] == (
        "auth failure: service=smtp client=192.0.2.1 login=<alice@example.test> failures=1"
    )
    assert text[1] == (
        "auth failure: service=pop3 client=192.0.2.1 login=<bob@example.test> failures=2"
    )
    assert text[2] == "auth throttle: 192.0.2.1 refused for 60s after 2 failures"


def test_pop3_hooks_stall_failed_logins(tmp_path: Path) -> None:
    throttle = LoginThrottle(Clock(), delays=(0, 5), max_failures=10)
    env = Env(
        tmp_path,
        on_auth_failure=throttle.on_auth_failure,
        failure_delay=throttle.failure_delay,
        max_auth_failures=10,
    )
    throttle.clock = env.clock
    session = env.connect("127.0.1.5")
    assert session.cmd("USER alice@example.test").startswith("+OK")
    assert session.cmd("PASS wrong") == "-ERR [AUTH] authentication failed\r\n"
    assert session.cmd("USER alice@example.test").startswith("+OK")
    assert session.cmd("PASS wrong again") == ""
    env.clock.advance(4.9)
    assert session.take() == b""
    env.clock.advance(0.1)
    assert session.take() == b"-ERR [AUTH] authentication failed\r\n"
    assert throttle.failures("127.0.1.5") == 2
    # Another address logs in at once.
    other = env.connect("127.0.1.6")
    assert other.login().startswith("+OK")


def test_locked_out_addresses_are_turned_away_from_pop3(tmp_path: Path) -> None:
    env = Env(tmp_path)
    throttle = LoginThrottle(env.clock, max_failures=2, cooldown=60)
    gate = LockedOutGate(env.factory, throttle, POP3_LOCKED_OUT)
    for _ in range(2):
        throttle.record_failure("192.0.2.7", "alice@example.test", "pop3")
    transport = Transport("192.0.2.7")
    refused = gate.buildProtocol(transport.getPeer())
    assert refused is not None and not isinstance(refused, POP3Server)
    refused.makeConnection(transport)
    assert transport.value() == (
        b"-ERR [SYS/TEMP] too many failed logins from your address, try again later\r\n"
    )
    assert transport.disconnecting
    # Others get the POP3 server; after the cool-down so does the locked-out address.
    assert isinstance(gate.buildProtocol(Transport("192.0.2.8").getPeer()), POP3Server)
    env.clock.advance(60)
    assert isinstance(gate.buildProtocol(transport.getPeer()), POP3Server)
