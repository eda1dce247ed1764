"""What the spool keeps in memory (states, holds) always agrees with the disk."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from appliance.mail import queue
from appliance.mail.interfaces import Reply
from appliance.mail.queue import (
    DEFERRED,
    DELIVERED,
    ENVELOPE,
    HELD,
    RecipientState,
    Spool,
    UnknownMessage,
)
from tests.test_mail_queue import commit, make_spool
from tests.test_mail_queue_support import envelope, failure, result

SOON = Reply(451, "4.0.0", "later")
CLOCK: Any = Clock()


def on_disk(spool: Spool, queue_id: str) -> list[str]:
    """The recipient statuses as a fresh reader of envelope.json sees them."""
    return [r.status for r in make_spool(spool.root).load(queue_id).recipients]


def test_load_follows_every_update_and_the_disk_agrees(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    qid = commit(spool, b"Subject: x\r\n\r\nx\r\n", "a@x.test", "b@x.test")
    assert [r.status for r in spool.load(qid).recipients] == ["pending", "pending"]
    result(spool.update_recipient(qid, RecipientState("a@x.test", DEFERRED, 1, 5.0, SOON)))
    assert [r.status for r in spool.load(qid).recipients] == ["deferred", "pending"]
    assert on_disk(spool, qid) == ["deferred", "pending"]
    result(spool.update_recipients(qid, [RecipientState("b@x.test", DELIVERED, 1)]))
    assert [r.status for r in spool.load(qid).recipients] == ["deferred", "delivered"]
    assert on_disk(spool, qid) == ["deferred", "delivered"]


def test_removed_message_is_unknown(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    qid = commit(spool)
    spool.load(qid)
    result(spool.remove(qid, force=True))
    with pytest.raises(UnknownMessage):
        spool.load(qid)


def test_a_failed_state_write_leaves_the_disk_in_charge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new envelope.json is in place but its directory fsync failed: load() reads the disk."""
    spool = make_spool(tmp_path)
    qid = commit(spool, b"Subject: x\r\n\r\nx\r\n", "a@x.test")
    spool.load(qid)

    def broken(path: Path) -> None:
        raise OSError(5, "EIO")

    monkeypatch.setattr(queue, "fsync_dir", broken)
    failure(spool.update_recipient(qid, RecipientState("a@x.test", DELIVERED, 1)))
    monkeypatch.undo()
    assert [r.status for r in spool.load(qid).recipients] == on_disk(spool, qid) == ["delivered"]


def test_bounded_memory_still_reads_every_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue, "STATE_CACHE", 3)
    spool = make_spool(tmp_path)
    ids = [commit(spool, b"Subject: x\r\n\r\nx\r\n", f"r{i}@x.test") for i in range(6)]
    assert len(spool._states) == 3
    for i, qid in enumerate(ids):
        assert spool.load(qid).recipients[0].address == f"r{i}@x.test"
    restarted = make_spool(tmp_path)
    assert restarted.recover() == ids
    assert len(restarted._states) == 3


def test_recovery_reads_the_disk_not_what_it_knew(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    qid = commit(spool, b"Subject: x\r\n\r\nx\r\n", "a@x.test")
    other = make_spool(tmp_path)  # another writer while this one was not running
    result(other.update_recipient(qid, RecipientState("a@x.test", DEFERRED, 1, 5.0, SOON)))
    assert spool.recover() == [qid]
    assert [r.status for r in spool.load(qid).recipients] == ["deferred"]


def test_holds_known_from_recovery_on(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    held, free = commit(spool), commit(spool)
    spool.set_held(held, True)  # before recovery: the marker alone
    assert spool.is_held(held) and not spool.is_held(free)
    restarted = make_spool(tmp_path)
    restarted.recover()
    assert restarted.is_held(held) and not restarted.is_held(free)
    restarted.set_held(held, False)
    restarted.set_held(free, True)
    assert not restarted.is_held(held) and restarted.is_held(free)
    assert not (restarted.queue_dir / held / HELD).exists()
    assert (restarted.queue_dir / free / HELD).exists()
    result(restarted.remove(free, force=True))
    assert not restarted.is_held(free)
    with pytest.raises(UnknownMessage):
        restarted.set_held(free, True)
    assert not restarted.is_held(free)


def test_update_writes_the_state_it_read_from_disk(tmp_path: Path) -> None:
    """An update starts from envelope.json, so nothing a stale memory held can be written back."""
    spool = make_spool(tmp_path)
    qid = commit(spool, b"Subject: x\r\n\r\nx\r\n", "a@x.test", "b@x.test")
    spool.load(qid)
    other = make_spool(tmp_path)
    result(other.update_recipient(qid, RecipientState("a@x.test", DELIVERED, 1)))
    result(spool.update_recipient(qid, RecipientState("b@x.test", DEFERRED, 1, 5.0, SOON)))
    assert on_disk(spool, qid) == ["delivered", "deferred"]
    assert os.path.exists(spool.queue_dir / qid / ENVELOPE)


class Trips:
    """A Blocking that holds every call until run() (a thread pool that has not come round yet)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def run(self) -> None:
        while self.calls:
            f, args, d = self.calls.pop(0)
            d.callback(f(*args))


def test_removal_is_at_once_in_memory_and_on_disk_after_the_trip(tmp_path: Path) -> None:
    trips = Trips()
    spool = Spool(tmp_path, CLOCK, blocking=trips)
    commits = [spool.begin().commit(envelope("a@x.test")) for _ in range(3)]
    trips.run()
    ids = [result(d) for d in commits]
    drained = spool.drain()
    assert drained.called
    result(spool.remove(ids[0], force=True))
    result(spool.remove(ids[1], force=True))
    # Gone for this process at once; the disk follows in one trip for both.
    assert spool.messages() == [ids[2]]
    assert [spool.has(q) for q in ids] == [False, False, True]
    assert not spool.has("not an id") and not spool.has("0" * 23)
    for qid in ids[:2]:
        with pytest.raises(UnknownMessage):
            spool.load(qid)
        failure(spool.remove(qid, force=True)).trap(UnknownMessage)
        with pytest.raises(UnknownMessage):
            spool.set_held(qid, True)
    assert (spool.queue_dir / ids[0]).is_dir()
    drained = spool.drain()
    assert not drained.called
    assert spool.recover() == [ids[2]]  # a recovery meanwhile spares them
    assert len(trips.calls) == 1
    trips.run()
    assert drained.called
    assert sorted(os.listdir(spool.queue_dir)) == [ids[2]]
    assert os.listdir(spool.tmp_dir) == []
    assert make_spool(tmp_path).recover() == [ids[2]]


def test_removal_that_fails_on_disk_leaves_the_message_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trips = Trips()
    spool = Spool(tmp_path, CLOCK, blocking=trips)
    committed = spool.begin().commit(envelope("a@x.test"))
    trips.run()
    qid = result(committed)
    result(spool.remove(qid, force=True))
    assert spool.messages() == []

    def broken(source: Any, target: Any) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "rename", broken)
    trips.run()
    monkeypatch.undo()
    # Logged; this process's next listing and the next start see it again.
    assert spool.messages() == [qid]
    assert spool.load(qid).queue_id == qid
    assert make_spool(tmp_path).recover() == [qid]
