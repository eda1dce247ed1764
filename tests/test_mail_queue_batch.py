"""Group commit, batched thread trips, in-memory reception and the header cache of the spool."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from appliance.mail import maildir
from appliance.mail import queue as queue_module
from appliance.mail.queue import DATA, DELIVERED, Batched, RecipientState, Spool
from appliance.mail.runner import parse_trace, read_trace
from tests.test_mail_queue_support import (
    check_commit_survives_kills,
    envelope,
    failure,
    result,
)

BODY = b"Received: from x by y; Mon, 1 Jan 2026 00:00:00 +0000\r\nSubject: hi\r\n\r\nbody\r\n"


class ManualBlocking:
    """A Blocking whose trips run only when the test says so: one trip in flight at a time."""

    def __init__(self) -> None:
        self.trips: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.trips.append((f, args, d))
        return d

    def run_next(self) -> None:
        f, args, d = self.trips.pop(0)
        defer.maybeDeferred(f, *args).chainDeferred(d)


def make_spool(root: Path, blocking: Any = None) -> Spool:
    clock = Clock()
    clock.advance(1000.0)
    return Spool(root, clock, blocking=blocking)


def count_queue_fsyncs(monkeypatch: pytest.MonkeyPatch, spool: Spool) -> list[str]:
    synced: list[str] = []
    real = queue_module.fsync_dir

    def spy(path: Path) -> None:
        synced.append(str(path))
        real(path)

    monkeypatch.setattr(queue_module, "fsync_dir", spy)
    return synced


def test_commits_during_a_batch_join_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocking = ManualBlocking()
    spool = make_spool(tmp_path, blocking)
    synced = count_queue_fsyncs(monkeypatch, spool)
    msgs = [spool.begin() for _ in range(5)]
    for m in msgs:
        m.write(BODY)
    first = msgs[0].commit(envelope("a@example.test"))
    rest = [m.commit(envelope("a@example.test")) for m in msgs[1:]]
    assert len(blocking.trips) == 1  # the other four wait for the first batch
    assert spool.messages() == []
    blocking.run_next()
    assert result(first) == msgs[0].queue_id
    assert not any(d.called for d in rest)
    assert len(blocking.trips) == 1  # one trip for the four that waited
    blocking.run_next()
    assert [result(d) for d in rest] == [m.queue_id for m in msgs[1:]]
    assert spool.messages() == sorted(m.queue_id for m in msgs)
    assert synced.count(str(spool.queue_dir)) == 2  # once per batch, not per message
    assert os.listdir(tmp_path / "tmp") == []
    for m in msgs:
        assert spool.load(m.queue_id).data_path.read_bytes() == BODY


def test_one_bad_message_fails_alone(tmp_path: Path) -> None:
    blocking = ManualBlocking()
    spool = make_spool(tmp_path, blocking)
    first = spool.begin()
    first.write(BODY)
    d0 = first.commit(envelope("a@example.test"))
    good, bad = spool.begin(), spool.begin()
    good.write(BODY)
    bad.write(BODY)
    os.mkdir(tmp_path / "tmp" / bad.queue_id)  # its mkdir will fail: EEXIST
    d1, d2 = good.commit(envelope("a@example.test")), bad.commit(envelope("a@example.test"))
    blocking.run_next()
    blocking.run_next()
    assert result(d0) == first.queue_id
    assert result(d1) == good.queue_id
    failure(d2).trap(FileExistsError)
    assert os.listdir(tmp_path / "tmp") == [bad.queue_id]  # not ours: left alone
    assert spool.messages() == sorted([first.queue_id, good.queue_id])


def test_failed_queue_fsync_fails_and_removes_the_whole_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = make_spool(tmp_path)
    real = queue_module.fsync_dir

    def broken(path: Path) -> None:
        if Path(path) == spool.queue_dir:
            raise OSError(5, "simulated EIO")
        real(path)

    monkeypatch.setattr(queue_module, "fsync_dir", broken)
    msg = spool.begin()
    msg.write(BODY)
    failure(msg.commit(envelope("a@example.test"))).trap(OSError)
    assert spool.messages() == []
    assert os.listdir(tmp_path / "tmp") == []


def test_small_message_touches_the_disk_only_at_commit(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    msg = spool.begin()
    msg.write(BODY)
    assert os.listdir(tmp_path / "tmp") == []
    msg.abort()
    assert os.listdir(tmp_path / "tmp") == []


def test_large_message_spills_to_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue_module, "MEMORY_LIMIT", 100)
    spool = make_spool(tmp_path)
    body = BODY + b"x" * 500 + b"\r\n"
    msg = spool.begin()
    for i in range(0, len(body), 60):
        msg.write(body[i : i + 60])
    assert (tmp_path / "tmp" / msg.queue_id / DATA).exists()
    qid = result(msg.commit(envelope("a@example.test")))
    m = spool.load(qid)
    assert m.data_path.read_bytes() == body
    assert m.size == len(body)
    assert os.listdir(tmp_path / "tmp") == []
    aborted = spool.begin()
    aborted.write(body)
    aborted.abort()
    assert os.listdir(tmp_path / "tmp") == []


def test_spilled_commit_survives_kill_at_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_module, "MEMORY_LIMIT", 16)

    def commit(spool: Spool) -> str:
        msg = spool.begin()
        for i in range(0, len(BODY), 10):
            msg.write(BODY[i : i + 10])
        return result(msg.commit(envelope("a@example.test")))

    check_commit_survives_kills(tmp_path, monkeypatch, make_spool, commit, BODY)


def test_header_cache_serves_the_runner_once(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    msg = spool.begin()
    msg.write(BODY)
    qid = result(msg.commit(envelope("a@example.test")))
    assert spool.take_fresh(qid) is None  # nobody listens: nothing kept
    spool.add_commit_listener(lambda q: None)
    msg = spool.begin()
    msg.write(BODY)
    qid = result(msg.commit(envelope("a@example.test")))
    fresh = spool.take_fresh(qid)
    assert fresh is not None
    assert fresh.message == spool.load(qid)
    assert parse_trace(fresh.head) == read_trace(spool.load(qid).data_path)
    assert spool.take_fresh(qid) is None
    msg = spool.begin()
    msg.write(BODY)
    qid = result(msg.commit(envelope("a@example.test")))
    result(spool.update_recipient(qid, RecipientState("a@example.test", DELIVERED)))
    assert spool.take_fresh(qid) is None  # changed since the commit: forgotten


def test_batched_runs_waiting_calls_in_one_trip() -> None:
    blocking = ManualBlocking()
    batched = Batched(blocking)
    calls: list[int] = []

    def work(n: int) -> int:
        calls.append(n)
        if n == 2:
            raise ValueError("two")
        return n * 10

    ds = [batched(work, n) for n in range(4)]
    assert len(blocking.trips) == 1
    blocking.run_next()
    assert result(ds[0]) == 0
    assert len(blocking.trips) == 1
    blocking.run_next()
    assert calls == [0, 1, 2, 3]
    assert result(ds[1]) == 10
    failure(ds[2]).trap(ValueError)
    assert result(ds[3]) == 30
    assert blocking.trips == []


def test_batched_trip_failure_fails_its_calls_only() -> None:
    trips: list[Deferred[Any]] = []

    def blocking(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        trips.append(d)
        return d

    batched = Batched(blocking)
    d1 = batched(lambda: 1)
    d2 = batched(lambda: 2)
    trips[0].errback(RuntimeError("pool gone"))
    failure(d1).trap(RuntimeError)
    assert not d2.called
    trips[1].callback([2])
    assert result(d2) == 2


def test_maildir_removed_behind_our_back_is_created_again(tmp_path: Path) -> None:
    box = tmp_path / "mail" / "bob"
    first = maildir.deliver(box, [b"a\n"], hostname="h", now=1.0, key="Q1", key_time=1.0)
    assert (box / first).read_bytes() == b"a\n"
    shutil.rmtree(tmp_path / "mail")
    second = maildir.deliver(box, [b"b\n"], hostname="h", now=2.0, key="Q2", key_time=2.0)
    assert (box / second).read_bytes() == b"b\n"
    shutil.rmtree(box / "new")
    with pytest.raises(FileNotFoundError):
        maildir.deliver(box, [b"c\n"], hostname="h", now=3.0, key="Q3", key_time=3.0)
    third = maildir.deliver(box, [b"c\n"], hostname="h", now=3.0, key="Q3", key_time=3.0)
    assert (box / third).read_bytes() == b"c\n"
    assert os.listdir(box / "tmp") == []
