#!/usr/bin/env python3
"""What the anti-spam gate costs: messages per second through the real process, checks on vs off.

The same load twice against ``twistd appliance`` on loopback: once with
every check of ``[gate]`` on (greet pause 0 so the pause itself is not what
is measured, access map, both DNSBLs, sender domain existence, header checks,
greylisting with the bench's sender allow-listed so it is consulted but lets
mail through, SPF) and once without a ``[gate]`` section.  DNSBL, domain and
SPF data come from a private BIND on 127.0.0.1 (tests/test_gate_acceptance_support.py);
the appliance's resolver caches the answers, as in production.  The load:
``--sessions`` client processes, each bound to its own 127.0.2.x address,
sending ``--messages`` in total with smtplib, ``--per-connection`` messages
per SMTP connection (1: every message pays for the connect checks).  The
clock runs from the first connection to the last 250 after DATA.

    .venv/bin/python bench/smtp_gate/run.py [--messages 2000] [--sessions 8] [--rounds 3]

Reports both rates (median of the rounds) and on/off (target >= 0.80), by wall clock
and per CPU second of the appliance process (steadier on a shared, loaded machine).
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import smtplib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import tree_cpu  # noqa: E402
from tests.harness import ApplianceProcess  # noqa: E402
from tests.test_gate_acceptance_support import (  # noqa: E402
    ACCESS_MAP,
    GATE_ALL,
    Named,
    gate_config,
)

OUTSIDE = "127.0.0.10"
SENDER = "bench@spfpass.test"
RECIPIENT = "bob@example.test"


def client(args: tuple[int, int, int, int, int]) -> int:
    """One client process: ``count`` messages from 127.0.2.(100+index); returns those accepted."""
    index, port, count, per_connection, size = args
    source = f"127.0.2.{100 + index}"
    body = "x" * 76 + "\r\n"
    lines = max(1, size // len(body))
    accepted = 0
    sent = 0
    while sent < count:
        with smtplib.SMTP(OUTSIDE, port, timeout=60, source_address=(source, 0)) as session:
            session.ehlo(f"client{index}.spfpass.test")
            for _ in range(min(per_connection, count - sent)):
                data = (
                    f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: bench {index} {sent}\r\n"
                    f"Message-ID: <{index}.{sent}@spfpass.test>\r\n\r\n" + body * lines
                )
                try:
                    session.sendmail(SENDER, [RECIPIENT], data)
                    accepted += 1
                except smtplib.SMTPException as error:
                    print(f"client {index}: {error}", file=sys.stderr)
                sent += 1
    return accepted




def run_once(config: Path, port: int, pid: int, args: argparse.Namespace) -> tuple[float, float]:
    """(messages per wall-clock second, messages per CPU second of the appliance)."""
    per_client = [args.messages // args.sessions] * args.sessions
    per_client[0] += args.messages - sum(per_client)
    jobs = [(i, port, n, args.per_connection, args.size) for i, n in enumerate(per_client)]
    with multiprocessing.Pool(args.sessions) as pool:
        # Warm the caches (resolver, greylist, Python) with one message per client first.
        pool.map(client, [(i, port, 1, 1, args.size) for i in range(args.sessions)])
        started, cpu = time.monotonic(), tree_cpu(pid)
        accepted = sum(pool.map(client, jobs))
        elapsed, cpu = time.monotonic() - started, tree_cpu(pid) - cpu
    if accepted != args.messages:
        raise SystemExit(f"only {accepted} of {args.messages} messages accepted; see {config}")
    return args.messages / elapsed, args.messages / max(cpu, 1e-9)


def gate_section(greet: float) -> str:
    # Greylisting consulted for every recipient but the bench's sender passes it.
    return GATE_ALL.format(greet=greet, grey_delay=1, grey_allow='"spfpass.test"')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=8, help="parallel client processes")
    parser.add_argument("--per-connection", type=int, default=1, help="messages per connection")
    parser.add_argument("--size", type=int, default=2048, help="body bytes per message")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--greet", type=float, default=0.0, help="greet pause when on (s)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if args.sessions > 150:
        raise SystemExit("at most 150 sessions (127.0.2.100-249)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-smtp-gate-"))
    named = Named(tmp / "named")
    named.start()
    forwarder = f"127.0.0.1:{named.port}"
    rates: dict[str, list[float]] = {"off": [], "on": []}
    per_cpu: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for round_number in range(args.rounds):
            for mode in ("off", "on"):
                work = tmp / f"{mode}-{round_number}"
                section = gate_section(args.greet) if mode == "on" else ""
                config, port = gate_config(work, section, forwarder, ACCESS_MAP)
                process = ApplianceProcess(config, work / "appliance.log")
                process.start()
                try:
                    assert process.process is not None
                    rate, cpu_rate = run_once(config, port, process.process.pid, args)
                finally:
                    process.stop()
                rates[mode].append(rate)
                per_cpu[mode].append(cpu_rate)
                print(
                    f"round {round_number + 1} gate {mode:>3}: {rate:8.1f} msg/s, "
                    f"{cpu_rate:8.1f} msg per appliance CPU second",
                    flush=True,
                )
    finally:
        named.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    cpu_off, cpu_on = statistics.median(per_cpu["off"]), statistics.median(per_cpu["on"])
    print(
        f"\n{args.messages} messages, {args.sessions} sessions, {args.per_connection}/connection, "
        f"{args.size} bytes; medians of {args.rounds} rounds"
    )
    print(f"gate off: {off:8.1f} msg/s wall clock, {cpu_off:8.1f} msg per appliance CPU second")
    print(f"gate on : {on:8.1f} msg/s wall clock, {cpu_on:8.1f} msg per appliance CPU second")
    print(f"on/off  : {on / off:.2f} wall clock, {cpu_on / cpu_off:.2f} CPU (target >= 0.80)")


if __name__ == "__main__":
    main()
