"""Remote delivery and bounces through the queue runner, against a real SMTP server on loopback.

The "remote MTA" is our own SMTP server with a scripted recipient check, so
one transaction can answer 250, 451 and 550 to three recipients (issue 7's
mixed-results case): one is delivered, one stays queued for a retry, one is
bounced, and the sender gets exactly one DSN naming only the 550 recipient.
"""

from __future__ import annotations

import email
import email.policy
import os
import random
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from appliance.mail.aliases import parse_aliases
from appliance.mail.interfaces import Reply
from appliance.mail.local import LocalRecipients
from appliance.mail.outbound import BounceWriter, RemoteDelivery
from appliance.mail.queue import DEFERRED, DELIVERED, FAILED, Spool
from appliance.mail.relay import RelayPolicy
from appliance.mail.routing import Router
from appliance.mail.runner import QueueRunner
from appliance.mail.smtp import SMTPServerFactory
from appliance.mail.smtp_client import OutboundSettings, tcp_endpoint
from tests.test_mail_local import ALICE, FakeDirectory
from tests.test_mail_queue_support import envelope
from tests.test_smtp_support import FakeRecipients, FakeStore

BODY = b"From: alice@example.test\r\nSubject: three recipients\r\nMessage-ID: <m1@example.test>\r\n\r\nhello\r\n.dot line\r\n"


class NoDNS:
    """Static routes to literal addresses need no lookups; any lookup is a test failure."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"unexpected DNS lookup {name}")


class MixedResults(unittest.TestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()).resolve()
        self.remote_store = FakeStore()
        remote_rcpts = FakeRecipients(known=("ok@remote.test",))
        remote_rcpts.answers = {
            "later@remote.test": Reply(451, "4.2.0", "Mailbox busy, try later"),
            "gone@remote.test": Reply(550, "5.1.1", "No such user here"),
        }
        remote = SMTPServerFactory(
            "outside",
            "mx.remote.test",
            self.remote_store,
            remote_rcpts,
            RelayPolicy([], ["remote.test"], [], ["mx.remote.test"]),
            None,
            reactor,
        )
        self.port = reactor.listenTCP(0, remote, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

        self.spool = Spool(self.root / "spool", reactor)
        table, _ = parse_aliases("postmaster: alice@example.test\n")
        recipients = LocalRecipients(FakeDirectory(ALICE), table, ("example.test",))
        router = Router(
            {"remote.test": f"[127.0.0.1]:{self.port.getHost().port}"},
            None,
            ["mail.example.test"],
            ["127.0.0.10"],
        )
        self.delivery = RemoteDelivery(
            router,
            NoDNS(),
            OutboundSettings(helo_name="mail.example.test", opportunistic_tls=False),
            reactor,
            lambda address, port: tcp_endpoint(reactor, address, port),
            random.Random(1),
        )
        self.addCleanup(self.delivery.close)  # QUIT on the connection kept for reuse
        self.runner = QueueRunner(
            self.spool,
            recipients,
            self.root / "mail",
            "mail.example.test",
            reactor,
            remote_delivery=self.delivery,
            bounce=BounceWriter(
                self.spool, "mail.example.test", "postmaster@example.test", reactor
            ),
        )

    def alice_mail(self) -> list[bytes]:
        new = self.root / "mail" / "example.test" / "alice" / "new"
        return [(new / n).read_bytes() for n in sorted(os.listdir(new))] if new.exists() else []

    @defer.inlineCallbacks
    def test_one_delivered_one_retried_one_bounced_with_one_dsn(self) -> object:
        incoming = self.spool.begin()
        incoming.write(BODY)
        queue_id = yield incoming.commit(
            envelope(
                "ok@remote.test",
                "later@remote.test",
                "gone@remote.test",
                sender="alice@example.test",
                at=reactor.seconds(),
            )
        )
        self.runner.start()
        for _ in range(100):
            if self.alice_mail():
                break
            yield deferLater(reactor, 0.05, lambda: None)
        yield self.runner.stop()

        (delivered,) = self.remote_store.committed
        assert delivered.envelope is not None
        self.assertEqual(delivered.envelope.recipients, ("ok@remote.test",))
        self.assertEqual(delivered.envelope.sender, "alice@example.test")
        self.assertIn(b"\r\n.dot line\r\n", bytes(delivered.data))

        states = {r.address: r for r in self.spool.load(queue_id).recipients}
        self.assertEqual(states["ok@remote.test"].status, DELIVERED)
        self.assertEqual(states["later@remote.test"].status, DEFERRED)
        self.assertEqual(states["gone@remote.test"].status, FAILED)
        self.assertTrue(states["gone@remote.test"].dsn_sent)

        (report,) = self.alice_mail()
        parsed = email.message_from_bytes(report, policy=email.policy.default)
        self.assertEqual(parsed.get_content_type(), "multipart/report")
        self.assertEqual(parsed["Return-Path"], "<>")
        status = parsed.get_payload()[1]
        self.assertEqual(status.get_content_type(), "message/delivery-status")
        text = status.as_string()
        self.assertIn("Final-Recipient: rfc822; gone@remote.test", text)
        self.assertIn("Status: 5.1.1", text)
        self.assertIn("550", text)
        self.assertNotIn("later@remote.test", text)
        self.assertNotIn("ok@remote.test", text)
