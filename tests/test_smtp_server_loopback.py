"""The SMTP server on a real loopback socket: smtplib with STARTTLS, a raw STARTTLS injection
attempt through a real TLS handshake, and swaks (Debian package swaks).

The certificate is a throwaway self-signed one made with ``cryptography`` in the test.
"""

from __future__ import annotations

import datetime
import shutil
import smtplib
import socket
import ssl
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import reactor as _reactor
from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial import unittest

from appliance.mail.smtp import SMTPServer, SMTPServerFactory
from tests.test_smtp_support import HOSTNAME, FakeRecipients, FakeStore, body_of, make_policy

pytestmark = pytest.mark.integration
reactor: Any = _reactor


def self_signed_options() -> CertificateOptions:
    """Server TLS options with a fresh self-signed certificate for HOSTNAME."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOSTNAME)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
        certificate=crypto.X509.from_cryptography(certificate),
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def read_reply(sock: Any) -> list[bytes]:
    """Read one (possibly multi-line) SMTP reply, a byte at a time so nothing is over-read."""
    lines: list[bytes] = []
    while True:
        line = b""
        while not line.endswith(b"\r\n"):
            char = sock.recv(1)
            if not char:
                raise ConnectionError(f"closed after {lines!r} {line!r}")
            line += char
        lines.append(line[:-2])
        if line[3:4] == b" ":
            return lines


class LoopbackTests(unittest.TestCase):
    """Real sockets on 127.0.0.1, port 0; the client runs in a thread or a child process."""

    def setUp(self) -> None:
        self.store = FakeStore()
        self.recipients = FakeRecipients()
        self.lost: list[Deferred[None]] = []
        lost = self.lost

        class Tracked(SMTPServer):
            def connectionMade(self) -> None:
                self.gone: Deferred[None] = Deferred()
                lost.append(self.gone)
                super().connectionMade()

            def connectionLost(self, reason: Failure = connectionDone) -> None:
                super().connectionLost(reason)
                self.gone.callback(None)

        factory = SMTPServerFactory(
            "outside",
            HOSTNAME,
            self.store,
            self.recipients,
            make_policy(),
            self_signed_options(),
            reactor,
        )
        factory.protocol = Tracked
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.portnum = self.port.getHost().port

    @inlineCallbacks
    def tearDown(self) -> Any:  # type: ignore[override]
        yield self.port.stopListening()
        yield DeferredList(self.lost)

    @inlineCallbacks
    def test_smtplib_with_starttls(self) -> Any:
        port = self.portnum

        def client() -> tuple[str | None, dict[str, Any]]:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as smtp:
                smtp.ehlo()
                assert smtp.has_extn("starttls") and smtp.has_extn("pipelining")
                smtp.starttls(context=client_context())
                smtp.ehlo()
                assert not smtp.has_extn("starttls")
                refused = smtp.sendmail(
                    "someone@remote.test",
                    ["bob@example.test"],
                    b"Subject: test\r\n\r\nline one\r\n.leading dot\r\n",
                )
                version = smtp.sock.version()  # type: ignore[union-attr]
            return version, refused

        version, refused = yield threads.deferToThread(client)
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        self.assertEqual(refused, {})
        [message] = self.store.committed
        self.assertEqual(body_of(message), b"Subject: test\r\n\r\nline one\r\n.leading dot\r\n")
        self.assertEqual(message.envelope.protocol, "ESMTPS")  # type: ignore[union-attr]

    @inlineCallbacks
    def test_plaintext_injected_before_the_handshake_is_discarded(self) -> Any:
        port = self.portnum

        def client() -> list[list[bytes]]:
            replies = []
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                replies.append(read_reply(sock))
                sock.sendall(b"EHLO client.test\r\n")
                replies.append(read_reply(sock))
                # One segment: STARTTLS plus commands an attacker in the path appended.
                sock.sendall(b"STARTTLS\r\nMAIL FROM:<evil@remote.test>\r\n")
                replies.append(read_reply(sock))
                with client_context().wrap_socket(sock, server_hostname=HOSTNAME) as tls:
                    tls.sendall(b"EHLO client.test\r\n")
                    replies.append(read_reply(tls))
                    tls.sendall(b"RCPT TO:<bob@example.test>\r\n")
                    replies.append(read_reply(tls))
                    tls.sendall(b"QUIT\r\n")
                    replies.append(read_reply(tls))
            return replies

        replies = yield threads.deferToThread(client)
        self.assertEqual(replies[2], [b"220 2.0.0 Ready to start TLS"])
        self.assertNotIn(b"250-STARTTLS", replies[3])
        self.assertNotIn(b"250 STARTTLS", replies[3])
        self.assertEqual(replies[4], [b"503 5.5.1 Error: need MAIL command"])
        self.assertEqual(replies[5], [b"221 2.0.0 Bye"])

    @inlineCallbacks
    def test_swaks_transaction(self) -> Any:
        swaks = shutil.which("swaks")
        if swaks is None:
            raise unittest.SkipTest("swaks is not installed (Debian package swaks)")
        out, err, code = yield getProcessOutputAndValue(
            swaks,
            [
                "--server", "127.0.0.1",
                "--port", str(self.portnum),
                "--helo", "client.test",
                "--from", "someone@remote.test",
                "--to", "bob@example.test",
                "--tls",
                "--pipeline",
                "--header", "Subject: from swaks",
                "--body", "hello from swaks",
            ],
        )  # fmt: skip
        self.assertEqual(code, 0, (out + err).decode("utf-8", "replace"))
        [message] = self.store.committed
        self.assertIn(b"Subject: from swaks\r\n", body_of(message))
        self.assertIn(b"hello from swaks\r\n", body_of(message))
        self.assertEqual(message.envelope.recipients, ("bob@example.test",))  # type: ignore[union-attr]
