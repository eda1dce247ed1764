"""The operator's queue tools: hold/release in the runner, the control socket, route explanations."""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, reactor, threads
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from appliance.control import CommandError, ControlClient, ControlProtocol, ControlService
from appliance.dns.lookup import NoSuchDomain, TemporaryFailure
from appliance.mail.interfaces import Reply
from appliance.mail.outbound import RemoteDelivery
from appliance.mail.queue import DEFERRED, HELD, QueuedMessage, RecipientState
from appliance.mail.queuetools import (
    format_mailq,
    format_route,
    list_queue,
    queue_handlers,
)
from appliance.mail.routing import Router
from appliance.mail.smtp_client import OutboundSettings
from tests.test_mail_queue_support import result
from tests.test_mail_runner import Env


class FakeResolver:
    """MX and address answers from dicts; a name in ``broken`` times out (R-1)."""

    def __init__(
        self,
        mx: Mapping[str, list[tuple[int, str]]],
        addresses: Mapping[str, list[str]],
        broken: Sequence[str] = (),
    ) -> None:
        self._mx = mx
        self._addresses = addresses
        self.broken = set(broken)

    def mx(self, domain: str) -> defer.Deferred[list[tuple[int, str]]]:
        if domain in self.broken:
            return defer.fail(TemporaryFailure(domain))
        if domain not in self._mx and domain not in self._addresses:
            return defer.fail(NoSuchDomain(domain))
        return defer.succeed(list(self._mx.get(domain, [])))

    def addresses(self, host: str) -> defer.Deferred[list[str]]:
        if host in self.broken:
            return defer.fail(TemporaryFailure(host))
        if host not in self._addresses:
            return defer.fail(NoSuchDomain(host))
        return defer.succeed(list(self._addresses[host]))


class Recorder:
    """A remote_delivery hook that answers 250 to everyone and remembers the calls."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(
        self, message: QueuedMessage, recipients: Sequence[RecipientState]
    ) -> defer.Deferred[Mapping[str, Reply]]:
        self.calls.append([r.address for r in recipients])
        return defer.succeed({r.address: Reply(250, "2.0.0", "ok") for r in recipients})


def remote_delivery(resolver: Any, **routes: str) -> RemoteDelivery:
    return RemoteDelivery(
        Router(routes, None, ["mail.example.test"], ["127.0.0.10"]),
        resolver,
        OutboundSettings(helo_name="mail.example.test", own_names=("mail.example.test",)),
        reactor,
        lambda a, p: None,
        random.Random(1),
    )


def handlers(env: Env, remote: Any = None) -> dict[str, Any]:
    return queue_handlers(env.spool, env.runner, lambda: env.recipients, lambda: remote)


# -- hold / release / flush / delete ------------------------------------------------------


def test_held_message_is_not_attempted_until_released(tmp_path: Path) -> None:
    recorder = Recorder()
    env = Env(tmp_path, remote_delivery=recorder)
    qid = env.submit("friend@remote.test")  # runner not started: nothing attempted yet
    env.spool.set_held(qid, True)
    assert env.spool.is_held(qid)
    assert (env.spool.queue_dir / qid / HELD).exists()
    env.runner.start()
    env.clock.advance(3600)
    assert recorder.calls == []
    assert env.spool.messages() == [qid]
    h = handlers(env)
    assert h["flush"]({"target": None}) == {"flushed": [], "held": [qid]}
    assert recorder.calls == []
    assert h["release"]({"queue_id": qid}) == {"released": qid}
    assert recorder.calls == [["friend@remote.test"]]
    assert env.spool.messages() == []


def test_hold_survives_a_restart_and_state_updates(tmp_path: Path) -> None:
    env = Env(tmp_path, remote_delivery=Recorder())
    qid = env.submit("alice@example.test", "friend@remote.test")
    result(
        env.spool.update_recipient(
            qid, RecipientState("friend@remote.test", DEFERRED, 1, 0.0, Reply(451, "4.0.0", "x"))
        )
    )
    env.spool.set_held(qid, True)
    env2 = env.restart(remote_delivery=Recorder())
    env2.runner.start()
    assert env2.box("alice") == []
    assert env2.spool.is_held(qid)
    (entry,) = list_queue(env2.spool, env2.clock.seconds())
    assert entry["held"] is True
    assert [r["status"] for r in entry["recipients"]] == ["pending", "deferred"]
    env2.spool.set_held(qid, False)
    result(env2.runner.force(qid))
    assert len(env2.box("alice")) == 1


def test_hold_of_unknown_or_malformed_id_fails_and_creates_nothing(tmp_path: Path) -> None:
    env = Env(tmp_path)
    h = handlers(env)
    with pytest.raises(CommandError):
        h["hold"]({"queue_id": "0" * 23})
    with pytest.raises(CommandError):
        h["hold"]({"queue_id": "../../etc"})
    with pytest.raises(CommandError):
        h["release"]({"queue_id": "0" * 23})
    assert not (env.spool.queue_dir / ("0" * 23)).exists()


def test_flush_by_id_and_by_domain_retries_now(tmp_path: Path) -> None:
    recorder = Recorder()
    env = Env(tmp_path, remote_delivery=recorder)
    q1 = env.submit("a@remote.test")
    q2 = env.submit("b@other.test")
    for qid, rcpt in ((q1, "a@remote.test"), (q2, "b@other.test")):
        state = RecipientState(rcpt, DEFERRED, 1, env.clock.seconds() + 3600)
        result(env.spool.update_recipient(qid, state))
    env.runner.start()
    assert recorder.calls == []
    h = handlers(env)
    assert h["flush"]({"target": "other.test"}) == {"flushed": [q2], "held": []}
    assert recorder.calls == [["b@other.test"]]
    assert h["flush"]({"target": q1.lower()}) == {"flushed": [q1], "held": []}
    assert recorder.calls == [["b@other.test"], ["a@remote.test"]]
    assert env.spool.messages() == []
    with pytest.raises(CommandError):
        h["flush"]({"target": q1})  # gone now


def test_delete_removes_the_message(tmp_path: Path) -> None:
    env = Env(tmp_path)
    qid = env.submit("friend@remote.test")
    h = handlers(env)
    assert result(h["delete"]({"queue_id": qid})) == {"deleted": qid}
    assert env.spool.messages() == []
    with pytest.raises(CommandError):
        result(h["delete"]({"queue_id": qid}))


def test_mailq_lists_states_and_last_errors(tmp_path: Path) -> None:
    env = Env(tmp_path)
    qid = env.submit("friend@remote.test", "alice@example.test")
    state = RecipientState(
        "friend@remote.test", DEFERRED, 2, env.clock.seconds() + 600, Reply(451, "4.4.1", "timeout")
    )
    result(env.spool.update_recipient(qid, state))
    env.clock.advance(90)
    entries = handlers(env)["mailq"]({})
    (entry,) = entries
    assert entry["queue_id"] == qid
    assert entry["age"] == 90
    assert entry["sender"] == "sender@remote.test"
    assert entry["recipients"][0]["last_reply"] == {
        "code": 451,
        "enhanced": "4.4.1",
        "text": "timeout",
    }
    text = format_mailq(entries, env.clock.seconds())
    assert qid in text and "<sender@remote.test>" in text
    assert "<friend@remote.test> deferred, 2 attempt(s), next in 8m: 451 4.4.1 timeout" in text
    assert "<alice@example.test> pending" in text
    assert format_mailq([], 0) == "Mail queue is empty\n"


# -- route ------------------------------------------------------------------------------


def test_route_explains_mx_order_with_dns_answers(tmp_path: Path) -> None:
    env = Env(tmp_path)
    resolver = FakeResolver(
        {"remote.test": [(20, "mx2.remote.test"), (10, "mx1.remote.test")]},
        {"mx1.remote.test": ["127.0.2.1"], "mx2.remote.test": ["127.0.2.2"]},
    )
    info = result(handlers(env, remote_delivery(resolver))["route"]({"address": "x@Remote.test"}))
    assert info["kind"] == "remote"
    assert info["route"]["kind"] == "mx"
    assert [(d["host"], d["preference"], d["address"]) for d in info["result"]["destinations"]] == [
        ("mx1.remote.test", 10, "127.0.2.1"),
        ("mx2.remote.test", 20, "127.0.2.2"),
    ]
    assert info["dns"][0] == {
        "query": "MX",
        "name": "remote.test",
        "answer": [[20, "mx2.remote.test"], [10, "mx1.remote.test"]],
    }
    text = format_route(info)
    assert "dns: MX remote.test -> 20 mx2.remote.test, 10 mx1.remote.test" in text
    assert "1. mx1.remote.test (preference 10) 127.0.2.1 port 25" in text


def test_route_explains_failures_static_routes_and_aliases(tmp_path: Path) -> None:
    env = Env(tmp_path)
    resolver = FakeResolver({"null.test": [(0, "")]}, {}, broken=["slow.test"])
    remote = remote_delivery(resolver, **{"static.test": "[127.0.2.9]:2525"})
    h = handlers(env, remote)
    null = result(h["route"]({"address": "a@null.test"}))
    assert null["result"]["permanent"]["enhanced"] == "5.1.10"
    assert "dns: MX null.test -> 0 ." in format_route(null)
    slow = result(h["route"]({"address": "a@slow.test"}))
    assert slow["result"]["temporary"]["code"] == 451
    assert "failed (TemporaryFailure)" in format_route(slow)
    static = result(h["route"]({"address": "a@static.test"}))
    assert static["route"] == {
        "kind": "static",
        "host": "127.0.2.9",
        "port": 2525,
        "mx_lookup": False,
    }
    assert static["dns"] == []
    assert static["result"]["destinations"][0]["port"] == 2525
    fwd = result(h["route"]({"address": "fwd@example.test"}))
    assert fwd["kind"] == "local"
    assert fwd["mailboxes"] == [{"mailbox": "example.test/alice", "address": "alice@example.test"}]
    assert [f["address"] for f in fwd["forwards"]] == ["friend@remote.test", "other@remote.test"]
    unknown = result(h["route"]({"address": "nobody@example.test"}))
    assert unknown["unknown"]["code"] == 550
    with pytest.raises(CommandError):
        result(h["route"]({"address": "no-domain"}))
    env.directory.down = True
    with pytest.raises(CommandError, match="directory is unavailable"):
        result(h["route"]({"address": "alice@example.test"}))


# -- the socket ------------------------------------------------------------------------


def test_protocol_answers_errors_without_raising() -> None:
    proto = ControlProtocol({"boom": lambda r: 1 / 0, "echo": lambda r: r["x"]}, frozenset({0}))
    transport = StringTransport()
    proto.makeConnection(transport)
    for line in (
        b"not json",
        b'{"command": "nope"}',
        b'{"command": "boom"}',
        b"[1]",
        b'{"command": "echo", "x": [1, "a"]}',
    ):
        proto.dataReceived(line + b"\n")
    answers = [json.loads(x) for x in transport.value().splitlines()]
    assert [a["ok"] for a in answers] == [False, False, False, False, True]
    assert answers[1]["error"] == "unknown command 'nope'"
    assert "ZeroDivisionError" in answers[2]["error"]
    assert answers[4]["result"] == [1, "a"]


class SocketTest(unittest.TestCase):
    @defer.inlineCallbacks
    def test_unix_socket_round_trip_and_mode(self) -> object:
        # Under the system temporary directory, so that another user can reach the directory.
        directory = Path(tempfile.mkdtemp(prefix="control-test-"))
        self.addCleanup(shutil.rmtree, directory, True)
        directory.chmod(0o755)
        path = directory / "control.sock"
        service = ControlService(path, reactor, {"echo": lambda r: {"got": r["value"]}})
        path.write_text("stale")  # a killed process left its socket behind
        service.startService()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertTrue(stat.S_ISSOCK(os.stat(path).st_mode))

        def client() -> Any:
            with ControlClient(path, timeout=10) as c:
                first = c.call("echo", value=1)
                try:
                    c.call("missing")
                except CommandError as e:
                    second = str(e)
                return first, second, c.call("echo", value="again")

        if os.geteuid() == 0:
            # Another user (nobody) cannot connect while the socket is 0600, and can once
            # it is made 0666 (which shows the probe itself works).
            probe = (
                "import socket, sys\n"
                "s = socket.socket(socket.AF_UNIX)\n"
                "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(3)\n"
            )
            command = ["/usr/bin/python3", "-c", probe, str(path)]
            code = yield threads.deferToThread(subprocess.call, command, user=65534)
            self.assertEqual(code, 3)
            path.chmod(0o666)
            code = yield threads.deferToThread(subprocess.call, command, user=65534)
            self.assertEqual(code, 0)
            path.chmod(0o600)

        got = yield threads.deferToThread(client)
        self.assertEqual(got, ({"got": 1}, "unknown command 'missing'", {"got": "again"}))
        yield service.stopService()
        self.assertFalse(path.exists())
        # Twisted's UNIX port compares bytes with str when it closes (BytesWarning under -b).
        self.flushWarnings()
