"""A counting semaphore for coroutines that costs nothing while a slot is free.

The queue runner and remote delivery bound the messages in flight overall,
and per next hop.  ``DeferredSemaphore.run`` makes three Deferreds per use
even when a token is free; on the delivery path of every message that was
measurable.  :class:`Slots` only makes one when the caller has to wait::

    wait = slots.take()
    if wait is not None:
        await wait
    try:
        ...
    finally:
        slots.release()

Slots are handed to waiters in order.  A waiter that finishes at once and
releases again does not recurse: the hand-off is a loop, so thousands of
queued messages that need no I/O (held, vanished) cannot exhaust the stack.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred


class Slots:
    """At most ``limit`` holders at a time; the others wait in order."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._free = self.limit
        self._waiting: deque[Deferred[None]] = deque()
        self._handing = False

    @property
    def idle(self) -> bool:
        """Whether nobody holds or waits for a slot."""
        return self._free == self.limit and not self._waiting

    def take(self) -> Deferred[None] | None:
        """Take a slot: None when one was free, else a Deferred that fires with it."""
        if self._free and not self._waiting:
            self._free -= 1
            return None
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def release(self) -> None:
        """Give a slot back; the longest waiter gets it (a cancelled wait is skipped)."""
        self._free += 1
        if self._handing:
            return  # a release from inside a hand-off: the loop below goes on
        self._handing = True
        try:
            while self._free and self._waiting:
                d = self._waiting.popleft()
                if d.called:
                    continue
                self._free -= 1
                d.callback(None)
        finally:
            self._handing = False
