"""Connection reuse (M-6) through the real ``twistd appliance`` process.

A small Internet of its own on 127.0.2.0/24: a name server for
``reuse.test`` and a scripted receiver on its MX address that counts
connections.  Ten messages submitted in quick succession to the one remote
domain must arrive over far fewer than ten connections: the queue runner
keeps the session after each transaction and the next message takes it.
"""

from __future__ import annotations

import os
import smtplib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ApplianceProcess
from tests.test_delivery_support import DNSServer, Receiver, internet_appliance, wait_until

pytestmark = pytest.mark.integration

DNS_ADDRESS = "127.0.2.230"
MX_ADDRESS = "127.0.2.231"
RECORDS = {
    "test": [("SOA", "ns.test. hostmaster.test. 1 3600 600 86400 1")],
    "reuse.test": [("MX", "10 mx.reuse.test.")],
    "mx.reuse.test": [("A", MX_ADDRESS)],
}


class ReuseNet:
    def __init__(self, tmp: Path) -> None:
        self.dns = DNSServer(DNS_ADDRESS, RECORDS)
        self.mx = Receiver(MX_ADDRESS)
        self.process: ApplianceProcess
        self.process, self.config, self.ports = internet_appliance(tmp, self.dns)
        self.process.start()

    def close(self) -> None:
        self.process.stop()
        self.mx.close()
        self.dns.close()


@pytest.fixture()
def net(tmp_path: Path) -> Iterator[ReuseNet]:
    if os.geteuid() != 0:
        pytest.skip("receivers on port 25 need root")
    internet = ReuseNet(tmp_path)
    try:
        yield internet
    finally:
        internet.close()


def test_ten_messages_to_one_domain_share_few_connections(net: ReuseNet) -> None:
    tag = uuid.uuid4().hex[:8]
    rcpts = [f"user{n}-{tag}@reuse.test" for n in range(10)]
    for n, rcpt in enumerate(rcpts):
        body = (
            f"From: alice@example.test\r\nTo: {rcpt}\r\nSubject: reuse {n}\r\n"
            f"Message-ID: <{uuid.uuid4()}@t>\r\n\r\nmessage {n}\r\n"
        )
        with smtplib.SMTP(
            "127.0.0.20", net.ports["smtp"], source_address=("127.0.1.101", 0), timeout=30
        ) as s:
            refused = s.sendmail("alice@example.test", [rcpt], body.encode())
            assert not refused

    wait_until(
        lambda: set(rcpts) <= set(net.mx.delivered()), 60, "all ten messages at the receiver"
    )
    # Ten separate transactions (one message each), all complete.
    per_message = [t.recipients for t in net.mx.transactions]
    assert sorted(r for t in per_message for r in t) == sorted(rcpts)
    assert all(len(t) == 1 for t in per_message)
    # The first few may race each other onto fresh connections; the rest reuse them.
    assert net.mx.connections <= 4, f"{net.mx.connections} connections for 10 messages"
