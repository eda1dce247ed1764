"""Run the real ``twistd appliance`` process on loopback for integration tests; shared test helpers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from twisted.internet import defer

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "etc" / "demo"


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP on ``host`` (best effort: nothing holds it afterwards)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
            return port
    raise RuntimeError(f"no free port on {host}")


def async_test(
    f: Callable[[Any], Coroutine[Any, Any, None]],
) -> Callable[[Any], defer.Deferred[None]]:
    """A trial test method written as a coroutine."""

    def run(self: Any) -> defer.Deferred[None]:
        return defer.ensureDeferred(f(self))

    run.__name__ = f.__name__
    return run


def demo_copy(tmp_path: Path) -> Path:
    """A copy of the demo configuration whose state lives under ``tmp_path``."""
    target = tmp_path / "demo"
    shutil.copytree(DEMO, target)
    path = target / "appliance.toml"
    text = path.read_text().replace('state_dir = "../../var/demo"', f'state_dir = "{tmp_path / "state"}"')
    path.write_text(text)
    return path


class ApplianceProcess:
    """``twistd -n appliance --config PATH`` as a child process, with its log in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        twistd = Path(sys.executable).parent / "twistd"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(twistd), "--nodaemon", "--pidfile=", "--logger=appliance.logs.observer", "appliance", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(self.config.parent),
                env=env,
            )
        self.wait_for_log("appliance started", timeout)

    def wait_for_log(self, text: str, timeout: float = 30.0, after: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.read_log()[after:]:
                return
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"appliance exited ({self.process.returncode}):\n{self.read_log()}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.read_log()}")

    def read_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self) -> int:
        """SIGTERM and wait; 0 for a clean stop (newer twistd re-raises SIGTERM at exit: -15 too)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return 0 if code == -signal.SIGTERM else code

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), 0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
