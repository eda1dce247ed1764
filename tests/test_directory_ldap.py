"""The LDAP directory against a real OpenLDAP slapd (Debian packages slapd and ldap-utils).

Each test class starts its own slapd on a 127.0.2.x address with a
throw-away slapd.conf (mdb backend) in a temporary directory, loads a small
directory with ldapadd, and stops it afterwards; the system's slapd service
is never used.  The last class stops slapd in the middle of an SMTP session
to check rule R-2 end to end: every recipient gets 451 4.4.3, nothing is
stored, and mail flows again once slapd is back.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
from twisted.internet import reactor as _reactor
from twisted.internet import threads
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.trial import unittest

from appliance.directory.base import DirectoryUnavailable, User
from appliance.directory.ldap import LDAPDirectory, LDAPSettings, settings_from_mapping
from appliance.mail.aliases import AliasTable
from appliance.mail.local import LocalRecipients
from appliance.mail.smtp import SMTPServer, SMTPServerFactory
from appliance.tls import make_self_signed
from tests.harness import free_port
from tests.test_smtp_support import HOSTNAME, FakeStore, make_policy

pytestmark = pytest.mark.integration
reactor: Any = _reactor

SLAPD = shutil.which("slapd") or ("/usr/sbin/slapd" if Path("/usr/sbin/slapd").exists() else None)
LDAPADD = shutil.which("ldapadd")
BASE = "dc=example,dc=test"
ROOT_DN = f"cn=admin,{BASE}"
ROOT_PW = "root-secret"
SERVICE_DN = f"cn=mailer,{BASE}"
SERVICE_PW = "mailer-secret"

LDIF = f"""\
dn: {BASE}
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: {SERVICE_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: mailer
userPassword: {SERVICE_PW}

dn: ou=people,{BASE}
objectClass: organizationalUnit
ou: people

dn: uid=alice,ou=people,{BASE}
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: alice
cn: Alice
sn: Liddell
mail: alice@example.test
mailLocalAddress: a.liddell@example.test
mailLocalAddress: Postmaster@example.test
description: example.test/alice-box
userPassword: wonderland

dn: uid=bob,ou=people,{BASE}
objectClass: inetOrgPerson
uid: bob
cn: Bob
sn: Builder
mail: bob@example.test
userPassword: builder

dn: uid=nopass,ou=people,{BASE}
objectClass: inetOrgPerson
uid: nopass
cn: No
sn: Password
mail: nopass@example.test

dn: uid=evil,ou=people,{BASE}
objectClass: inetOrgPerson
uid: evil
cn: Evil
sn: Box
mail: evil@example.test
description: ../../etc

dn: uid=canary,ou=people,{BASE}
objectClass: inetOrgPerson
uid: canary
cn: Canary
sn: Bird
mail: canary@example.test

dn: uid=dup1,ou=people,{BASE}
objectClass: inetOrgPerson
uid: dup1
cn: Dup
sn: One
mail: dup@example.test

dn: uid=dup2,ou=people,{BASE}
objectClass: inetOrgPerson
uid: dup2
cn: Dup
sn: Two
mail: dup@example.test
"""




def wait_for_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Slapd:
    """One private slapd: ldap:// (with StartTLS) and ldaps:// on ``host``, data in ``root``."""

    def __init__(self, root: Path, host: str) -> None:
        assert SLAPD is not None
        self.root = root
        self.host = host
        self.port = free_port(host)
        self.tls_port = free_port(host)
        self.uri = f"ldap://{host}:{self.port}"
        self.ldaps_uri = f"ldaps://{host}:{self.tls_port}"
        self.process: subprocess.Popen[bytes] | None = None
        cert, key = make_self_signed((host, "ldap.example.test"))
        self.ca_file = root / "cert.pem"
        self.ca_file.write_bytes(cert)
        (root / "key.pem").write_bytes(key)
        (root / "db").mkdir()
        schema = Path("/etc/ldap/schema")
        (root / "slapd.conf").write_text(
            "\n".join(
                [
                    *(f"include {schema / n}.schema" for n in ("core", "cosine", "inetorgperson")),
                    f"include {schema / 'misc.schema'}",
                    "modulepath /usr/lib/ldap",
                    "moduleload back_mdb",
                    f"pidfile {root / 'slapd.pid'}",
                    f"TLSCertificateFile {self.ca_file}",
                    f"TLSCertificateKeyFile {root / 'key.pem'}",
                    "database mdb",
                    "maxsize 10485760",
                    f'suffix "{BASE}"',
                    f'rootdn "{ROOT_DN}"',
                    f"rootpw {ROOT_PW}",
                    f"directory {root / 'db'}",
                    "access to attrs=userPassword by anonymous auth by self read by * none",
                    f'access to * by dn.exact="{SERVICE_DN}" read by * none',
                    "",
                ]
            )
        )

    def start(self) -> None:
        assert SLAPD is not None
        log = (self.root / "slapd.log").open("ab")
        self.process = subprocess.Popen(
            [
                SLAPD,
                "-f", str(self.root / "slapd.conf"),
                "-h", f"{self.uri}/ {self.ldaps_uri}/",
                "-d", "0",
            ],
            stdout=log,
            stderr=log,
        )  # fmt: skip
        log.close()
        wait_for_port(self.host, self.port)
        wait_for_port(self.host, self.tls_port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=15)
            self.process = None

    def load(self, ldif: str) -> None:
        assert LDAPADD is not None
        subprocess.run(
            [LDAPADD, "-x", "-H", self.uri, "-D", ROOT_DN, "-w", ROOT_PW],
            input=ldif.encode(),
            check=True,
            capture_output=True,
        )

    def settings(self, **overrides: Any) -> LDAPSettings:
        values: dict[str, Any] = {
            "servers": (self.uri,),
            "base_dn": BASE,
            "bind_dn": SERVICE_DN,
            "bind_password": SERVICE_PW,
            "canary": "canary@example.test",
            "timeout": 5.0,
        }
        values.update(overrides)
        return LDAPSettings(**values)


def _skip_reason() -> str | None:
    if SLAPD is None or LDAPADD is None:
        return "slapd/ldapadd not installed (Debian packages slapd and ldap-utils)"
    return None


class SlapdTestCase(unittest.TestCase):
    """Starts one slapd for the whole class."""

    host: ClassVar[str] = "127.0.2.5"
    slapd: ClassVar[Slapd]
    tmp: ClassVar[tempfile.TemporaryDirectory[str]]

    @classmethod
    def setUpClass(cls) -> None:
        reason = _skip_reason()
        if reason is not None:
            raise unittest.SkipTest(reason)
        cls.tmp = tempfile.TemporaryDirectory(prefix="appliance-slapd-")
        cls.slapd = Slapd(Path(cls.tmp.name), cls.host)
        cls.slapd.start()
        try:
            cls.slapd.load(LDIF)
        except Exception:
            cls.slapd.stop()
            cls.tmp.cleanup()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls.slapd.stop()
        cls.tmp.cleanup()

    def directory(self, **overrides: Any) -> LDAPDirectory:
        return LDAPDirectory(self.slapd.settings(**overrides), reactor)


class LookupTests(SlapdTestCase):
    @inlineCallbacks
    def test_find_user_by_mail_and_by_alternate_address(self) -> Any:
        directory = self.directory()
        alice = User(
            login="alice@example.test",
            mailbox="example.test/alice",
            addresses=("alice@example.test", "a.liddell@example.test", "postmaster@example.test"),
        )
        self.assertEqual((yield directory.find_user("alice@example.test")), alice)
        self.assertEqual((yield directory.find_user("a.liddell@example.test")), alice)
        self.assertEqual((yield directory.find_user("ALICE@example.test")), alice)
        bob = yield directory.find_user("bob@example.test")
        self.assertEqual(bob.addresses, ("bob@example.test",))

    @inlineCallbacks
    def test_unknown_address_is_none_when_the_canary_is_there(self) -> Any:
        directory = self.directory()
        self.assertIsNone((yield directory.find_user("nobody@example.test")))
        self.assertIsNone((yield directory.find_user("*")))
        self.assertIsNone((yield directory.find_user("*)(mail=*")))
        canary = yield directory.find_user("canary@example.test")
        self.assertEqual(canary.login, "canary@example.test")

    @inlineCallbacks
    def test_missing_canary_means_unavailable(self) -> Any:
        directory = self.directory(canary="no-canary@example.test")
        with self.assertRaises(DirectoryUnavailable):
            yield directory.find_user("nobody@example.test")
        # A user that is found needs no canary.
        self.assertIsNotNone((yield directory.find_user("bob@example.test")))

    @inlineCallbacks
    def test_a_broken_directory_is_unavailable_not_empty(self) -> Any:
        # A wrong base DN, a wrong service password, an anonymous search the ACL hides:
        # each would make everybody "unknown" without the canary rule and error handling.
        for overrides in (
            {"base_dn": "dc=nowhere,dc=test"},
            {"bind_password": "wrong"},
            {"bind_dn": "", "bind_password": ""},
        ):
            directory = self.directory(**overrides)
            with self.assertRaises(DirectoryUnavailable, msg=str(overrides)):
                yield directory.find_user("nobody@example.test")
            with self.assertRaises(DirectoryUnavailable, msg=str(overrides)):
                yield directory.authenticate("alice@example.test", "wonderland")

    @inlineCallbacks
    def test_ambiguous_and_unsafe_entries_are_unavailable(self) -> Any:
        directory = self.directory(mailbox_attribute="description")
        with self.assertRaises(DirectoryUnavailable):
            yield directory.find_user("dup@example.test")
        with self.assertRaises(DirectoryUnavailable):
            yield directory.find_user("evil@example.test")
        alice = yield directory.find_user("alice@example.test")
        self.assertEqual(alice.mailbox, "example.test/alice-box")
        bob = yield directory.find_user("bob@example.test")
        self.assertEqual(bob.mailbox, "example.test/bob")

    @inlineCallbacks
    def test_passwords_are_checked_by_binding(self) -> Any:
        directory = self.directory()
        alice = yield directory.authenticate("alice@example.test", "wonderland")
        self.assertEqual(alice.login, "alice@example.test")
        alias_login = yield directory.authenticate("a.liddell@example.test", "wonderland")
        self.assertEqual(alias_login.login, "alice@example.test")
        self.assertIsNone((yield directory.authenticate("alice@example.test", "wrong")))
        self.assertIsNone((yield directory.authenticate("alice@example.test", "")))
        self.assertIsNone((yield directory.authenticate("nopass@example.test", "x")))
        self.assertIsNone((yield directory.authenticate("nobody@example.test", "x")))
        self.assertIsNone((yield directory.authenticate("", "x")))

    @inlineCallbacks
    def test_failover_to_the_next_server(self) -> Any:
        dead = f"ldap://127.0.2.9:{free_port('127.0.2.9')}"
        directory = self.directory(servers=(dead, self.slapd.uri))
        self.assertIsNotNone((yield directory.find_user("alice@example.test")))
        self.assertEqual(directory._preferred, 1)
        self.assertIsNotNone((yield directory.authenticate("bob@example.test", "builder")))
        everything_dead = self.directory(servers=(dead,))
        with self.assertRaises(DirectoryUnavailable):
            yield everything_dead.find_user("alice@example.test")

    @inlineCallbacks
    def test_a_server_that_never_answers_times_out(self) -> Any:
        silent = socket.socket()
        silent.bind(("127.0.2.9", 0))
        silent.listen(5)  # the kernel accepts connections; nobody ever answers
        self.addCleanup(silent.close)
        uri = f"ldap://127.0.2.9:{silent.getsockname()[1]}"
        directory = self.directory(servers=(uri, self.slapd.uri), timeout=0.5)
        started = time.monotonic()
        self.assertIsNotNone((yield directory.find_user("alice@example.test")))
        self.assertLess(time.monotonic() - started, 5)

    @inlineCallbacks
    def test_starttls_and_ldaps(self) -> Any:
        ca = str(self.slapd.ca_file)
        starttls = self.directory(starttls=True, ca_file=ca)
        self.assertIsNotNone((yield starttls.find_user("alice@example.test")))
        self.assertIsNotNone((yield starttls.authenticate("alice@example.test", "wonderland")))
        ldaps = self.directory(servers=(self.slapd.ldaps_uri,), ca_file=ca)
        self.assertIsNotNone((yield ldaps.find_user("alice@example.test")))
        # Without the right CA the certificate is refused: unavailable, not "unknown".
        other_ca = Path(self.mktemp())
        other_ca.write_bytes(make_self_signed(("elsewhere.test",))[0])
        untrusted = self.directory(starttls=True, ca_file=str(other_ca))
        with self.assertRaises(DirectoryUnavailable):
            yield untrusted.find_user("alice@example.test")

    def test_settings_from_mapping(self) -> None:
        settings = settings_from_mapping(
            {"servers": ["ldap://a", "ldap://b"], "base_dn": BASE, "canary": "c@d.test"}
        )
        self.assertEqual(settings.servers, ("ldap://a", "ldap://b"))
        with self.assertRaises(ValueError):
            settings_from_mapping({"servers": ["ldap://a"], "base_dn": BASE, "bogus": 1})


class OutageThroughSMTPTests(SlapdTestCase):
    """R-2 end to end: slapd stops during SMTP sessions; nothing is refused for good or lost."""

    host = "127.0.2.6"

    def setUp(self) -> None:
        self.store = FakeStore()
        self.ldap = self.directory(timeout=2.0)
        recipients = LocalRecipients(self.ldap, AliasTable(), ["example.test"])
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
            "outside", HOSTNAME, self.store, recipients, make_policy(), None, reactor
        )
        factory.protocol = Tracked
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.portnum = self.port.getHost().port

    @inlineCallbacks
    def tearDown(self) -> Any:  # type: ignore[override]
        yield self.port.stopListening()
        yield DeferredList(self.lost)
        if self.slapd.process is None:
            self.slapd.start()

    def send(self) -> dict[str, tuple[int, bytes]]:
        port = self.portnum
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20) as smtp:
            smtp.ehlo()
            smtp.mail("someone@remote.test")
            replies = {
                rcpt: smtp.rcpt(rcpt)
                for rcpt in ("alice@example.test", "nobody@example.test", "bob@example.test")
            }
            if any(code == 250 for code, _ in replies.values()):
                code, text = smtp.data(b"Subject: ldap\r\n\r\nhello\r\n")
                replies["DATA"] = (code, text)
            else:
                smtp.rset()
        return replies

    @inlineCallbacks
    def test_outage_gives_451_and_mail_flows_again(self) -> Any:
        before = yield threads.deferToThread(self.send)
        self.assertEqual(before["alice@example.test"][0], 250)
        self.assertEqual(before["nobody@example.test"][0], 550)
        self.assertTrue(before["nobody@example.test"][1].startswith(b"5.1.1 "))
        self.assertEqual(before["DATA"][0], 250)
        self.assertEqual(len(self.store.committed), 1)

        yield threads.deferToThread(self.slapd.stop)
        during = yield threads.deferToThread(self.send)
        for rcpt in ("alice@example.test", "nobody@example.test", "bob@example.test"):
            code, text = during[rcpt]
            self.assertEqual(code, 451, rcpt)
            self.assertTrue(text.startswith(b"4.4.3 "), text)
        self.assertNotIn("DATA", during)
        self.assertEqual(len(self.store.committed), 1)
        self.assertEqual([m for m in self.store.messages if not m.committed], [])
        with self.assertRaises(DirectoryUnavailable):
            yield self.ldap.authenticate("alice@example.test", "wonderland")

        yield threads.deferToThread(self.slapd.start)
        after = yield threads.deferToThread(self.send)
        self.assertEqual(after["alice@example.test"][0], 250, after)
        self.assertEqual(after["bob@example.test"][0], 250)
        self.assertEqual(after["nobody@example.test"][0], 550)
        self.assertEqual(after["DATA"][0], 250)
        self.assertEqual(len(self.store.committed), 2)
        last = self.store.committed[-1]
        assert last.envelope is not None
        self.assertEqual(last.envelope.recipients, ("alice@example.test", "bob@example.test"))
