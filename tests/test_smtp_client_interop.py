"""The outbound ESMTP driver over real loopback sockets: fake servers, STARTTLS, IPv6, Postfix smtp-sink."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.trial import unittest
from zope.interface import implementer

from appliance.mail.routing import MX, STATIC, Route
from appliance.mail.smtp_client import (
    DeliveryResult,
    OpportunisticTLS,
    OutboundSettings,
    Outcome,
    Timeouts,
    attempt,
    deliver,
)
from appliance.tls import make_self_signed
from tests.harness import free_port
from tests.test_mail_mx import FakeResolver

SMTP_SINK = shutil.which("smtp-sink") or (
    "/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None
)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """A server-side context factory for ``startTLS`` that records the SNI name the client sent."""

    def __init__(self, sni_seen: list[str]) -> None:
        cert_pem, key_pem = make_self_signed(("mx.remote.test",))
        self.context = SSL.Context(SSL.TLS_METHOD)
        self.context.use_certificate(x509.load_pem_x509_certificate(cert_pem))
        self.context.use_privatekey(serialization.load_pem_private_key(key_pem, None))

        def servername(connection: SSL.Connection) -> None:
            name = connection.get_servername()
            sni_seen.append(name.decode() if name else "")

        self.context.set_tlsext_servername_callback(servername)

    def serverConnectionForTLS(self, tls_protocol: object) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tls_protocol)
        return connection


class Received:
    def __init__(self, sender: bytes, recipients: list[bytes], data: bytes, tls: bool) -> None:
        self.sender = sender
        self.recipients = recipients
        self.data = data
        self.tls = tls


class FakeSMTP(LineReceiver):
    """A scripted ESMTP server: replies per recipient by local part (ok*, later*, gone*)."""

    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, factory: FakeSMTPFactory) -> None:
        self.f = factory
        self.in_data = False
        self.data: list[bytes] = []
        self.data_bytes = 0
        self.sender = b""
        self.rcpts: list[bytes] = []
        self.tls = False
        self.held_mail_reply = False
        self.release: Any = None

    def connectionMade(self) -> None:
        self.f.connections.append(self)
        if self.f.banner:
            self.sendLine(self.f.banner)

    def connectionLost(self, reason: Any = None) -> None:
        if self.release is not None and self.release.active():
            self.release.cancel()
        self.f.closed.append(self)
        for d in self.f.waiting_for_close:
            if len(self.f.closed) >= len(self.f.connections) and not d.called:
                d.callback(None)

    def lineReceived(self, line: bytes) -> None:
        if self.in_data:
            self._data_line(line)
            return
        if self.held_mail_reply:
            # pipelined: the RCPT arrived before the MAIL reply went out
            self.f.pipelined.append(line.upper().startswith(b"RCPT"))
            self.held_mail_reply = False
            self.release.cancel()
            self.sendLine(b"250 2.1.0 sender ok")
        command = line[:4].upper()
        if command in (b"EHLO", b"HELO"):
            keywords = list(self.f.extensions)
            if self.tls:
                keywords = [k for k in keywords if k != b"STARTTLS"]
            lines = [b"mx.remote.test", *keywords]
            if command == b"HELO":
                lines = lines[:1]
            for keyword in lines[:-1]:
                self.sendLine(b"250-" + keyword)
            self.sendLine(b"250 " + lines[-1])
        elif command == b"STAR" and self.f.tls_options is None:
            self.sendLine(b"220 2.0.0 go ahead")
            self.transport.loseConnection()  # a broken TLS stack, as seen from the client
        elif command == b"STAR":
            self.sendLine(b"220 2.0.0 go ahead")
            self.transport.startTLS(self.f.tls_options)  # type: ignore[attr-defined]
            self.tls = True
        elif command == b"MAIL":
            self.sender = line[10:]
            self.rcpts = []
            if b"PIPELINING" in self.f.extensions:
                self.held_mail_reply = True
                self.release = self.f.clock.callLater(2, self._release_mail_reply)
            else:
                self.sendLine(b"250 2.1.0 sender ok")
        elif command == b"RCPT":
            address = line[8:].strip(b"<>")
            local = address.split(b"@")[0]
            if local.startswith(b"later"):
                self.sendLine(b"451 4.2.0 mailbox busy")
            elif local.startswith(b"gone"):
                self.sendLine(b"550 5.1.1 no such user")
            else:
                self.rcpts.append(address)
                self.sendLine(b"250 2.1.5 ok")
        elif command == b"DATA":
            self.in_data = True
            self.data = []
            self.data_bytes = 0
            self.sendLine(b"354 end with <CRLF>.<CRLF>")
        elif command == b"RSET":
            self.sendLine(b"250 2.0.0 ok")
        elif command == b"QUIT":
            self.sendLine(b"221 2.0.0 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"502 5.5.2 what")

    def _release_mail_reply(self) -> None:
        if self.held_mail_reply:
            self.held_mail_reply = False
            self.f.pipelined.append(False)
            self.sendLine(b"250 2.1.0 sender ok")

    def _data_line(self, line: bytes) -> None:
        if line == b".":
            self.in_data = False
            message = b"".join(part + b"\r\n" for part in self.data)
            self.f.messages.append(Received(self.sender, self.rcpts, message, self.tls))
            if self.f.after_dot == "close":
                self.transport.loseConnection()
            elif self.f.after_dot == "reply":
                self.sendLine(b"250 2.0.0 queued as FAKE1")
            return
        self.data.append(line[1:] if line.startswith(b".") else line)
        self.data_bytes += len(line) + 2
        if self.f.close_after_data_bytes and self.data_bytes > self.f.close_after_data_bytes:
            self.transport.abortConnection()  # type: ignore[attr-defined]


class FakeSMTPFactory(Factory):
    def __init__(self, **kw: Any) -> None:
        self.banner: bytes | None = kw.get("banner", b"220 mx.remote.test ESMTP fake")
        self.extensions: list[bytes] = kw.get(
            "extensions", [b"PIPELINING", b"8BITMIME", b"SIZE 100000000"]
        )
        self.after_dot: str = kw.get("after_dot", "reply")
        self.close_after_data_bytes: int = kw.get("close_after_data_bytes", 0)
        self.tls_options: Any = kw.get("tls_options")
        self.clock: Any = reactor
        self.connections: list[FakeSMTP] = []
        self.closed: list[FakeSMTP] = []
        self.waiting_for_close: list[defer.Deferred[None]] = []
        self.messages: list[Received] = []
        self.pipelined: list[bool] = []

    def buildProtocol(self, addr: Any) -> FakeSMTP:
        return FakeSMTP(self)

    def all_closed(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if len(self.closed) >= len(self.connections):
            d.callback(None)
        else:
            self.waiting_for_close.append(d)
        return d


class LoopbackTests(unittest.TestCase):
    """Real sockets on 127.0.0.1 / ::1, the real reactor as the clock."""

    timeout = 30

    def serve(self, interface: str = "127.0.0.1", **kw: Any) -> tuple[FakeSMTPFactory, int]:
        factory = FakeSMTPFactory(**kw)
        port = reactor.listenTCP(0, factory, interface=interface)  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.all_closed)
        return factory, port.getHost().port

    def send(
        self, address: str, port: int, recipients: list[str], message: bytes | str, **kw: Any
    ) -> defer.Deferred[DeliveryResult]:
        return deliver(
            (address, port),
            "gw.example.test",
            "alice@example.test",
            recipients,
            message,
            kw.pop("tls_options", None),
            reactor,
            **kw,
        )

    @defer.inlineCallbacks
    def test_per_recipient_replies_and_pipelining(self) -> Any:
        factory, port = self.serve()
        message = b"Subject: t\r\n\r\n.\r\n..\r\n.x\r\nend\r\n"
        result = yield self.send(
            "127.0.0.1",
            port,
            ["ok1@remote.test", "later@remote.test", "gone@remote.test", "ok2@remote.test"],
            message,
        )
        self.assertEqual(
            {r: reply.code for r, reply in result.replies.items()},
            {
                "ok1@remote.test": 250,
                "later@remote.test": 451,
                "gone@remote.test": 550,
                "ok2@remote.test": 250,
            },
        )
        self.assertIsNone(result.error)
        self.assertEqual(factory.pipelined, [True])
        [received] = factory.messages
        self.assertEqual(received.data, message)
        self.assertEqual(received.recipients, [b"ok1@remote.test", b"ok2@remote.test"])
        self.assertEqual(received.sender, b"<alice@example.test> SIZE=%d" % len(message))

    @defer.inlineCallbacks
    def test_ipv6_loopback(self) -> Any:
        try:
            socket.socket(socket.AF_INET6).bind(("::1", 0))
        except OSError:
            raise unittest.SkipTest("no IPv6 loopback") from None
        factory, port = self.serve("::1")
        result = yield self.send("::1", port, ["ok@remote.test"], b"hi\r\n")
        self.assertEqual(result.delivered, ["ok@remote.test"])
        self.assertEqual(result.remote, f"[::1]:{port}")
        self.assertEqual(factory.messages[0].data, b"hi\r\n")

    @defer.inlineCallbacks
    def test_connection_refused_is_temporary(self) -> Any:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        result = yield self.send("127.0.0.1", port, ["ok@remote.test"], b"hi\r\n")
        reply = result.replies["ok@remote.test"]
        self.assertEqual((reply.code, reply.enhanced), (451, "4.4.1"))
        self.assertTrue(result.try_next)

    @defer.inlineCallbacks
    def test_server_that_never_answers_times_out(self) -> Any:
        _factory, port = self.serve(banner=None)
        started = time.monotonic()
        result = yield self.send(
            "127.0.0.1",
            port,
            ["ok@remote.test"],
            b"hi\r\n",
            timeouts=Timeouts(greeting=0.3, quit=0.3),
        )
        self.assertLess(time.monotonic() - started, 10)
        reply = result.replies["ok@remote.test"]
        self.assertTrue(reply.temporary)
        self.assertIn("timed out while reading the greeting", reply.text)
        self.assertTrue(result.try_next)

    @defer.inlineCallbacks
    def test_server_closing_mid_data(self) -> Any:
        factory, port = self.serve(close_after_data_bytes=100_000)
        body = b"".join(b"line %d of a long message\r\n" % i for i in range(100_000))
        result = yield self.send("127.0.0.1", port, ["ok@remote.test", "gone@remote.test"], body)
        self.assertTrue(result.replies["ok@remote.test"].temporary)
        self.assertEqual(result.replies["gone@remote.test"].code, 550)
        self.assertTrue(result.try_next)
        self.assertEqual(factory.messages, [])

    @defer.inlineCallbacks
    def test_server_closing_after_the_dot(self) -> Any:
        factory, port = self.serve(after_dot="close")
        result = yield self.send("127.0.0.1", port, ["ok@remote.test"], b"hi\r\n")
        reply = result.replies["ok@remote.test"]
        self.assertTrue(reply.temporary)
        self.assertIn("possible duplicate", reply.text)
        self.assertFalse(result.try_next)
        self.assertEqual(len(factory.messages), 1)  # it did arrive: the duplicate risk is real

    @defer.inlineCallbacks
    def test_starttls_opportunistic_with_sni(self) -> Any:
        sni: list[str] = []
        factory, port = self.serve(
            extensions=[b"PIPELINING", b"STARTTLS", b"8BITMIME"],
            tls_options=ServerTLS(sni),
        )
        message = b"Subject: secret\r\n\r\n" + b".dot\r\n" * 50_000
        result = yield self.send(
            "127.0.0.1",
            port,
            ["ok@remote.test"],
            message,
            tls_options=OpportunisticTLS("mx.remote.test"),
        )
        self.assertEqual(result.delivered, ["ok@remote.test"])
        self.assertTrue(result.tls)
        [received] = factory.messages
        self.assertTrue(received.tls)
        self.assertEqual(received.data, message)
        self.assertEqual(sni, ["mx.remote.test"])

    @defer.inlineCallbacks
    def test_message_file_streamed(self) -> Any:
        factory, port = self.serve()
        path = Path(self.mktemp())
        path.write_bytes(b"Subject: f\n\n" + b".\n" * 70_000 + b"tail")
        result = yield self.send("127.0.0.1", port, ["ok@remote.test"], str(path))
        self.assertEqual(result.delivered, ["ok@remote.test"])
        self.assertEqual(
            factory.messages[0].data, b"Subject: f\r\n\r\n" + b".\r\n" * 70_000 + b"tail\r\n"
        )


class AttemptTests(unittest.TestCase):
    """attempt: walking MX hosts over loopback fake servers."""

    timeout = 30

    def setUp(self) -> None:
        self.ports: dict[str, int] = {}
        self.factories: dict[str, FakeSMTPFactory] = {}
        self.resolver = FakeResolver(
            {"remote.test": [(10, "mx1.remote.test"), (20, "mx2.remote.test")]},
            {"mx1.remote.test": ["127.0.2.1"], "mx2.remote.test": ["127.0.2.2"]},
        )

    def serve(self, address: str, **kw: Any) -> FakeSMTPFactory:
        factory = FakeSMTPFactory(**kw)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.all_closed)
        self.ports[address] = port.getHost().port
        self.factories[address] = factory
        return factory

    def refuse(self, address: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.ports[address] = probe.getsockname()[1]

    def endpoint(self, address: str, port: int) -> TCP4ClientEndpoint:
        self.assertEqual(port, 25)
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.ports[address])

    def attempt(
        self, recipients: list[str], route: Route | None = None, **kw: Any
    ) -> defer.Deferred[dict[str, Outcome]]:
        settings = OutboundSettings(
            helo_name="gw.example.test",
            own_names=("gw.example.test",),
            own_addresses=("127.0.0.10",),
            timeouts=Timeouts(greeting=5, quit=2),
            **kw,
        )
        return defer.ensureDeferred(
            attempt(
                route or Route(MX, "remote.test", 25, True),
                "alice@example.test",
                recipients,
                b"Subject: x\r\n\r\nhello\r\n",
                self.resolver,
                settings,
                reactor,
                self.endpoint,
                random.Random(1),
            )
        )

    @defer.inlineCallbacks
    def test_first_mx_down_second_takes_it(self) -> Any:
        self.refuse("127.0.2.1")
        mx2 = self.serve("127.0.2.2")
        outcomes = yield self.attempt(["ok@remote.test", "ok2@remote.test"])
        self.assertEqual(
            {r: (o.reply.code, o.remote_mta) for r, o in outcomes.items()},
            {
                "ok@remote.test": (250, "mx2.remote.test"),
                "ok2@remote.test": (250, "mx2.remote.test"),
            },
        )
        self.assertEqual(len(mx2.messages), 1)

    @defer.inlineCallbacks
    def test_recipient_replies_are_final_for_this_attempt(self) -> Any:
        mx1 = self.serve("127.0.2.1")
        mx2 = self.serve("127.0.2.2")
        outcomes = yield self.attempt(["ok@remote.test", "later@remote.test", "gone@remote.test"])
        self.assertEqual(outcomes["ok@remote.test"].reply.code, 250)
        self.assertEqual(outcomes["later@remote.test"].reply.code, 451)
        self.assertEqual(
            outcomes["gone@remote.test"],
            Outcome(outcomes["gone@remote.test"].reply, "mx1.remote.test"),
        )
        self.assertEqual(outcomes["gone@remote.test"].reply.code, 550)
        self.assertEqual(len(mx1.messages), 1)
        self.assertEqual(mx2.connections, [])  # a 451 to RCPT is not a reason to try the next MX

    @defer.inlineCallbacks
    def test_refused_greeting_moves_on(self) -> Any:
        self.serve("127.0.2.1", banner=b"554 5.7.1 go away")
        self.serve("127.0.2.2")
        outcomes = yield self.attempt(["ok@remote.test"])
        self.assertEqual(outcomes["ok@remote.test"].reply.code, 250)
        self.assertEqual(outcomes["ok@remote.test"].remote_mta, "mx2.remote.test")

    @defer.inlineCallbacks
    def test_all_down_is_temporary_then_fallback(self) -> Any:
        self.refuse("127.0.2.1")
        self.refuse("127.0.2.2")
        outcomes = yield self.attempt(["ok@remote.test"])
        self.assertTrue(outcomes["ok@remote.test"].reply.temporary)
        fallback = self.serve("127.0.2.9")
        outcomes = yield self.attempt(
            ["ok@remote.test"], fallback=Route(STATIC, "127.0.2.9", 25, False)
        )
        self.assertEqual(outcomes["ok@remote.test"].reply.code, 250)
        self.assertEqual(len(fallback.messages), 1)

    @defer.inlineCallbacks
    def test_broken_tls_is_retried_in_the_clear(self) -> Any:
        mx1 = self.serve("127.0.2.1", extensions=[b"PIPELINING", b"STARTTLS"])
        outcomes = yield self.attempt(["ok@remote.test"])
        self.assertEqual(outcomes["ok@remote.test"].reply.code, 250)
        self.assertEqual(len(mx1.connections), 2)
        self.assertFalse(mx1.messages[0].tls)

    @defer.inlineCallbacks
    def test_dns_outcomes(self) -> Any:
        self.resolver.mx_records["null.test"] = [(0, "")]
        outcomes = yield self.attempt(["a@null.test"], Route(MX, "null.test", 25, True))
        self.assertEqual(outcomes["a@null.test"], Outcome(outcomes["a@null.test"].reply, None))
        self.assertEqual(outcomes["a@null.test"].reply.enhanced, "5.1.10")
        self.resolver.mx_records["mine.test"] = [(10, "gw.example.test")]
        outcomes = yield self.attempt(["a@mine.test"], Route(MX, "mine.test", 25, True))
        self.assertEqual(outcomes["a@mine.test"].reply.enhanced, "5.4.6")
        # TryNullMXList: straight to the domain's own address
        self.resolver.address_records["mine.test"] = ["127.0.2.7"]
        self.serve("127.0.2.7")
        outcomes = yield self.attempt(
            ["ok@mine.test"], Route(MX, "mine.test", 25, True), self_is_best_mx="addresses"
        )
        self.assertEqual(outcomes["ok@mine.test"].reply.code, 250)


# -- Postfix smtp-sink ----------------------------------------------------------------------------


def dotted_message(size: int = 5 * 1024 * 1024) -> bytes:
    """About ``size`` bytes whose "." lines start at every offset -4..+4 around 16 KiB boundaries."""
    out = bytearray(b"From: alice@example.test\r\nSubject: dots\r\n\r\n")
    dots = [b".\r\n", b"..\r\n", b".dot line\r\n", b"...\r\n"]
    boundary = 16384
    k = 1
    while boundary * k < size:
        target = boundary * k + (k % 9) - 4
        gap = target - len(out)
        if gap >= 3:
            out += b"f" * (gap - 2) + b"\r\n"
            assert len(out) == target
            out += dots[k % len(dots)]
        k += 1
    return bytes(out) + b"last line\r\n"




@pytest.mark.integration
class SmtpSinkTests(unittest.TestCase):
    """Interoperation with Postfix's smtp-sink (Debian package postfix), which dumps what it received."""

    timeout = 60

    def setUp(self) -> None:
        if SMTP_SINK is None:
            raise unittest.SkipTest("smtp-sink (Debian package postfix) is not installed")
        self.dump_dir = tempfile.mkdtemp(prefix="smtp-sink-")
        os.chmod(self.dump_dir, 0o777)
        self.addCleanup(shutil.rmtree, self.dump_dir, True)
        self.port = free_port()
        command = [SMTP_SINK, "-d", os.path.join(self.dump_dir, "msg.")]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]
        command += [f"127.0.0.1:{self.port}", "10"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.addCleanup(self._stop)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"smtp-sink did not start: {self.process.stderr.read() if self.process.stderr else ''!r}"
                    ) from None
                time.sleep(0.05)

    def _stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        if self.process.stderr:
            self.process.stderr.close()

    def dumped(self) -> bytes:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            files = sorted(Path(self.dump_dir).glob("msg.*"))
            if files:
                data = files[0].read_bytes()
                if data.endswith(b"last line\n\n"):
                    return data
            time.sleep(0.05)
        raise AssertionError("smtp-sink wrote no complete dump")

    @defer.inlineCallbacks
    def test_five_megabytes_with_dots_around_every_16k_boundary(self) -> Any:
        message = dotted_message()
        self.assertGreater(len(message), 5_000_000)
        path = Path(self.mktemp())
        path.write_bytes(message)
        result = yield deliver(
            ("127.0.0.1", self.port),
            "gw.example.test",
            "alice@example.test",
            ["bob@remote.test", "carol@remote.test"],
            str(path),
            None,
            reactor,
        )
        self.assertIsNone(result.error, result.transcript[-5:])
        self.assertEqual(result.delivered, ["bob@remote.test", "carol@remote.test"])
        dump = self.dumped()
        # smtp-sink's dump: X- headers with the envelope, its Received header, then the message
        # with LF line ends (its record format), then a blank separator line.
        head, _, rest = dump.partition(b"Received: from ")
        self.assertIn(b"X-Mail-Args: <alice@example.test>\n", head)
        self.assertIn(b"X-Rcpt-Args: <bob@remote.test>\n", head)
        self.assertIn(b"X-Rcpt-Args: <carol@remote.test>\n", head)
        lines = rest.split(b"\n")
        i = 1
        while lines[i].startswith((b"\t", b" ")):
            i += 1
        body = b"\n".join(lines[i:])
        expected = message.replace(b"\r\n", b"\n") + b"\n"
        self.assertEqual(len(body), len(expected))
        self.assertEqual(body, expected)
