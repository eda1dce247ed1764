"""SMTP AUTH to the smart host (issue 7): the client session, the credentials file, and a real peer.

* :class:`Session` against the scripted peer of tests/test_smtp_client.py:
  PLAIN (RFC 4616 initial response, RFC 4954), LOGIN, never in the clear
  (4.7.4), every refusal temporary (Postfix's ``smtp_sasl_auth_soft_bounce``),
  the password never in the transcript.
* ``[delivery] smart_host_auth_file``: read at load, mode 0600-ish like an ssh key.
* Through the processes: one appliance relays through a second appliance's
  submission port (a real AUTH server after STARTTLS) as the demo user alice.
"""

from __future__ import annotations

import base64
import os
import smtplib
import uuid
from pathlib import Path
from typing import Any

import pytest

from appliance import config
from appliance.control import ControlClient
from appliance.mail.queue import DEFERRED
from appliance.mail.smtp_client import Credentials, OutboundSettings
from tests.harness import free_port
from tests.test_config import MINIMAL, write
from tests.test_delivery_support import (
    DNSServer,
    Receiver,
    internet_appliance,
    maildir_messages,
    tool,
    wait_until,
)
from tests.test_smtp_client import Peer

LOGIN = Credentials("alice@example.test", "s3cret pass phrase")
TLS = object()


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def to_auth(peer: Peer, after_tls_ehlo: bytes) -> None:
    """Greeting, EHLO with STARTTLS, the handshake, and ``after_tls_ehlo`` as the second EHLO reply."""
    peer.greet(b"250-mx.remote.test\r\n250-STARTTLS\r\n250-AUTH PLAIN\r\n250 PIPELINING\r\n")
    assert peer.written() == b"STARTTLS\r\n"  # AUTH offered in the clear is ignored
    peer.reply(b"220 2.0.0 ready\r\n")
    assert peer.endpoint.transport.tls is TLS
    assert peer.written() == b"EHLO gw.example.test\r\n"
    peer.reply(after_tls_ehlo)


def assert_password_hidden(peer: Peer) -> None:
    secrets = (
        LOGIN.password,
        b64(LOGIN.password).decode(),
        b64(f"\0{LOGIN.username}\0{LOGIN.password}").decode(),
    )
    for line in peer.session.transcript:
        assert not any(s in line for s in secrets), line
    for reply in peer.results[0].replies.values() if peer.results else ():
        assert LOGIN.password not in reply.text
    assert LOGIN.password not in repr(LOGIN)


# -- the session ------------------------------------------------------------------------------


def test_plain_with_initial_response_after_starttls() -> None:
    peer = Peer(tls_options=TLS, credentials=LOGIN)
    assert peer.session.requires_tls
    peer.send(["b@remote.test"])
    to_auth(peer, b"250-mx.remote.test\r\n250-AUTH LOGIN PLAIN\r\n250 PIPELINING\r\n")
    assert (
        peer.written() == b"AUTH PLAIN " + b64("\0alice@example.test\0s3cret pass phrase") + b"\r\n"
    )
    peer.reply(b"235 2.7.0 Authentication successful\r\n")
    assert peer.written().startswith(b"MAIL FROM:<alice@example.test>")
    peer.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
    peer.pump()
    peer.reply(b"250 2.0.0 queued\r\n")
    assert peer.result.delivered == ["b@remote.test"] and peer.result.tls
    assert "C: AUTH PLAIN <hidden>" in peer.session.transcript
    assert_password_hidden(peer)


def test_login_when_plain_is_not_offered() -> None:
    peer = Peer(tls_options=TLS, credentials=LOGIN)
    peer.send(["b@remote.test"])
    to_auth(peer, b"250-mx.remote.test\r\n250-AUTH CRAM-MD5 LOGIN\r\n250 PIPELINING\r\n")
    assert peer.written() == b"AUTH LOGIN\r\n"
    peer.reply(b"334 VXNlcm5hbWU6\r\n")
    assert peer.written() == b64("alice@example.test") + b"\r\n"
    peer.reply(b"334 UGFzc3dvcmQ6\r\n")
    assert peer.written() == b64("s3cret pass phrase") + b"\r\n"
    peer.reply(b"235 2.7.0 ok\r\n")
    assert peer.written().startswith(b"MAIL FROM:")
    assert peer.session.transcript.count("C: <hidden>") == 2
    assert_password_hidden(peer)


def test_old_auth_equals_form_is_understood() -> None:
    peer = Peer(tls_options=TLS, credentials=LOGIN)
    peer.send(["b@remote.test"])
    to_auth(peer, b"250-mx.remote.test\r\n250-AUTH=LOGIN\r\n250 PIPELINING\r\n")
    assert peer.written() == b"AUTH LOGIN\r\n"


@pytest.mark.parametrize(
    "ehlo, starttls_reply",
    [
        (b"250-mx.remote.test\r\n250-AUTH PLAIN LOGIN\r\n250 PIPELINING\r\n", None),  # no STARTTLS
        (
            b"250-mx.remote.test\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n",
            b"454 4.7.0 no TLS today\r\n",
        ),
    ],
)
def test_no_tls_means_no_password_and_a_temporary_474(
    ehlo: bytes, starttls_reply: bytes | None
) -> None:
    peer = Peer(tls_options=TLS, credentials=LOGIN)
    peer.send(["b@remote.test"])
    peer.greet(ehlo)
    if starttls_reply is not None:
        assert peer.written() == b"STARTTLS\r\n"
        peer.reply(starttls_reply)
    assert peer.written() == b"QUIT\r\n"
    peer.reply(b"221 bye\r\n")
    reply = peer.result.replies["b@remote.test"]
    assert (reply.code, reply.enhanced) == (451, "4.7.4") and reply.temporary
    assert not any("AUTH" in line for line in peer.session.transcript if line.startswith("C:"))
    assert_password_hidden(peer)


def test_credentials_without_tls_options_never_authenticate() -> None:
    peer = Peer(credentials=LOGIN)  # e.g. a retry that dropped TLS: still refused
    assert peer.session.requires_tls
    peer.send(["b@remote.test"])
    peer.greet(b"250-mx.remote.test\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n")
    assert peer.written() == b"QUIT\r\n"
    peer.reply(b"221 bye\r\n")
    assert peer.result.replies["b@remote.test"].enhanced == "4.7.4"


def test_failed_handshake_is_474_and_not_marked_for_a_clear_retry() -> None:
    peer = Peer(tls_options=TLS, credentials=LOGIN)
    peer.send(["b@remote.test"])
    peer.greet(b"250-mx\r\n250 STARTTLS\r\n")
    peer.reply(b"220 go\r\n")
    peer.endpoint.transport.loseConnection()
    result = peer.result
    reply = result.replies["b@remote.test"]
    assert (reply.code, reply.enhanced) == (451, "4.7.4")
    assert not result.tls_failed  # the clear-text retry of opportunistic TLS must not apply
    assert_password_hidden(peer)


@pytest.mark.parametrize(
    "answer, code, enhanced",
    [
        (b"535 5.7.8 Error: authentication failed\r\n", 451, "4.7.8"),
        (b"535 authentication failed\r\n", 451, "4.7.8"),
        (b"554 5.7.0 go away\r\n", 451, "4.7.0"),
        (b"454 4.7.0 Temporary authentication failure\r\n", 454, "4.7.0"),
        (b"250 what?\r\n", 451, "4.7.0"),
    ],
)
def test_refused_auth_defers_never_bounces(answer: bytes, code: int, enhanced: str) -> None:
    peer = Peer(tls_options=TLS, credentials=LOGIN)
    peer.send(["b@remote.test", "c@remote.test"])
    to_auth(peer, b"250-mx.remote.test\r\n250 AUTH PLAIN\r\n")
    assert peer.written().startswith(b"AUTH PLAIN ")
    peer.reply(answer)
    assert peer.written() == b"QUIT\r\n"  # no MAIL after a failed AUTH
    peer.reply(b"221 bye\r\n")
    result = peer.result
    assert not result.bounced and result.deferred == ["b@remote.test", "c@remote.test"]
    reply = result.replies["b@remote.test"]
    assert (reply.code, reply.enhanced) == (code, enhanced)
    assert "mx.remote.test[127.0.2.1]:25" in reply.text
    assert "C: AUTH PLAIN <hidden>" in peer.session.transcript
    assert_password_hidden(peer)


def test_login_refused_at_the_password_is_temporary() -> None:
    peer = Peer(tls_options=TLS, credentials=LOGIN)
    peer.send(["b@remote.test"])
    to_auth(peer, b"250-mx.remote.test\r\n250 AUTH LOGIN\r\n")
    peer.written()
    peer.reply(b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n535 5.7.8 no\r\n")
    peer.written()
    peer.reply(b"221 bye\r\n")
    reply = peer.result.replies["b@remote.test"]
    assert (reply.code, reply.enhanced) == (451, "4.7.8")
    assert_password_hidden(peer)


def test_no_common_mechanism_is_temporary_and_names_the_host() -> None:
    peer = Peer(tls_options=TLS, credentials=LOGIN)
    peer.send(["b@remote.test"])
    to_auth(peer, b"250-mx.remote.test\r\n250 AUTH CRAM-MD5 GSSAPI\r\n")
    assert peer.written() == b"QUIT\r\n"
    peer.reply(b"221 bye\r\n")
    reply = peer.result.replies["b@remote.test"]
    assert (reply.code, reply.enhanced) == (451, "4.7.0")
    assert "mx.remote.test[127.0.2.1]:25" in reply.text and "CRAM-MD5" in reply.text


def test_without_credentials_there_is_no_auth() -> None:
    peer = Peer(tls_options=TLS)
    assert not peer.session.requires_tls
    peer.send(["b@remote.test"])
    to_auth(peer, b"250-mx.remote.test\r\n250 AUTH PLAIN\r\n")
    assert peer.written().startswith(b"MAIL FROM:")


def test_settings_carry_credentials_for_the_smart_host_only() -> None:
    settings = OutboundSettings("gw.example.test", smart_host_credentials=LOGIN)
    assert settings.smart_host_credentials == LOGIN
    assert LOGIN.password not in repr(settings)
    assert OutboundSettings("gw.example.test").smart_host_credentials is None


# -- the configuration --------------------------------------------------------------------------


def auth_config(tmp_path: Path, content: str | None, mode: int = 0o600, extra: str = "") -> Path:
    auth = tmp_path / "smarthost-auth"
    if content is not None:
        auth.write_text(content)
        auth.chmod(mode)
    text = (
        MINIMAL
        + f'\n[delivery]\nsmart_host = "[127.0.2.5]:587"\nsmart_host_auth_file = "smarthost-auth"\n{extra}'
    )
    return write(tmp_path, text)


def problems(path: Path) -> dict[str, str]:
    return {p.key: p.reason for p in config.check(path)}


def test_good_auth_file_is_read_at_load(tmp_path: Path) -> None:
    path = auth_config(tmp_path, "# the ISP's relay\n\n  alice@example.test   two words  \n")
    c = config.load(path)
    assert c.delivery.smart_host_auth_file == tmp_path / "smarthost-auth"
    assert c.delivery.smart_host_credentials == Credentials("alice@example.test", "two words")
    assert "two words" not in repr(c.delivery)


def test_auth_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    found = problems(auth_config(tmp_path, "alice pw\n", 0o644))
    reason = found["delivery.smart_host_auth_file"]
    assert "0644" in reason and "group or other" in reason
    assert problems(auth_config(tmp_path, "alice pw\n", 0o640))
    assert not problems(auth_config(tmp_path, "alice pw\n", 0o400))


def test_missing_file(tmp_path: Path) -> None:
    (problem,) = config.check(auth_config(tmp_path, None))
    assert problem.key == "delivery.smart_host_auth_file"
    assert "does not exist" in problem.reason and str(tmp_path / "smarthost-auth") in problem.reason
    assert problem.file == str(tmp_path / "appliance.toml")


def test_directory_is_not_an_auth_file(tmp_path: Path) -> None:
    path = auth_config(tmp_path, None)
    (tmp_path / "smarthost-auth").mkdir()
    assert "is not a regular file" in problems(path)["delivery.smart_host_auth_file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    found = problems(auth_config(tmp_path, "alice pw\n", 0o000))
    assert "cannot read" in found["delivery.smart_host_auth_file"]


@pytest.mark.parametrize(
    "content, reason",
    [
        ("# nothing\n\n", "exactly one 'username password' line, not 0"),
        ("alice pw\nbob pw\n", "exactly one 'username password' line, not 2"),
        ("# c\nalice-only\n", "line 2 must be 'username password'"),
    ],
)
def test_wrong_shape(tmp_path: Path, content: str, reason: str) -> None:
    (problem,) = config.check(auth_config(tmp_path, content))
    assert problem.key == "delivery.smart_host_auth_file"
    assert reason in problem.reason


def test_password_is_never_quoted_in_errors(tmp_path: Path) -> None:
    found = problems(auth_config(tmp_path, "alice hunter2\nbob hunter3\n", 0o644))
    assert not any("hunter" in reason for reason in found.values())
    found = problems(auth_config(tmp_path, "alice hunter2\nbob hunter3\n"))
    assert not any("hunter" in reason for reason in found.values())


def test_key_needs_smart_host_and_tls(tmp_path: Path) -> None:
    (tmp_path / "smarthost-auth").write_text("alice pw\n")
    (tmp_path / "smarthost-auth").chmod(0o600)
    text = (
        MINIMAL
        + '\n[delivery]\nsmart_host_auth_file = "smarthost-auth"\nopportunistic_tls = false\n'
    )
    found = problems(write(tmp_path, text))
    assert set(found) == {"delivery.smart_host_auth_file"}
    reasons = [p.reason for p in config.check(write(tmp_path, text))]
    assert any("smart_host is not" in r for r in reasons)
    assert any("opportunistic_tls = false" in r for r in reasons)
    assert problems(auth_config(tmp_path, "alice pw\n", extra="")) == {}
    text = MINIMAL + '\n[delivery]\nsmart_host = "[127.0.2.5]"\nsmart_host_auth_file = ""\n'
    assert "must name a file" in problems(write(tmp_path, text))["delivery.smart_host_auth_file"]


def test_appliance_check_reports_the_mode(tmp_path: Path) -> None:
    path = auth_config(tmp_path, "alice pw\n", 0o644)
    out = tool(path, "check")
    assert out.returncode == 1
    assert "delivery.smart_host_auth_file" in out.stdout and "0644" in out.stdout


# -- through the processes: a second appliance is the smart host ---------------------------------

PEER_OUTSIDE = "127.0.2.192"
PEER_INSIDE = "127.0.2.193"
FINAL = "127.0.2.191"
DNS = "127.0.2.190"


def send(ports: dict[str, int], rcpt: str) -> None:
    """Alice's message into the gateway's port 25 from the LAN (relaying from inside is allowed)."""
    body = f"From: alice@example.test\r\nSubject: via the smart host\r\nMessage-ID: <{uuid.uuid4()}@t>\r\n\r\nhi\r\n"
    with smtplib.SMTP(
        "127.0.0.20", ports["smtp"], source_address=("127.0.1.101", 0), timeout=30
    ) as s:
        assert not s.sendmail("alice@example.test", [rcpt], body.encode())


def state_of(state: Path, rcpt: str) -> dict[str, Any] | None:
    """``rcpt``'s queue entry, straight from the control socket."""
    with ControlClient(state / "control.sock", timeout=30) as client:
        entries = client.call("mailq")
    for entry in entries:
        for r in entry["recipients"]:
            if r["address"] == rcpt:
                return dict(r, queue_id=entry["queue_id"])
    return None


@pytest.mark.integration
def test_smart_host_auth_through_a_second_appliance(tmp_path: Path) -> None:
    dns = DNSServer(DNS, {"test": [("SOA", "ns.test. hostmaster.test. 1 3600 600 86400 1")]})
    final = Receiver(FINAL, free_port(FINAL))
    started: list[Any] = []
    try:
        # The peer: the demo appliance moved to 127.0.2.192/.193, relaying remote.test to FINAL.
        peer, peer_config, peer_ports = internet_appliance(
            tmp_path / "peer",
            dns,
            delivery=f'[delivery.static_routes]\n"remote.test" = "[{FINAL}]:{final.port}"\n',
        )
        text = peer_config.read_text()
        peer_config.write_text(
            text.replace("127.0.0.10", PEER_OUTSIDE).replace("127.0.0.20", PEER_INSIDE)
        )
        peer.start()
        started.append(peer)

        # The gateway: everything remote goes to the peer's submission port, with AUTH;
        # static.test goes there too, as a static route, which must get no credentials.
        auth = tmp_path / "smarthost-auth"
        auth.write_text("# the smart host's login\nalice@example.test wrong-password\n")
        auth.chmod(0o600)
        smart = f"[{PEER_OUTSIDE}]:{peer_ports['submission']}"
        gateway, gw_config, gw_ports = internet_appliance(
            tmp_path / "gw",
            dns,
            delivery=(
                f'[delivery]\nsmart_host = "{smart}"\nsmart_host_auth_file = "{auth}"\n'
                f'[delivery.static_routes]\n"static.test" = "{smart}"\n'
            ),
        )
        assert tool(gw_config, "check").returncode == 0
        gateway.start()
        started.append(gateway)
        gw_state = tmp_path / "gw" / "state"

        # A wrong password: 535 from the peer; the mail waits (4.7.8), nothing is bounced.
        rcpt = f"u-{uuid.uuid4().hex[:8]}@remote.test"
        send(gw_ports, rcpt)
        state = wait_until(
            lambda: (s := state_of(gw_state, rcpt)) and s["attempts"] > 0 and s, what="an attempt"
        )
        assert state["status"] == DEFERRED
        assert state["last_reply"]["code"] == 451
        assert state["last_reply"]["enhanced"] == "4.7.8", state
        assert smart in state["last_reply"]["text"]
        assert final.delivered() == []

        # The right password, a reload, a flush: alice's mail reaches FINAL through the peer.
        auth.write_text("# the smart host's login\nalice@example.test demo-alice\n")
        assert tool(gw_config, "reload").returncode == 0
        wait_until(lambda: b"reloaded" in gateway.log.read_bytes(), what="the reload")
        out = tool(gw_config, "flush", state["queue_id"])
        assert out.returncode == 0, out.stderr
        wait_until(lambda: rcpt in final.delivered(), what="delivery through the smart host")
        (transaction,) = [t for t in final.transactions if rcpt in t.recipients]
        assert transaction.sender == "alice@example.test"
        # The peer's Received line: TLS and AUTH (RFC 3848 ESMTPSA).
        assert b"ESMTPSA" in transaction.data
        wait_until(lambda: state_of(gw_state, rcpt) is None, what="the queue to empty")

        # A static route to the same server: no credentials, so the peer's submission refuses it.
        other = f"s-{uuid.uuid4().hex[:8]}@static.test"
        before = len(maildir_messages(gw_state, "alice"))
        send(gw_ports, other)
        reports = wait_until(
            lambda: [
                m for m in maildir_messages(gw_state, "alice")[before:] if other.encode() in m
            ],
            what="the bounce for the static route",
        )
        assert b"5.7.0" in reports[0]
        assert other not in final.delivered()

        for secret in (b"wrong-password", b"demo-alice"):
            assert secret not in gateway.log.read_bytes()
    finally:
        for process in reversed(started):
            process.stop()
        final.close()
        dns.close()
