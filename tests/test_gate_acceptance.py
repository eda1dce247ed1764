"""Issue 8's acceptance: the SMTP gate through the real ``twistd appliance``, real clients, real DNS.

BIND on 127.0.0.1 serves the block lists, the sender domains and their SPF
records (tests/test_gate_acceptance_support.py); the appliance's inside
resolver forwards to it only.  Clients (smtplib, swaks, a raw socket) come
from 127.0.2.x, "the Internet", to the OUTSIDE listener.  Three processes:
every check on with healthy DNS; neighbours that fail (a list that is down,
one that times out, one answering 127.255.255.254, a domain whose DNS times
out, SPF lookups that time out); and a forwarder that is dead.  Timeouts in
the configs are 1-2 s so the failure cases stay quick.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ApplianceProcess
from tests.test_gate_acceptance_support import (
    ACCESS_ERROR,
    ACCESS_OK,
    ACCESS_REJECT,
    ACCESS_RELAY,
    ERROR_CODE,
    GATE_ALL,
    GATE_BROKEN,
    LISTED,
    NAMED,
    TAG_LISTED,
    Named,
    free_udp_port,
    gate_config,
)
from tests.test_smtp_acceptance_support import maildir, messages_with, wait_for

pytestmark = pytest.mark.integration

OUTSIDE = "127.0.0.10"
CLEAN = "127.0.2.10"  # listed nowhere, in no access entry
LAN_CLIENT = "127.0.1.7"
GREET = 0.4
GREY_DELAY = 1.0
#: Every sender domain the tests use except grey.test is exempt from greylisting.
GREY_ALLOW = '"remote.test", "spfpass.test", "spffail.test", "typo.test", "invalid"'
SWAKS = shutil.which("swaks")


class Running:
    """A running appliance: its process, config and SMTP port."""

    def __init__(self, process: ApplianceProcess, config: Path, port: int) -> None:
        self.process = process
        self.config = config
        self.port = port

    def log_has(self, *texts: str, level: str = "") -> bool:
        """True when one log line (of ``level``, e.g. ``#error]``) contains every text."""
        return any(
            all(t in line for t in texts) and level in line
            for line in self.process.read_log().splitlines()
        )

    def wait_log(self, *texts: str, level: str = "") -> None:
        wait_for(lambda: self.log_has(*texts, level=level), 10, f"log line with {texts}")


@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Named]:
    if NAMED is None:
        pytest.skip("named (bind9) not installed")
    server = Named(tmp_path_factory.mktemp("gate-named"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _run(tmp: Path, gate: str, forwarder: str) -> Iterator[Running]:
    config, port = gate_config(tmp, gate, forwarder)
    process = ApplianceProcess(config, tmp / "appliance.log")
    process.start()
    try:
        yield Running(process, config, port)
    finally:
        assert process.stop() == 0, process.read_log()[-3000:]


@pytest.fixture(scope="module")
def gate_on(tmp_path_factory: pytest.TempPathFactory, named: Named) -> Iterator[Running]:
    gate = GATE_ALL.format(greet=GREET, grey_delay=GREY_DELAY, grey_allow=GREY_ALLOW)
    yield from _run(tmp_path_factory.mktemp("gate-on"), gate, f"127.0.0.1:{named.port}")


@pytest.fixture(scope="module")
def gate_broken(tmp_path_factory: pytest.TempPathFactory, named: Named) -> Iterator[Running]:
    yield from _run(tmp_path_factory.mktemp("gate-broken"), GATE_BROKEN, f"127.0.0.1:{named.port}")


def token() -> str:
    return "tok-" + uuid.uuid4().hex


def connect(running: Running, source: str) -> smtplib.SMTP:
    session = smtplib.SMTP(OUTSIDE, running.port, timeout=15, source_address=(source, 0))
    assert session.ehlo("client.remote.test")[0] == 250
    return session


def message(tok: str, subject: str = "hello", sender: str = "someone@remote.test") -> bytes:
    head = f"From: {sender}\r\n" if sender else ""
    return (
        f"{head}To: bob@example.test\r\nSubject: {subject}\r\nMessage-ID: <{tok}@remote.test>\r\n"
        f"\r\nbody {tok}\r\n"
    ).encode()


def send_all(session: smtplib.SMTP, sender: str, recipient: str, data: bytes) -> tuple[int, bytes]:
    """MAIL, RCPT (both must be 250), DATA: the reply to the end of DATA."""
    assert session.mail(sender)[0] == 250
    code, text = session.rcpt(recipient)
    assert code == 250, text
    return session.data(data)


def delivered(running: Running, user: str, tok: str) -> bytes:
    box = maildir(running.config, user)
    wait_for(lambda: bool(messages_with(box, tok)), 20, f"delivery of {tok}")
    return messages_with(box, tok)[0]


def header_block(data: bytes) -> bytes:
    return data.split(b"\n\n", 1)[0].replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]


# ---------------------------------------------------------------------- DNSBL


@pytest.mark.skipif(SWAKS is None, reason="swaks not installed")
def test_dnsbl_reject_at_connect_with_the_lists_txt(gate_on: Running) -> None:
    assert SWAKS is not None
    run = subprocess.run(
        [SWAKS, "--server", OUTSIDE, "--port", str(gate_on.port), "--local-interface", LISTED,
         "--from", "someone@remote.test", "--to", "bob@example.test", "--timeout", "15"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode != 0
    assert "<** 554 5.7.1" in run.stdout, run.stdout
    assert "blocked using bl.test; Listed for spam, see http://bl.test/127.0.2.2" in run.stdout
    assert "EHLO" not in run.stdout.split("<** 554", 1)[1]  # the connection ended at the banner
    gate_on.wait_log("gate connect dnsbl", f"client={LISTED}", "reject 554 5.7.1")


def test_dnsbl_tag_mode_adds_a_header_and_spf_pass_adds_authentication_results(
    gate_on: Running,
) -> None:
    tok = token()
    with connect(gate_on, TAG_LISTED) as session:
        code, _ = send_all(session, "someone@remote.test", "bob@example.test", message(tok))
        assert code == 250
    head = header_block(delivered(gate_on, "bob", tok))
    assert b"X-DNSBL: tagbl.test 127.0.0.3 client=[127.0.2.4]; Suspicious, tag only" in head
    assert b"Authentication-Results: mail.example.test; spf=pass" in head
    assert b"smtp.mailfrom=someone@remote.test" in head


@pytest.mark.skipif(SWAKS is None, reason="swaks not installed")
def test_clean_client_accepted_with_authentication_results_via_swaks(gate_on: Running) -> None:
    assert SWAKS is not None
    tok = token()
    run = subprocess.run(
        [SWAKS, "--server", OUTSIDE, "--port", str(gate_on.port), "--local-interface", CLEAN,
         "--from", "x@spfpass.test", "--to", "alice@example.test", "--header", f"Subject: {tok}",
         "--timeout", "15"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout
    head = header_block(delivered(gate_on, "alice", tok))
    assert b"Authentication-Results: mail.example.test; spf=pass" in head
    assert b"X-DNSBL" not in head


# ---------------------------------------------------------------------- domains


def test_sender_domain_nxdomain_is_553_at_mail(gate_on: Running) -> None:
    with connect(gate_on, CLEAN) as session:
        code, text = session.mail("someone@ghost.remote.test")
        assert (code, text[:5]) == (553, b"5.1.8"), text
        assert b"ghost.remote.test not found" in text
        assert session.mail("someone@remote.test")[0] == 250  # the session goes on


@pytest.mark.parametrize("sender", ["x@typo.test", "root@host.localdomain", "a@b.invalid"])
def test_always_wrong_domain_fails_at_once_without_dns(gate_on: Running, sender: str) -> None:
    with connect(gate_on, CLEAN) as session:
        code, text = session.mail(sender)
    assert (code, text[:5]) == (553, b"5.1.8"), text
    gate_on.wait_log(f"sender=<{sender}>", "in the always-wrong list")
    assert not gate_on.log_has(f"sender=<{sender}>", "no such domain")


# ---------------------------------------------------------------------- access map


@pytest.mark.parametrize(
    ("client", "reply"),
    [
        (ACCESS_REJECT, (554, b"5.7.1 Access denied")),
        (ACCESS_ERROR, (554, b"5.7.1 You are not welcome here")),
    ],
    ids=["REJECT", "ERROR"],
)
def test_access_map_refuses_clients_at_connect(
    gate_on: Running, client: str, reply: tuple[int, bytes]
) -> None:
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP(OUTSIDE, gate_on.port, timeout=15, source_address=(client, 0))
    assert (refused.value.smtp_code, refused.value.smtp_error) == reply


def test_access_map_ok_skips_dnsbl_and_domain_checks(gate_on: Running) -> None:
    # ACCESS_OK is listed in bl.test and the sender domain does not exist: OK wins.
    with connect(gate_on, ACCESS_OK) as session:
        assert session.mail("someone@ghost.remote.test")[0] == 250
        assert session.rcpt("bob@example.test")[0] == 250
        # OK does not permit relaying.
        code, text = session.rcpt("friend@spfpass.test")
        assert (code, text[:5]) == (550, b"5.7.1")


def test_access_map_relay_permits_relaying(gate_on: Running) -> None:
    with connect(gate_on, ACCESS_RELAY) as session:
        assert session.mail("someone@remote.test")[0] == 250
        assert session.rcpt("friend@spfpass.test")[0] == 250
        session.rset()
    with connect(gate_on, CLEAN) as session:
        assert session.mail("someone@remote.test")[0] == 250
        code, text = session.rcpt("friend@spfpass.test")
        assert (code, text[:5]) == (550, b"5.7.1")


@pytest.mark.parametrize(
    ("sender", "reply"),
    [
        ("spammer@remote.test", (550, b"5.7.1 Access denied")),
        ("tempfail@remote.test", (451, b"4.7.1 Come back later")),
    ],
    ids=["From-REJECT", "From-ERROR-451"],
)
def test_access_map_sender_entries(gate_on: Running, sender: str, reply: tuple[int, bytes]) -> None:
    with connect(gate_on, CLEAN) as session:
        assert session.mail(sender) == reply


def test_access_map_recipient_error(gate_on: Running) -> None:
    with connect(gate_on, CLEAN) as session:
        assert session.mail("someone@remote.test")[0] == 250
        assert session.rcpt("hostmaster@example.test") == (
            550,
            b"5.7.1 This mailbox takes no mail from outside",
        )
        assert session.rcpt("bob@example.test")[0] == 250


def test_access_map_discard_answers_250_and_drops(gate_on: Running) -> None:
    tok = token()
    with connect(gate_on, CLEAN) as session:
        code, text = send_all(
            session, "someone@discard.remote.test", "bob@example.test", message(tok)
        )
    assert code == 250 and b"discarded" in text
    # A message accepted after it proves the queue ran; the discarded one never arrives.
    tok2 = token()
    with connect(gate_on, CLEAN) as session:
        assert send_all(session, "someone@remote.test", "bob@example.test", message(tok2))[0] == 250
    delivered(gate_on, "bob", tok2)
    assert not messages_with(maildir(gate_on.config, "bob"), tok)


# ---------------------------------------------------------------------- headers


@pytest.mark.parametrize(
    ("subject", "with_from", "reply"),
    [
        ("cheap viagra", True, (550, b"5.7.1 Spam subject")),
        ("no author", False, (550, b"5.6.0 Message header From is missing or malformed")),
    ],
    ids=["rule-reject", "no-From"],
)
def test_header_checks_refuse_at_end_of_data(
    gate_on: Running, subject: str, with_from: bool, reply: tuple[int, bytes]
) -> None:
    tok = token()
    data = message(tok, subject, "someone@remote.test" if with_from else "")
    with connect(gate_on, CLEAN) as session:
        assert send_all(session, "someone@remote.test", "bob@example.test", data) == reply
    gate_on.wait_log("gate data headers", f"client={CLEAN}", f"reject {reply[0]}")


def test_header_rule_tag_adds_a_header(gate_on: Running) -> None:
    tok = token()
    with connect(gate_on, CLEAN) as session:
        code, _ = send_all(
            session, "someone@remote.test", "bob@example.test", message(tok, "win the lottery")
        )
    assert code == 250
    assert b"X-Header-Check: lottery words" in header_block(delivered(gate_on, "bob", tok))


# ---------------------------------------------------------------------- greylisting, SPF


def test_greylisting_451_then_accepted_after_the_delay(gate_on: Running) -> None:
    sender = f"{token()}@grey.test"
    with connect(gate_on, CLEAN) as session:
        assert session.mail(sender)[0] == 250
        first = time.monotonic()
        assert session.rcpt("bob@example.test") == (
            451,
            b"4.7.1 Greylisted, please try again later",
        )
        # Too early: still greylisted.
        assert session.rcpt("bob@example.test")[0] == 451
    time.sleep(max(0.0, GREY_DELAY + 0.2 - (time.monotonic() - first)))
    tok = token()
    with connect(gate_on, CLEAN) as session:
        assert send_all(session, sender, "bob@example.test", message(tok, sender=sender))[0] == 250
    delivered(gate_on, "bob", tok)


def test_spf_fail_is_550_5_7_23(gate_on: Running) -> None:
    with connect(gate_on, CLEAN) as session:
        assert session.mail("someone@spffail.test")[0] == 250
        code, text = session.rcpt("bob@example.test")
    assert (code, text[:6]) == (550, b"5.7.23"), text


# ---------------------------------------------------------------------- greet pause


def _raw_talk_first(source: str, port: int) -> bytes:
    """Connect, send EHLO at once (before any banner), read everything until the server closes."""
    with socket.create_connection((OUTSIDE, port), 15, source_address=(source, 0)) as raw:
        raw.sendall(b"EHLO eager.remote.test\r\n")
        raw.settimeout(15)
        data = b""
        while b"\r\n250" not in data and b"\r\n250 " not in data:
            chunk = raw.recv(4096)
            if not chunk:
                break
            data += chunk
            if data.startswith(b"554"):
                break
        return data


def test_early_talker_is_refused(gate_on: Running) -> None:
    reply = _raw_talk_first("127.0.2.11", gate_on.port)
    assert reply.startswith(b"554 5.5.0"), reply
    gate_on.wait_log("gate connect greet_pause", "client=127.0.2.11", "reject 554 5.5.0")


def test_client_that_waits_is_served_after_the_pause(gate_on: Running) -> None:
    started = time.monotonic()
    with smtplib.SMTP(OUTSIDE, gate_on.port, timeout=15, source_address=("127.0.2.12", 0)) as s:
        waited = time.monotonic() - started
        assert s.ehlo("patient.remote.test")[0] == 250
    assert waited >= GREET - 0.05


def test_inside_clients_are_not_delayed(gate_on: Running) -> None:
    # An inside client may even speak at once: there is no pause to talk into.
    reply = _raw_talk_first(LAN_CLIENT, gate_on.port)
    assert reply.startswith(b"220 "), reply
    assert b"\r\n250" in reply


# ---------------------------------------------------------------------- appliance policy test


def _policy(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", "policy", "test", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_policy_test_explains_a_refusal(gate_on: Running) -> None:
    run = _policy(
        gate_on.config,
        "--client", LISTED, "--helo", "h.remote.test", "--from", "a@remote.test",
        "--to", "bob@example.test",
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert "connect  dnsbl" in run.stdout
    assert "reject 554 5.7.1" in run.stdout and "Listed for spam" in run.stdout
    assert run.stdout.rstrip().endswith("=> refused")


def test_policy_test_explains_each_step_of_an_accepted_session(gate_on: Running) -> None:
    run = _policy(
        gate_on.config,
        "--client", CLEAN, "--helo", "h.remote.test", "--from", "a@spfpass.test",
        "--to", "bob@example.test",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert any(
        line.startswith("connect") and "greet_pause" in line and "0.4s" in line for line in lines
    )
    for check in ("dnsbl", "domain", "relay", "recipient", "greylist", "spf"):
        assert any(f" {check} " in f" {line} " for line in lines), (check, run.stdout)
    assert any("spf" in line and "pass for spfpass.test" in line for line in lines)
    assert lines[-1] == "=> accepted"


def test_policy_test_relay_and_unknown_recipient(gate_on: Running) -> None:
    run = _policy(
        gate_on.config,
        "--client", CLEAN, "--from", "a@remote.test", "--to", "nobody@example.test",
        "--to", "friend@spfpass.test",
    )  # fmt: skip
    assert run.returncode == 1
    lines = run.stdout.splitlines()
    assert any(line.split()[1:4] == ["recipient", "reject", "550"] for line in lines), run.stdout
    assert any(
        line.split()[1] == "relay" and "reject 550 5.7.1 Relaying denied" in line for line in lines
    )
    # Greylisting is only consulted: the greylisted triple is not recorded by the dry run.
    grey = _policy(
        gate_on.config, "--client", CLEAN, "--from", "dry@grey.test", "--to", "bob@example.test"
    )
    assert grey.returncode == 1 and "tempfail 451 4.7.1" in grey.stdout
    grey = _policy(
        gate_on.config, "--client", CLEAN, "--from", "dry@grey.test", "--to", "bob@example.test"
    )
    assert "new triple" in grey.stdout


# ---------------------------------------------------------------------- neighbours that fail


def test_failing_block_lists_mean_not_listed_and_are_logged(gate_broken: Running) -> None:
    # ERROR_CODE: bl.test answers 127.255.255.254; downbl.test is down; slowbl.test times out.
    tok = token()
    with connect(gate_broken, ERROR_CODE) as session:
        assert send_all(session, "someone@remote.test", "bob@example.test", message(tok))[0] == 250
    delivered(gate_broken, "bob", tok)
    gate_broken.wait_log("bl.test answered error code 127.255.255.254", ERROR_CODE, level="#error]")
    gate_broken.wait_log("DNSBL downbl.test lookup for", ERROR_CODE, level="#error]")
    gate_broken.wait_log("DNSBL slowbl.test lookup for", ERROR_CODE, level="#error]")


def test_sender_domain_dns_timeout_is_451_never_5xx(gate_broken: Running) -> None:
    with connect(gate_broken, CLEAN) as session:
        code, text = session.mail("someone@slow.test")
    assert (code, text[:5]) == (451, b"4.4.3"), text
    gate_broken.wait_log("sender domain slow.test", "DNS lookup failed", level="#error]")


def test_spf_timeout_accepts_and_is_logged(gate_broken: Running) -> None:
    tok = token()
    with connect(gate_broken, CLEAN) as session:
        data = message(tok, sender="someone@spfslow.test")
        assert send_all(session, "someone@spfslow.test", "bob@example.test", data)[0] == 250
    head = header_block(delivered(gate_broken, "bob", tok))
    assert b"spf=temperror" in head
    gate_broken.wait_log("SPF for", CLEAN, "temperror", level="#error]")


def test_dead_forwarder_refuses_nothing_permanently(tmp_path: Path, named: Named) -> None:
    dead = f"127.0.0.1:{free_udp_port()}"
    for running in _run(tmp_path, GATE_BROKEN, dead):
        with connect(running, "127.0.2.13") as session:
            code, text = session.mail("someone@remote.test")
            assert code == 451, text
            code, text = session.mail("<>")  # no sender domain: on to RCPT, SPF of the HELO
            assert code == 250, text
            code, text = session.rcpt("bob@example.test")
            assert code < 500, text
        running.wait_log("DNSBL bl.test lookup for 127.0.2.13 failed", level="#error]")
        running.wait_log("sender domain remote.test", "DNS lookup failed", level="#error]")


# ---------------------------------------------------------------------- restart (last: it restarts)


def test_greylisting_survives_a_restart(gate_on: Running) -> None:
    sender = f"{token()}@grey.test"
    with connect(gate_on, CLEAN) as session:
        assert session.mail(sender)[0] == 250
        first = time.monotonic()
        assert session.rcpt("bob@example.test")[0] == 451
    assert gate_on.process.stop() == 0
    log = gate_on.process.log
    log.rename(log.with_name(log.name + ".before-restart"))  # start() waits for a new log line
    gate_on.process.start()
    time.sleep(max(0.0, GREY_DELAY + 0.2 - (time.monotonic() - first)))
    with connect(gate_on, CLEAN) as session:
        assert session.mail(sender)[0] == 250
        assert session.rcpt("bob@example.test")[0] == 250


def test_policy_test_judges_a_header_block(gate_on: Running, tmp_path: Path) -> None:
    spam = tmp_path / "spam.eml"
    spam.write_bytes(b"From: a@remote.test\nSubject: cheap viagra\n\nbody\n")
    args = ("--client", CLEAN, "--from", "a@remote.test", "--to", "bob@example.test")
    run = _policy(gate_on.config, *args, "--headers", str(spam))
    assert run.returncode == 1, run.stdout + run.stderr
    assert any(
        line.startswith("data") and "headers" in line and "reject 550 5.7.1 Spam subject" in line
        for line in run.stdout.splitlines()
    ), run.stdout
    spam.write_bytes(b"From: a@remote.test\nSubject: hello\n\nbody\n")
    assert _policy(gate_on.config, *args, "--headers", str(spam)).returncode == 0


def test_policy_test_without_a_gate_still_explains_relaying(tmp_path: Path) -> None:
    from tests.harness import demo_copy

    config = demo_copy(tmp_path)
    run = _policy(config, "--client", "127.0.2.7", "--to", "alice@example.test")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no [gate] section" in run.stdout
    run = _policy(config, "--client", "127.0.2.7", "--to", "x@elsewhere.test")
    assert run.returncode == 1 and "Relaying denied" in run.stdout
    run = _policy(config, "--client", "127.0.1.7", "--to", "x@elsewhere.test")
    assert run.returncode == 0 and "relaying to elsewhere.test permitted" in run.stdout


def test_policy_test_reports_a_discard(gate_on: Running) -> None:
    run = _policy(
        gate_on.config,
        "--client",
        CLEAN,
        "--from",
        "x@discard.remote.test",
        "--to",
        "bob@example.test",
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert any(
        line.split()[:3] == ["mail", "access", "discard"] for line in run.stdout.splitlines()
    ), run.stdout
    assert run.stdout.rstrip().endswith("=> discarded")
