"""Open SMTP sessions kept for the next message to the same destination (connection reuse, M-6).

Postfix's connection cache, in small: after a transaction the queue runner
hands a still-usable :class:`~appliance.mail.smtp_client.Session` back to the
pool instead of saying QUIT, and the next delivery to the same next hop (route
and security settings) takes it instead of looking up MX records, connecting,
greeting, saying EHLO and negotiating TLS again.  A session is kept for at most ``idle`` seconds
between transactions (Postfix's ``smtp_connection_cache_time_limit``, 2 s),
for at most ``max_uses`` transactions and ``max_age`` seconds in all
(``smtp_connection_reuse_count_limit``/``_time_limit``), and at most
``max_idle`` sessions wait at once; beyond that they are closed with QUIT.

A destination may close a cached connection at any moment; a session found
broken is dropped when taken, and a transaction that fails on a reused session
before the server answered anything is retried once on a fresh connection by
the caller (see ``smtp_client._attempt``).
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

if TYPE_CHECKING:  # smtp_client imports this module
    from appliance.mail.smtp_client import Session

log = Logger(namespace="appliance.mail.connections")


@dataclass
class _Use:
    """What the pool remembers of a session: no reference to it, so a lost session is freed."""

    label: str
    born: float
    uses: int = 0


@dataclass
class _Idle:
    session: Session
    use: _Use
    timer: Any = field(default=None)


class SessionPool:
    """Idle SMTP sessions by destination key; ``take`` one, ``give`` it back after a transaction."""

    def __init__(
        self,
        clock: Any,
        *,
        idle: float = 2.0,
        max_uses: int = 100,
        max_age: float = 300.0,
        max_idle: int = 100,
    ) -> None:
        self.clock = clock
        self.idle = idle
        self.max_uses = max_uses
        self.max_age = max_age
        self.max_idle = max_idle
        self._idle: dict[Hashable, list[_Idle]] = {}
        self._count = 0
        # Sessions handed out by take(): weakly, since a caller that closes a broken
        # one itself need not tell the pool.
        self._out: weakref.WeakKeyDictionary[Session, _Use] = weakref.WeakKeyDictionary()
        self._closing: set[Deferred[None]] = set()
        self.reused = 0

    def __len__(self) -> int:
        """How many sessions are waiting idle."""
        return self._count

    def take(self, key: Hashable) -> tuple[Session, str] | None:
        """An idle, still working session for ``key`` and its label, or None (then connect anew)."""
        waiting = self._idle.get(key)
        while waiting:
            entry = waiting.pop()
            self._count -= 1
            if entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
            entry.timer = None
            if entry.session.usable:
                if not waiting:
                    del self._idle[key]
                self._out[entry.session] = entry.use
                self.reused += 1
                return entry.session, entry.use.label
            self._close(entry.session)
        self._idle.pop(key, None)
        return None

    def give(self, key: Hashable, session: Session, label: str = "") -> None:
        """A transaction on ``session`` is over: keep it for the next one, or close it.

        ``label`` comes back with the session from :meth:`take` (the host name
        the session was opened to, for logs and DSNs).  A session's age counts
        from the first time it is given.
        """
        now = self.clock.seconds()
        use = self._out.pop(session, None) or _Use(label, now)
        use.uses += 1
        if (
            not session.usable
            or use.uses >= self.max_uses
            or now - use.born >= self.max_age
            or self._count >= self.max_idle
        ):
            self._close(session)
            return
        entry = _Idle(session, use)
        entry.timer = self.clock.callLater(self.idle, self._expire, key, entry)
        self._idle.setdefault(key, []).append(entry)
        self._count += 1

    def _expire(self, key: Hashable, entry: _Idle) -> None:
        waiting = self._idle.get(key, [])
        if entry in waiting:
            waiting.remove(entry)
            self._count -= 1
            if not waiting:
                self._idle.pop(key, None)
        entry.timer = None
        self._close(entry.session)

    def _close(self, session: Session) -> None:
        self._out.pop(session, None)
        closing = session.close()
        self._closing.add(closing)
        closing.addBoth(lambda _: self._closing.discard(closing))

    def close_all(self) -> Deferred[None]:
        """QUIT every idle session (at shutdown); fires when they are all closed."""
        for key in list(self._idle):
            for entry in self._idle.pop(key):
                if entry.timer is not None and entry.timer.active():
                    entry.timer.cancel()
                self._close(entry.session)
        self._count = 0
        d = defer.DeferredList(list(self._closing), consumeErrors=True)
        return d.addCallback(lambda _: None)


__all__ = ["SessionPool"]
