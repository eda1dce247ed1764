"""The queue runner: local delivery, state recording, retries, loops, hooks and crash redelivery."""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from appliance.directory.base import User
from appliance.mail import maildir
from appliance.mail.aliases import parse_aliases
from appliance.mail.interfaces import Reply
from appliance.mail.local import LocalRecipients
from appliance.mail.queue import (
    DEFERRED,
    DELIVERED,
    EXPANDED,
    FAILED,
    PENDING,
    QueuedMessage,
    RecipientState,
    Spool,
)
from appliance.mail.runner import QueueRunner, Trace, count_received, parse_trace
from tests.test_mail_local import FakeDirectory
from tests.test_mail_queue_support import Crash, envelope, kill_points, result

ALICE = User("alice@example.test", "example.test/alice", ("alice@example.test",))
BOB = User("bob@example.test", "example.test/bob", ("bob@example.test",))
BODY = (
    b"Received: from mx.remote.test (127.0.2.5) by mail.example.test; Mon, 1 Jan 2026\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"line one\r\n"
    b"..not unstuffed twice\r\n"
)
ALIASES = "team: alice, bob\nfwd: alice, friend@remote.test, other@remote.test\npostmaster: alice\n"


class Env:
    """A spool, a directory and a runner over one temporary tree, on a fake clock."""

    def __init__(self, root: Path, **runner_kw: Any) -> None:
        self.root = root
        self.clock = Clock()
        self.clock.advance(1000)
        self.directory = FakeDirectory(ALICE, BOB)
        table, errors = parse_aliases(ALIASES)
        assert not errors
        self.recipients = LocalRecipients(self.directory, table, ("example.test",))
        self.spool = Spool(root / "spool", self.clock)
        self.mail = root / "mail"
        self.bounces: list[tuple[str, list[str]]] = []
        self.failed: list[RecipientState] = []
        runner_kw.setdefault("bounce", self._bounce)
        self.runner = QueueRunner(
            self.spool, self.recipients, self.mail, "mail.example.test", self.clock, **runner_kw
        )

    def _bounce(self, message: QueuedMessage, failed: Sequence[RecipientState]) -> None:
        self.bounces.append((message.queue_id, [r.address for r in failed]))
        self.failed.extend(failed)

    def submit(self, *rcpts: str, body: bytes = BODY) -> str:
        msg = self.spool.begin()
        msg.write(body)
        return result(msg.commit(envelope(*rcpts, at=self.clock.seconds())))

    def box(self, name: str) -> list[bytes]:
        """Every message in a user's Maildir (new/ and cur/)."""
        path = self.mail / "example.test" / name
        out = []
        for sub in ("new", "cur"):
            if (path / sub).exists():
                out.extend((path / sub / n).read_bytes() for n in sorted(os.listdir(path / sub)))
        return out

    def restart(self, **runner_kw: Any) -> Env:
        """A new process on the same disk (the old objects are abandoned, as after SIGKILL)."""
        return Env(self.root, **runner_kw)


def expected(delivered_to: str, sender: str = "sender@remote.test") -> bytes:
    return f"Return-Path: <{sender}>\nDelivered-To: {delivered_to}\n".encode() + BODY.replace(
        b"\r\n", b"\n"
    )


def test_delivers_local_recipients_and_removes(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.runner.start()
    qid = env.submit("alice@example.test", "Bob+Tag@example.test")
    assert env.box("alice") == [expected("alice@example.test")]
    assert env.box("bob") == [expected("bob+tag@example.test")]
    assert env.spool.messages() == []
    assert env.bounces == []
    names = os.listdir(env.mail / "example.test" / "alice" / "new")
    assert names[0].startswith(f"1000.Q{qid}.mail.example.test,S=")
    result(env.runner.stop())
    assert env.clock.getDelayedCalls() == []


def test_start_delivers_what_was_queued_before(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.submit("alice@example.test")  # the runner is not started: "crash" before delivery
    env2 = env.restart()
    env2.runner.start()
    assert env2.box("alice") == [expected("alice@example.test")]
    assert env2.spool.messages() == []


def test_remote_recipients_left_pending_without_hook(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.runner.start()
    qid = env.submit("alice@example.test", "carol@remote.test")
    m = env.spool.load(qid)
    assert m.recipient("alice@example.test").status == DELIVERED
    assert m.recipient("carol@remote.test").status == PENDING
    env.clock.advance(3600)
    assert env.box("alice") == [expected("alice@example.test")]


def test_same_mailbox_twice_stores_once(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.runner.start()
    env.submit("alice@example.test", "alice+x@example.test", "team@example.test")
    assert len(env.box("alice")) == 1
    assert len(env.box("bob")) == 1
    assert env.spool.messages() == []


def test_alias_with_remote_targets_expands_into_queue(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def remote(
        message: QueuedMessage, rcpts: Sequence[RecipientState]
    ) -> Deferred[Mapping[str, Reply]]:
        calls.append([r.address for r in rcpts])
        return defer.succeed(
            {
                "friend@remote.test": Reply(250, "2.0.0", "ok"),
                "other@remote.test": Reply(550, "5.1.1", "no such user"),
            }
        )

    env = Env(tmp_path)
    env.runner.start()
    env2 = env.restart(remote_delivery=remote)
    qid = env.submit("fwd@example.test")  # env's runner: no remote hook
    m = env.spool.load(qid)
    assert m.recipient("fwd@example.test").status == EXPANDED
    assert m.recipient("friend@remote.test").original == "fwd@example.test"
    assert m.recipient("other@remote.test").status == PENDING
    assert env.box("alice") == [expected("alice@example.test")]
    result(env.runner.stop())
    env2.runner.start()
    assert calls == [["friend@remote.test", "other@remote.test"]]
    assert env2.bounces == [(qid, ["other@remote.test"])]
    assert env2.spool.messages() == []
    assert env2.box("alice") == [expected("alice@example.test")]


def test_remote_temporary_failures_retry(tmp_path: Path) -> None:
    answers = [{}, {"carol@remote.test": Reply(250, "2.0.0", "ok")}]

    def remote(
        message: QueuedMessage, rcpts: Sequence[RecipientState]
    ) -> Deferred[Mapping[str, Reply]]:
        return defer.succeed(answers.pop(0))

    env = Env(tmp_path, remote_delivery=remote, retry_intervals=(30.0,))
    env.runner.start()
    qid = env.submit("carol@remote.test")
    state = env.spool.load(qid).recipient("carol@remote.test")
    assert state.status == DEFERRED and state.attempts == 1
    assert state.next_attempt == env.clock.seconds() + 30
    env.clock.advance(60)
    assert env.spool.messages() == []
    assert answers == []


def test_unknown_user_fails_and_bounces(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.runner.start()
    qid = env.submit("nobody@example.test", "alice@example.test")
    assert env.bounces == [(qid, ["nobody@example.test"])]
    assert env.spool.messages() == []


def test_without_bounce_hook_failure_is_recorded(tmp_path: Path) -> None:
    env = Env(tmp_path, bounce=None)
    env.runner.start()
    env.submit("nobody@example.test", "carol@remote.test")
    (qid,) = env.spool.messages()
    state = env.spool.load(qid).recipient("nobody@example.test")
    assert state.status == FAILED
    assert state.last_reply == Reply(550, "5.1.1", "<nobody@example.test>: no such user here")
    assert not state.dsn_sent


def test_failing_bounce_hook_keeps_message_and_retries(tmp_path: Path) -> None:
    outcomes: list[Any] = [RuntimeError("spool full"), None]

    def bounce(message: QueuedMessage, failed: Sequence[RecipientState]) -> Deferred[None]:
        outcome = outcomes.pop(0)
        return defer.fail(outcome) if outcome else defer.succeed(None)

    env = Env(tmp_path, bounce=bounce, poll_interval=10.0)
    env.runner.start()
    qid = env.submit("nobody@example.test")
    assert env.spool.messages() == [qid]
    assert not env.spool.load(qid).recipient("nobody@example.test").dsn_sent
    env.clock.advance(10)
    assert env.spool.messages() == []
    assert outcomes == []


def test_directory_outage_defers_then_delivers(tmp_path: Path) -> None:
    env = Env(tmp_path, retry_intervals=(60.0, 120.0), poll_interval=30.0)
    env.runner.start()
    env.directory.down = True
    qid = env.submit("alice@example.test")
    state = env.spool.load(qid).recipient("alice@example.test")
    assert state.status == DEFERRED
    assert state.last_reply is not None and state.last_reply.enhanced == "4.4.3"
    assert state.next_attempt == 1060.0
    env.clock.advance(30)  # not due yet
    assert env.spool.load(qid).recipient("alice@example.test").attempts == 1
    env.clock.advance(30)
    state = env.spool.load(qid).recipient("alice@example.test")
    assert state.attempts == 2 and state.next_attempt == 1060.0 + 120
    env.directory.down = False
    env.clock.advance(120)
    assert env.box("alice") == [expected("alice@example.test")]
    assert env.spool.messages() == []


def test_lifetime_expiry_fails(tmp_path: Path) -> None:
    env = Env(tmp_path, retry_intervals=(3600.0,), poll_interval=600.0, lifetime=3 * 3600)
    env.runner.start()
    env.directory.down = True
    qid = env.submit("alice@example.test")
    for _ in range(4):
        env.clock.advance(3600)
    assert env.bounces == [(qid, ["alice@example.test"])]
    assert env.spool.messages() == []


def test_loop_detection(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.runner.start()
    hops = b"Received: from a by b; x\r\n" * 26
    qid = env.submit("alice@example.test", "carol@remote.test", body=hops + BODY)
    assert env.bounces == [(qid, ["alice@example.test", "carol@remote.test"])]
    assert env.spool.messages() == []
    for r in env.failed:
        assert r.status == FAILED
        assert r.last_reply is not None and (r.last_reply.code, r.last_reply.enhanced) == (
            554,
            "5.4.6",
        )
    assert env.box("alice") == []
    ok = Env(tmp_path / "ok")
    ok.runner.start()
    ok.submit("alice@example.test", body=b"Received: x\r\n" * 24 + BODY)
    assert len(ok.box("alice")) == 1


def test_delivered_to_loop(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.runner.start()
    body = b"Delivered-To: alice@example.test\r\n" + BODY
    qid = env.submit("alice@example.test", "bob@example.test", body=body)
    assert env.bounces == [(qid, ["alice@example.test"])]
    assert env.failed[0].last_reply is not None
    assert env.failed[0].last_reply.enhanced == "5.4.6"
    assert env.box("alice") == []
    assert len(env.box("bob")) == 1


def test_count_received(tmp_path: Path) -> None:
    p = tmp_path / "m"
    p.write_bytes(b"Received: a\r\n  continued\r\nRECEIVED: b\r\nX: y\r\n\r\nReceived: body\r\n")
    assert count_received(p) == 2


def test_trace_reads_only_the_header_section() -> None:
    body = b"Received: body\r\nDelivered-To: body@x.test\r\n" * 1000
    for blank in (b"\r\n\r\n", b"\n\n", b"\n\r\n"):
        head = b"Received: a\r\nDelivered-To: Alice@X.test" + blank + body
        assert parse_trace(head) == Trace(1, frozenset({"alice@x.test"}))
    assert parse_trace(b"\r\nReceived: x\r\n") == Trace(0, frozenset())
    assert parse_trace(b"Received: a\r\nReceived: b") == Trace(2, frozenset())


def test_disk_full_mailbox_defers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = Env(tmp_path)
    real = maildir.deliver

    def full(*args: Any, **kwargs: Any) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(maildir, "deliver", full)
    env.runner.start()
    qid = env.submit("alice@example.test")
    state = env.spool.load(qid).recipient("alice@example.test")
    assert state.status == DEFERRED
    assert state.last_reply == Reply(452, "4.2.2", "Mailbox full")
    monkeypatch.setattr(maildir, "deliver", real)
    env.clock.advance(3600)
    assert env.box("alice") == [expected("alice@example.test")]


def test_notify_while_busy_runs_again(tmp_path: Path) -> None:
    gate: list[Deferred[Any]] = []

    def blocking(f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        gate.append(d)
        d.addCallback(lambda _: f(*args))
        return d

    env = Env(tmp_path, blocking=blocking)
    env.runner.start()
    qid = env.submit("alice@example.test")
    env.runner.notify(qid)  # in flight: remembered, not run twice at once
    while gate:
        gate.pop(0).callback(None)
    assert env.box("alice") == [expected("alice@example.test")]
    assert env.spool.messages() == []


# -- crash redelivery -------------------------------------------------------------------


def test_delivered_but_state_not_updated_redelivers_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = Env(tmp_path)

    def crash(*args: Any, **kwargs: Any) -> Deferred[Any]:
        raise Crash("killed before the state update")

    monkeypatch.setattr(env.spool, "update_recipients", crash)
    monkeypatch.setattr(env.spool, "remove", crash)
    env.runner.start()
    qid = env.submit("alice@example.test", "team@example.test")
    assert env.box("alice") == [expected("alice@example.test")]
    assert env.spool.load(qid).recipient("alice@example.test").status == PENDING
    env2 = env.restart()
    env2.runner.start()
    assert env2.box("alice") == [expected("alice@example.test")]
    assert env2.box("bob") == [expected("bob@example.test")]
    assert env2.spool.messages() == []


def test_redelivery_after_user_read_the_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy was moved to cur/ by POP3 before the crash: still no second copy."""
    env = Env(tmp_path)
    monkeypatch.setattr(env.spool, "update_recipients", lambda *a, **k: defer.fail(Crash()))
    monkeypatch.setattr(env.spool, "remove", lambda *a, **k: defer.fail(Crash()))
    env.runner.start()
    env.submit("alice@example.test")
    new = env.mail / "example.test" / "alice" / "new"
    (name,) = os.listdir(new)
    os.rename(new / name, new.parent / "cur" / (name + ":2,S"))
    env2 = env.restart()
    env2.runner.start()
    assert env2.box("alice") == [expected("alice@example.test")]
    assert os.listdir(new) == []


def test_kill_at_every_step_of_a_delivery_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL at any filesystem operation of the runner: after restart each mailbox has one copy."""
    rcpts = ("alice@example.test", "team@example.test", "fwd@example.test")

    def run(root: Path, kill_at: int | None) -> int:
        env = Env(root)
        env.submit(*rcpts)
        with kill_points(monkeypatch, kill_at) as kp:
            try:
                env.runner.start()
            except Crash:
                pass
        return kp.count

    total = run(tmp_path / "probe", None)
    assert total > 20
    for kill_at in range(1, total + 1):
        root = tmp_path / f"k{kill_at}"
        run(root, kill_at)
        env = Env(root)
        env.runner.start()
        assert env.box("alice") == [expected("alice@example.test")], kill_at
        assert env.box("bob") == [expected("bob@example.test")], kill_at
        for sub in ("tmp",):
            for user in ("alice", "bob"):
                d = env.mail / "example.test" / user / sub
                assert not d.exists() or os.listdir(d) == [], (kill_at, user)
        (qid,) = env.spool.messages()  # the remote targets of fwd@ wait for remote delivery
        m = env.spool.load(qid)
        assert {r.address for r in m.recipients if not r.final} == {
            "friend@remote.test",
            "other@remote.test",
        }
        assert m.recipient("fwd@example.test").status == EXPANDED


def test_notify_before_start_waits_for_start(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.spool.add_commit_listener(env.runner.notify)
    env.submit("alice@example.test")
    assert env.box("alice") == []
    env.runner.start()
    assert len(env.box("alice")) == 1


def test_flush_ignores_retry_times(tmp_path: Path) -> None:
    env = Env(tmp_path, retry_intervals=(3600.0,))
    env.runner.start()
    env.directory.down = True
    env.submit("alice@example.test")
    env.directory.down = False
    assert env.box("alice") == []
    result(env.runner.flush())
    assert len(env.box("alice")) == 1
    assert env.spool.messages() == []


def test_stop_waits_for_deliveries_under_way(tmp_path: Path) -> None:
    gate: list[Deferred[Any]] = []

    def blocking(f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        gate.append(d)
        d.addCallback(lambda _: f(*args))
        return d

    env = Env(tmp_path, blocking=blocking)
    env.runner.start()
    env.submit("alice@example.test")
    stopped = env.runner.stop()
    assert not stopped.called
    while gate:
        gate.pop(0).callback(None)
    assert stopped.called
    assert env.clock.getDelayedCalls() == []


class ThreadedRunner(unittest.TestCase):
    """Commit and local delivery with the fsync work in a real thread pool."""

    @defer.inlineCallbacks
    def test_delivers_through_thread_pool(self):  # type: ignore[no-untyped-def]
        pool = ThreadPool(1, 4)
        pool.start()
        self.addCleanup(pool.stop)
        blocking = partial(deferToThreadPool, reactor, pool)
        root = Path(self.mktemp())
        spool = Spool(root / "spool", reactor, blocking=blocking)
        table, _ = parse_aliases(ALIASES)
        recipients = LocalRecipients(FakeDirectory(ALICE, BOB), table, ("example.test",))
        runner = QueueRunner(spool, recipients, root / "mail", "h", reactor, blocking=blocking)
        runner.start()
        self.addCleanup(runner.stop)
        for _ in range(5):
            msg = spool.begin()
            msg.write(BODY)
            yield msg.commit(envelope("team@example.test"))
        for _ in range(500):
            if not spool.messages() and not runner._inflight:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(spool.messages(), [])
        for user in ("alice", "bob"):
            self.assertEqual(len(os.listdir(root / "mail" / "example.test" / user / "new")), 5)
