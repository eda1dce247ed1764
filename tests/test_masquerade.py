"""Sender masquerading (M-7): envelope sender and From: header, exposed users, configuration."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from twisted.internet import defer

from appliance import config as config_module
from appliance.mail.interfaces import Reply
from appliance.mail.masquerade import MASQ_DATA, Masquerader, MasqueradingDelivery
from appliance.mail.queue import QueuedMessage, RecipientState, Spool
from tests.harness import demo_copy
from tests.test_mail_queue_support import envelope, result
from tests.test_mail_runner import Env

ORG = Masquerader("example.test", ["*.example.test", "gw.other.test"])


def test_addresses() -> None:
    assert ORG.address("alice@pc1.lan.example.test") == "alice@example.test"
    assert ORG.address("alice@GW.other.test") == "alice@example.test"
    assert ORG.address("alice@example.test") == "alice@example.test"
    assert ORG.address("alice@other.test") == "alice@other.test"
    assert ORG.address("alice@sub.gw.other.test") == "alice@sub.gw.other.test"
    assert ORG.address("root@pc1.example.test") == "root@pc1.example.test"
    assert ORG.address("Postmaster@pc1.example.test") == "Postmaster@pc1.example.test"
    assert ORG.address("") == ""
    assert ORG.address("nodomain") == "nodomain"
    assert not Masquerader("", ["*.example.test"]).active
    assert not Masquerader("example.test", []).active


def test_from_header_only() -> None:
    head = (
        b"Received: from pc1.example.test by gw\r\n\tfor <bob@pc1.example.test>\r\n"
        b"From: Alice <alice@pc1.example.test>,\r\n bob@pc2.example.test\r\n"
        b"Reply-To: alice@pc1.example.test\r\n"
        b"Cc: root@pc1.example.test\r\n\r\n"
    )
    new = ORG.header(head)
    assert new == (
        b"Received: from pc1.example.test by gw\r\n\tfor <bob@pc1.example.test>\r\n"
        b"From: Alice <alice@example.test>,\r\n bob@example.test\r\n"
        b"Reply-To: alice@pc1.example.test\r\n"
        b"Cc: root@pc1.example.test\r\n\r\n"
    )
    assert ORG.header(b"From: root@pc1.example.test\r\n\r\n") is None
    assert ORG.header(b"From: alice@example.test\r\n\r\n") is None


class Capture:
    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []

    def __call__(
        self, message: QueuedMessage, recipients: Sequence[RecipientState]
    ) -> defer.Deferred[Mapping[str, Reply]]:
        self.seen.append((message.envelope.sender, message.data_path.read_bytes()))
        return defer.succeed({r.address: Reply(250, "2.0.0", "ok") for r in recipients})


def queued(spool: Spool, sender: str, body: bytes) -> QueuedMessage:
    incoming = spool.begin()
    incoming.write(body)
    qid = result(incoming.commit(envelope("x@remote.test", sender=sender)))
    return spool.load(qid)


def test_delivery_rewrites_envelope_and_header_keeps_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path, Env(tmp_path).clock, sync=False)
    body = b"From: alice@pc1.example.test\r\nSubject: hi\r\n\r\nFrom: alice@pc1.example.test\r\n"
    message = queued(spool, "alice@pc1.example.test", body)
    capture = Capture()
    hook = MasqueradingDelivery(capture, ORG)
    replies = result(hook(message, message.recipients))
    assert replies["x@remote.test"].code == 250
    ((sender, data),) = capture.seen
    assert sender == "alice@example.test"
    assert (
        data == b"From: alice@example.test\r\nSubject: hi\r\n\r\nFrom: alice@pc1.example.test\r\n"
    )
    assert message.data_path.read_bytes() == body  # the spooled original is untouched
    assert spool.load(message.queue_id).envelope.sender == "alice@pc1.example.test"
    assert (message.data_path.parent / MASQ_DATA).exists()


def test_exposed_user_and_null_sender_pass_unchanged(tmp_path: Path) -> None:
    spool = Spool(tmp_path, Env(tmp_path).clock, sync=False)
    capture = Capture()
    hook = MasqueradingDelivery(capture, ORG)
    for sender in ("root@pc1.example.test", ""):
        body = f"From: {sender or 'MAILER-DAEMON@gw.example.test'}\r\n\r\nx\r\n".encode()
        message = queued(spool, sender, body)
        result(hook(message, message.recipients))
        assert capture.seen[-1] == (sender, body)
        assert not (message.data_path.parent / MASQ_DATA).exists()


def test_config(tmp_path: Path) -> None:
    path = demo_copy(tmp_path)
    base = path.read_text()

    def load(extra: str) -> config_module.MailConfig:
        path.write_text(base.replace("[mail]\n", "[mail]\n" + extra))
        return config_module.load(path).mail

    mail = load("")
    assert (mail.masquerade_as, mail.masquerade_domains) == ("example.test", ())
    assert mail.masquerade_exceptions == ("root", "postmaster")
    assert load('masquerade_domains = "*.lan.example.test"\n').masquerade_domains == (
        "*.lan.example.test",
    )
    mail = load(
        'masquerade_domains = ["*.lan.example.test", "pc9.example.test"]\n'
        'masquerade_as = "Example.test"\nmasquerade_exceptions = ["root"]\n'
    )
    assert mail.masquerade_domains == ("*.lan.example.test", "pc9.example.test")
    assert (mail.masquerade_as, mail.masquerade_exceptions) == ("example.test", ("root",))
    with pytest.raises(config_module.ConfigError) as info:
        load('masquerade_domains = ["bad name!"]\n')
    assert any("masquerade_domains[0]" in str(p) for p in info.value.problems)
