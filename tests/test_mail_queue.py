"""The durable spool: commit, state updates, removal, recovery, kill points and disk errors."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest

from appliance.mail.interfaces import MessageStore, Reply
from appliance.mail.queue import (
    DELIVERED,
    FAILED,
    PENDING,
    STATUSES,
    CorruptMessage,
    QueuedMessage,
    RecipientState,
    Spool,
    UnknownMessage,
    parse_envelope_file,
)
from tests.test_mail_queue_support import (
    Crash,
    check_commit_survives_kills,
    envelope,
    failure,
    kill_points,
    result,
)

BODY = b"Received: from x by y; Mon, 1 Jan 2026 00:00:00 +0000\r\nSubject: hi\r\n\r\nbody\r\n"


def make_spool(root: Path, at: float = 1000.0) -> Spool:
    clock = Clock()
    clock.advance(at)
    return Spool(root, clock)


def commit(spool: Spool, body: bytes = BODY, *rcpts: str) -> str:
    msg = spool.begin()
    for i in range(0, len(body), 7):
        msg.write(body[i : i + 7])
    return result(msg.commit(envelope(*(rcpts or ("a@example.test",)))))


def test_spool_is_a_message_store(tmp_path: Path) -> None:
    store: MessageStore = make_spool(tmp_path)
    assert store.begin().queue_id


def test_commit_makes_message_visible_only_after_commit(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    seen: list[str] = []
    spool.add_commit_listener(seen.append)
    msg = spool.begin()
    msg.write(BODY)
    assert spool.messages() == []
    qid = result(msg.commit(envelope("a@example.test", "b@example.test", "a@example.test")))
    assert qid == msg.queue_id
    assert seen == [qid]
    assert spool.messages() == [qid]
    loaded = spool.load(qid)
    assert loaded.size == len(BODY)
    assert loaded.data_path.read_bytes() == BODY
    with spool.open_data(qid) as f:
        assert f.read() == BODY
    # duplicates in the envelope collapse to one recipient
    assert [r.address for r in loaded.recipients] == ["a@example.test", "b@example.test"]
    assert all(r.status == PENDING for r in loaded.recipients)
    assert loaded.envelope.sender == "sender@remote.test"
    assert os.listdir(tmp_path / "tmp") == []


def test_queue_ids_unique_and_sortable(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(1_700_000_000)
    spool = Spool(tmp_path, clock)
    ids = []
    for _ in range(300):
        ids.append(spool.new_queue_id())
        clock.advance(0.000001 if len(ids) % 2 else 0)
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(Spool.valid_queue_id(i) for i in ids)
    other = Spool(tmp_path, clock)
    assert not set(ids) & {other.new_queue_id() for _ in range(50)}


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    msg = spool.begin()
    msg.write(b"x" * 1000)
    msg.abort()
    msg.abort()
    assert os.listdir(tmp_path / "tmp") == []
    assert spool.messages() == []
    failure(msg.commit(envelope("a@example.test"))).trap(ValueError)


def test_abort_after_commit_is_harmless(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    qid = commit(spool)
    msg = spool.begin()
    msg.write(BODY)
    qid2 = result(msg.commit(envelope("x@example.test")))
    msg.abort()
    assert spool.messages() == sorted([qid, qid2])


def test_update_and_remove(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    qid = commit(spool, BODY, "a@example.test", "b@example.test")
    reply = Reply(250, "2.0.0", "ok")
    m = result(
        spool.update_recipient(qid, RecipientState("a@example.test", DELIVERED, 1, 0.0, reply))
    )
    assert m.recipient("a@example.test").last_reply == reply
    assert not m.all_final
    failure(spool.remove(qid)).trap(ValueError)
    assert spool.messages() == [qid]
    # adding recipients (alias expansion) dedupes addresses
    m = result(
        spool.update_recipients(
            qid,
            [RecipientState("b@example.test", "expanded")],
            add=[
                RecipientState("r@remote.test", original="b@example.test"),
                RecipientState("a@example.test"),
                RecipientState("r@remote.test"),
            ],
        )
    )
    assert [r.address for r in m.recipients] == [
        "a@example.test",
        "b@example.test",
        "r@remote.test",
    ]
    assert m.recipient("r@remote.test").original == "b@example.test"
    assert spool.load(qid) == m
    failure(spool.update_recipient(qid, RecipientState("nobody@x"))).trap(KeyError)
    m = result(spool.update_recipient(qid, RecipientState("r@remote.test", FAILED, dsn_sent=True)))
    assert m.all_final
    result(spool.remove(qid))
    assert spool.messages() == []
    assert os.listdir(tmp_path / "tmp") == []
    failure(spool.remove(qid)).trap(UnknownMessage)
    with pytest.raises(UnknownMessage):
        spool.load(qid)
    with pytest.raises(UnknownMessage):
        spool.load("../../etc")


def test_force_remove(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    qid = commit(spool)
    result(spool.remove(qid, force=True))
    assert spool.messages() == []


def test_concurrent_updates_are_serialised(tmp_path: Path) -> None:
    """Two updates to one message issued together must both survive (no lost update)."""
    gate: defer.Deferred[None] = defer.Deferred()
    calls = []

    def blocking(f, *args):  # type: ignore[no-untyped-def]
        calls.append(f)
        d = defer.Deferred()
        gate.addCallback(lambda _: d.callback(f(*args)))
        return d

    clock = Clock()
    plain = Spool(tmp_path, clock)
    qid = commit(plain, BODY, "a@x.test", "b@x.test")
    spool = Spool(tmp_path, clock, blocking=blocking)
    d1 = spool.update_recipient(qid, RecipientState("a@x.test", DELIVERED))
    d2 = spool.update_recipient(qid, RecipientState("b@x.test", DELIVERED))
    assert len(calls) == 1  # the second waits for the first
    gate.callback(None)
    result(d1)
    assert len(calls) == 2
    m = spool.load(qid)
    assert all(r.status == DELIVERED for r in m.recipients)
    assert result(d2).all_final


def test_recovery_removes_tmp_and_stale_state(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    qid = commit(spool)
    unfinished = spool.begin()
    unfinished.write(b"half a message")
    (tmp_path / "queue" / qid / "envelope.json.new").write_bytes(b"{garbage")
    (tmp_path / "tmp" / "stray").write_bytes(b"x")
    again = make_spool(tmp_path)
    assert again.recover() == [qid]
    assert os.listdir(tmp_path / "tmp") == []
    assert os.listdir(tmp_path / "queue" / qid) == ["data", "envelope.json"] or sorted(
        os.listdir(tmp_path / "queue" / qid)
    ) == ["data", "envelope.json"]


def test_recovery_quarantines_corrupt_entries(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    good = commit(spool)
    bad = commit(spool)
    (tmp_path / "queue" / bad / "envelope.json").write_bytes(b'{"version": 1}')
    with pytest.raises(CorruptMessage):  # a reader that did not write it (the writer remembers)
        make_spool(tmp_path).load(bad)
    assert make_spool(tmp_path).recover() == [good]
    assert os.listdir(tmp_path / "corrupt") == [bad]


def test_envelope_file_is_json(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    qid = commit(spool, BODY, "a@example.test")
    doc = json.loads((tmp_path / "queue" / qid / "envelope.json").read_text())
    assert doc["version"] == 1
    assert doc["envelope"]["sender"] == "sender@remote.test"
    assert doc["recipients"][0]["status"] == "pending"


# -- kill points: SIGKILL at every filesystem operation ----------------------------------


def _count_ops(monkeypatch: pytest.MonkeyPatch, action) -> int:  # type: ignore[no-untyped-def]
    with kill_points(monkeypatch, None) as kp:
        action()
    return kp.count


def test_commit_survives_kill_at_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_commit_survives_kills(tmp_path, monkeypatch, make_spool, commit, BODY)


def test_update_survives_kill_at_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    new = RecipientState("a@example.test", DELIVERED, 1, 0.0, Reply(250, "2.0.0", "ok"))

    def setup(root: Path) -> tuple[Spool, str]:
        spool = make_spool(root)
        return spool, commit(spool)

    spool, qid = setup(tmp_path / "probe")
    n = _count_ops(monkeypatch, lambda: result(spool.update_recipient(qid, new)))
    for kill_at in range(1, n + 1):
        spool, qid = setup(tmp_path / f"k{kill_at}")
        done = False
        with kill_points(monkeypatch, kill_at):
            try:
                result(spool.update_recipient(qid, new))
                done = True
            except Crash:
                pass
        after = make_spool(tmp_path / f"k{kill_at}")
        assert after.recover() == [qid]
        assert not (tmp_path / f"k{kill_at}" / "corrupt").exists()
        state = after.load(qid).recipient("a@example.test")
        assert state in (new, RecipientState("a@example.test", PENDING, updated_at=1000.0))
        if done:
            assert state == new


def test_remove_survives_kill_at_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def setup(root: Path) -> tuple[Spool, str]:
        spool = make_spool(root)
        qid = commit(spool)
        result(spool.update_recipient(qid, RecipientState("a@example.test", DELIVERED)))
        return spool, qid

    spool, qid = setup(tmp_path / "probe")
    n = _count_ops(monkeypatch, lambda: result(spool.remove(qid)))
    for kill_at in range(1, n + 1):
        root = tmp_path / f"k{kill_at}"
        spool, qid = setup(root)
        with kill_points(monkeypatch, kill_at):
            try:
                result(spool.remove(qid))
            except Crash:
                pass
        after = make_spool(root)
        queued = after.recover()
        assert queued in ([], [qid])
        for q in queued:
            assert after.load(q).data_path.read_bytes() == BODY
        assert os.listdir(root / "tmp") == []


# -- disk errors ---------------------------------------------------------------------------


def test_begin_fails_when_spool_unusable(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    spool = make_spool(tmp_path / "file")
    with pytest.raises(OSError):
        spool.begin()


@pytest.mark.parametrize("broken", ["fsync", "rename", "write"])
def test_commit_error_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    spool = make_spool(tmp_path)
    msg = spool.begin()
    msg.write(BODY)
    real = getattr(os, broken)

    def fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        if broken == "write" and args and args[0] in (0, 1, 2):
            return real(*args, **kwargs)
        raise OSError(errno.EIO, "simulated I/O error")

    monkeypatch.setattr(os, broken, fail)
    err = failure(msg.commit(envelope("a@example.test")))
    monkeypatch.undo()
    assert err.check(OSError)
    assert spool.messages() == []
    assert os.listdir(tmp_path / "tmp") == []


def test_write_error_reported_by_commit(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    msg = spool.begin()

    class Broken:
        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self) -> None:
            pass

    msg._file = Broken()  # type: ignore[assignment]
    msg.write(b"data")  # must not raise into the protocol
    failure(msg.commit(envelope("a@example.test"))).trap(OSError)
    assert os.listdir(tmp_path / "tmp") == []


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a real 'disk full'.  Skipped where mounting is not allowed."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,nr_inodes=64", "tmpfs", str(mnt)],
        capture_output=True,
    )
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_fails_commit_and_leaves_nothing(tiny_fs: Path) -> None:
    spool = make_spool(tiny_fs)
    small = commit(spool)
    msg = spool.begin()
    for _ in range(100):
        msg.write(b"x" * 8192)
    failure(msg.commit(envelope("a@example.test"))).trap(OSError)
    assert spool.messages() == [small]
    assert os.listdir(tiny_fs / "tmp") == []
    # the spool still works once there is room again
    assert commit(spool) in spool.messages()


def test_recover_spares_messages_being_received(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    msg = spool.begin()
    msg.write(BODY)
    spool.recover()
    qid = result(msg.commit(envelope("a@example.test")))
    assert spool.messages() == [qid]


def test_unencodable_envelope_fails_cleanly(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    msg = spool.begin()
    msg.write(BODY)
    bad = envelope("a@example.test")
    object.__setattr__(bad, "received_at", object())
    failure(msg.commit(bad))
    assert os.listdir(tmp_path / "tmp") == []
    assert spool.messages() == []


class ThreadPoolCommit(unittest.TestCase):
    """The fsync work in a real thread pool, the Deferred fired back in the reactor thread."""

    def setUp(self) -> None:
        self.pool = ThreadPool(1, 4)
        self.pool.start()
        self.addCleanup(self.pool.stop)

    @defer.inlineCallbacks
    def test_commit_update_remove_in_threads(self):  # type: ignore[no-untyped-def]
        root = Path(self.mktemp())
        spool = Spool(root, reactor, blocking=partial(deferToThreadPool, reactor, self.pool))
        msgs = [spool.begin() for _ in range(10)]
        for m in msgs:
            m.write(BODY)
        ids = yield defer.gatherResults(
            [m.commit(envelope("a@example.test", "b@example.test")) for m in msgs]
        )
        self.assertEqual(sorted(ids), spool.messages())
        qid = ids[0]
        yield defer.gatherResults(
            [
                spool.update_recipient(qid, RecipientState("a@example.test", DELIVERED)),
                spool.update_recipient(qid, RecipientState("b@example.test", FAILED)),
            ]
        )
        self.assertTrue(spool.load(qid).all_final)
        yield spool.remove(qid)
        self.assertEqual(len(spool.messages()), 9)


addresses = st.from_regex(r"[a-z0-9.+-]{1,12}@[a-z]{1,8}\.test", fullmatch=True)
replies = st.builds(Reply, st.integers(200, 599), st.just("4.0.0"), st.text(max_size=30))
states = st.builds(
    RecipientState,
    address=addresses,
    status=st.sampled_from(sorted(STATUSES)),
    attempts=st.integers(0, 100),
    next_attempt=st.floats(0, 2e9),
    last_reply=st.none() | replies,
    updated_at=st.floats(0, 2e9),
    original=st.none() | addresses,
    dsn_sent=st.booleans(),
)


@given(
    st.lists(states, max_size=5, unique_by=lambda r: r.address),
    st.text(max_size=20),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)
def test_envelope_file_round_trip(
    recipients: list[RecipientState], sender: str, params: dict[str, str]
) -> None:
    env = replace(envelope(*(r.address for r in recipients), sender=sender), mail_parameters=params)
    m = QueuedMessage("0" * 23, env, tuple(recipients), 5, Path("/x/data"))
    assert parse_envelope_file(m.to_json(), "0" * 23, Path("/x/data")) == m
