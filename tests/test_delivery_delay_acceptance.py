"""Issue 7's delay notice through the real ``twistd appliance`` process (M-5).

A small Internet on 127.0.2.0/24 of its own: a name server for
``delay.test`` and a scripted receiver that answers every RCPT with 451.
With ``[delivery] delay_warning = "1s"`` the deferred message earns exactly one
RFC 3464 ``Action: delayed`` report in the sender's local mailbox, however
often it is retried and across a restart of the process.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import time
import uuid
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from appliance.control import ControlClient
from tests.harness import ApplianceProcess
from tests.test_delivery_support import (
    DNSServer,
    Receiver,
    internet_appliance,
    maildir_messages,
    tool,
    wait_until,
)

pytestmark = pytest.mark.integration

DNS_ADDRESS = "127.0.2.226"
MX_ADDRESS = "127.0.2.227"
RECORDS = {
    "test": [("SOA", "ns.test. hostmaster.test. 1 3600 600 86400 1")],
    "delay.test": [("MX", "10 mx.delay.test.")],
    "mx.delay.test": [("A", MX_ADDRESS)],
}


class DelayNet:
    def __init__(self, tmp: Path) -> None:
        self.dns = DNSServer(DNS_ADDRESS, RECORDS)
        self.mx = Receiver(MX_ADDRESS)
        self.process: ApplianceProcess
        self.process, self.config, self.ports = internet_appliance(
            tmp,
            self.dns,
            delivery='[delivery]\ndelay_warning = "1s"\nretry_intervals = ["1s"]\n',
        )
        self.state = tmp / "state"
        self.process.start()

    def close(self) -> None:
        self.process.stop()
        self.mx.close()
        self.dns.close()

    def mailq(self) -> list[dict[str, Any]]:
        """The queue from the control socket (waiting for it while the process starts)."""

        def ask() -> list[list[dict[str, Any]]]:
            try:
                with ControlClient(self.state / "control.sock", timeout=30) as client:
                    return [client.call("mailq")]
            except (FileNotFoundError, ConnectionRefusedError):
                return []

        return wait_until(ask, 30, "the control socket")[0]  # type: ignore[no-any-return]

    def recipient(self, address: str) -> dict[str, Any] | None:
        for entry in self.mailq():
            for r in entry["recipients"]:
                if r["address"] == address:
                    return dict(r, queue_id=entry["queue_id"])
        return None

    def attempts(self, address: str) -> int:
        state = self.recipient(address)
        return 0 if state is None else int(state["attempts"])

    def retry(self, queue_id: str, address: str) -> None:
        """Flush the message and wait for the attempt to be recorded."""
        before = self.attempts(address)
        out = tool(self.config, "flush", queue_id)
        assert out.returncode == 0, out.stderr
        wait_until(lambda: self.attempts(address) > before, 30, "a new attempt")

    def notices(self, address: str) -> list[Message]:
        out = []
        for raw in maildir_messages(self.state, "alice"):
            if address.encode() in raw:
                msg = email.message_from_bytes(raw, policy=email.policy.compat32)
                if msg["Subject"] == "Delayed Mail (still being retried)":
                    out.append(msg)
        return out


@pytest.fixture()
def net(tmp_path: Path) -> Iterator[DelayNet]:
    internet = DelayNet(tmp_path)
    try:
        yield internet
    finally:
        internet.close()


def test_deferred_message_gets_one_delay_notice_across_retries_and_a_restart(
    net: DelayNet,
) -> None:
    rcpt = f"busy-{uuid.uuid4().hex[:8]}@delay.test"
    net.mx.answers[rcpt] = ["451 4.2.0 mailbox busy"]
    body = f"From: alice@example.test\r\nSubject: lunch\r\nMessage-ID: <{uuid.uuid4()}@t>\r\n\r\nsecret body\r\n"
    with smtplib.SMTP(
        "127.0.0.20", net.ports["smtp"], source_address=("127.0.1.101", 0), timeout=30
    ) as s:
        assert not s.sendmail("alice@example.test", [rcpt], body.encode())
    wait_until(lambda: net.attempts(rcpt) > 0, 30, "the first attempt")
    queue_id = net.recipient(rcpt)["queue_id"]  # type: ignore[index]
    time.sleep(1.2)  # older than delay_warning now: the next attempt owes the notice
    net.retry(queue_id, rcpt)
    (notice,) = wait_until(lambda: net.notices(rcpt), 30, "the delay notice")
    net.retry(queue_id, rcpt)
    net.retry(queue_id, rcpt)

    # A restart reads delay_notified back from the spool and does not warn again.
    assert net.process.stop() in (0, -15)
    net.process.start()
    net.retry(queue_id, rcpt)
    net.retry(queue_id, rcpt)
    time.sleep(0.5)  # a second notice would be in the mailbox by now
    assert len(net.notices(rcpt)) == 1
    assert net.recipient(rcpt)["status"] == "deferred"  # type: ignore[index]
    assert net.mx.transactions == []

    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    assert notice["Return-Path"] == "<>"
    assert notice["To"] == "<alice@example.test>"
    _human, status, headers = notice.get_payload()
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: lunch" in headers.get_payload()
    assert "secret body" not in notice.as_string()
    per_message, per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mail.example.test"
    assert per_recipient["Final-Recipient"] == f"rfc822; {rcpt}"
    assert per_recipient["Action"] == "delayed"
    assert per_recipient["Status"] == "4.2.0"
    assert per_recipient["Remote-MTA"] == "dns; mx.delay.test"
    assert per_recipient["Diagnostic-Code"] == "smtp; 451 4.2.0 mx.delay.test said: mailbox busy"
    assert per_recipient["Will-Retry-Until"]
