"""Side-by-side authoritative DNS throughput: the appliance's outside view vs NSD, BIND and twisted.names.

Every server is started here on its own loopback address and high port,
pinned to CPU 0 (``taskset -c 0``) while dnsperf runs on CPU 1, serves the
same generated 1,000-name zone, gets the same dnsperf load for ``--seconds``,
and is stopped before the next one starts.  Rounds are interleaved (all
servers once, then all again) so that drift in the shared machine's load hits
every server alike; the best round per server is reported, with every round
shown.

Run from the repository root::

    .venv/bin/python bench/dns/run.py                 # 20 s per server, 3 rounds
    .venv/bin/python bench/dns/run.py --seconds 5 --rounds 1 --only appliance,twisted

Needs the Debian packages dnsperf, nsd and bind9 (see bench/README.md) and
the two virtualenvs .venv (Twisted 26.x) and .venv-tw22 (Twisted 22.4).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import zonegen
from dnsperf_run import run_dnsperf

from bench.common import stop, tree_cpu

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SERVER_CPU = "0"
CLIENT_CPU = "1"


@dataclass
class Server:
    """One contender: how to start it (argv + files written into its directory) and where it listens."""

    name: str
    address: str
    port: int
    start: Callable[[Path, Path, str, int], list[str]]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    answers: dict[tuple[str, str], tuple[str, frozenset[str]]] | None = None


# --- per-server setup: each writes its config into ``work`` and returns the argv to run ---------


def nsd_argv(work: Path, zone: Path, address: str, port: int) -> list[str]:
    """Debian's NSD limits responses to 200/s per /24 by default (RRL): switched off for the bench."""
    (work / "nsd").mkdir(exist_ok=True)
    conf = work / "nsd.conf"
    conf.write_text(
        f"""server:
  ip-address: {address}@{port}
  server-count: 1
  username: ""
  chroot: ""
  pidfile: "{work}/nsd/nsd.pid"
  xfrdfile: "{work}/nsd/xfrd.state"
  zonelistfile: "{work}/nsd/zone.list"
  database: ""
  zonesdir: "{zone.parent}"
  logfile: "{work}/nsd/nsd.log"
  verbosity: 0
  rrl-ratelimit: 0
  rrl-whitelist-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: {zonegen.ORIGIN}
  zonefile: {zone.name}
"""
    )
    return ["/usr/sbin/nsd", "-d", "-c", str(conf)]


def named_argv(work: Path, zone: Path, address: str, port: int) -> list[str]:
    """BIND only binds addresses it finds on an interface: on loopback that is 127.0.0.1."""
    d = work / "named"
    d.mkdir(exist_ok=True)
    conf = work / "named.conf"
    conf.write_text(
        f"""options {{
  directory "{d}"; pid-file none; session-keyfile none;
  listen-on port {port} {{ {address}; }}; listen-on-v6 {{ none; }};
  recursion no; dnssec-validation no; managed-keys-directory "{d}";
  minimal-responses no;
}};
controls {{ }};
logging {{ category default {{ null; }}; category lame-servers {{ null; }}; }};
zone "{zonegen.ORIGIN}" {{ type primary; file "{zone}"; }};
"""
    )
    return ["/usr/sbin/named", "-g", "-n", "1", "-4", "-c", str(conf)]


def twisted_argv(work: Path, zone: Path, address: str, port: int) -> list[str]:
    return [
        str(ROOT / ".venv/bin/python"),
        str(HERE / "tw_server.py"),
        str(zone),
        address,
        str(port),
    ]


def appliance_argv(venv: str) -> Callable[[Path, Path, str, int], list[str]]:
    def argv(work: Path, zone: Path, address: str, port: int) -> list[str]:
        d = work / f"appliance-{venv}"
        d.mkdir(exist_ok=True)
        (d / "users").write_text("# login:password-hash:mailbox:extra-addresses:apop-secret\n")
        inside = address.rsplit(".", 1)[0] + ".250"
        (d / "appliance.toml").write_text(
            f"""[appliance]
hostname = "ns1.{zonegen.ORIGIN}"
state_dir = "{d / "state"}"

[interfaces.outside]
addresses = ["{address}"]

[interfaces.inside]
addresses = ["{inside}"]
networks = ["127.0.4.0/24"]

[listeners]
dns = {{ sides = ["outside"], port = {port} }}

[dns.outside]
[[dns.outside.zones]]
name = "{zonegen.ORIGIN}"
file = "{zone}"

[tls]
self_signed = true

[mail]
local_domains = ["{zonegen.ORIGIN}"]

[directory]
users = "users"
"""
        )
        twistd = ROOT / venv / "bin" / "twistd"
        return [
            str(twistd), "--nodaemon", "--pidfile=", f"--logfile={d / 'twistd.log'}",
            "appliance", "--config", str(d / "appliance.toml"),
        ]  # fmt: skip

    return argv


# --- plumbing -------------------------------------------------------------------------------------


def probe(address: str, port: int, qname: str = f"h0.{zonegen.ORIGIN}") -> int | None:
    """The rcode of one A query over UDP, or None when nothing answered within 0.5 s."""
    wire = b"".join(bytes([len(p)]) + p.encode() for p in qname.split(".")) + b"\x00"
    query = struct.pack("!HHHHHH", 0x1234, 0, 1, 0, 0, 0) + wire + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        try:
            s.sendto(query, (address, port))
            reply = s.recv(4096)
        except OSError:
            return None
    return reply[3] & 0x0F if len(reply) >= 12 and reply[:2] == b"\x12\x34" else None


def wait_ready(
    proc: subprocess.Popen[bytes], address: str, port: int, log: Path, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}"
            )
        if probe(address, port) == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"no answer on {address}:{port} within {timeout}s; log {log}")


def dnsperf(
    address: str, port: int, queries: Path, seconds: float, clients: int, outstanding: int
) -> dict[str, Any]:
    argv = [
        "taskset", "-c", CLIENT_CPU, "dnsperf", "-s", address, "-p", str(port), "-d", str(queries),
        "-l", str(seconds), "-c", str(clients), "-q", str(outstanding), "-t", "1",
    ]  # fmt: skip
    return run_dnsperf(argv, seconds + 60)


def busy_note() -> str:
    load1, load5, _ = os.getloadavg()
    return f"load average {load1:.2f} {load5:.2f}"


def sample_answers(
    address: str, port: int, queries: Path, count: int = 300
) -> dict[tuple[str, str], tuple[str, frozenset[str]]]:
    """(rcode, answer section as text) for the first ``count`` distinct queries of the file.

    Throughput means nothing if the answers are wrong: the summary compares
    every server's answers with NSD's.
    """
    import dns.message
    import dns.query
    import dns.rcode

    out: dict[tuple[str, str], tuple[str, frozenset[str]]] = {}
    for line in queries.read_text().splitlines():
        if len(out) >= count:
            break
        qname, qtype = line.split()
        if (qname, qtype) in out:
            continue
        query = dns.message.make_query(qname, qtype, use_edns=False)
        query.flags &= ~0x0100  # RD clear, as dnsperf's queries are answered authoritatively
        try:
            reply = dns.query.udp(query, address, port=port, timeout=2)
        except Exception as e:
            out[qname, qtype] = (f"error {type(e).__name__}", frozenset())
            continue
        rrs = frozenset(rr.to_text().lower() for rrset in reply.answer for rr in _split(rrset))
        out[qname, qtype] = (dns.rcode.to_text(reply.rcode()), rrs)
    return out


def _split(rrset: Any) -> list[Any]:
    """One RRset per record, so that the text form is one line per record."""
    import dns.rrset

    return [dns.rrset.from_rdata(rrset.name, rrset.ttl, rd) for rd in rrset]


def parity(servers: list[Server], reference: str = "nsd") -> None:
    """How many sampled answers of each server differ from the reference server's, with examples."""
    ref = next((s.answers for s in servers if s.name == reference and s.answers), None)
    if ref is None:
        return
    print(f"\nanswers compared with {reference} ({len(ref)} distinct sampled questions):")
    for s in servers:
        if s.name == reference or s.answers is None:
            continue
        diff = [key for key, value in ref.items() if s.answers.get(key) != value]
        print(f"  {s.name:15s} {len(diff)} differ")
        for key in diff[:2]:
            print(f"      {key[0]} {key[1]}: {reference} {sorted(ref[key][1]) or ref[key][0]}")
            got = s.answers.get(key, ("missing", frozenset()))
            print(
                f"      {'':{len(key[0]) + len(key[1]) + 1}s}  {s.name} {sorted(got[1]) or got[0]}"
            )


def measure(
    s: Server, work: Path, zone: Path, queries: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Start ``s``, warm it up for 2 s, run dnsperf for ``args.seconds``, stop it; dnsperf's figures + CPU."""
    log = work / f"{s.name}.log"
    argv = ["taskset", "-c", SERVER_CPU, *s.start(work, zone, s.address, s.port)]
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=str(zone.parent))
    try:
        wait_ready(proc, s.address, s.port, log)
        if s.answers is None:
            s.answers = sample_answers(s.address, s.port, queries)
        # A short warm-up pass fills caches (the appliance's answer cache, BIND's) alike.
        dnsperf(s.address, s.port, queries, 2, args.clients, args.outstanding)
        note = busy_note()
        cpu = tree_cpu(proc.pid)
        r = dnsperf(s.address, s.port, queries, args.seconds, args.clients, args.outstanding)
        r["cpu"] = tree_cpu(proc.pid) - cpu
    finally:
        stop(proc)
    r["per_cpu"] = r["completed"] / r["cpu"] if r["cpu"] > 0 else 0.0
    r["note"] = note
    return r


def summary(servers: list[Server]) -> None:
    """Best round per server, per-round ratios, and the ratios against the targets of issue 3."""
    done = {s.name: s for s in servers if s.rounds}
    print("\nbest of rounds:                qps    q/CPU-s")
    for name, s in done.items():
        qps = max(r["qps"] for r in s.rounds)
        per_cpu = max(r["per_cpu"] for r in s.rounds)
        print(f"  {name:15s} {qps:>12,.0f} {per_cpu:>10,.0f}")
    if "appliance" not in done:
        return
    mine = done["appliance"].rounds
    for other, target in (("twisted", 1.5), ("nsd", 0.30), ("bind", None)):
        if other not in done:
            continue
        theirs = done[other].rounds
        per_round = ", ".join(
            f"{a['qps'] / o['qps']:.2f}" for a, o in zip(mine, theirs, strict=False)
        )
        best = max(r["qps"] for r in mine) / max(r["qps"] for r in theirs)
        cpu = max(r["per_cpu"] for r in mine) / max(r["per_cpu"] for r in theirs)
        goal = ""
        if target:
            verdict = " and ".join(
                f"{how} {'met' if value >= target else 'NOT met'}"
                for how, value in (("qps", best), ("per CPU-s", cpu))
            )
            goal = f"  target >= {target:g}: {verdict}"
        print(
            f"  appliance/{other:8s} qps {best:5.2f} (rounds: {per_round}), per CPU-s {cpu:5.2f}{goal}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=4, help="dnsperf -c")
    p.add_argument("--outstanding", type=int, default=100, help="dnsperf -q")
    p.add_argument(
        "--only",
        default="",
        help="comma-separated subset of: nsd,bind,twisted,appliance,appliance-tw22",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()

    for tool in ("dnsperf", "taskset", "/usr/sbin/nsd", "/usr/sbin/named"):
        if shutil.which(tool) is None:
            print(f"missing {tool}: apt-get install dnsperf nsd bind9", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="dnsbench-"))
    zone, queries = zonegen.write(work / "zone")
    servers = [
        Server("appliance", "127.0.3.11", 25353, appliance_argv(".venv")),
        Server("nsd", "127.0.3.12", 25353, nsd_argv),
        Server("bind", "127.0.0.1", 25354, named_argv),
        Server("twisted", "127.0.3.14", 25353, twisted_argv),
        Server("appliance-tw22", "127.0.3.15", 25353, appliance_argv(".venv-tw22")),
    ]
    if args.only:
        wanted = set(args.only.split(","))
        servers = [s for s in servers if s.name in wanted]
    print(
        f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}"
    )
    print(
        f"# zone {zonegen.NAMES} names, {sum(1 for _ in zone.open())} lines; "
        f"{sum(1 for _ in queries.open())} queries in the file; server on CPU {SERVER_CPU}, "
        f"dnsperf on CPU {CLIENT_CPU}, -c {args.clients} -q {args.outstanding}, {args.seconds:g} s each"
    )
    try:
        for rnd in range(args.rounds):
            for s in servers:
                try:
                    r = measure(s, work, zone, queries, args)
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    print(f"round {rnd + 1} {s.name:15s} FAILED: {e}", flush=True)
                    continue
                s.rounds.append(r)
                print(
                    f"round {rnd + 1} {s.name:15s} {r['qps']:>9,.0f} qps {r['per_cpu']:>9,.0f} q/CPU-s"
                    f"  (server CPU {r['cpu']:4.1f} s, lost {r['lost']:.0f}/{r['sent']:.0f},"
                    f" avg {r['latency_ms']:.2f} ms)  [{r['note']}]  {r['rcodes']}",
                    flush=True,
                )
                time.sleep(1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"# work directory kept: {work}")
    summary(servers)
    parity(servers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
