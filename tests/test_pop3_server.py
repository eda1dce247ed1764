"""The POP3 server: every command with StringTransport, then real poplib sessions on loopback."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import poplib
import shutil
import ssl as stdlib_ssl
import tempfile
from collections.abc import Callable
from hashlib import md5
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from appliance.directory.base import DirectoryUnavailable, User
from appliance.pop3 import server as pop3_server
from appliance.pop3.mailbox import MailboxLocks, SizeCache, encode_message
from appliance.pop3.server import POP3Server, POP3ServerFactory

ALICE = User("alice@example.test", "example.test/alice", ("alice@example.test",))
BOB = User("bob@example.test", "example.test/bob", ("bob@example.test",))
PASSWORDS = {"alice@example.test": "alice pw", "bob@example.test": "bob-pw"}
USERS = {"alice@example.test": ALICE, "bob@example.test": BOB}

MSG1 = b"Subject: one\n\nbody one\n.dotted\n"
MSG2 = b"Subject: two\r\nX: y\r\n\r\nl1\r\nl2\r\nl3\r\n"


class FakeDirectory:
    """Answers from a dict; ``hold`` keeps the answers back to test pipelining."""

    def __init__(self) -> None:
        self.hold = False
        self.held: list[tuple[Deferred[User | None], User | None]] = []
        self.error: Exception | None = None
        self.calls: list[tuple[str, str]] = []

    def find_user(self, address: str) -> Deferred[User | None]:
        return succeed(USERS.get(address.lower()))

    def authenticate(self, login: str, password: str) -> Deferred[User | None]:
        self.calls.append((login, password))
        if self.error is not None:
            return fail(self.error)
        user = USERS.get(login.lower()) if PASSWORDS.get(login.lower()) == password else None
        if self.hold:
            d: Deferred[User | None] = Deferred()
            self.held.append((d, user))
            return d
        return succeed(user)

    def release(self) -> None:
        held, self.held = self.held, []
        for d, user in held:
            d.callback(user)


class APOPDirectory(FakeDirectory):
    def authenticate_apop(self, login: str, challenge: bytes, digest: str) -> Deferred[User | None]:
        secret = PASSWORDS.get(login.lower(), "").encode()
        ok = md5(challenge + secret).hexdigest() == digest
        return succeed(USERS.get(login.lower()) if ok else None)


class Transport(StringTransport):
    """StringTransport plus the TCP/TLS methods the server uses."""

    def __init__(self, host: str = "192.0.2.7") -> None:
        peer: Any = (
            IPv6Address("TCP", host, 4242) if ":" in host else IPv4Address("TCP", host, 4242)
        )
        super().__init__(peerAddress=peer)
        self.tls: Any = None
        self.nodelay = False
        self.tight = False  # pause the producer after every write, like a full socket
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)
        if self.tight and self.producer is not None:
            self.producer.pauseProducing()

    def startTLS(self, ctx: Any) -> None:
        self.tls = ctx

    def setTcpNoDelay(self, on: bool) -> None:
        self.nodelay = on


TLS = object()  # stands for a CertificateOptions; Transport.startTLS only records it


def make_maildir(root: Path, user: User, messages: dict[str, bytes]) -> Path:
    md = root / user.mailbox
    for sub in ("tmp", "new", "cur"):
        (md / sub).mkdir(parents=True, exist_ok=True)
    for name, data in messages.items():
        (md / "new" / name).write_bytes(data)
    return md


class Env:
    def __init__(self, root: Path, directory: FakeDirectory | None = None, **kw: Any) -> None:
        self.root = root
        self.clock = Clock()
        self.directory = directory or FakeDirectory()
        self.logins: list[str] = []
        self.failures: list[tuple[str, str]] = []
        args: dict[str, Any] = {
            "tls_options": TLS,
            "inside_networks": ["127.0.1.0/24"],
            "allow_plaintext_inside": True,
            "implicit_tls": False,
            "on_login": self.logins.append,
            "on_auth_failure": lambda ip, login: self.failures.append((ip, login)),
            "locks": MailboxLocks(),
            "sizes": SizeCache(),
        }
        args.update(kw)
        self.factory = POP3ServerFactory(
            self.directory, str(root), "pop.example.test", clock=self.clock, **args
        )
        self.maildir = make_maildir(
            root,
            ALICE,
            {"1700000001.M1P1.host,S=31": MSG1, "1700000002.M2P1.host,S=40": MSG2},
        )

    def connect(self, host: str = "192.0.2.7") -> Session:
        return Session(self.factory, host)


class Session:
    def __init__(self, factory: POP3ServerFactory, host: str) -> None:
        self.transport = Transport(host)
        self.proto: POP3Server = factory.buildProtocol(self.transport.getPeer())
        self.proto.makeConnection(self.transport)
        self.greeting = self.take()

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def send(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        return self.take()

    def cmd(self, line: str) -> str:
        return self.send(line.encode() + b"\r\n").decode()

    def step(self) -> bytes:
        """The socket drained once: the session may produce one more write."""
        self.proto.resumeProducing()
        return self.take()

    def login(self, user: str = "alice@example.test") -> str:
        assert self.cmd(f"USER {user}").startswith("+OK")
        return self.cmd(f"PASS {PASSWORDS[user]}")

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def inside(env: Env) -> Session:
    return env.connect("127.0.1.5")


# -- greeting, CAPA, plaintext policy -------------------------------------


def test_greeting_nodelay_and_no_apop_banner(env: Env) -> None:
    s = env.connect()
    assert s.greeting == b"+OK pop.example.test POP3 server ready\r\n"
    assert s.transport.nodelay


def test_apop_banner_and_login(tmp_path: Path) -> None:
    env = Env(tmp_path, APOPDirectory())
    s = env.connect()
    banner = s.greeting.decode().strip()
    stamp = banner[banner.index("<") :]
    assert stamp.endswith("@pop.example.test>")
    assert s.cmd("APOP alice@example.test 0123") == "-ERR [AUTH] authentication failed\r\n"
    assert s.cmd("APOP alice@example.test").startswith("-ERR usage")
    digest = md5(stamp.encode() + b"alice pw").hexdigest()
    # APOP sends no password, so it needs no TLS.
    assert s.cmd(f"APOP alice@example.test {digest}").startswith("+OK 2 messages")


def test_apop_unavailable(env: Env) -> None:
    assert env.connect().cmd("APOP alice@example.test abc") == "-ERR APOP not available\r\n"


def caps(s: Session) -> list[str]:
    lines = s.cmd("CAPA").split("\r\n")
    assert lines[0].startswith("+OK") and lines[-2:] == [".", ""]
    return lines[1:-2]


def test_capa_outside_before_and_after_stls(env: Env) -> None:
    s = env.connect()
    before = caps(s)
    for cap in ("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "STLS"):
        assert cap in before
    assert "USER" not in before and not any(c.startswith("SASL") for c in before)
    assert s.cmd("STLS") == "+OK begin TLS negotiation\r\n"
    assert s.transport.tls is TLS
    after = caps(s)
    assert "USER" in after and "SASL PLAIN" in after and "STLS" not in after


def test_capa_inside_and_without_tls(tmp_path: Path) -> None:
    env = Env(tmp_path, tls_options=None)
    c = caps(inside(env))
    assert "USER" in c and "SASL PLAIN" in c and "STLS" not in c
    assert "USER" not in caps(env.connect())
    assert env.connect().cmd("STLS") == "-ERR STLS not available\r\n"


def test_inside_plaintext_can_be_disallowed(tmp_path: Path) -> None:
    env = Env(tmp_path, allow_plaintext_inside=False)
    s = inside(env)
    assert "USER" not in caps(s)
    assert s.cmd("USER alice@example.test").startswith("-ERR [AUTH] plaintext")


def test_ipv4_mapped_inside_client(env: Env) -> None:
    s = env.connect("::ffff:127.0.1.9")
    assert s.login().startswith("+OK")
    assert env.logins == ["127.0.1.9"]
    assert env.factory.is_inside("127.0.1.1") and not env.factory.is_inside("bogus")


def test_plaintext_refused_outside_without_tls(env: Env) -> None:
    s = env.connect()
    refusal = "-ERR [AUTH] plaintext authentication disallowed on non-secure connections\r\n"
    assert s.cmd("USER alice@example.test") == refusal
    assert s.cmd("PASS alice pw") == refusal
    assert s.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0alice pw").decode()) == (
        refusal
    )
    assert s.cmd("AUTH") == "+OK\r\n.\r\n"
    assert env.directory.calls == []
    assert s.proto.state == "AUTHORIZATION"


def test_stls_discards_pipelined_plaintext(env: Env) -> None:
    s = env.connect()
    out = s.send(b"STLS\r\nUSER alice@example.test\r\nPASS alice pw\r\n")
    assert out == b"+OK begin TLS negotiation\r\n"
    assert env.directory.calls == []
    assert s.proto.state == "AUTHORIZATION"
    assert s.cmd("STLS") == "-ERR already using TLS\r\n"
    assert s.login().startswith("+OK")


def test_stls_not_after_login(env: Env) -> None:
    s = inside(env)
    s.login()
    assert s.cmd("STLS") == "-ERR command not valid in this state\r\n"


def test_implicit_tls(tmp_path: Path) -> None:
    env = Env(tmp_path, implicit_tls=True)
    s = env.connect()
    assert s.transport.tls is TLS
    assert "STLS" not in caps(s)
    assert s.login().startswith("+OK")
    with pytest.raises(ValueError):
        Env(tmp_path / "x", implicit_tls=True, tls_options=None)


# -- USER/PASS, AUTH PLAIN ---------------------------------------------------


def test_user_pass_success_and_failure_paths(env: Env) -> None:
    s = inside(env)
    assert s.cmd("PASS x") == "-ERR USER first\r\n"
    assert s.cmd("USER") == "-ERR USER needs a name\r\n"
    assert s.cmd("STAT") == "-ERR command not valid in this state\r\n"
    assert s.cmd("NOOP") == "-ERR command not valid in this state\r\n"
    assert s.cmd("USER alice@example.test") == "+OK send PASS\r\n"
    assert s.cmd("PASS wrong") == "-ERR [AUTH] authentication failed\r\n"
    assert s.cmd("PASS alice pw") == "-ERR USER first\r\n"  # USER must be repeated
    size = len(encode_message(MSG1, False)) + len(encode_message(MSG2, False))
    assert s.login() == f"+OK 2 messages ({size} octets)\r\n"
    assert env.directory.calls[-1] == ("alice@example.test", "alice pw")
    assert env.logins == ["127.0.1.5"]
    assert env.failures == [("127.0.1.5", "alice@example.test")]
    assert s.cmd("USER bob@example.test") == "-ERR command not valid in this state\r\n"
    assert s.cmd("AUTH PLAIN") == "-ERR command not valid in this state\r\n"


def test_too_many_failures_disconnect(env: Env) -> None:
    s = inside(env)
    for _ in range(3):
        s.cmd("USER alice@example.test")
        assert s.cmd("PASS nope") == "-ERR [AUTH] authentication failed\r\n"
    assert s.closed
    assert s.cmd("USER alice@example.test") == ""


def test_failure_delay_hook(tmp_path: Path) -> None:
    env = Env(tmp_path, failure_delay=lambda ip: 2.0)
    s = inside(env)
    s.cmd("USER alice@example.test")
    assert s.send(b"PASS nope\r\nNOOP\r\n") == b""
    env.clock.advance(1.9)
    assert s.take() == b""
    env.clock.advance(0.2)
    assert (
        s.take() == b"-ERR [AUTH] authentication failed\r\n-ERR command not valid in this state\r\n"
    )


def test_directory_unavailable_and_crash(env: Env) -> None:
    s = inside(env)
    env.directory.error = DirectoryUnavailable("ldap down")
    s.cmd("USER alice@example.test")
    assert s.cmd("PASS alice pw").startswith("-ERR [SYS/TEMP]")
    env.directory.error = RuntimeError("bug")
    s.cmd("USER alice@example.test")
    assert s.cmd("PASS alice pw").startswith("-ERR [SYS/TEMP]")
    env.directory.error = None
    assert s.login().startswith("+OK")


def test_pipelined_commands_wait_for_login(env: Env) -> None:
    env.directory.hold = True
    s = inside(env)
    out = s.send(b"USER alice@example.test\r\nPASS alice pw\r\nSTAT\r\nUIDL 2\r\n")
    assert out == b"+OK send PASS\r\n"
    env.directory.release()
    lines = s.take().decode().split("\r\n")
    assert lines[0].startswith("+OK 2 messages")
    assert lines[1].startswith("+OK 2 ")
    assert lines[2] == "+OK 2 1700000002.M2P1.host"


def test_auth_plain_forms(env: Env) -> None:
    good = base64.b64encode(b"\0alice@example.test\0alice pw").decode()
    s = inside(env)
    assert s.cmd("AUTH") == "+OK\r\nPLAIN\r\n.\r\n"
    assert s.cmd("AUTH CRAM-MD5") == "-ERR unsupported SASL mechanism\r\n"
    assert s.cmd("AUTH PLAIN") == "+ \r\n"
    assert s.cmd("*") == "-ERR authentication cancelled\r\n"
    assert s.cmd("AUTH PLAIN !!!") == "-ERR invalid base64 in SASL response\r\n"
    assert s.cmd("AUTH PLAIN =") == "-ERR [AUTH] malformed PLAIN response\r\n"
    other = base64.b64encode(b"bob@example.test\0alice@example.test\0alice pw").decode()
    assert s.cmd(f"AUTH PLAIN {other}") == "-ERR [AUTH] cannot act as another user\r\n"
    bad = base64.b64encode(b"\0alice@example.test\0nope").decode()
    assert s.cmd(f"AUTH PLAIN {bad}") == "-ERR [AUTH] authentication failed\r\n"
    assert s.cmd("AUTH PLAIN") == "+ \r\n"
    assert s.cmd(good).startswith("+OK 2 messages")

    s2 = env.connect()
    s2.cmd("STLS")
    same = base64.b64encode(b"bob@example.test\0bob@example.test\0bob-pw").decode()
    assert s2.cmd(f"AUTH PLAIN {same}").startswith("+OK 0 messages")


def test_in_use(env: Env) -> None:
    first = inside(env)
    assert first.login().startswith("+OK")
    second = inside(env)
    assert second.login() == "-ERR [IN-USE] mailbox is locked by another POP3 session\r\n"
    assert second.proto.state == "AUTHORIZATION"
    assert inside(env).login("bob@example.test").startswith("+OK")
    assert first.cmd("QUIT").startswith("+OK")
    assert inside(env).login().startswith("+OK")


def test_disconnect_releases_lock_without_update(env: Env) -> None:
    s = inside(env)
    s.login()
    s.cmd("DELE 1")
    s.proto.connectionLost(None)
    assert len(os.listdir(env.maildir / "new")) == 2
    assert inside(env).login().startswith("+OK 2 messages")


def test_mailbox_open_error(env: Env) -> None:
    (env.root / "example.test" / "bob").mkdir(parents=True)
    (env.root / "example.test" / "bob" / "new").write_bytes(b"not a directory")
    s = inside(env)
    assert s.login("bob@example.test").startswith("-ERR [SYS/TEMP]")
    assert not env.factory.locks.held(str(env.root / "example.test" / "bob"))


# -- TRANSACTION -------------------------------------------------------------


@pytest.fixture
def txn(env: Env) -> Session:
    s = inside(env)
    assert s.login().startswith("+OK")
    return s


def test_stat_list_uidl(txn: Session) -> None:
    n1, n2 = len(encode_message(MSG1, False)), len(encode_message(MSG2, False))
    assert txn.cmd("STAT") == f"+OK 2 {n1 + n2}\r\n"
    assert txn.cmd("STAT x") == "-ERR STAT takes no argument\r\n"
    assert txn.cmd("LIST") == f"+OK 2 messages ({n1 + n2} octets)\r\n1 {n1}\r\n2 {n2}\r\n.\r\n"
    assert txn.cmd("LIST 2") == f"+OK 2 {n2}\r\n"
    assert txn.cmd("LIST 3") == "-ERR no such message\r\n"
    assert txn.cmd("LIST x") == "-ERR invalid message number\r\n"
    assert txn.cmd("LIST 1 2") == "-ERR invalid message number\r\n"
    assert txn.cmd("UIDL") == (
        f"+OK 2 messages ({n1 + n2} octets)\r\n1 1700000001.M1P1.host\r\n2 1700000002.M2P1.host\r\n.\r\n"
    )
    assert txn.cmd("UIDL 1") == "+OK 1 1700000001.M1P1.host\r\n"
    assert txn.cmd("UIDL 0") == "-ERR no such message\r\n"
    assert txn.cmd("NOOP") == "+OK\r\n"
    assert txn.cmd("lIsT 1") == f"+OK 1 {n1}\r\n"
    assert txn.cmd("XYZZY") == "-ERR unknown command\r\n"
    assert txn.cmd("") == "-ERR unknown command\r\n"


def test_retr_and_top(txn: Session) -> None:
    body = encode_message(MSG1)
    assert txn.cmd("RETR 1") == f"+OK {len(encode_message(MSG1, False))} octets\r\n".format() + (
        body.decode() + ".\r\n"
    )
    assert b"\r\n..dotted\r\n" in body
    assert txn.cmd("RETR 9") == "-ERR no such message\r\n"
    assert txn.cmd("RETR") == "-ERR invalid message number\r\n"
    assert txn.cmd("TOP 2 0") == "+OK top of message follows\r\nSubject: two\r\nX: y\r\n\r\n.\r\n"
    assert txn.cmd("TOP 2 2") == (
        "+OK top of message follows\r\nSubject: two\r\nX: y\r\n\r\nl1\r\nl2\r\n.\r\n"
    )
    assert txn.cmd("TOP 1 99") == "+OK top of message follows\r\n" + body.decode() + ".\r\n"
    assert txn.cmd("TOP 1") == "-ERR usage: TOP message lines\r\n"
    assert txn.cmd("TOP 1 -1") == "-ERR usage: TOP message lines\r\n"
    assert txn.cmd("TOP 5 1") == "-ERR no such message\r\n"


def test_dele_rset_quit(env: Env, txn: Session) -> None:
    assert txn.cmd("DELE 1") == "+OK message 1 deleted\r\n"
    assert txn.cmd("DELE 1") == "-ERR message 1 already deleted\r\n"
    assert txn.cmd("DELE 7") == "-ERR no such message\r\n"
    assert txn.cmd("DELE x") == "-ERR invalid message number\r\n"
    assert txn.cmd("RETR 1") == "-ERR no such message\r\n"
    assert txn.cmd("LIST").count("\r\n") == 3
    assert txn.cmd("RSET").startswith("+OK maildrop has 2 messages")
    txn.cmd("DELE 2")
    txn.cmd("RETR 1")
    assert len(os.listdir(env.maildir / "new")) == 2  # nothing before QUIT
    assert txn.cmd("QUIT") == "+OK pop.example.test POP3 server signing off\r\n"
    assert txn.closed
    assert os.listdir(env.maildir / "new") == []
    assert os.listdir(env.maildir / "cur") == ["1700000001.M1P1.host,S=31:2,S"]


def test_quit_reports_update_failure(
    env: Env, txn: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    txn.cmd("DELE 1")
    from appliance.pop3 import mailbox

    def unlink(path: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(mailbox.os, "unlink", unlink)
    assert txn.cmd("QUIT") == "-ERR [SYS/TEMP] some deleted messages not removed\r\n"
    assert txn.closed
    assert not env.factory.locks.held(str(env.maildir))


def test_quit_in_authorization(env: Env) -> None:
    s = env.connect()
    assert s.cmd("QUIT").startswith("+OK")
    assert s.closed
    assert s.cmd("CAPA") == ""


def test_retr_of_vanished_message(env: Env, txn: Session) -> None:
    os.unlink(env.maildir / "new" / "1700000001.M1P1.host,S=31")
    assert txn.cmd("RETR 1") == "-ERR message was removed by another program\r\n"
    assert txn.cmd("TOP 1 0") == "-ERR message was removed by another program\r\n"
    assert txn.cmd("QUIT").startswith("+OK")


def test_internal_error_does_not_escape(txn: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    assert txn.proto.mailbox is not None

    def boom() -> Any:
        raise RuntimeError("bug")

    monkeypatch.setattr(txn.proto.mailbox, "stat", boom)
    assert txn.cmd("STAT") == "-ERR [SYS/TEMP] internal error\r\n"
    assert txn.cmd("NOOP") == "+OK\r\n"


def test_line_too_long(env: Env) -> None:
    s = env.connect()
    assert s.send(b"USER " + b"a" * 5000) == b"-ERR line too long\r\n"
    assert s.closed
    s = env.connect()
    assert s.send(b"NOOP " + b"a" * 5000 + b"\r\n") == b"-ERR line too long\r\n"


def test_idle_timeout_forgets_deletions(env: Env, txn: Session) -> None:
    txn.cmd("DELE 1")
    env.clock.advance(599)
    assert txn.take() == b""
    txn.cmd("NOOP")
    env.clock.advance(599)
    assert not txn.closed
    env.clock.advance(2)
    assert txn.take() == b"-ERR autologout: idle for too long\r\n"
    assert txn.closed
    txn.proto.connectionLost(None)
    assert len(os.listdir(env.maildir / "new")) == 2
    assert env.clock.getDelayedCalls() == []


def dotty_message(size: int = 1 << 20, eol: bytes = b"\r\n") -> bytes:
    """A message with lines starting with "." at every offset around each 16 KiB boundary."""
    out = bytearray(b"Subject: dots" + eol + eol)
    k = 1
    while len(out) < size:
        target = k * 16384 + (k % 11) - 5
        gap = target - len(out)
        # Filler lines short enough for poplib (2048-byte line limit).
        while gap > 1000:
            out += b"a" * (900 - len(eol)) + eol
            gap -= 900
        if gap >= len(eol) + 1:
            out += b"a" * (gap - len(eol)) + eol
        elif gap > 0:
            out += b"b" * gap
        out += b"." + eol + b"." + eol + b".." + eol + b".x" + eol + b"x." + eol
        k += 1
    return bytes(out)


def unstuff(wire: bytes) -> bytes:
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire[:-3].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_big_retr_streams_under_backpressure(env: Env, eol: bytes) -> None:
    data = dotty_message(eol=eol)
    (env.maildir / "new" / "1700000003.M3P1.host").write_bytes(data)
    s = inside(env)
    s.login()
    s.transport.tight = True
    out = s.send(b"RETR 3\r\nNOOP\r\n")
    # Paused after the first write: the rest waits for the transport.
    assert s.proto._busy and len(out) < len(data) // 2
    writes = 0
    while True:
        more = s.step()
        if not more:
            break
        out += more
        writes += 1
    assert writes > 3
    head, _, rest = out.partition(b"\r\n")
    wire, noop = rest[: -len(b"+OK\r\n")], rest[-len(b"+OK\r\n") :]
    assert noop == b"+OK\r\n"
    expected = encode_message(data, stuff=False)
    assert head == b"+OK %d octets" % len(expected)
    assert unstuff(wire) == expected
    if eol == b"\r\n":
        assert unstuff(wire) == data
    s.transport.tight = False
    assert s.cmd("QUIT").startswith("+OK")
    assert any(n.startswith("1700000003.M3P1.host:2,S") for n in os.listdir(env.maildir / "cur"))


def test_big_retr_without_backpressure_is_one_burst(env: Env) -> None:
    data = dotty_message(300_000)
    (env.maildir / "new" / "1700000003.M3P1.host").write_bytes(data)
    s = inside(env)
    s.login()
    out = s.send(b"RETR 3\r\nNOOP\r\n")
    assert out.endswith(b"\r\n.\r\n+OK\r\n")
    assert unstuff(out.partition(b"\r\n")[2][: -len(b"+OK\r\n")]) == data


def test_pipelined_burst_answered_in_one_write(env: Env) -> None:
    s = inside(env)
    s.login()
    writes = len(s.transport.writes)
    out = s.send(b"RETR 1\r\nRETR 2\r\nSTAT\r\n")
    assert out.count(b"\r\n.\r\n") == 2 and out.endswith(b"\r\n") and b"+OK 2 " in out
    assert len(s.transport.writes) == writes + 1


def test_pipelined_small_retrs_wait_for_the_transport(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Replies are held back per burst only up to OUT_BATCH bytes; at 1, after every reply.
    monkeypatch.setattr(pop3_server, "OUT_BATCH", 1)
    s = inside(env)
    s.login()
    s.transport.tight = True
    out = s.send(b"RETR 1\r\nRETR 2\r\nSTAT\r\n")
    assert out.startswith(b"+OK") and out.count(b"\r\n.\r\n") == 1
    second = s.step()
    assert second.startswith(b"+OK") and second.count(b"\r\n.\r\n") == 1
    assert s.step().startswith(b"+OK 2 ")
    assert s.step() == b""


def test_reading_pauses_when_blocked_input_piles_up(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pop3_server, "OUT_BATCH", 1)
    s = inside(env)
    s.login()
    s.transport.tight = True
    s.send(b"NOOP\r\n" * 20_000)
    assert s.transport.producerState == "paused"
    for _ in range(30_000):
        s.proto.resumeProducing()
        if s.transport.producerState == "producing":
            break
    assert s.transport.producerState == "producing"


def test_disconnect_during_stream_closes_file(env: Env) -> None:
    (env.maildir / "new" / "1700000003.M3P1.host").write_bytes(dotty_message())
    s = inside(env)
    s.login()
    s.transport.tight = True
    s.cmd("RETR 3")
    sender = s.proto._sender
    assert sender is not None and sender._file is not None
    s.proto.connectionLost(None)
    assert sender._file is None
    s.proto.resumeProducing()  # a late call after the end: harmless


def test_idle_timeout_during_stream_unregisters_producer(env: Env) -> None:
    (env.maildir / "new" / "1700000003.M3P1.host").write_bytes(dotty_message())
    s = inside(env)
    s.login()
    s.transport.tight = True
    s.cmd("RETR 3")
    env.clock.advance(600)
    assert s.closed and s.transport.producer is None
    assert s.proto._sender is None


def test_dataReceived_never_raises(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    s = env.connect()

    def boom() -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(s.proto, "_process", boom)
    s.proto.dataReceived(b"NOOP\r\n")
    assert s.transport.disconnected


# -- real sockets: poplib ----------------------------------------------------


def self_signed() -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pop.example.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.integration
class LoopbackTests(unittest.TestCase):
    """poplib against the server on 127.0.0.1, with STLS and implicit TLS."""

    def setUp(self) -> None:
        from twisted.internet import ssl

        key_pem, cert_pem = self_signed()
        self.tls_options = ssl.PrivateCertificate.loadPEM(key_pem + cert_pem).options()
        self.client_ctx = stdlib_ssl.create_default_context(cadata=cert_pem.decode())
        self.root = Path(tempfile.mkdtemp(prefix="pop3-loopback-"))
        self.addCleanup(shutil.rmtree, self.root, True)
        self.big = dotty_message()
        self.maildir = make_maildir(
            self.root,
            ALICE,
            {
                "1700000001.M1P1.host,S=31": MSG1,
                "1700000002.M2P1.host": self.big,
                "1700000003.M3P1.host": MSG2,
            },
        )
        self.logins: list[str] = []
        self.ports: list[Any] = []

    def tearDown(self) -> Any:
        from twisted.internet.defer import gatherResults

        return gatherResults([p.stopListening() for p in self.ports])

    def listen(self, implicit: bool, inside: bool = False) -> int:
        factory = POP3ServerFactory(
            FakeDirectory(),
            str(self.root),
            "pop.example.test",
            self.tls_options,
            ["127.0.0.0/8"] if inside else [],
            inside,
            implicit,
            global_reactor,
            on_login=self.logins.append,
            locks=MailboxLocks(),
            sizes=SizeCache(),
            run_io=deferToThread,
        )
        port = global_reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.ports.append(port)
        return int(port.getHost().port)

    def in_thread(self, f: Callable[[], None]) -> Deferred[None]:
        return deferToThread(f)

    def test_stls_session(self) -> Deferred[None]:
        port = self.listen(implicit=False)

        def client() -> None:
            pop = poplib.POP3("127.0.0.1", port, timeout=30)
            try:
                self.assertIn("STLS", pop.capa())
                self.assertNotIn("USER", pop.capa())
                with self.assertRaises(poplib.error_proto):
                    pop.user("alice@example.test")
                pop.stls(self.client_ctx)
                self.assertIn("USER", pop.capa())
                pop.user("alice@example.test")
                pop.pass_("alice pw")
                count, _size = pop.stat()
                self.assertEqual(count, 3)
                uidls1 = pop.uidl()[1]
                _resp, lines, _octets = pop.retr(2)
                got = b"\r\n".join(lines) + b"\r\n"
                self.assertEqual(got, self.big)
                self.assertEqual(int(pop.list(2).split()[2]), len(self.big))
                self.assertEqual(pop.retr(1)[1][-1], b".dotted")
                self.assertEqual(pop.top(3, 1)[1], [b"Subject: two", b"X: y", b"", b"l1"])
                pop.dele(1)

                # A second session while this one holds the mailbox: [IN-USE].
                other = poplib.POP3("127.0.0.1", port, timeout=30)
                other.stls(self.client_ctx)
                other.user("alice@example.test")
                with self.assertRaises(poplib.error_proto) as err:
                    other.pass_("alice pw")
                self.assertIn(b"[IN-USE]", err.exception.args[0])
                other.quit()

                # DELE takes effect only at QUIT.
                self.assertEqual(len(os.listdir(self.maildir / "new")), 3)
            finally:
                pop.quit()
            # 1 deleted; 2 retrieved, so seen; 3 only had TOP, so it stays new.
            self.assertEqual(os.listdir(self.maildir / "new"), ["1700000003.M3P1.host"])
            self.assertEqual(os.listdir(self.maildir / "cur"), ["1700000002.M2P1.host:2,S"])

            again = poplib.POP3("127.0.0.1", port, timeout=30)
            again.stls(self.client_ctx)
            again.user("alice@example.test")
            again.pass_("alice pw")
            uidls2 = again.uidl()[1]
            again.quit()
            # Same UIDLs after the flag change (new/ -> cur/:2,S), renumbered after the DELE.
            self.assertEqual([u.split()[1] for u in uidls2], [u.split()[1] for u in uidls1[1:]])
            self.assertEqual([u.split()[0] for u in uidls2], [b"1", b"2"])
            self.assertEqual(self.logins, ["127.0.0.1", "127.0.0.1"])

        return self.in_thread(client)

    def test_implicit_tls_session(self) -> Deferred[None]:
        port = self.listen(implicit=True)

        def client() -> None:
            pop = poplib.POP3_SSL("127.0.0.1", port, context=self.client_ctx, timeout=30)
            caps = pop.capa()
            self.assertNotIn("STLS", caps)
            self.assertIn("USER", caps)
            pop.user("alice@example.test")
            pop.pass_("alice pw")
            _resp, lines, _octets = pop.retr(2)
            self.assertEqual(b"\r\n".join(lines) + b"\r\n", self.big)
            pop.quit()

        return self.in_thread(client)

    def test_plain_tcp_from_inside_and_server_close(self) -> Deferred[None]:
        port = self.listen(implicit=False, inside=True)

        def client() -> None:
            pop = poplib.POP3("127.0.0.1", port, timeout=30)
            self.assertIn("USER", pop.capa())
            pop.user("alice@example.test")
            pop.pass_("alice pw")
            _resp, lines, _octets = pop.retr(2)
            self.assertEqual(b"\r\n".join(lines) + b"\r\n", self.big)
            # The server, not the client, closes after QUIT.
            sock = pop.sock
            sock.sendall(b"QUIT\r\n")
            received = b""
            while chunk := sock.recv(4096):
                received += chunk
            self.assertTrue(received.startswith(b"+OK"))
            sock.close()

        return self.in_thread(client)


class HeldIO:
    """A run_io that keeps each job until released, like a busy thread pool."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, f: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((f, d))
        return d

    def run(self) -> None:
        jobs, self.jobs = self.jobs, []
        for f, d in jobs:
            try:
                result = f()
            except Exception as e:
                d.errback(e)
            else:
                d.callback(result)


def test_run_io_login_scan_and_update(tmp_path: Path) -> None:
    io = HeldIO()
    env = Env(tmp_path, run_io=io)
    s = inside(env)
    s.cmd("USER alice@example.test")
    assert s.send(b"PASS alice pw\r\nSTAT\r\n") == b""
    assert len(io.jobs) == 1
    io.run()
    out = s.take().decode()
    assert out.startswith("+OK 2 messages") and "\r\n+OK 2 " in out
    s.cmd("DELE 1")
    assert s.send(b"QUIT\r\nNOOP\r\n") == b""
    # The client vanishes during UPDATE: the lock stays until the files are done.
    s.proto.connectionLost(None)
    assert env.factory.locks.held(str(env.maildir))
    io.run()
    assert not env.factory.locks.held(str(env.maildir))
    assert os.listdir(env.maildir / "new") == ["1700000002.M2P1.host,S=40"]


def test_run_io_open_failure(tmp_path: Path) -> None:
    def failing(f: Callable[[], Any]) -> Deferred[Any]:
        return fail(OSError(5, "I/O error"))

    env = Env(tmp_path, run_io=failing)
    s = inside(env)
    assert s.login() == "-ERR [SYS/TEMP] cannot open the mailbox, try again later\r\n"
    assert not env.factory.locks.held(str(env.maildir))
    assert s.cmd("CAPA").startswith("+OK")


def test_disconnect_cancels_delayed_refusal(tmp_path: Path) -> None:
    env = Env(tmp_path, failure_delay=lambda ip: 5.0)
    s = inside(env)
    s.cmd("USER alice@example.test")
    s.cmd("PASS nope")
    s.proto.connectionLost(None)
    assert [c for c in env.clock.getDelayedCalls() if c.active()] == []


def test_hooks_that_raise_are_contained(tmp_path: Path) -> None:
    def bad_hook(*args: Any) -> None:
        raise RuntimeError("hook bug")

    env = Env(tmp_path, on_login=bad_hook, on_auth_failure=bad_hook)
    s = inside(env)
    s.cmd("USER alice@example.test")
    assert s.cmd("PASS nope") == "-ERR [AUTH] authentication failed\r\n"
    assert s.login().startswith("+OK 2 messages")
