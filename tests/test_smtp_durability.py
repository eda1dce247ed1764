"""Issue 5's durability promise through the real process: a 250 survives SIGKILL, exactly once.

Several client threads send 2,000 small messages (one, or two recipients in
two mailboxes) while the main thread kills the ``twistd appliance`` process
with SIGKILL at random moments (during service, and sometimes during start-up
recovery) and starts it again, at least ten times.  Each client records every
``250 ... queued as`` it gets.  Afterwards every acknowledged message is in
each of its mailboxes exactly once, no message is anywhere twice, every
Maildir file is complete, and the spool is empty.
"""

from __future__ import annotations

import os
import random
import re
import smtplib
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.harness import ApplianceProcess
from tests.test_smtp_acceptance_support import (
    INSIDE,
    LAN_CLIENT,
    configure,
    maildir,
    messages_in,
    queued,
    state_dir,
    wait_for,
)

pytestmark = [pytest.mark.integration]

MESSAGES = 2000
THREADS = 8
MIN_KILLS = 10
#: Recipient sets in rotation and the mailboxes each reaches.
ROUTES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("bob@example.test",), ("bob",)),
    (("alice@example.test",), ("alice",)),
    (("alice@example.test", "bob+copy@example.test"), ("alice", "bob")),
]
TOKEN_RE = re.compile(rb"^X-Token: (t\d+)$", re.MULTILINE)


class CrashingAppliance(ApplianceProcess):
    """ApplianceProcess that can also be started without waiting, to be killed mid-recovery."""

    def launch(self) -> None:
        twistd = Path(sys.executable).parent / "twistd"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(twistd), "--nodaemon", "--pidfile=", "--logger=appliance.logs.observer", "appliance", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(self.config.parent),
                env=env,
            )  # fmt: skip

    def restart(self) -> None:
        mark = len(self.read_log())
        self.launch()
        self.wait_for_log("appliance started", 60, after=mark)


class Clients:
    """The sending side: threads share a counter of message numbers and a record of 250s."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.lock = threading.Lock()
        self.next_number = 0
        self.acked: dict[str, tuple[str, ...]] = {}
        self.sent: dict[str, tuple[str, ...]] = {}
        self.refused: Counter[int] = Counter()
        self.errors = 0
        self.stop = threading.Event()

    def take(self) -> tuple[str, tuple[str, ...], tuple[str, ...]] | None:
        with self.lock:
            # Sending goes on until the killer has both enough 250s and enough kills.
            if self.stop.is_set():
                return None
            number = self.next_number
            self.next_number += 1
        recipients, boxes = ROUTES[number % len(ROUTES)]
        token = f"t{number}"
        with self.lock:
            self.sent[token] = boxes
        return token, recipients, boxes

    def connect(self) -> smtplib.SMTP | None:
        """A session, retrying while the appliance is down; None once sending is over."""
        while not self.stop.is_set():
            try:
                session = smtplib.SMTP(
                    INSIDE, self.port, timeout=20, source_address=(LAN_CLIENT, 0)
                )
                session.ehlo("durability.client.test")
                return session
            except (OSError, smtplib.SMTPException):
                time.sleep(0.02)
        return None

    def run(self) -> None:
        session: smtplib.SMTP | None = None
        while True:
            if session is None:
                session = self.connect()
                if session is None:
                    break
            job = self.take()
            if job is None:
                break
            token, recipients, boxes = job
            try:
                reply = self.send(session, token, recipients)
            except (OSError, smtplib.SMTPException):
                with self.lock:
                    self.errors += 1
                session.close()
                session = None
                continue
            if reply[0] == 250 and b"queued as" in reply[1]:
                with self.lock:
                    self.acked[token] = boxes
            else:
                with self.lock:
                    self.refused[reply[0]] += 1
        if session is not None:
            session.close()

    @staticmethod
    def send(session: smtplib.SMTP, token: str, recipients: tuple[str, ...]) -> tuple[int, bytes]:
        code, message = session.mail("sender@remote.test")
        if code != 250:
            return code, message
        for recipient in recipients:
            code, message = session.rcpt(recipient)
            if code != 250:
                session.rset()
                return code, message
        body = (
            f"Subject: durability {token}\r\nX-Token: {token}\r\n\r\n"
            + f"line for {token}\r\n" * 8
            + f"end-of-{token}\r\n"
        )
        return session.data(body.encode())


def complete(path: Path, token: str) -> bool:
    """A Maildir file is whole: it ends with the message's last line and matches its S= size."""
    data = path.read_bytes()
    size = re.search(r",S=(\d+)", path.name)
    return data.endswith(f"end-of-{token}\n".encode()) and (
        size is None or int(size.group(1)) == len(data)
    )


def test_every_acknowledged_message_survives_sigkill_exactly_once(tmp_path: Path) -> None:
    config, port = configure(tmp_path)
    appliance = CrashingAppliance(config, tmp_path / "appliance.log")
    appliance.start()
    clients = Clients(port)
    threads = [threading.Thread(target=clients.run, daemon=True) for _ in range(THREADS)]
    rng = random.Random()
    kills = during_startup = 0
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            time.sleep(rng.uniform(0.2, 1.5))
            if len(clients.acked) >= MESSAGES and kills >= MIN_KILLS:
                break
            appliance.kill()
            kills += 1
            if rng.random() < 0.25:
                # Die again while recovering the spool and redelivering.
                appliance.launch()
                time.sleep(rng.uniform(0.05, 0.6))
                appliance.kill()
                during_startup += 1
            appliance.restart()
        clients.stop.set()
        for thread in threads:
            thread.join(60)
        sending = time.monotonic() - started
        # One last crash right after the last 250, then a clean run drains the spool.
        appliance.kill()
        appliance.restart()
        wait_for(lambda: not queued(config), timeout=120, what="the spool to drain")
    finally:
        clients.stop.set()
        code = appliance.stop()
    assert code == 0, appliance.read_log()[-5000:]
    assert kills >= MIN_KILLS
    assert len(clients.acked) >= MESSAGES, (len(clients.acked), clients.errors, clients.refused)
    assert not clients.refused, clients.refused

    seen: Counter[tuple[str, str]] = Counter()
    partial = []
    for user in ("alice", "bob"):
        for path in messages_in(maildir(config, user)):
            match = TOKEN_RE.search(path.read_bytes())
            assert match, path
            token = match.group(1).decode()
            seen[(user, token)] += 1
            if not complete(path, token):
                partial.append(path)
    assert not partial
    duplicates = {key: n for key, n in seen.items() if n > 1}
    assert not duplicates
    missing = [
        (token, box)
        for token, boxes in clients.acked.items()
        for box in boxes
        if not seen[(box, token)]
    ]
    assert not missing, f"{len(missing)} acknowledged deliveries lost, e.g. {missing[:5]}"
    stray = [
        key for key in seen if key[1] not in clients.sent or key[0] not in clients.sent[key[1]]
    ]
    assert not stray
    corrupt = state_dir(config) / "spool" / "corrupt"
    assert not (corrupt.is_dir() and list(corrupt.iterdir()))
    unacked_delivered = sum(1 for token in clients.sent if token not in clients.acked and any(
        seen[(box, token)] for box in clients.sent[token]))  # fmt: skip
    log = appliance.read_log()
    print(
        f"\nredeliveries recognised: {log.count('already delivered as')}, "
        f"recovery removals: {log.count('recovery: removing unfinished')}, "
        f"{len(clients.acked)} acknowledged, {len(clients.sent)} attempted, {kills} kills "
        f"({during_startup} more during start-up), {clients.errors} broken sessions, "
        f"{unacked_delivered} unacknowledged but delivered, {sending:.1f}s sending"
    )
