"""Direct delivery (appliance.mail.direct) and maildir.deliver_many: eligibility, bytes, failures, batching."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from appliance import config
from appliance.directory.base import User
from appliance.mail import maildir
from appliance.mail.aliases import parse_aliases
from appliance.mail.direct import DirectDelivery
from appliance.mail.local import LocalRecipients
from appliance.mail.queue import MEMORY_LIMIT, Spool
from appliance.mail.runner import QueueRunner
from tests.harness import ApplianceProcess
from tests.test_mail_local import FakeDirectory
from tests.test_mail_queue_support import envelope, failure, result
from tests.test_mail_runner import ALICE, BOB, BODY
from tests.test_mail_runner import Env as RunnerEnv
from tests.test_smtp_acceptance_support import INSIDE, LAN_CLIENT, configure, fill, smtp

HOST = "mail.example.test"
ALIASES = "team: alice, bob\nfwd: alice, bob, friend@remote.test\nme: alice\n"


class Manual:
    """A ``blocking`` that records each trip and runs it only when told to."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def run(self, index: int = 0) -> None:
        f, args, d = self.calls[index]
        try:
            value = f(*args)
        except Exception:
            d.errback(Failure())
        else:
            d.callback(value)


class PendingDirectory(FakeDirectory):
    """A directory (think LDAP) whose lookups have not answered yet."""

    def find_user(self, address: str) -> Deferred[User | None]:
        self.lookups.append(address)
        return Deferred()


class Env:
    """A spool, the recipient tables and a DirectDelivery over one temporary tree."""

    def __init__(
        self,
        root: Path,
        *,
        blocking: Any = None,
        spool_blocking: Any = None,
        directory: FakeDirectory | None = None,
        max_received: int = 25,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        table, errors = parse_aliases(ALIASES)
        assert not errors
        self.directory = directory if directory is not None else FakeDirectory(ALICE, BOB)
        self.recipients = LocalRecipients(self.directory, table, ("example.test",))
        self.spool = Spool(root / "spool", self.clock, blocking=spool_blocking)
        self.mail = root / "mail"
        self.direct = DirectDelivery(
            self.spool,
            self.recipients,
            self.mail,
            HOST,
            blocking=blocking,
            max_received=max_received,
        )

    def send(self, *rcpts: str, body: bytes = BODY) -> Deferred[str]:
        msg = self.direct.begin()
        msg.write(body)
        return msg.commit(envelope(*rcpts, at=self.clock.seconds()))

    def box(self, name: str) -> dict[str, bytes]:
        new = self.mail / "example.test" / name / "new"
        return {n: (new / n).read_bytes() for n in sorted(os.listdir(new))} if new.is_dir() else {}

    def spooled(self) -> list[tuple[str, tuple[str, ...]]]:
        """Every queued message and its recipients."""
        return [
            (q, tuple(r.address for r in self.spool.load(q).recipients))
            for q in self.spool.messages()
        ]

    def spool_tmp_empty(self) -> bool:
        """Nothing in the spool's tmp/, and no message of it still open (aborted when delivered)."""
        return not os.listdir(self.spool.tmp_dir) and not self.spool._active


@pytest.fixture
def logged() -> Any:
    """The formatted ``line`` fields logged during the test."""
    lines: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        if "line" in event:
            lines.append(str(event["line"]))

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


# ----------------------------------------------------------------------- eligible


def test_eligible_message_is_in_each_mailbox_as_the_runner_writes_it(
    tmp_path: Path, logged: list[str]
) -> None:
    env = Env(tmp_path / "direct")
    qid = result(env.send("alice@example.test", "Bob+Tag@example.test"))
    assert env.spooled() == [] and env.spool_tmp_empty()

    runner = RunnerEnv(tmp_path / "runner")
    runner.runner.start()
    rqid = runner.submit("alice@example.test", "Bob+Tag@example.test")
    for user in ("alice", "bob"):
        ((name, data),) = env.box(user).items()
        ((rname, rdata),) = {
            n: (runner.mail / "example.test" / user / "new" / n).read_bytes()
            for n in os.listdir(runner.mail / "example.test" / user / "new")
        }.items()
        assert data == rdata  # the same bytes ...
        assert name == rname.replace(rqid, qid)  # ... and the same keyed name
        assert name.startswith(f"1000.Q{qid}.{HOST},S={len(data)},")
    assert f"{qid}: to=<alice@example.test> delivered to example.test/alice as new/" in "\n".join(
        logged
    )
    assert f"{qid}: to=<Bob+Tag@example.test> delivered to example.test/bob as new/" in "\n".join(
        logged
    )


def test_recipients_reaching_one_mailbox_store_it_once(tmp_path: Path) -> None:
    env = Env(tmp_path)
    qid = result(env.send("team@example.test", "alice@example.test", "me@example.test"))
    assert env.spooled() == []
    (alice,) = env.box("alice").values()
    assert alice.startswith(
        b"Return-Path: <sender@remote.test>\nDelivered-To: alice@example.test\n"
    )
    assert len(env.box("bob")) == 1
    assert all(qid in name for name in [*env.box("alice"), *env.box("bob")])


def test_abort_before_commit_discards_and_after_commit_is_harmless(tmp_path: Path) -> None:
    manual = Manual()
    env = Env(tmp_path, blocking=manual)
    msg = env.direct.begin()
    msg.write(BODY)
    msg.abort()
    assert failure(msg.commit(envelope("alice@example.test"))).check(ValueError)
    msg = env.direct.begin()
    msg.write(BODY)
    d = msg.commit(envelope("alice@example.test"))
    msg.abort()  # the connection went away while the copies were being written
    manual.run()
    assert result(d) == msg.queue_id
    assert len(env.box("alice")) == 1


# ----------------------------------------------------------------------- not eligible


def spooled_only(env: Env, d: Deferred[str], *rcpts: str) -> None:
    qid = result(d)
    assert env.spooled() == [(qid, rcpts)]
    assert env.box("alice") == {} and env.box("bob") == {}


def test_alias_with_a_remote_target_goes_to_the_spool(tmp_path: Path) -> None:
    env = Env(tmp_path)
    spooled_only(env, env.send("fwd@example.test"), "fwd@example.test")


def test_remote_recipient_goes_to_the_spool(tmp_path: Path) -> None:
    env = Env(tmp_path)
    d = env.send("alice@example.test", "friend@remote.test")
    spooled_only(env, d, "alice@example.test", "friend@remote.test")


def test_unknown_user_goes_to_the_spool(tmp_path: Path) -> None:
    env = Env(tmp_path)
    d = env.send("alice@example.test", "nobody@example.test")
    spooled_only(env, d, "alice@example.test", "nobody@example.test")


def test_directory_down_goes_to_the_spool(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.directory.down = True
    spooled_only(env, env.send("alice@example.test"), "alice@example.test")


def test_lookup_not_answered_yet_goes_to_the_spool_without_waiting(tmp_path: Path) -> None:
    env = Env(tmp_path, directory=PendingDirectory(ALICE))
    spooled_only(env, env.send("alice@example.test"), "alice@example.test")
    assert env.directory.lookups == ["alice@example.test"]


def test_too_many_received_fields_go_to_the_spool(tmp_path: Path) -> None:
    env = Env(tmp_path, max_received=2)
    hop = b"Received: from a.test by b.test; Mon, 1 Jan 2026\r\n"
    assert result(Env(tmp_path / "ok", max_received=2).send("alice@example.test", body=hop + BODY))
    spooled_only(env, env.send("alice@example.test", body=hop * 2 + BODY), "alice@example.test")


def test_delivered_to_loop_goes_to_the_spool(tmp_path: Path) -> None:
    env = Env(tmp_path)
    body = b"Delivered-To: Bob+Tag@example.test\r\n" + BODY
    assert result(env.send("bob@example.test", body=body))  # another address: fine
    assert len(env.box("bob")) == 1
    qid = result(env.send("bob+tag@example.test", body=body))
    assert env.spooled() == [(qid, ("bob+tag@example.test",))]
    assert len(env.box("bob")) == 1


def test_large_message_spilled_to_disk_goes_to_the_spool(tmp_path: Path) -> None:
    env = Env(tmp_path)
    body = BODY + b"x" * 998 + b"\r\n"
    body *= MEMORY_LIMIT // len(body) + 1
    spooled_only(env, env.send("alice@example.test", body=body), "alice@example.test")


def test_invalid_mailbox_path_goes_to_the_spool(tmp_path: Path) -> None:
    evil = User("eve@example.test", "../outside", ("eve@example.test",))
    env = Env(tmp_path, directory=FakeDirectory(ALICE, evil))
    spooled_only(env, env.send("alice@example.test", "eve@example.test"),
                 "alice@example.test", "eve@example.test")  # fmt: skip
    assert not (tmp_path / "outside").exists()


def test_one_mailbox_under_two_delivered_to_addresses_goes_to_the_spool(tmp_path: Path) -> None:
    env = Env(tmp_path)
    d = env.send("alice@example.test", "alice+news@example.test")
    spooled_only(env, d, "alice@example.test", "alice+news@example.test")


def test_reloaded_recipient_table_is_used(tmp_path: Path) -> None:
    env = Env(tmp_path)
    table, _ = parse_aliases("team: alice, friend@remote.test\n")
    env.direct.recipients = LocalRecipients(env.directory, table, ("example.test",))
    spooled_only(env, env.send("team@example.test"), "team@example.test")


# ----------------------------------------------------------------------- failures


def fail_link_into(box: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.link

    def link(src: Any, dst: Any, *args: Any, **kw: Any) -> None:
        if f"/{box}/new/" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst, *args, **kw)

    monkeypatch.setattr(os, "link", link)


def test_failed_copy_queues_that_recipient_and_answers_after_the_spool_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logged: list[str]
) -> None:
    manual, spool_manual = Manual(), Manual()
    env = Env(tmp_path, blocking=manual, spool_blocking=spool_manual)
    fail_link_into("bob", monkeypatch)
    d = env.send("alice@example.test", "bob@example.test")
    fired: list[Any] = []
    d.addBoth(fired.append)
    manual.run()
    assert len(env.box("alice")) == 1 and env.box("bob") == {}
    assert fired == [] and len(spool_manual.calls) == 1  # 250 waits for the spool
    spool_manual.run()
    qid = fired[0]
    assert env.spooled() == [(qid, ("bob@example.test",))]
    assert env.spool.load(qid).data_path.read_bytes() == BODY
    assert not os.listdir(env.mail / "example.test" / "bob" / "tmp")
    text = "\n".join(logged)
    assert "to=<alice@example.test> delivered" in text and "to=<bob" not in text

    # The runner then delivers the queued recipient as it would any message.
    monkeypatch.undo()
    run_queue(env, qid)
    assert len(env.box("bob")) == 1 and len(env.box("alice")) == 1


def run_queue(env: Env, qid: str) -> None:
    """Let a queue runner (a new process on the same disk) deliver one queued message."""
    spool = Spool(env.spool.root, env.clock)
    runner = QueueRunner(spool, env.recipients, env.mail, HOST, env.clock)
    result(Deferred.fromCoroutine(runner.process(qid)))
    assert spool.messages() == []


def test_failed_copy_and_failed_spool_commit_fail_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = Env(tmp_path)
    fail_link_into("bob", monkeypatch)

    def no_space(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Spool, "_commit_one", no_space)
    d = env.send("alice@example.test", "bob@example.test")
    assert failure(d).check(OSError)
    assert env.box("bob") == {} and env.spool_tmp_empty()


def test_fsync_of_new_failing_counts_every_copy_linked_there_as_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = Env(tmp_path)
    real = maildir._fsync_dir

    def fsync_dir(path: Path) -> None:
        if path.parent.name == "bob" and path.name == "new":
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    monkeypatch.setattr(maildir, "_fsync_dir", fsync_dir)
    qid = result(env.send("alice@example.test", "team@example.test"))
    assert env.spooled() == [(qid, ("team@example.test",))]
    assert len(env.box("alice")) == 1
    # The copy may well have landed: the runner recognises it by its keyed name.
    monkeypatch.undo()
    run_queue(env, qid)
    assert len(env.box("bob")) == 1 and len(env.box("alice")) == 1


def test_unexpected_error_in_the_batch_queues_the_whole_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = Env(tmp_path)

    def broken(*args: Any, **kw: Any) -> list[Any]:
        raise RuntimeError("bug")

    monkeypatch.setattr(maildir, "deliver_many", broken)
    d = env.send("alice@example.test", "bob@example.test")
    spooled_only(env, d, "alice@example.test", "bob@example.test")


# ----------------------------------------------------------------------- group commit


def test_commits_queued_during_a_trip_share_the_next_one(tmp_path: Path) -> None:
    manual = Manual()
    env = Env(tmp_path, blocking=manual)
    first = env.send("alice@example.test")
    assert len(manual.calls) == 1
    later = [env.send("bob@example.test"), env.send("team@example.test")]
    assert len(manual.calls) == 1  # still in flight: the others wait
    manual.run(0)
    qid = result(first)
    assert len(manual.calls) == 2
    assert [c.maildir.name for c in manual.calls[1][1][0]] == ["bob", "alice", "bob"]
    assert not any(d.called for d in later)
    manual.run(1)
    assert len(manual.calls) == 2
    ids = [result(d) for d in later]
    assert len({qid, *ids}) == 3
    assert len(env.box("alice")) == 2 and len(env.box("bob")) == 2
    assert env.spooled() == [] and env.spool_tmp_empty()


# ----------------------------------------------------------------------- deliver_many


def test_deliver_many_writes_each_copy_as_deliver_does(tmp_path: Path) -> None:
    data = b"Subject: x\n\nbody\n"
    a, b = tmp_path / "a", tmp_path / "b"
    out = maildir.deliver_many(
        [maildir.Copy(a, data), maildir.Copy(b, data, "QID1", 1000.5), maildir.Copy(a, data)],
        hostname="h:1",
        now=2000.25,
    )
    assert all(isinstance(r, str) for r in out)
    assert str(out[1]) == f"new/1000.QQID1.h\\0721,S={len(data)},W={len(data) + 3}"
    assert str(out[0]).startswith("new/2000.M250000P") and out[0] != out[2]
    for box, name in ((a, out[0]), (b, out[1]), (a, out[2])):
        assert (box / str(name)).read_bytes() == data
        assert not os.listdir(box / "tmp") and (box / "cur").is_dir()
    # A keyed copy already there (a crash after the link) is delivered, not an error.
    again = maildir.deliver_many([maildir.Copy(b, data, "QID1", 1000.5)], hostname="h:1", now=1)
    assert again == [out[1]] and len(os.listdir(b / "new")) == 1


def test_deliver_many_reports_errors_per_copy(tmp_path: Path) -> None:
    data = b"x\n"
    blocked = tmp_path / "blocked"
    blocked.write_bytes(b"not a directory")
    out = maildir.deliver_many(
        [maildir.Copy(blocked / "box", data), maildir.Copy(tmp_path / "ok", data)],
        hostname="h",
        now=1,
    )
    assert isinstance(out[0], OSError) and isinstance(out[1], str)
    assert (tmp_path / "ok" / str(out[1])).read_bytes() == data


def test_local_copy_is_return_path_delivered_to_and_lf(tmp_path: Path) -> None:
    chunks = [b"A: b\r", b"\n\r\nbody\r\n"]
    assert b"".join(maildir.local_copy("", "x@y.test", chunks)) == (
        b"Return-Path: <>\nDelivered-To: x@y.test\nA: b\n\nbody\n"
    )


# ----------------------------------------------------------------------- through the process


@pytest.fixture(scope="module")
def full_disks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path, Path]]:
    """The real appliance with its Maildir tree and its spool each on a small tmpfs."""
    tmp = tmp_path_factory.mktemp("direct-delivery")
    mounts = [tmp / "mail-fs", tmp / "spool-fs"]
    mounted = []
    try:
        for mount in mounts:
            mount.mkdir()
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
            mounted.append(mount)
        config, port = configure(tmp, f'mail_root = "{mounts[0]}"\nspool = "{mounts[1]}"')
        process = ApplianceProcess(config, tmp / "appliance.log")
        process.start()
        try:
            yield (process, port), mounts[0], mounts[1]
        finally:
            assert process.stop() == 0, process.read_log()
    finally:
        for mount in mounted:
            subprocess.run(["umount", str(mount)], check=True)


def attempt(port: int, tag: str) -> tuple[int, bytes]:
    """One small message from the inside to alice and bob; the reply to its end of data."""
    with smtp(INSIDE, port, LAN_CLIENT) as session:
        assert session.mail("sender@example.test")[0] == 250
        assert session.rcpt("alice@example.test")[0] == 250
        assert session.rcpt("bob@example.test")[0] == 250
        return session.data(f"Subject: {tag}\r\n\r\nbody of {tag}\r\n".encode())


def queue_id(message: bytes) -> str:
    match = re.search(rb"queued as ([0-9A-F]{23})", message)
    assert match, message
    return match.group(1).decode()


@pytest.mark.integration
def test_process_delivers_before_the_250_without_a_queue_entry(
    full_disks: tuple[Any, Path, Path],
) -> None:
    (process, port), mail, spool = full_disks
    tag = f"direct-{os.getpid()}-a"
    code, message = attempt(port, tag)
    assert code == 250, message
    qid = queue_id(message)
    for user in ("alice", "bob"):
        (path,) = [p for p in (mail / "example.test" / user / "new").iterdir() if qid in p.name]
        assert tag.encode() in path.read_bytes()
    assert not list((spool / "queue").iterdir()) and not list((spool / "tmp").iterdir())
    log = process.read_log()
    delivered = log.index(f"{qid}: to=<bob@example.test> delivered to example.test/bob as new/")
    assert delivered < log.index(f"{qid}: client=")  # the transaction's 250 comes after


@pytest.mark.integration
def test_process_queues_when_the_mailboxes_are_full_and_452_when_the_spool_is_too(
    full_disks: tuple[Any, Path, Path],
) -> None:
    (process, port), mail, spool = full_disks
    mail_filler = fill(mail)
    try:
        tag = f"direct-{os.getpid()}-b"
        code, message = attempt(port, tag)
        assert code == 250, message
        qid = queue_id(message)
        envelope_json = json.loads((spool / "queue" / qid / "envelope.json").read_bytes())
        rcpts = [r["address"] for r in envelope_json["recipients"]]
        assert sorted(rcpts) == ["alice@example.test", "bob@example.test"]
        spool_filler = fill(spool)
        try:
            code, message = attempt(port, f"direct-{os.getpid()}-c")
            assert code == 452 and b"4.3.1" in message, message
        finally:
            spool_filler.unlink()
    finally:
        mail_filler.unlink()
    assert f"{qid}: queueing alice@example.test, bob@example.test after mailbox write errors" in (
        process.read_log()
    )


def test_config_switch(tmp_path: Path) -> None:
    from tests.test_config import MINIMAL, write

    assert config.load(write(tmp_path, MINIMAL)).mail.direct_delivery is True
    off = MINIMAL + "\n[mail]\ndirect_delivery = false\n"
    assert config.load(write(tmp_path, off)).mail.direct_delivery is False
    (problem,) = config.check(write(tmp_path, MINIMAL + '\n[mail]\ndirect_delivery = "yes"\n'))
    assert problem.key == "mail.direct_delivery"
