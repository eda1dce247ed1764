"""Submission, AUTH, sender ownership and POP-before-SMTP through the real ``twistd appliance``.

The demo configuration is copied with its ports moved (13xxx instead of
10xxx) so that this file and tests/test_demo.py can run at the same time;
everything happens in one test so that only one such process ever runs.
The demo users are alice (password ``demo-alice``) and bob (``demo-bob``).
"""

from __future__ import annotations

import poplib
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path

import pytest

from tests.harness import ApplianceProcess, demo_copy

pytestmark = pytest.mark.integration

OUTSIDE, INSIDE = "127.0.0.10", "127.0.0.20"
INTERNET_CLIENT = "127.0.2.5"
SMTP, SUBMISSION, SMTPS, POP3S = 13025, 13587, 13465, 13995


def context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[tuple[ApplianceProcess, Path]]:
    tmp = tmp_path
    config = demo_copy(tmp)
    config.write_text(config.read_text().replace("port = 10", "port = 13"))
    process = ApplianceProcess(config, tmp / "appliance.log")
    process.start()
    try:
        yield process, tmp / "state"
    finally:
        assert process.stop() == 0, process.read_log()


class POP3FromInternet(poplib.POP3_SSL):
    """POP3S from the "Internet" client address (poplib has no source_address)."""

    def _create_socket(self, timeout: float) -> socket.socket:
        sock = socket.create_connection(
            (self.host, self.port), timeout, source_address=(INTERNET_CLIENT, 0)
        )
        return self.context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined,no-any-return]


def relay_attempt() -> tuple[int, bytes]:
    with smtplib.SMTP(
        OUTSIDE, SMTP, local_hostname="client.remote.test", timeout=10,
        source_address=(INTERNET_CLIENT, 0),
    ) as smtp:  # fmt: skip
        smtp.ehlo()
        smtp.mail("someone@remote.test")
        reply = smtp.rcpt("friend@elsewhere.test")
        smtp.rset()
    return reply


def pop_before_smtp() -> None:
    code, text = relay_attempt()
    assert (code, text[:5]) == (550, b"5.7.1")
    pop = POP3FromInternet(OUTSIDE, POP3S, timeout=10, context=context())
    try:
        pop.user("alice@example.test")
        with pytest.raises(poplib.error_proto):
            pop.pass_("wrong")
        pop.user("alice@example.test")
        assert pop.pass_("demo-alice").startswith(b"+OK")
    finally:
        pop.quit()
    assert relay_attempt()[0] == 250


def submission(process: ApplianceProcess, state: Path) -> None:
    with smtplib.SMTP(INSIDE, SUBMISSION, local_hostname="laptop.test", timeout=10) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("auth")
        smtp.starttls(context=context())
        smtp.ehlo()
        assert smtp.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login("alice@example.test", "nope")
        smtp.login("alice@example.test", "demo-alice")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            smtp.sendmail("bob@example.test", ["bob@example.test"], b"Subject: x\r\n\r\nx\r\n")
        assert refused.value.smtp_code == 553
        smtp.sendmail(
            "alice@example.test", ["bob@example.test"], b"Subject: e2e submission\r\n\r\nhello\r\n"
        )
    with smtplib.SMTP_SSL(
        OUTSIDE, SMTPS, local_hostname="laptop.test", timeout=10, context=context()
    ) as smtps:
        smtps.login("bob@example.test", "demo-bob")
        smtps.sendmail(
            "bob@example.test", ["alice@example.test"], b"Subject: e2e 465\r\n\r\nhi\r\n"
        )

    def delivered(user: str, subject: bytes) -> bytes:
        new = state / "mail" / "example.test" / user / "new"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for path in new.glob("*") if new.is_dir() else ():
                data = path.read_bytes()
                if subject in data:
                    return data
            time.sleep(0.05)
        raise AssertionError(f"nothing delivered to {user}:\n{process.read_log()}")

    for user, subject in (("bob", b"e2e submission"), ("alice", b"e2e 465")):
        message = message_from_bytes(delivered(user, subject))
        assert message["Message-ID"] and message["Message-ID"].endswith("@mail.example.test>")
        assert message["Date"]
        assert " with ESMTPSA id " in " ".join(message.get_all("Received") or [])


def test_pop_before_smtp_and_authenticated_submission(
    appliance: tuple[ApplianceProcess, Path],
) -> None:
    """One test, one process: xdist may not start two appliances on the same ports."""
    pop_before_smtp()
    submission(*appliance)
