"""Run BIND's ``named`` on loopback for interop and parity tests (root only, foreground, temp config)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode

from tests.harness import free_port

NAMED = shutil.which("named") or "/usr/sbin/named"


def bind_available() -> str | None:
    """Why BIND tests cannot run here, or None if they can."""
    if not os.path.exists(NAMED):
        return "BIND's named is not installed (apt-get install bind9)"
    if os.geteuid() != 0:
        return "named needs root here"
    return None




def shift_ports(config: Path, ports: dict[str, int]) -> None:
    """Rewrite the demo configuration's listener ports (role -> port) so tests run side by side."""
    text = config.read_text()
    for role, port in ports.items():
        text = re.sub(rf"^({role} = \{{.*port = )\d+", rf"\g<1>{port}", text, flags=re.M)
    config.write_text(text)


ROLES = ("dns", "smtp", "submission", "smtps", "pop3", "pop3s")


def demo_on_free_ports(tmp: Path, host: str = "127.0.0.10") -> tuple[Path, dict[str, int]]:
    """A demo copy under ``tmp`` whose listeners all moved to free ports (role -> port)."""
    from tests.harness import demo_copy

    config = demo_copy(tmp)
    ports = {role: free_port(host) for role in ROLES}
    shift_ports(config, ports)
    return config, ports


class Setup:
    """What a BIND interop fixture hands its tests: both servers, our DNS port, the zone file."""

    def __init__(self, appliance: Any, named: Named, port: int, zone_file: Path) -> None:
        self.appliance = appliance
        self.named = named
        self.port = port
        self.zone_file = zone_file


class Named:
    """``named -g -c named.conf`` as a child process with its own directory and log.

    named listens only on addresses configured on an interface, so it listens
    on 127.0.0.1 (``address``); ``source`` (any 127/8 address: Linux lets a
    socket bind to all of them) is where its transfers and SOA queries come from.
    """

    def __init__(
        self, directory: Path, address: str, port: int, body: str, source: str | None = None
    ) -> None:
        source = source or address
        self.directory = directory
        self.address = address
        self.port = port
        self.log = directory / "named.log"
        directory.mkdir(parents=True, exist_ok=True)
        self.conf = directory / "named.conf"
        self.conf.write_text(
            f"""
options {{
    directory "{directory}";
    pid-file "{directory}/named.pid";
    session-keyfile "{directory}/session.key";
    managed-keys-directory "{directory}";
    listen-on port {port} {{ {address}; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    notify no;
    minimal-responses no;
    minimal-any no;
    allow-transfer {{ any; }};
    transfer-source {source};
    query-source address {source};
    notify-source {source};
}};
controls {{ }};
{body}
"""
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0, prefix: Sequence[str] = ()) -> None:
        """Start named (behind ``prefix``, e.g. ``taskset -c 1``) and wait until it runs."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [*prefix, NAMED, "-g", "-n", "1", "-c", str(self.conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(self.directory),
            )
        self.wait_for_log(" running\n", timeout)  # not "running as: ..." at the start

    def read_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.read_log():
                return
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"named exited ({self.process.returncode}):\n{self.read_log()}"
                )
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in named's log within {timeout}s:\n{self.read_log()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def soa_serial(server: str, port: int, zone: str, source: str) -> int | None:
    """The SOA serial ``server`` answers authoritatively for ``zone``, or None."""
    try:
        reply = dns.query.udp(
            dns.message.make_query(zone, "SOA"), server, port=port, source=source, timeout=1
        )
    except (dns.exception.DNSException, OSError):
        return None
    if reply.rcode() != dns.rcode.NOERROR or not reply.answer:
        return None
    return int(reply.answer[0][0].serial)
