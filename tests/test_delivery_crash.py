"""R-4 / M-5 through the real process: SIGKILL in the middle of remote deliveries, then restart.

A slow receiver holds every transaction after the final dot; the appliance is
killed while it waits for the replies, then started again with the receiver
fast.  Every recipient must arrive at least once (a transaction cut before
its reply reached us is sent again: RFC 1047's duplicate, never a loss), and
the queue must end empty.  The receiver counts a message only once the
client has read its final reply, so a lost message cannot hide behind the
first, interrupted, transaction.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from appliance.control import ControlClient
from tests.harness import ApplianceProcess
from tests.test_delivery_support import (
    DNSServer,
    Receiver,
    internet_appliance,
    sink_available,
    wait_until,
)

pytestmark = pytest.mark.integration

RECORDS = {
    "crash.test": [("MX", "10 mx.crash.test.")],
    "mx.crash.test": [("A", "127.0.2.175")],
}


def test_sigkill_during_remote_delivery_loses_nothing(tmp_path: Path) -> None:
    why = sink_available()
    if why:
        pytest.skip(why)
    dns_server = DNSServer("127.0.2.155", RECORDS)
    receiver = Receiver("127.0.2.175", data_delay=30.0, confirm=True)
    process, config, ports = internet_appliance(tmp_path, dns_server)
    second: ApplianceProcess | None = None
    try:
        process.start()
        expected = set()
        with smtplib.SMTP("127.0.0.20", ports["smtp"], source_address=("127.0.1.101", 0)) as s:
            for n in range(3):
                rcpts = [f"m{n}-a@crash.test", f"m{n}-b@crash.test"]
                expected.update(rcpts)
                s.sendmail("alice@example.test", rcpts, f"Subject: {n}\r\n\r\nbody {n}\r\n")
        # Every message is inside a transaction, waiting for the reply to its final dot.
        wait_until(lambda: receiver.data_received >= 3, what="three transactions in DATA")
        process.kill()
        assert receiver.delivered() == []

        receiver.data_delay = 0.0
        second = ApplianceProcess(config, tmp_path / "appliance-2.log")
        second.start()
        wait_until(lambda: expected <= set(receiver.delivered()), timeout=30, what="redelivery")

        def empty() -> bool:
            with ControlClient(tmp_path / "state" / "control.sock", timeout=10) as client:
                return client.call("mailq") == []

        wait_until(empty, what="an empty queue")
    finally:
        if second is not None:
            second.stop()
        process.kill()
        receiver.close()
        dns_server.close()
