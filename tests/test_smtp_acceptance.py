"""Issue 5's acceptance through the real ``twistd appliance``: port 25 on both sides, end to end.

Every row of shared/relay-matrix.md against both listeners; delivery with
smtplib and swaks into the Maildirs with the trace headers; unknown users at
RCPT; the published SMTP-smuggling end-of-data variants over a raw socket;
the size limits; and a spool on a small tmpfs that is full or read-only
(452 4.3.1, never 250).
"""

from __future__ import annotations

import email.utils
import json
import re
import shutil
import smtplib
import socket
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.harness import ApplianceProcess
from tests.test_smtp_acceptance_support import (
    INSIDE,
    INTERNET_CLIENT,
    LAN_CLIENT,
    OUTSIDE,
    configure,
    fill,
    maildir,
    messages_in,
    messages_with,
    queued,
    smtp,
    state_dir,
    wait_for,
)

pytestmark = pytest.mark.integration

MAX_SIZE = 65536
#: Our own three-target list (two local users, one remote), added to this copy of the demo.
TRIO_ALIAS = "trio: alice@example.test, bob@example.test, partner@remote.test\n"


class Demo:
    """The running process, its config and its SMTP port."""

    def __init__(self, process: ApplianceProcess, config: Path, port: int) -> None:
        self.process = process
        self.config = config
        self.port = port


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    tmp = tmp_path_factory.mktemp("smtp-acceptance")
    config, port = configure(tmp, f"max_message_size = {MAX_SIZE}", TRIO_ALIAS)
    process = ApplianceProcess(config, tmp / "appliance.log")
    process.start()
    try:
        yield Demo(process, config, port)
    finally:
        assert process.stop() == 0, process.read_log()


def token() -> str:
    return "tok-" + uuid.uuid4().hex


# ---------------------------------------------------------------------- relay matrix

INSIDE_SENDER, OUTSIDE_SENDER = "alice@example.test", "someone@remote.test"
INSIDE_RCPT, OUTSIDE_RCPT = "bob@example.test", "friend@remote.test"

#: (client, envelope sender, envelope recipient, accepted) exactly as relay-matrix.md.
MATRIX = [
    ("inside", "inside", "outside", True),
    ("inside", "outside", "outside", True),
    ("inside", "inside", "inside", True),
    ("inside", "outside", "inside", True),
    ("outside", "inside", "outside", False),
    ("outside", "outside", "outside", False),
    ("outside", "inside", "inside", True),
    ("outside", "outside", "inside", True),
]
#: "Mail from <> follows the same rules": the null sender with each client/recipient pair.
NULL_SENDER_ROWS = [
    ("inside", "null", "outside", True),
    ("inside", "null", "inside", True),
    ("outside", "null", "outside", False),
    ("outside", "null", "inside", True),
]
SOURCES = {"inside": LAN_CLIENT, "outside": INTERNET_CLIENT}
SENDERS = {"inside": INSIDE_SENDER, "outside": OUTSIDE_SENDER, "null": ""}
RECIPIENTS = {"inside": INSIDE_RCPT, "outside": OUTSIDE_RCPT}


@pytest.mark.parametrize("listener", [OUTSIDE, INSIDE], ids=["outside-listener", "inside-listener"])
@pytest.mark.parametrize(
    ("client", "sender", "recipient", "accepted"),
    MATRIX + NULL_SENDER_ROWS,
    ids=[f"{c}-client/{s}-sender/{r}-rcpt" for c, s, r, _ in MATRIX + NULL_SENDER_ROWS],
)
def test_relay_matrix(
    demo: Demo, listener: str, client: str, sender: str, recipient: str, accepted: bool
) -> None:
    with smtp(listener, demo.port, SOURCES[client]) as session:
        code, _ = session.mail(SENDERS[sender])
        assert code == 250
        code, message = session.rcpt(RECIPIENTS[recipient])
        if accepted:
            assert code == 250, message
        else:
            assert code in (550, 554), message
            assert b"5.7.1" in message
            # The refusal is for this recipient only: the transaction goes on.
            assert session.rcpt(INSIDE_RCPT)[0] == 250
        assert session.rset()[0] == 250


# ---------------------------------------------------------------------- local delivery

RECEIVED_RE = re.compile(
    r"Received: from (?P<from>\S+) \((?P<literal>\[[0-9.]+\])\)"
    r" by (?P<by>\S+) with (?P<with>ESMTPS?) id (?P<id>[0-9A-F]{23})"
    r" for <(?P<for>[^>]+)>; (?P<date>[^\n]+)\n"
)


def unfolded(message: bytes) -> str:
    """The header section with folded lines joined (RFC 5322 2.2.3)."""
    head = message.split(b"\n\n", 1)[0].decode("ascii")
    return re.sub(r"\n[ \t]+", " ", head) + "\n"


def send(demo: Demo, recipient: str, tag: str, sender: str = "someone@remote.test") -> str:
    """One message from the Internet to the outside listener; returns the queue id."""
    with smtp(OUTSIDE, demo.port, INTERNET_CLIENT) as session:
        assert session.mail(sender)[0] == 250
        code, message = session.rcpt(recipient)
        assert code == 250, message
        code, message = session.data(f"Subject: {tag}\r\n\r\nbody of {tag}\r\n".encode())
        assert code == 250, message
    match = re.search(rb"queued as ([0-9A-F]{23})", message)
    assert match, message
    return match.group(1).decode()


def delivered(demo: Demo, user: str, tag: str, count: int = 1) -> bytes:
    """Wait for ``tag`` to land in ``user``'s Maildir new/; it must be there exactly ``count`` times."""
    box = maildir(demo.config, user)
    wait_for(lambda: len(messages_with(box, tag)) >= count, what=f"{tag} in {user}'s Maildir")
    found = messages_with(box, tag)
    assert len(found) == count
    assert all(p.parent.name == "new" for p in messages_in(box) if tag.encode() in p.read_bytes())
    return found[0]


def check_trace(
    message: bytes,
    queue_id: str,
    recipient: str,
    delivered_to: str,
    with_: str = "ESMTP",
    sender: str = "someone@remote.test",
) -> None:
    head = unfolded(message)
    lines = head.splitlines()
    assert lines[0] == f"Return-Path: <{sender}>"
    assert lines[1] == f"Delivered-To: {delivered_to}"
    match = RECEIVED_RE.search(head)
    assert match, head
    assert match["from"] == "client.remote.test"
    assert match["literal"] == f"[{INTERNET_CLIENT}]"
    assert match["by"] == "mail.example.test"
    assert match["with"] == with_
    assert match["id"] == queue_id
    assert match["for"] == recipient
    stamp = email.utils.parsedate_to_datetime(match["date"])
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 300
    assert b"\r" not in message  # Maildir files use LF line ends


def test_smtplib_delivery_to_bob(demo: Demo) -> None:
    tag = token()
    queue_id = send(demo, "bob@example.test", tag)
    message = delivered(demo, "bob", tag)
    check_trace(message, queue_id, "bob@example.test", "bob@example.test")
    assert message.endswith(f"body of {tag}\n".encode())


def test_smtplib_delivery_to_an_address_extension(demo: Demo) -> None:
    tag = token()
    queue_id = send(demo, "bob+news@example.test", tag)
    message = delivered(demo, "bob", tag)
    check_trace(message, queue_id, "bob+news@example.test", "bob+news@example.test")


def test_smtplib_delivery_to_postmaster(demo: Demo) -> None:
    tag = token()
    queue_id = send(demo, "postmaster@example.test", tag, sender="")
    message = delivered(demo, "alice", tag)
    # postmaster is an alias of alice: Delivered-To names the mailbox's address.
    check_trace(message, queue_id, "postmaster@example.test", "alice@example.test", sender="")
    assert not messages_with(maildir(demo.config, "bob"), tag)


def test_smtplib_delivery_to_an_alias_with_three_targets(demo: Demo) -> None:
    tag = token()
    queue_id = send(demo, "trio@example.test", tag)
    for user in ("alice", "bob"):
        message = delivered(demo, user, tag)
        check_trace(message, queue_id, "trio@example.test", f"{user}@example.test")
    # The remote target was added to the queue entry as a recipient of its own.
    envelope = state_dir(demo.config) / "spool" / "queue" / queue_id / "envelope.json"
    wait_for(
        lambda: envelope.exists() and b"partner@remote.test" in envelope.read_bytes(),
        what="the remote alias target in the queue",
    )
    recipients = json.loads(envelope.read_text())["recipients"]
    added = [r for r in recipients if r["address"] == "partner@remote.test"]
    assert [r["original"] for r in added] == ["trio@example.test"]


@pytest.mark.parametrize("address", [OUTSIDE, INSIDE])
def test_unknown_user_refused_at_rcpt(demo: Demo, address: str) -> None:
    with smtp(address, demo.port, INTERNET_CLIENT) as session:
        assert session.mail("someone@remote.test")[0] == 250
        code, message = session.rcpt("nobody@example.test")
        assert code == 550 and b"5.1.1" in message
        code, message = session.rcpt("bob+nobody@example.test")
        assert code == 250, message


def swaks(demo: Demo, recipient: str, tag: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "swaks",
            "--server", OUTSIDE,
            "--port", str(demo.port),
            "--local-interface", INTERNET_CLIENT,
            "--helo", "client.remote.test",
            "--from", "someone@remote.test",
            "--to", recipient,
            "--header", f"Subject: {tag}",
            "--body", f"body of {tag}",
            "--timeout", "15",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


def swaks_queue_id(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"<[-~]\s+250 2\.0\.0 Ok: queued as ([0-9A-F]{23})", result.stdout)
    assert match, result.stdout
    return match.group(1)


@pytest.mark.skipif(
    shutil.which("swaks") is None, reason="swaks is not installed (apt install swaks)"
)
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
@pytest.mark.parametrize(
    ("recipient", "user", "delivered_to"),
    [
        ("bob@example.test", "bob", "bob@example.test"),
        ("bob+news@example.test", "bob", "bob+news@example.test"),
        ("postmaster@example.test", "alice", "alice@example.test"),
    ],
)
def test_swaks_delivery(
    demo: Demo, tls: bool, recipient: str, user: str, delivered_to: str
) -> None:
    tag = token()
    result = swaks(demo, recipient, tag, *(["--tls"] if tls else []))
    queue_id = swaks_queue_id(result)
    message = delivered(demo, user, tag)
    check_trace(message, queue_id, recipient, delivered_to, "ESMTPS" if tls else "ESMTP")


@pytest.mark.skipif(
    shutil.which("swaks") is None, reason="swaks is not installed (apt install swaks)"
)
def test_swaks_alias_with_three_targets_and_an_unknown_user(demo: Demo) -> None:
    tag = token()
    queue_id = swaks_queue_id(swaks(demo, "trio@example.test", tag, "--tls"))
    for user in ("alice", "bob"):
        message = delivered(demo, user, tag)
        check_trace(message, queue_id, "trio@example.test", f"{user}@example.test", "ESMTPS")
    refused = swaks(demo, "nobody@example.test", token())
    assert refused.returncode != 0
    assert re.search(r"<[-~*]+\s*550 5\.1\.1 ", refused.stdout), refused.stdout


# ---------------------------------------------------------------------- smuggling

#: Every end-of-data look-alike made of bare LF, bare CR and CRLF around the dot
#: (SEC Consult's 2023 "SMTP smuggling" set): only CRLF . CRLF may end DATA.
ENDINGS = [(a, b) for a in (b"\n", b"\r", b"\r\n") for b in (b"\n", b"\r", b"\r\n")]
SMUGGLING = [(a, b) for a, b in ENDINGS if (a, b) != (b"\r\n", b"\r\n")] + [
    (b"\r\n", b"\r\r\n"),
    (b"\n\r", b"\r\n"),
]


def read_replies(sock: socket.socket, until: bytes) -> bytes:
    """Read until a final reply line starting with ``until`` (or end of stream)."""
    data = b""
    while not re.search(b"(^|\n)" + re.escape(until) + b" [^\n]*\n", data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize(("before", "after"), SMUGGLING, ids=[f"{a!r}.{b!r}" for a, b in SMUGGLING])
def test_smuggled_end_of_data_is_content(demo: Demo, before: bytes, after: bytes) -> None:
    tag = token()
    with socket.create_connection((OUTSIDE, demo.port), 15, (INTERNET_CLIENT, 0)) as sock:
        sock.settimeout(15)
        replies = read_replies(sock, b"220")
        sock.sendall(b"EHLO client.remote.test\r\n")
        replies += read_replies(sock, b"250")
        sock.sendall(b"MAIL FROM:<someone@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
        replies += read_replies(sock, b"354")
        body = (
            f"Subject: {tag}\r\n\r\nfirst part {tag}".encode()
            + before
            + b"."
            + after
            + b"MAIL FROM:<attacker@remote.test>\r\n"
            + b"RCPT TO:<alice@example.test>\r\n"
            + b"DATA\r\n"
            + f"Subject: smuggled {tag}\r\n\r\nsmuggled part {tag}\r\n".encode()
            + b".\r\nQUIT\r\n"
        )
        sock.sendall(body)
        replies += read_replies(sock, b"221")
    assert replies.count(b"queued as") == 1, replies
    assert replies.count(b"354 ") == 1, replies
    assert replies.rstrip().endswith(b"221 2.0.0 Bye"), replies
    message = delivered(demo, "bob", tag)
    assert f"first part {tag}".encode() in message
    assert f"smuggled part {tag}".encode() in message
    assert b"MAIL FROM:<attacker@remote.test>" in message
    assert not messages_with(maildir(demo.config, "alice"), tag)


# ---------------------------------------------------------------------- size limits


def test_message_over_the_size_limit_is_refused_and_not_stored(demo: Demo) -> None:
    tag, follow_up = token(), token()
    before = {p.name for p in queued(demo.config)}
    line = b"x" * 76 + b"\r\n"
    big = f"Subject: {tag}\r\n\r\n".encode() + line * (MAX_SIZE // len(line) + 10)
    with smtp(OUTSIDE, demo.port, INTERNET_CLIENT) as session:
        assert session.mail("someone@remote.test")[0] == 250
        assert session.rcpt("bob@example.test")[0] == 250
        code, message = session.data(big)
        assert code == 552 and b"5.3.4" in message, message
        # The session goes on; the next message is the barrier for "nothing stored".
        assert session.mail("someone@remote.test")[0] == 250
        assert session.rcpt("bob@example.test")[0] == 250
        assert session.data(f"Subject: {follow_up}\r\n\r\nsmall\r\n".encode())[0] == 250
    delivered(demo, "bob", follow_up)
    assert not messages_with(maildir(demo.config, "bob"), tag)
    assert {p.name for p in queued(demo.config)} <= before
    assert not list((state_dir(demo.config) / "spool" / "tmp").iterdir())


def test_size_parameter_over_the_limit_is_refused_at_mail(demo: Demo) -> None:
    with smtp(OUTSIDE, demo.port, INTERNET_CLIENT) as session:
        assert session.has_extn("size") and session.esmtp_features["size"] == str(MAX_SIZE)
        code, message = session.mail("someone@remote.test", [f"SIZE={MAX_SIZE + 1}"])
        assert code == 552 and b"5.3.4" in message, message
        assert session.mail("someone@remote.test", [f"SIZE={MAX_SIZE}"])[0] == 250


# ---------------------------------------------------------------------- spool full / unwritable


@pytest.fixture(scope="module")
def small_spool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Demo, Path]]:
    tmp = tmp_path_factory.mktemp("smtp-spool-full")
    mount = tmp / "spool-fs"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the spool: {result.stderr.strip()}")
    try:
        # The spool's own promise: without direct delivery every message goes through it
        # (tests/test_mail_direct.py fills the Maildir tree's file system as well).
        config, port = configure(tmp, f'spool = "{mount}"\ndirect_delivery = false')
        process = ApplianceProcess(config, tmp / "appliance.log")
        process.start()
        try:
            yield Demo(process, config, port), mount
        finally:
            assert process.stop() == 0, process.read_log()
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mount)], capture_output=True)
        subprocess.run(["umount", str(mount)], check=True)


def attempt(demo: Demo, tag: str, size: int = 20_000) -> tuple[int, bytes]:
    """One message from the inside; the refusal of DATA or the reply to its end."""
    body = f"Subject: {tag}\r\n\r\n".encode() + (b"y" * 70 + b"\r\n") * (size // 72)
    with smtp(INSIDE, demo.port, LAN_CLIENT) as session:
        assert session.mail("alice@example.test")[0] == 250
        assert session.rcpt("bob@example.test")[0] == 250
        try:
            return session.data(body)
        except smtplib.SMTPDataError as refused:  # refused at DATA itself, before 354
            error = refused.smtp_error
            return refused.smtp_code, error if isinstance(error, bytes) else error.encode()


def test_spool_full_gives_452_never_250(small_spool: tuple[Demo, Path]) -> None:
    demo, mount = small_spool
    filler = fill(mount)
    try:
        for size in (200, 20_000, 60_000):
            tag = token()
            code, message = attempt(demo, tag, size)
            assert (code, b"4.3.1" in message) == (452, True), (size, code, message)
        assert not [p for p in (mount / "tmp").iterdir()]
        assert not [p for p in (mount / "queue").iterdir()]
    finally:
        filler.unlink()
    tag = token()
    code, message = attempt(demo, tag)
    assert code == 250, message
    delivered(demo, "bob", tag)


def test_spool_read_only_gives_452_never_250(small_spool: tuple[Demo, Path]) -> None:
    demo, mount = small_spool
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    try:
        code, message = attempt(demo, token())
        assert code == 452 and b"4.3.1" in message, message
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)
    tag = token()
    code, message = attempt(demo, tag)
    assert code == 250, message
    delivered(demo, "bob", tag)
