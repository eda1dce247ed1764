"""Failed-login throttling per client address, shared by SMTP AUTH and POP3 (brute-force defence).

Every failure is logged.  Each further failure from the same address within
``window`` seconds is answered after a longer delay (``delays``: 0, 1, 2, 4,
8 ... seconds); after ``max_failures`` of them the address is refused
outright (SMTP ``454 4.7.0``, POP3 ``-ERR [SYS/TEMP]``) for ``cooldown``
seconds, whatever password it tries.  Other addresses are never affected.
IPv6 clients are counted per /64, since one host usually owns a whole /64.
A success does not wipe the count: an attacker holding one valid account
must not be able to reset its budget against all the others.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

log = Logger(namespace="appliance.auth")

DEFAULT_DELAYS = (0.0, 1.0, 2.0, 4.0, 8.0)


@dataclass
class _Record:
    failures: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0
    last_seen: float = 0.0


def client_key(client: str) -> str:
    """The bucket an address counts in: IPv4 (also IPv4-mapped IPv6) as is, IPv6 per /64."""
    try:
        address = ipaddress.ip_address(client.partition("%")[0])
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def doubling_delays(max_delay: float) -> tuple[float, ...]:
    """0, 1, 2, 4 ... seconds, capped at ``max_delay`` (the ``login_throttle.max_delay`` setting)."""
    delays = [0.0]
    step = 1.0
    while step < max_delay:
        delays.append(step)
        step *= 2
    if max_delay > 0:
        delays.append(float(max_delay))
    return tuple(delays)


class LoginThrottle:
    """Counts failed logins per client address and says how long to stall or whether to refuse.

    ``clock`` is an IReactorTime (``task.Clock`` in tests).  The POP3 server
    uses :meth:`on_auth_failure` and :meth:`failure_delay` as its hooks and
    :meth:`cooldown_remaining` to refuse before checking a password; the SMTP
    server calls :meth:`cooldown_remaining` at AUTH and :meth:`record_failure`
    after a wrong password.  At most ``max_clients`` addresses are tracked:
    beyond that the least recently seen are forgotten, so a flood of
    addresses costs bounded memory.
    """

    def __init__(
        self,
        clock: IReactorTime | Any,
        delays: tuple[float, ...] = DEFAULT_DELAYS,
        max_failures: int = 10,
        window: float = 900.0,
        cooldown: float = 900.0,
        max_clients: int = 100_000,
    ) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        self.clock: Any = clock
        self.delays = tuple(float(d) for d in delays) or (0.0,)
        self.max_failures = max_failures
        self.window = float(window)
        self.cooldown = float(cooldown)
        self.max_clients = max_clients
        self._records: dict[str, _Record] = {}
        self._last_prune = 0.0

    def _now(self) -> float:
        return self.clock.seconds()

    def _expire(self, record: _Record, now: float) -> None:
        failures = record.failures
        while failures and failures[0] <= now - self.window:
            failures.popleft()

    def failures(self, client: str) -> int:
        """How many failures from ``client`` count now (within the window)."""
        record = self._records.get(client_key(client))
        if record is None:
            return 0
        self._expire(record, self._now())
        return len(record.failures)

    def cooldown_remaining(self, client: str) -> float:
        """Seconds ``client`` is still refused (0.0: it may try a password)."""
        record = self._records.get(client_key(client))
        if record is None:
            return 0.0
        return max(0.0, record.locked_until - self._now())

    def blocked(self, client: str) -> bool:
        """Whether ``client`` is refused right now."""
        return self.cooldown_remaining(client) > 0.0

    def _delay_for(self, count: int) -> float:
        if count <= 0:
            return 0.0
        return self.delays[min(count, len(self.delays)) - 1]

    def record_failure(self, client: str, login: str, service: str) -> float:
        """Count and log a wrong password; the delay (seconds) before answering it."""
        now = self._now()
        self._prune(now)
        key = client_key(client)
        record = self._records.get(key)
        if record is None:
            record = self._records[key] = _Record()
        record.last_seen = now
        self._expire(record, now)
        record.failures.append(now)
        count = len(record.failures)
        log.warn(
            "auth failure: service={service} client={client} login=<{login}> failures={count}",
            service=service,
            client=client,
            login=login[:100],
            count=count,
        )
        delay = self._delay_for(count)
        if count >= self.max_failures and record.locked_until <= now:
            record.locked_until = now + self.cooldown
            record.failures.clear()
            log.warn(
                "auth throttle: {client} refused for {cooldown:.0f}s after {count} failures",
                client=client,
                cooldown=self.cooldown,
                count=count,
            )
        return delay

    def record_success(self, client: str, login: str, service: str) -> None:
        """Log a successful login; the failure count is deliberately kept (see module doc)."""
        log.info(
            "auth success: service={service} client={client} login=<{login}>",
            service=service,
            client=client,
            login=login,
        )

    # POP3ServerFactory hooks -------------------------------------------------

    def on_auth_failure(self, client: str, login: str) -> None:
        """``POP3ServerFactory(on_auth_failure=...)``: count a failed POP3 login."""
        self.record_failure(client, login, "pop3")

    def failure_delay(self, client: str) -> float:
        """``POP3ServerFactory(failure_delay=...)``: the stall for the failure just counted."""
        record = self._records.get(client_key(client))
        if record is None:
            return 0.0
        if record.locked_until > self._now():
            return self.delays[-1]
        return self._delay_for(len(record.failures))

    # ------------------------------------------------------------------------

    def _prune(self, now: float) -> None:
        if now - self._last_prune < self.window and len(self._records) < self.max_clients:
            return
        self._last_prune = now
        for key, record in list(self._records.items()):
            self._expire(record, now)
            if not record.failures and record.locked_until <= now:
                del self._records[key]
        excess = len(self._records) - self.max_clients + 1
        if excess > 0:
            oldest = sorted(self._records, key=lambda k: self._records[k].last_seen)[:excess]
            for key in oldest:
                del self._records[key]


class _TurnAway(Protocol):
    """Writes one line and hangs up."""

    transport: Any = None

    def __init__(self, line: bytes) -> None:
        self.line = line

    def connectionMade(self) -> None:
        self.transport.write(self.line)
        self.transport.loseConnection()


class LockedOutGate(Factory):
    """Wraps a listener's factory: clients in their cool-down get ``line`` and are disconnected.

    Used in front of POP3, where nothing is possible without logging in,
    so refusing the connection is refusing the login (``-ERR [SYS/TEMP]``,
    RFC 2449 8.1.2), without the POP3 server needing a hook for it.
    """

    # One log line per event: our own, not Twisted's per-connection factory start/stop.
    noisy = False

    def __init__(self, wrapped: Factory, throttle: LoginThrottle, line: bytes) -> None:
        self.wrapped = wrapped
        self.throttle = throttle
        self.line = line

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        client = str(getattr(addr, "host", ""))
        if client and self.throttle.blocked(client):
            log.info("turned away {client}: failed-login cool-down", client=client)
            protocol = _TurnAway(self.line)
            protocol.factory = self
            return protocol
        return self.wrapped.buildProtocol(addr)


POP3_LOCKED_OUT = b"-ERR [SYS/TEMP] too many failed logins from your address, try again later\r\n"

__all__ = [
    "DEFAULT_DELAYS",
    "POP3_LOCKED_OUT",
    "LockedOutGate",
    "LoginThrottle",
    "client_key",
    "doubling_delays",
]
