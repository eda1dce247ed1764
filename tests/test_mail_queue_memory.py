"""What the spool keeps in memory (states, holds) always agrees with the disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
from tests.test_mail_queue_support import failure, result

SOON = Reply(451, "4.0.0", "later")


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
