"""Helpers for the SMTP acceptance and durability tests against the real ``twistd appliance``.

Each test module runs its own copy of the demo configuration on free ports
(so it can run next to tests/test_demo.py and other helpers' runs), with the
outside listener on 127.0.0.10 and the inside one on 127.0.0.20 as in the demo.
"""

from __future__ import annotations

import re
import smtplib
import socket
import time
from collections.abc import Callable
from pathlib import Path

from tests.harness import demo_copy

OUTSIDE, INSIDE = "127.0.0.10", "127.0.0.20"
#: Clients: one in the inside networks (127.0.1.0/24), one on the "Internet" (127.0.2.0/24).
LAN_CLIENT, INTERNET_CLIENT = "127.0.1.7", "127.0.2.7"
DOMAIN = "example.test"


def free_port() -> int:
    """A TCP port free on both the outside and the inside address right now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((OUTSIDE, 0))
            port = int(probe.getsockname()[1])
        try:
            with socket.socket() as other:
                other.bind((INSIDE, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


def configure(tmp_path: Path, mail_settings: str = "", aliases: str = "") -> tuple[Path, int]:
    """A demo copy on fresh ports; extra ``[mail]`` lines and alias lines appended.

    Returns the config path and the SMTP port.
    """
    config = demo_copy(tmp_path)
    text = config.read_text()
    ports: dict[str, int] = {}

    def renumber(match: re.Match[str]) -> str:
        old = match.group(1)
        ports.setdefault(old, free_port())
        return f"port = {ports[old]}"

    text = re.sub(r"port = (\d+)", renumber, text)
    if mail_settings:
        text = text.replace("[mail]\n", "[mail]\n" + mail_settings.rstrip("\n") + "\n", 1)
    config.write_text(text)
    if aliases:
        alias_file = config.parent / "aliases"
        alias_file.write_text(alias_file.read_text() + aliases)
    return config, ports["10025"]


def state_dir(config: Path) -> Path:
    """The state directory demo_copy put next to the config's directory."""
    return config.parent.parent / "state"


def maildir(config: Path, user: str) -> Path:
    """The Maildir of a demo user (default mailbox ``<domain>/<local>`` under the mail root)."""
    return state_dir(config) / "mail" / DOMAIN / user


def messages_in(box: Path) -> list[Path]:
    """Every delivered message file (new/ and cur/) of a Maildir."""
    found: list[Path] = []
    for sub in ("new", "cur"):
        directory = box / sub
        if directory.is_dir():
            found.extend(p for p in directory.iterdir() if p.is_file())
    return found


def messages_with(box: Path, token: str) -> list[bytes]:
    """The contents of the messages in ``box`` that contain ``token``."""
    wanted = token.encode()
    return [data for p in messages_in(box) if wanted in (data := p.read_bytes())]


def wait_for(condition: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll until ``condition()`` holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def queued(config: Path) -> list[Path]:
    """Committed messages still in the spool's queue/ directory."""
    queue = state_dir(config) / "spool" / "queue"
    return sorted(queue.iterdir()) if queue.is_dir() else []


def smtp(address: str, port: int, source: str) -> smtplib.SMTP:
    """An smtplib session from ``source`` to ``address:port`` after EHLO."""
    session = smtplib.SMTP(address, port, timeout=15, source_address=(source, 0))
    code, _ = session.ehlo("client.remote.test")
    assert code == 250
    return session


def fill(mount: Path) -> Path:
    """Write a file until the tmpfs has no space left."""
    filler = mount / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler
