"""POP-before-SMTP (MISSION M-9): a client address that just logged in to POP3 may relay for a while.

The old trick for mail clients without SMTP AUTH: after a successful POP3
login, the same address counts as inside on port 25 for ``duration``
seconds.  Wire :meth:`PopBeforeSMTP.on_login` as ``POP3ServerFactory(on_login=...)``
and the object itself as ``RelayPolicy.add_inside_predicate``.  A duration
of 0 turns it off.  Expiry follows the injected clock.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger(namespace="appliance.auth")


def _normalise(client: str) -> str:
    try:
        address = ipaddress.ip_address(client.partition("%")[0])
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class PopBeforeSMTP:
    """Remembers POP3 logins per client address until they expire.

    At most ``max_clients`` addresses are remembered; when full, expired
    entries are dropped first, then the oldest.
    """

    def __init__(
        self, clock: IReactorTime | Any, duration: float, max_clients: int = 10_000
    ) -> None:
        self.clock: Any = clock
        self.duration = float(duration)
        self.max_clients = max_clients
        self._until: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return self.duration > 0

    def on_login(self, client: str) -> None:
        """``POP3ServerFactory(on_login=...)``: open relaying for ``client`` for ``duration``."""
        if not self.enabled:
            return
        now = self.clock.seconds()
        key = _normalise(client)
        self._until.pop(key, None)
        if len(self._until) >= self.max_clients:
            self._prune(now)
        self._until[key] = now + self.duration
        log.info(
            "pop-before-smtp: {client} may relay for {duration:.0f}s",
            client=key,
            duration=self.duration,
        )

    def __call__(self, client: str) -> bool:
        """The RelayPolicy inside predicate: whether ``client`` logged in to POP3 recently."""
        until = self._until.get(_normalise(client))
        if until is None:
            return False
        if until <= self.clock.seconds():
            del self._until[_normalise(client)]
            return False
        return True

    def _prune(self, now: float) -> None:
        for key, until in list(self._until.items()):
            if until <= now:
                del self._until[key]
        while len(self._until) >= self.max_clients:
            # Dicts keep insertion order and on_login re-inserts: the first key is the oldest.
            del self._until[next(iter(self._until))]


__all__ = ["PopBeforeSMTP"]
