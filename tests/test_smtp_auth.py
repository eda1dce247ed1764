"""SMTP AUTH (RFC 4954) on the ESMTP server: PLAIN and LOGIN, only under TLS, with throttling.

The first part drives the protocol on an in-memory transport with a fake
directory and ``task.Clock``; the second part (class ``LoopbackAuthTests``)
runs real listeners on 127.0.0.1 with a self-signed certificate from
``appliance.tls.make_self_signed`` and talks to them with smtplib and swaks.
"""

from __future__ import annotations

import base64
import re
import shutil
import smtplib
import ssl
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor as _reactor
from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredList, fail, inlineCallbacks, succeed
from twisted.internet.protocol import connectionDone
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial import unittest

from appliance.directory.base import DirectoryUnavailable, User
from appliance.directory.filedb import FileDirectory
from appliance.directory.passwords import hash_password
from appliance.directory.throttle import LoginThrottle
from appliance.mail.smtp import SMTPServer, SMTPServerFactory
from appliance.mail.submission import SenderPolicy
from appliance.tls import load_server_options, make_self_signed
from tests.test_smtp_support import (
    HOSTNAME,
    INSIDE_CLIENT,
    OUTSIDE_CLIENT,
    FakeRecipients,
    FakeStore,
    Session,
    body_of,
    make_policy,
    transaction,
)

reactor: Any = _reactor

ALICE = User(
    login="alice@example.test",
    mailbox="example.test/alice",
    addresses=("alice@example.test", "a.liddell@example.test", "postmaster@example.test"),
)
BOB = User(login="bob@example.test", mailbox="example.test/bob", addresses=("bob@example.test",))


class FakeDirectory:
    """Passwords in a dict; ``manual`` leaves the Deferreds to the test; ``down`` fails them."""

    def __init__(self) -> None:
        self.users = {"alice@example.test": (ALICE, "wonderland"), "bob@example.test": (BOB, "b")}
        self.manual = False
        self.down = False
        self.pending: list[Deferred[User | None]] = []
        self.asked: list[tuple[str, str]] = []

    def find_user(self, address: str) -> Deferred[User | None]:
        for user, _ in self.users.values():
            if address in user.addresses:
                return succeed(user)
        return succeed(None)

    def authenticate(self, login: str, password: str) -> Deferred[User | None]:
        self.asked.append((login, password))
        if self.down:
            return fail(DirectoryUnavailable("ldap down"))
        if self.manual:
            d: Deferred[User | None] = Deferred()
            self.pending.append(d)
            return d
        entry = self.users.get(login.lower())
        return succeed(entry[0] if entry is not None and entry[1] == password else None)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plain(login: str, password: str, authzid: str = "") -> bytes:
    return b64(f"{authzid}\0{login}\0{password}".encode())


def tls_session(
    client: str = OUTSIDE_CLIENT, listener: str = "submission", **kwargs: Any
) -> tuple[Session, FakeDirectory]:
    """A session that already did STARTTLS and EHLO, with AUTH enabled."""
    directory = FakeDirectory()
    kwargs.setdefault("sender_policy", SenderPolicy(extension_separators="+"))
    session = Session(
        client=client, listener=listener, tls_options=object(), authenticator=directory, **kwargs
    )
    session.ehlo()
    assert session.send(b"STARTTLS\r\n") == ["220 2.0.0 Ready to start TLS"]
    session.ehlo()
    return session, directory


def authenticated(**kwargs: Any) -> tuple[Session, FakeDirectory]:
    session, directory = tls_session(**kwargs)
    assert session.send(b"AUTH PLAIN " + plain("alice@example.test", "wonderland") + b"\r\n") == [
        "235 2.7.0 Authentication successful"
    ]
    return session, directory


# ---------------------------------------------------------------- never before TLS


def test_auth_is_not_advertised_or_accepted_before_tls() -> None:
    directory = FakeDirectory()
    session = Session(tls_options=object(), authenticator=directory)
    replies = session.ehlo()
    assert not any("AUTH" in line for line in replies)
    assert session.send(b"AUTH PLAIN " + plain("alice@example.test", "wonderland") + b"\r\n") == [
        "538 5.7.11 Encryption required for requested authentication mechanism"
    ]
    assert session.send(b"AUTH LOGIN\r\n")[0].startswith("538 5.7.11")
    assert directory.asked == []
    assert session.protocol.authenticated_user is None


def test_auth_is_advertised_after_starttls_and_with_implicit_tls() -> None:
    session, _ = tls_session()
    assert session.ehlo()[-1] == "250 AUTH PLAIN LOGIN"
    implicit = Session(tls_options=object(), implicit_tls=True, authenticator=FakeDirectory())
    assert implicit.ehlo()[-1] == "250 AUTH PLAIN LOGIN"


def test_without_an_authenticator_auth_is_unknown() -> None:
    session = Session(tls_options=object(), implicit_tls=True)
    assert not any("AUTH" in line for line in session.ehlo())
    assert session.codes(b"AUTH PLAIN\r\n") == ["500"]


# ---------------------------------------------------------------- PLAIN and LOGIN


def test_plain_with_initial_response() -> None:
    session, directory = authenticated()
    assert directory.asked == [("alice@example.test", "wonderland")]
    assert session.protocol.authenticated_user == "alice@example.test"
    assert session.protocol.protocol_name() == "ESMTPSA"


def test_plain_with_a_challenge() -> None:
    session, _ = tls_session()
    assert session.send(b"AUTH PLAIN\r\n") == ["334 "]
    assert session.send(plain("alice@example.test", "wonderland") + b"\r\n") == [
        "235 2.7.0 Authentication successful"
    ]


def test_plain_with_matching_authzid_and_the_empty_initial_response() -> None:
    session, _ = tls_session()
    response = plain("alice@example.test", "wonderland", authzid="alice@example.test")
    assert session.codes(b"AUTH PLAIN " + response + b"\r\n") == ["235"]
    other, _ = tls_session()
    assert other.send(b"AUTH PLAIN =\r\n") == ["501 5.5.2 Error: malformed authentication response"]


def test_plain_acting_as_another_user_is_refused() -> None:
    session, directory = tls_session()
    response = plain("alice@example.test", "wonderland", authzid="bob@example.test")
    assert session.send(b"AUTH PLAIN " + response + b"\r\n") == [
        "535 5.7.8 Error: authentication failed"
    ]
    assert directory.asked == []
    assert session.protocol.authenticated_user is None


def test_login_mechanism() -> None:
    session, _ = tls_session()
    assert session.send(b"AUTH LOGIN\r\n") == ["334 VXNlcm5hbWU6"]
    assert session.send(b64(b"alice@example.test") + b"\r\n") == ["334 UGFzc3dvcmQ6"]
    assert session.send(b64(b"wonderland") + b"\r\n") == ["235 2.7.0 Authentication successful"]
    assert session.protocol.authenticated_user == "alice@example.test"
    # LOGIN with the user name as initial response (RFC 4954 allows it; Outlook sends it).
    other, _ = tls_session()
    assert other.send(b"AUTH login " + b64(b"alice@example.test") + b"\r\n") == ["334 UGFzc3dvcmQ6"]
    assert other.codes(b64(b"wonderland") + b"\r\n") == ["235"]


def test_wrong_password_and_unknown_user() -> None:
    session, _ = tls_session()
    assert session.send(b"AUTH PLAIN " + plain("alice@example.test", "rabbit") + b"\r\n") == [
        "535 5.7.8 Error: authentication failed"
    ]
    assert session.send(b"AUTH PLAIN " + plain("carol@example.test", "x") + b"\r\n") == [
        "535 5.7.8 Error: authentication failed"
    ]
    assert session.protocol.authenticated_user is None
    # The session goes on: a right password still works.
    assert session.codes(b"AUTH PLAIN " + plain("alice@example.test", "wonderland") + b"\r\n") == [
        "235"
    ]


@pytest.mark.parametrize(
    ("lines", "last"),
    [
        ([b"AUTH PLAIN not*base64\r\n"], "501 5.5.2 Cannot decode response"),
        ([b"AUTH PLAIN\r\n", b"%%%\r\n"], "501 5.5.2 Cannot decode response"),
        ([b"AUTH PLAIN\r\n", b"*\r\n"], "501 5.7.0 Authentication aborted"),
        ([b"AUTH LOGIN\r\n", b"*\r\n"], "501 5.7.0 Authentication aborted"),
        ([b"AUTH LOGIN\r\n", b64(b"alice@example.test") + b"\r\n", b"*\r\n"], "501 5.7.0"),
        ([b"AUTH PLAIN " + b64(b"no-separators") + b"\r\n"], "501 5.5.2"),
        ([b"AUTH PLAIN " + b64(b"\0alice\xff\0pw") + b"\r\n"], "501 5.5.2"),
        ([b"AUTH CRAM-MD5\r\n"], "504 5.5.4 Unrecognized authentication type"),
        ([b"AUTH\r\n"], "501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
        ([b"AUTH PLAIN a b\r\n"], "501 5.5.4"),
    ],
)
def test_malformed_exchanges_change_nothing(lines: list[bytes], last: str) -> None:
    session, directory = tls_session()
    replies: list[str] = []
    for line in lines:
        replies = session.send(line)
    assert replies[-1].startswith(last)
    assert directory.asked == []
    assert session.protocol.authenticated_user is None
    # Back in command mode: the next line is a command again.
    assert session.send(b"NOOP\r\n") == ["250 2.0.0 Ok"]


def test_an_over_long_response_line_ends_the_exchange() -> None:
    session, directory = tls_session()
    assert session.send(b"AUTH PLAIN\r\n") == ["334 "]
    assert session.send(b"A" * 20000 + b"\r\n") == ["500 5.5.2 Error: line too long"]
    assert session.send(b"NOOP\r\n") == ["250 2.0.0 Ok"]
    assert directory.asked == []


def test_a_long_response_within_the_rfc_limit_is_taken() -> None:
    session, directory = tls_session()
    assert session.send(b"AUTH PLAIN\r\n") == ["334 "]
    long_password = "p" * 250
    assert session.codes(plain("alice@example.test", long_password) + b"\r\n") == ["535"]
    assert directory.asked == [("alice@example.test", long_password)]
    # The command line limit is back to 512 octets.
    assert session.send(b"NOOP " + b"x" * 600 + b"\r\n") == ["500 5.5.2 Error: line too long"]


def test_state_errors() -> None:
    directory = FakeDirectory()
    session = Session(tls_options=object(), implicit_tls=True, authenticator=directory)
    session.output()
    assert session.send(b"AUTH PLAIN " + plain("alice@example.test", "wonderland") + b"\r\n") == [
        "503 5.5.1 Error: send EHLO first"
    ]
    session.ehlo()
    session.send(b"MAIL FROM:<x@remote.test>\r\n")
    assert session.send(b"AUTH PLAIN " + plain("alice@example.test", "wonderland") + b"\r\n") == [
        "503 5.5.1 Error: MAIL transaction in progress"
    ]
    session.send(b"RSET\r\n")
    assert session.codes(b"AUTH PLAIN " + plain("alice@example.test", "wonderland") + b"\r\n") == [
        "235"
    ]
    assert session.send(b"AUTH PLAIN " + plain("alice@example.test", "wonderland") + b"\r\n") == [
        "503 5.5.1 Error: already authenticated"
    ]


def test_directory_unavailable_is_temporary() -> None:
    session, directory = tls_session()
    directory.down = True
    assert session.send(b"AUTH PLAIN " + plain("alice@example.test", "wonderland") + b"\r\n") == [
        "454 4.7.0 Temporary authentication failure"
    ]
    assert session.protocol.authenticated_user is None


def test_pipelined_commands_wait_for_the_password_check() -> None:
    session, directory = tls_session()
    directory.manual = True
    replies = session.send(
        b"AUTH PLAIN "
        + plain("alice@example.test", "wonderland")
        + b"\r\nMAIL FROM:<alice@example.test>\r\n"
    )
    assert replies == []
    assert session.transport.producerState == "paused"
    directory.pending[0].callback(ALICE)
    assert session.lines() == ["235 2.7.0 Authentication successful", "250 2.1.0 Ok"]


def test_starttls_forgets_the_authentication() -> None:
    directory = FakeDirectory()
    session = Session(tls_options=object(), authenticator=directory)
    session.ehlo()
    session.protocol.auth_user = ALICE
    session.protocol.authenticated_user = ALICE.login
    session.send(b"STARTTLS\r\n")
    assert session.protocol.auth_user is None and session.protocol.authenticated_user is None


# ---------------------------------------------------------------- submission policy


def test_submission_requires_auth_before_mail() -> None:
    session, _ = tls_session(require_auth=True)
    assert session.send(b"MAIL FROM:<alice@example.test>\r\n") == [
        "530 5.7.0 Authentication required"
    ]


@pytest.mark.parametrize(
    "sender",
    [
        "alice@example.test",
        "ALICE@Example.Test",
        "a.liddell@example.test",
        "postmaster@example.test",
        "alice+lists@example.test",
        "",
    ],
)
def test_user_may_send_as_own_addresses(sender: str) -> None:
    session, _ = authenticated(require_auth=True)
    assert session.send(f"MAIL FROM:<{sender}>\r\n".encode()) == ["250 2.1.0 Ok"]
    assert session.send(b"RCPT TO:<friend@elsewhere.test>\r\n") == ["250 2.1.5 Ok"]


@pytest.mark.parametrize(
    "sender", ["bob@example.test", "alice@elsewhere.test", "alicex@example.test", "x+alice@a.test"]
)
def test_user_may_not_send_as_others(sender: str) -> None:
    session, _ = authenticated(require_auth=True)
    assert session.send(f"MAIL FROM:<{sender}>\r\n".encode()) == [
        "553 5.7.1 Sender address rejected: not owned by user alice@example.test"
    ]
    assert session.send(b"RCPT TO:<friend@elsewhere.test>\r\n") == [
        "503 5.5.1 Error: need MAIL command"
    ]


def test_allow_any_sender() -> None:
    session, _ = authenticated(sender_policy=SenderPolicy(allow_any_sender=True))
    assert session.codes(b"MAIL FROM:<bob@example.test>\r\n") == ["250"]


def test_unauthenticated_sessions_are_not_judged_by_the_sender_policy() -> None:
    session, _ = tls_session(listener="outside")
    assert session.codes(b"MAIL FROM:<bob@example.test>\r\n") == ["250"]
    assert session.send(b"RCPT TO:<friend@elsewhere.test>\r\n") == ["550 5.7.1 Relaying denied"]


def test_authenticated_mail_gets_message_id_and_date() -> None:
    session, _ = authenticated(require_auth=True)
    replies = session.send(
        transaction(
            "alice@example.test",
            ("friend@elsewhere.test",),
            b"From: Alice <alice@example.test>\r\nSubject: hi\r\n\r\nbody\r\n",
        )
    )
    assert replies[-1].startswith("250 2.0.0 Ok: queued as ")
    [message] = session.store.committed
    body = body_of(message)
    head, _, rest = body.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[:2] == [b"From: Alice <alice@example.test>", b"Subject: hi"]
    assert re.fullmatch(rb"Message-ID: <\d{14}\.Q0001@mail\.example\.test>", lines[2])
    assert lines[3].startswith(b"Date: ") and lines[3].endswith(b" +0000")
    assert rest == b"body\r\n"
    assert message.envelope is not None
    assert message.envelope.authenticated_user == "alice@example.test"
    assert message.envelope.recipients == ("friend@elsewhere.test",)


def test_existing_message_id_and_date_are_kept() -> None:
    session, _ = authenticated()
    original = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nmessage-id: <x@y>\r\n\r\nbody\r\n"
    session.send(transaction("alice@example.test", ("bob@example.test",), original))
    assert body_of(session.store.committed[0]) == original


def test_unauthenticated_mail_is_stored_unchanged() -> None:
    session, _ = tls_session(listener="outside")
    session.send(transaction(body=b"Subject: x\r\n\r\nbody\r\n"))
    assert body_of(session.store.committed[0]) == b"Subject: x\r\n\r\nbody\r\n"


def test_header_completion_with_a_body_sent_one_octet_at_a_time() -> None:
    session, _ = authenticated()
    body = b"Subject: slow\r\n\r\n.. dotted\r\nline\r\n"
    session.send_slowly(transaction("alice@example.test", ("bob@example.test",), body))
    stored = body_of(session.store.committed[0])
    assert stored.startswith(b"Subject: slow\r\nMessage-ID: <")
    assert stored.endswith(b"\r\n\r\n. dotted\r\nline\r\n")


def test_oversized_authenticated_message_is_refused_and_nothing_stored() -> None:
    session, _ = authenticated(max_message_size=2000)
    replies = session.send(
        transaction("alice@example.test", ("bob@example.test",), b"S: x\r\n" + b"y\r\n" * 2000)
    )
    assert replies[-1] == "552 5.3.4 Error: message too big for system"
    assert session.store.committed == []
    assert session.store.messages[0].aborted


# ---------------------------------------------------------------- throttling (task.Clock)


def wrong(session: Session) -> list[str]:
    return session.send(b"AUTH PLAIN " + plain("alice@example.test", "guess") + b"\r\n")


def test_brute_force_is_slowed_then_refused_while_others_log_in() -> None:
    attacker, directory = tls_session(max_errors=100)
    throttle = LoginThrottle(attacker.clock, delays=(0, 1, 2, 4), max_failures=10, cooldown=600)
    attacker.factory.throttle = throttle
    assert wrong(attacker) == ["535 5.7.8 Error: authentication failed"]
    for expected_delay in (1, 2, 4, 4, 4, 4, 4, 4):
        assert wrong(attacker) == []  # stalled
        attacker.clock.advance(expected_delay - 0.01)
        assert attacker.lines() == []
        attacker.clock.advance(0.01)
        assert attacker.lines() == ["535 5.7.8 Error: authentication failed"]
    assert throttle.failures(OUTSIDE_CLIENT) == 9
    assert wrong(attacker) == []
    attacker.clock.advance(4)
    assert attacker.lines() == ["535 5.7.8 Error: authentication failed"]
    # Now refused outright, even with the right password, without asking the directory.
    asked = len(directory.asked)
    for _ in range(10):
        assert wrong(attacker) == [
            "454 4.7.0 Too many failed authentication attempts, try again later"
        ]
    assert attacker.codes(b"AUTH PLAIN " + plain("alice@example.test", "wonderland") + b"\r\n") == [
        "454"
    ]
    assert len(directory.asked) == asked
    # Another address is unaffected (same throttle, same clock).
    other, _ = tls_session(client=INSIDE_CLIENT)
    other.factory.throttle = throttle
    assert other.codes(b"AUTH PLAIN " + plain("alice@example.test", "wonderland") + b"\r\n") == [
        "235"
    ]
    # After the cool-down the attacker may try again (and is answered at once).
    throttle.clock.advance(600)
    attacker, _ = tls_session()
    attacker.factory.throttle = throttle
    assert not throttle.blocked(OUTSIDE_CLIENT)
    assert attacker.codes(b"AUTH PLAIN " + plain("alice@example.test", "wonderland") + b"\r\n") == [
        "235"
    ]


def test_connection_lost_while_a_failure_is_stalled() -> None:
    session, _ = tls_session()
    session.factory.throttle = LoginThrottle(session.clock, delays=(5,))
    assert wrong(session) == []
    session.protocol.connectionLost(Failure(ConnectionError("gone")))
    session.clock.advance(5)
    assert session.lines() == []


# ---------------------------------------------------------------- real sockets


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@pytest.mark.integration
class LoopbackAuthTests(unittest.TestCase):
    """Port 587-style (STARTTLS) and 465-style (implicit TLS) listeners on 127.0.0.1, port 0."""

    def setUp(self) -> None:
        tmp = Path(self.mktemp())
        tmp.mkdir(parents=True)
        cert, key = make_self_signed((HOSTNAME, "127.0.0.1"))
        (tmp / "cert.pem").write_bytes(cert)
        (tmp / "key.pem").write_bytes(key)
        tls = load_server_options(tmp / "cert.pem", tmp / "key.pem")
        users = tmp / "users"
        users.write_text(
            f"alice@example.test:{hash_password('wonderland', n=1024)}::a.liddell@example.test\n"
            f"bob@example.test:{hash_password('builder', n=1024)}\n"
        )
        self.directory = FileDirectory(str(users), reactor)
        self.store = FakeStore()
        self.throttle = LoginThrottle(reactor, delays=(0, 0.01, 0.02), max_failures=6)
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

        def factory(implicit: bool) -> SMTPServerFactory:
            f = SMTPServerFactory(
                "submission",
                HOSTNAME,
                self.store,
                FakeRecipients(),
                make_policy(),
                tls,
                reactor,
                require_auth=True,
                implicit_tls=implicit,
                authenticator=self.directory,
                throttle=self.throttle,
                sender_policy=SenderPolicy(),
            )
            f.protocol = Tracked
            return f

        self.port = reactor.listenTCP(0, factory(False), interface="127.0.0.1")
        wrapped = TLSMemoryBIOFactory(tls, False, factory(True))  # type: ignore[arg-type]
        self.tls_port = reactor.listenTCP(0, wrapped, interface="127.0.0.1")
        self.portnum = self.port.getHost().port
        self.tls_portnum = self.tls_port.getHost().port

    @inlineCallbacks
    def tearDown(self) -> Any:  # type: ignore[override]
        yield self.port.stopListening()
        yield self.tls_port.stopListening()
        yield DeferredList(self.lost)

    @inlineCallbacks
    def test_submission_with_starttls(self) -> Any:
        port = self.portnum

        def client() -> dict[str, Any]:
            out: dict[str, Any] = {}
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as smtp:
                smtp.ehlo()
                out["auth_before_tls"] = smtp.has_extn("auth")
                try:
                    smtp.login("alice@example.test", "wonderland")
                except smtplib.SMTPNotSupportedError:
                    out["login_before_tls"] = "refused"
                out["raw_auth_before_tls"] = smtp.docmd("AUTH", "PLAIN")
                smtp.starttls(context=client_context())
                smtp.ehlo()
                out["mechanisms"] = smtp.esmtp_features.get("auth", "").strip()
                try:
                    smtp.login("alice@example.test", "wrong")
                except smtplib.SMTPAuthenticationError as error:
                    out["wrong"] = (error.smtp_code, error.smtp_error)
                smtp.user, smtp.password = "alice@example.test", "wonderland"
                out["login"] = smtp.auth("LOGIN", smtp.auth_login)
                out["own"] = smtp.sendmail(
                    "alice@example.test", ["friend@elsewhere.test"], b"Subject: 1\r\n\r\nx\r\n"
                )
                out["alias"] = smtp.sendmail(
                    "a.liddell@example.test", ["friend@elsewhere.test"], b"Subject: 2\r\n\r\ny\r\n"
                )
                try:
                    smtp.sendmail("bob@example.test", ["friend@elsewhere.test"], b"\r\n")
                except smtplib.SMTPSenderRefused as error:
                    out["bob"] = (error.smtp_code, error.smtp_error)
            return out

        out = yield threads.deferToThread(client)
        self.assertFalse(out["auth_before_tls"])
        self.assertEqual(out["login_before_tls"], "refused")
        self.assertEqual(out["raw_auth_before_tls"][0], 538)
        self.assertEqual(out["mechanisms"], "PLAIN LOGIN")
        self.assertEqual(out["wrong"], (535, b"5.7.8 Error: authentication failed"))
        self.assertEqual(out["login"][0], 235)
        self.assertEqual(out["own"], {})
        self.assertEqual(out["alias"], {})
        self.assertEqual(out["bob"][0], 553)
        self.assertEqual(len(self.store.committed), 2)
        for message in self.store.committed:
            assert message.envelope is not None
            self.assertEqual(message.envelope.recipients, ("friend@elsewhere.test",))
            self.assertEqual(message.envelope.protocol, "ESMTPSA")
            self.assertIn(b"\r\nMessage-ID: <", body_of(message))

    @inlineCallbacks
    def test_implicit_tls_with_plain(self) -> Any:
        port = self.tls_portnum

        def client() -> tuple[Any, Any, dict[str, Any]]:
            with smtplib.SMTP_SSL(
                "127.0.0.1",
                port,
                local_hostname="client.test",
                timeout=10,
                context=client_context(),
            ) as smtp:
                smtp.ehlo()
                mechanisms = smtp.esmtp_features.get("auth", "").strip()
                smtp.user, smtp.password = "alice@example.test", "wonderland"
                login = smtp.auth("PLAIN", smtp.auth_plain)
                refused = smtp.sendmail(
                    "alice@example.test", ["bob@example.test"], b"Subject: 465\r\n\r\nz\r\n"
                )
            return mechanisms, login, refused

        mechanisms, login, refused = yield threads.deferToThread(client)
        self.assertEqual(mechanisms, "PLAIN LOGIN")
        self.assertEqual(login[0], 235)
        self.assertEqual(refused, {})
        self.assertEqual(len(self.store.committed), 1)

    @inlineCallbacks
    def test_brute_force_from_one_address(self) -> Any:
        port = self.portnum

        def attack() -> list[int]:
            codes = []
            with smtplib.SMTP("127.0.0.1", port, local_hostname="evil.test", timeout=10) as smtp:
                smtp.starttls(context=client_context())
                smtp.ehlo()
                for attempt in range(20):
                    password = f"guess{attempt}"
                    response = b64(f"\0alice@example.test\0{password}".encode()).decode()
                    code, _ = smtp.docmd("AUTH", "PLAIN " + response)
                    codes.append(code)
            return codes

        def legitimate() -> tuple[int, bytes]:
            with smtplib.SMTP(
                "127.0.0.1",
                port,
                local_hostname="good.test",
                timeout=10,
                source_address=("127.0.0.2", 0),
            ) as smtp:
                smtp.starttls(context=client_context())
                smtp.ehlo()
                return smtp.login("alice@example.test", "wonderland")

        codes = yield threads.deferToThread(attack)
        self.assertEqual(codes[:6], [535] * 6)
        self.assertEqual(codes[6:], [454] * 14)
        self.assertTrue(self.throttle.blocked("127.0.0.1"))
        login = yield threads.deferToThread(legitimate)
        self.assertEqual(login[0], 235)

    @inlineCallbacks
    def test_swaks_auth(self) -> Any:
        swaks = shutil.which("swaks")
        if swaks is None:
            raise unittest.SkipTest("swaks is not installed (Debian package swaks)")
        results = []
        for mechanism in ("PLAIN", "LOGIN"):
            out, err, code = yield getProcessOutputAndValue(
                swaks,
                [
                    "--server", "127.0.0.1",
                    "--port", str(self.portnum),
                    "--helo", "client.test",
                    "--from", "alice@example.test",
                    "--to", "friend@elsewhere.test",
                    "--tls",
                    "--auth", mechanism,
                    "--auth-user", "alice@example.test",
                    "--auth-password", "wonderland",
                    "--header", "Subject: swaks " + mechanism,
                ],
            )  # fmt: skip
            results.append((code, (out + err).decode("utf-8", "replace")))
        for code, transcript in results:
            self.assertEqual(code, 0, transcript)
        self.assertEqual(len(self.store.committed), 2)
