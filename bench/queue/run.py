#!/usr/bin/env python3
"""Queue delivery throughput: the appliance against a private Postfix instance, side by side.

Each server is loaded the same way: ``smtp-source`` relays N messages for
``remote.test`` into it while the remote MX (Postfix's ``smtp-sink`` on
127.0.2.201:25) is down, so every message is queued and deferred.  Then the
sink starts, the queue is flushed (``appliance flush`` / ``postqueue -f``),
and the clock runs until the sink has received all N.  That isolates the
queue runner and the SMTP client: receiving is not timed.

The appliance finds the sink through its real path: an MX lookup of
remote.test answered by a small name server on 127.0.2.157 (its inside view
forwards there).  Postfix uses a transport map to ``[127.0.2.201]`` (its
resolver is the system's, which this script does not touch); both deliver
with at most 20 parallel connections.  Postfix runs as its own instance
(config_directory, queue_directory, data_directory in a temporary directory)
and reuses connections (its connection cache), as the appliance does (its
SessionPool).  Besides the wall-clock rate, the CPU seconds each server's
processes used during the flush are printed: the appliance is one process
(one core at most, for its Python code), Postfix's processes use both cores.

    sudo .venv/bin/python bench/queue/run.py [--messages 5000] [--size 4096]
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance.control import ControlClient  # noqa: E402

# Same Postfix services as the receive benchmark (its virtual(8) goes unused here).
from bench.common import free_port, tree_cpu  # noqa: E402
from bench.smtp.run import MASTER_CF, POSTFIX_BASE_CF  # noqa: E402
from tests.test_delivery_support import (  # noqa: E402
    DNSServer,
    internet_appliance,
)

#: Server CPU seconds spent during each server's timed flush.
CPU: dict[str, float] = {}

SINK_ADDRESS = "127.0.2.201"
POSTFIX_ADDRESS = "127.0.2.202"
RECIPIENT = "bench@remote.test"
RECORDS = {
    "remote.test": [("MX", "10 mx.remote.test.")],
    "mx.remote.test": [("A", SINK_ADDRESS)],
}


def wait(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


class Sink:
    """smtp-sink dumping one file per message (its directory belongs to nobody)."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="queue-bench-sink-"))
        nobody = pwd.getpwnam("nobody")
        os.chown(self.directory, nobody.pw_uid, nobody.pw_gid)
        self.process = subprocess.Popen(
            [
                "smtp-sink",
                "-u",
                "nobody",
                "-d",
                f"{self.directory}/%M.",
                f"{SINK_ADDRESS}:25",
                "1024",
            ],
        )
        wait(self._up, 10, "smtp-sink")

    @staticmethod
    def _up() -> bool:
        try:
            socket.create_connection((SINK_ADDRESS, 25), 0.5).close()
            return True
        except OSError:
            return False

    def count(self) -> int:
        return len(os.listdir(self.directory))

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


def inject(address: str, port: int, args: argparse.Namespace) -> None:
    subprocess.run(
        [
            "smtp-source",
            "-s",
            str(args.sessions),
            "-m",
            str(args.messages),
            "-l",
            str(args.size),
            "-f",
            "sender@bench.test",
            "-t",
            RECIPIENT,
            f"{address}:{port}",
        ],
        check=True,
        timeout=args.timeout,
    )


def timed_flush(  # type: ignore[no-untyped-def]
    flush, args: argparse.Namespace, server: Callable[[], int], empty: Callable[[], bool]
) -> float:
    """Flush, wait for the sink to hold every message and the server's queue to be empty.

    The time counts until both hold: a server that deletes its queue files
    after the delivery (the appliance does it in the background) pays for it
    inside the measured time, as one that deletes them first.

    ``server()`` names the server's top process: the CPU seconds it and its
    descendants used meanwhile go to ``CPU[...]`` (steadier than wall-clock
    time on a shared machine).
    """
    sink = Sink()
    try:
        pid = server()
        cpu = tree_cpu(pid)
        start = time.monotonic()
        flush()
        wait(lambda: sink.count() >= args.messages, args.timeout, "all deliveries")
        delivered = time.monotonic() - start
        wait(empty, args.timeout, "an empty queue")
        seconds = time.monotonic() - start
        print(f"{args.current}: last delivery at {delivered:.2f} s, queue empty at {seconds:.2f} s")
        CPU[args.current] = tree_cpu(pid) - cpu
        return seconds
    finally:
        sink.close()


# -- the appliance ---------------------------------------------------------------------


def run_appliance(tmp: Path, args: argparse.Namespace) -> float:
    tmp.mkdir(parents=True)
    dns_server = DNSServer("127.0.2.157", RECORDS)
    tls = "true" if args.tls else "false"
    process, _config, ports = internet_appliance(
        tmp,
        dns_server,
        mail='relay_domains = ["remote.test"]\n',
        delivery=f"[delivery]\nopportunistic_tls = {tls}\n",
    )
    process.start()
    control = tmp / "state" / "control.sock"
    try:
        inject("127.0.0.10", ports["smtp"], args)

        def all_deferred() -> bool:
            with ControlClient(control) as client:
                queue = client.call("mailq")
            return len(queue) >= args.messages and all(
                r["attempts"] > 0 for e in queue for r in e["recipients"]
            )

        wait(all_deferred, args.timeout, "the appliance to queue and defer everything")

        spy: list[subprocess.Popen[bytes]] = []

        def flush() -> None:
            if args.py_spy:
                # Sample the appliance's threads while it delivers (py-spy, not a dependency).
                assert process.process is not None
                spy.append(
                    subprocess.Popen(
                        ["py-spy", "record", "-p", str(process.process.pid), "-r", "250",
                         "-t", "-f", "raw", "-o", args.py_spy],
                        stdout=subprocess.DEVNULL,
                    )
                )  # fmt: skip
                time.sleep(0.5)
            with ControlClient(control) as client:
                client.call("flush")

        assert process.process is not None
        pid = process.process.pid
        try:
            spool = tmp / "state" / "spool"
            return timed_flush(
                flush, args, lambda: pid, lambda: _no_entries(spool / "queue", spool / "tmp")
            )
        finally:
            for p in spy:
                p.send_signal(2)
                p.wait()
    finally:
        process.stop()
        dns_server.close()


# -- Postfix ---------------------------------------------------------------------------

MAIN_CF = (
    POSTFIX_BASE_CF
    + """\
transport_maps = inline:{{ remote.test=smtp:[{sink}]:25 }}
default_destination_concurrency_limit = 20
smtp_tls_security_level = {tls}
"""
)


def postfix(etc: Path, *command: str) -> subprocess.CompletedProcess[str]:
    # Postfix logs to syslog unless stderr is a terminal: give it one with script(1).
    line = " ".join((*command[:1], "-c", str(etc), *command[1:]))
    return subprocess.run(["script", "-qec", line, "/dev/null"], capture_output=True, text=True)


def run_postfix(tmp: Path, args: argparse.Namespace) -> float:
    if shutil.which("postfix") is None:
        raise SystemExit("Postfix is not installed (apt install postfix)")
    etc, spool, data = tmp / "etc", tmp / "spool", tmp / "data"
    for d in (etc, spool, data):
        d.mkdir(parents=True)
    shutil.chown(data, "postfix")
    port = free_port(POSTFIX_ADDRESS)
    (etc / "main.cf").write_text(
        MAIN_CF.format(tmp=tmp, sink=SINK_ADDRESS, tls="may" if args.tls else "none")
    )
    (etc / "master.cf").write_text(MASTER_CF.format(address=POSTFIX_ADDRESS, port=port))
    started = postfix(etc, "postfix", "start")
    if started.returncode != 0:
        raise SystemExit(f"postfix start failed: {started.stdout}{started.stderr}")
    try:
        wait(lambda: _connects(POSTFIX_ADDRESS, port), 30, "postfix")
        inject(POSTFIX_ADDRESS, port, args)

        def deferred() -> int:
            return sum(len(files) for _, _, files in os.walk(spool / "deferred"))

        wait(lambda: deferred() >= args.messages, args.timeout, "postfix to defer everything")

        def master() -> int:
            return int((spool / "pid" / "master.pid").read_text().split()[0])

        queues = [spool / q for q in ("incoming", "active", "deferred", "defer")]
        return timed_flush(
            lambda: postfix(etc, "postqueue", "-f"), args, master, lambda: _no_files(*queues)
        )
    finally:
        postfix(etc, "postfix", "stop")


def _no_files(*directories: Path) -> bool:
    """Whether no file is left anywhere under the directories (Postfix's hashed queues)."""
    return not any(files for d in directories for _, _, files in os.walk(d))


def _no_entries(*directories: Path) -> bool:
    """Whether the directories are empty (the appliance's queue/ and tmp/)."""
    return not any(os.listdir(d) for d in directories if d.exists())


def _connects(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), 1).close()
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--only", choices=("appliance", "postfix"))
    parser.add_argument(
        "--tls",
        action="store_true",
        help="opportunistic STARTTLS on (appliance default, Postfix 'may'); the sink offers none",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--py-spy", help="sample the appliance with py-spy into this raw file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (port 25 for the sink, Postfix's own users)")
    work = Path(tempfile.mkdtemp(prefix="queue-bench-"))
    work.chmod(0o755)  # Postfix's daemons run as the postfix user
    results: dict[str, float] = {}
    try:
        for name, run in (("appliance", run_appliance), ("postfix", run_postfix)):
            if args.only and args.only != name:
                continue
            args.current = name
            seconds = run(work / name, args)
            results[name] = args.messages / seconds
            cpu = CPU.get(name, 0.0)
            per_cpu = args.messages / cpu if cpu else 0.0
            print(
                f"{name}: {args.messages} deliveries in {seconds:.2f} s = {results[name]:.0f}/s"
                f" (server CPU {cpu:.2f} s = {per_cpu:.0f} per CPU-second)"
            )
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if len(results) == 2:
        print(f"ratio appliance/postfix: {results['appliance'] / results['postfix']:.2f}")
        if CPU.get("appliance") and CPU.get("postfix"):
            ratio = CPU["postfix"] / CPU["appliance"]
            print(f"ratio per CPU-second: {ratio:.2f}")


if __name__ == "__main__":
    main()
