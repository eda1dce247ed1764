"""SessionPool (appliance.mail.connections) on a fake clock with fake sessions (M-6 connection reuse).

The pool keeps SMTP sessions between transactions as Postfix's connection
cache does: 2 s idle, 100 uses, 300 s in all, a bound on idle sessions.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from appliance.mail.connections import SessionPool

KEY = ("route-a", True, None)
OTHER = ("route-b", True, None)


class FakeSession:
    """Stands in for smtp_client.Session: ``usable`` and a ``close()`` that records the call."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.usable = True
        self.closed = 0

    def close(self) -> defer.Deferred[None]:
        self.closed += 1
        self.usable = False
        return defer.succeed(None)

    def __repr__(self) -> str:
        return f"FakeSession({self.name!r})"


class SessionPoolTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = SessionPool(self.clock)

    def session(self, name: str = "s") -> Any:
        return FakeSession(name)

    def test_take_from_empty_is_none(self) -> None:
        self.assertIsNone(self.pool.take(KEY))
        self.assertEqual(len(self.pool), 0)
        self.assertEqual(self.pool.reused, 0)

    def test_give_then_take_returns_the_same_session_and_label(self) -> None:
        s = self.session()
        self.pool.give(KEY, s, "mx1.remote.test")
        self.assertEqual(len(self.pool), 1)
        taken = self.pool.take(KEY)
        assert taken is not None
        self.assertIs(taken[0], s)
        self.assertEqual(taken[1], "mx1.remote.test")
        self.assertEqual(s.closed, 0)
        self.assertEqual(len(self.pool), 0)
        self.assertIsNone(self.pool.take(KEY))
        # Taking it cancelled its idle timer: nothing is left to fire.
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_last_in_first_out_per_key(self) -> None:
        first, second = self.session("first"), self.session("second")
        self.pool.give(KEY, first, "one")
        self.pool.give(KEY, second, "two")
        a = self.pool.take(KEY)
        b = self.pool.take(KEY)
        assert a is not None and b is not None
        self.assertEqual((a[0], a[1]), (second, "two"))
        self.assertEqual((b[0], b[1]), (first, "one"))
        self.assertIsNone(self.pool.take(KEY))

    def test_keys_are_separate(self) -> None:
        a, b = self.session("a"), self.session("b")
        self.pool.give(KEY, a, "a")
        self.assertIsNone(self.pool.take(OTHER))
        self.pool.give(OTHER, b, "b")
        taken_b = self.pool.take(OTHER)
        taken_a = self.pool.take(KEY)
        assert taken_a is not None and taken_b is not None
        self.assertIs(taken_a[0], a)
        self.assertIs(taken_b[0], b)
        self.assertEqual((a.closed, b.closed), (0, 0))

    def test_idle_session_is_closed_after_two_seconds_not_before(self) -> None:
        s = self.session()
        self.pool.give(KEY, s, "h")
        self.clock.advance(1.9)
        self.assertEqual(s.closed, 0)
        self.assertEqual(len(self.pool), 1)
        self.clock.advance(0.2)
        self.assertEqual(s.closed, 1)
        self.assertEqual(len(self.pool), 0)
        self.assertIsNone(self.pool.take(KEY))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idle_timer_restarts_with_each_give(self) -> None:
        s = self.session()
        self.pool.give(KEY, s, "h")
        self.clock.advance(1.5)
        self.assertIsNotNone(self.pool.take(KEY))
        self.pool.give(KEY, s, "h")
        self.clock.advance(1.5)  # 3 s since the first give, 1.5 s idle
        self.assertEqual(s.closed, 0)
        self.clock.advance(0.6)
        self.assertEqual(s.closed, 1)

    def test_expiry_of_one_leaves_the_others(self) -> None:
        old, new = self.session("old"), self.session("new")
        self.pool.give(KEY, old, "h")
        self.clock.advance(1.0)
        self.pool.give(KEY, new, "h")
        self.clock.advance(1.5)
        self.assertEqual((old.closed, new.closed), (1, 0))
        taken = self.pool.take(KEY)
        assert taken is not None
        self.assertIs(taken[0], new)

    def test_unusable_session_is_closed_and_skipped_at_take(self) -> None:
        good, dead = self.session("good"), self.session("dead")
        self.pool.give(KEY, good, "good")
        self.pool.give(KEY, dead, "dead")
        dead.usable = False  # the destination closed it while it waited
        taken = self.pool.take(KEY)
        assert taken is not None
        self.assertIs(taken[0], good)
        self.assertEqual(dead.closed, 1)
        self.assertEqual(good.closed, 0)
        self.assertEqual(len(self.pool), 0)
        self.assertEqual(self.pool.reused, 1)
        # The dead one's idle timer went with it.
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_only_unusable_sessions_gives_none(self) -> None:
        dead = self.session("dead")
        self.pool.give(KEY, dead, "h")
        dead.usable = False
        self.assertIsNone(self.pool.take(KEY))
        self.assertEqual(dead.closed, 1)
        self.assertEqual(self.pool.reused, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unusable_session_given_back_is_closed(self) -> None:
        s = self.session()
        s.usable = False
        self.pool.give(KEY, s, "h")
        self.assertEqual(s.closed, 1)
        self.assertEqual(len(self.pool), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_max_uses_closes_on_give(self) -> None:
        pool = SessionPool(self.clock, max_uses=3)
        s = self.session()
        pool.give(KEY, s, "h")  # use 1
        for _ in range(2):
            taken = pool.take(KEY)
            assert taken is not None
            self.assertIs(taken[0], s)
            pool.give(KEY, s, "h")  # uses 2 and 3
        self.assertEqual(s.closed, 1)
        self.assertIsNone(pool.take(KEY))
        self.assertEqual(pool.reused, 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_default_max_uses_is_one_hundred(self) -> None:
        s = self.session()
        self.pool.give(KEY, s, "h")
        uses = 1
        while self.pool.take(KEY) is not None:
            self.pool.give(KEY, s, "h")
            uses += 1
        self.assertEqual(uses, 100)
        self.assertEqual(s.closed, 1)

    def test_max_age_closes_on_give(self) -> None:
        pool = SessionPool(self.clock, max_age=10.0)
        s = self.session()
        pool.give(KEY, s, "h")
        for _ in range(5):  # 1.5 s between messages: never idle too long, 7.5 s old
            self.clock.advance(1.5)
            taken = pool.take(KEY)
            assert taken is not None
            pool.give(KEY, s, "h")
        self.assertEqual(s.closed, 0)
        self.clock.advance(1.5)
        self.assertIsNotNone(pool.take(KEY))
        self.clock.advance(1.1)  # 10.1 s since it was first given back
        pool.give(KEY, s, "h")
        self.assertEqual(s.closed, 1)
        self.assertIsNone(pool.take(KEY))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_max_idle_bounds_the_waiting_sessions(self) -> None:
        pool = SessionPool(self.clock, max_idle=2)
        a, b, c = self.session("a"), self.session("b"), self.session("c")
        pool.give(KEY, a, "h")
        pool.give(OTHER, b, "h")
        pool.give(KEY, c, "h")  # a third idle one: closed at once
        self.assertEqual(len(pool), 2)
        self.assertEqual((a.closed, b.closed, c.closed), (0, 0, 1))
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        # Taking one makes room again.
        taken = pool.take(KEY)
        assert taken is not None
        self.assertIs(taken[0], a)
        d = self.session("d")
        pool.give(KEY, d, "h")
        self.assertEqual(d.closed, 0)
        self.assertEqual(len(pool), 2)

    def test_close_all_closes_every_idle_session_and_cancels_timers(self) -> None:
        sessions = [self.session(str(i)) for i in range(4)]
        self.pool.give(KEY, sessions[0], "h")
        self.pool.give(KEY, sessions[1], "h")
        self.pool.give(OTHER, sessions[2], "h")
        self.pool.give(("route-c", False, None), sessions[3], "h")
        self.assertEqual(len(self.clock.getDelayedCalls()), 4)
        done = self.pool.close_all()
        self.assertEqual([s.closed for s in sessions], [1, 1, 1, 1])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.pool), 0)
        self.assertIsNone(self.pool.take(KEY))
        self.assertIsNone(self.successResultOf(done))
        # Timers really gone: nothing is closed a second time later.
        self.clock.advance(10)
        self.assertEqual([s.closed for s in sessions], [1, 1, 1, 1])

    def test_close_all_waits_for_slow_closes(self) -> None:
        s = self.session()
        pending: defer.Deferred[None] = defer.Deferred()
        s.close = lambda: pending  # a QUIT still waiting for its reply
        self.pool.give(KEY, s, "h")
        done = self.pool.close_all()
        self.assertNoResult(done)
        pending.callback(None)
        self.assertIsNone(self.successResultOf(done))

    def test_close_all_on_empty_pool_fires(self) -> None:
        self.assertIsNone(self.successResultOf(self.pool.close_all()))

    def test_reused_counts_successful_takes(self) -> None:
        a, b = self.session("a"), self.session("b")
        self.pool.give(KEY, a, "h")
        self.pool.give(OTHER, b, "h")
        self.pool.take(KEY)
        self.pool.take(KEY)  # empty: not counted
        self.pool.take(OTHER)
        self.assertEqual(self.pool.reused, 2)
        self.pool.give(KEY, a, "h")
        self.pool.take(KEY)
        self.assertEqual(self.pool.reused, 3)

    def test_taken_session_given_back_keeps_its_use_count(self) -> None:
        """Uses add up across take/give; a fresh session object starts at one."""
        pool = SessionPool(self.clock, max_uses=2)
        s = self.session()
        pool.give(KEY, s, "h")
        self.assertIsNotNone(pool.take(KEY))
        pool.give(KEY, s, "h")  # second use: the limit
        self.assertEqual(s.closed, 1)
        fresh = self.session("fresh")
        pool.give(KEY, fresh, "h")
        self.assertEqual(fresh.closed, 0)

    def test_taken_session_closed_by_its_user_is_not_kept(self) -> None:
        """A session taken and then found broken is closed by the caller, never given back.

        ``_attempt`` does exactly this (``_keep_or_close`` closes an unusable
        session without telling the pool); the pool must not hold on to it.
        """
        s = self.session()
        self.pool.give(KEY, s, "h")
        self.assertIsNotNone(self.pool.take(KEY))
        s.usable = False  # e.g. the destination dropped it at MAIL
        s.close()
        ref = weakref.ref(s)
        del s
        gc.collect()
        self.assertIsNone(ref(), "the pool still references a session it handed out and lost")
