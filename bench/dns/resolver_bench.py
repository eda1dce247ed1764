"""Cache-hit throughput of the inside resolver, side by side with Unbound and twisted.names.

One upstream, BIND as an authoritative server on 127.0.0.1 (a free port),
serves ``bench.test`` with ``--names`` A records (TTL one day).  Each
resolver in turn forwards everything to it, is warmed by one dnsperf pass
over all the names (every answer is then cached), and is measured by dnsperf
repeating the same queries for ``--seconds`` from 127.0.1.5 (an inside
client of the demo configuration):

* ``appliance``: the real ``twistd appliance`` process (demo configuration,
  ports moved, ``forwarders`` = BIND, forward-only), queried on its inside
  listener 127.0.0.20;
* ``unbound``: Debian's unbound, one thread, our own configuration in a temp
  directory (never the system service), ``forward-zone "."`` to BIND;
* ``twisted``: a plain twisted.names server, ``CacheResolver`` + a forwarding
  ``client.Resolver``, the stock way to build a caching forwarder with it.

Each resolver runs pinned to CPU 0 (``taskset``), dnsperf to CPU 1.  Rounds
are interleaved and the best per server is reported, then the ratios the
targets are stated in (appliance >= 2x twisted.names, >= 25% of Unbound).

Run from the repository root (root is needed for BIND)::

    .venv/bin/python bench/dns/resolver_bench.py                  # 10 s, 3 rounds
    .venv/bin/python bench/dns/resolver_bench.py --seconds 5 --rounds 1

Needs the Debian packages dnsperf, bind9 and unbound.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from dnsperf_run import run_dnsperf  # noqa: E402

from bench.common import free_port, tree_cpu  # noqa: E402
from tests.test_dns_bind_support import Named  # noqa: E402

SERVER_CPU = "0"
CLIENT_CPU = "1"
BIND_ADDRESS = "127.0.0.1"
INSIDE = "127.0.0.20"  # the demo's inside address
UNBOUND_ADDRESS = "127.0.0.30"
TWISTED_ADDRESS = "127.0.0.31"
CLIENT = "127.0.1.5"  # an inside client: allowed to recurse in the demo configuration
ZONE = "bench.test"


def wait_udp(address: str, port: int, name: str, timeout: float = 30.0) -> None:
    """Wait until ``address:port`` answers a recursive A query for ``name`` with NOERROR."""
    import dns.exception
    import dns.message
    import dns.query

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = dns.query.udp(
                dns.message.make_query(name, "A"), address, port=port, source=CLIENT, timeout=1
            )
            if reply.rcode() == 0 and reply.answer:
                return
        except (dns.exception.DNSException, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{address}:{port} does not resolve {name}")


# --------------------------------------------------------------------------- the upstream


def zone_text(count: int) -> str:
    lines = [
        "$TTL 86400",
        f"@ IN SOA ns.{ZONE}. hostmaster.{ZONE}. ( 1 3600 900 1209600 86400 )",
        f"  IN NS ns.{ZONE}.",
        "ns IN A 127.0.0.1",
    ]
    lines += [f"h{i} IN A 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(count)]
    return "\n".join(lines) + "\n"


def start_bind(directory: Path, port: int, count: int) -> Named:
    """BIND as the authoritative upstream, pinned to the client's CPU."""
    named = Named(
        directory, BIND_ADDRESS, port, f'zone "{ZONE}" {{ type primary; file "{ZONE}.zone"; }};'
    )
    (directory / f"{ZONE}.zone").write_text(zone_text(count))
    named.start(prefix=["taskset", "-c", CLIENT_CPU])
    return named


# --------------------------------------------------------------------------- the resolvers


class Resolver:
    """One resolver under test: how to start it, where it listens, how to stop it."""

    def __init__(self, name: str, address: str, port: int, start: Callable[[], Any]) -> None:
        self.name = name
        self.address = address
        self.port = port
        self._start = start
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = self._start()

    def stop(self) -> None:
        process = self.process
        self.process = None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def appliance_resolver(tmp: Path, upstream: tuple[str, int], python: str) -> Resolver:
    from tests.harness import demo_copy
    from tests.test_dns_bind_support import shift_ports

    base = tmp / "appliance"
    base.mkdir()
    config = demo_copy(base)
    ports = {role: free_port(INSIDE) for role in ("smtp", "submission", "smtps", "pop3", "pop3s")}
    ports["dns"] = free_port(INSIDE)
    shift_ports(config, ports)
    text = config.read_text().replace(
        'forwarders = ["127.0.2.53:10053"]', f'forwarders = ["{upstream[0]}:{upstream[1]}"]'
    )
    config.write_text(text)
    twistd = str(Path(python).parent / "twistd")

    def start() -> subprocess.Popen[bytes]:
        log = (base / "appliance.log").open("ab")
        process = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, twistd, "--nodaemon", "--pidfile=", "--logfile=-",
             "appliance", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(config.parent),
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while "appliance started" not in (base / "appliance.log").read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((base / "appliance.log").read_text(errors="replace"))
            time.sleep(0.1)
        return process

    return Resolver("appliance", INSIDE, ports["dns"], start)


def unbound_resolver(tmp: Path, upstream: tuple[str, int]) -> Resolver:
    directory = tmp / "unbound"
    directory.mkdir()
    port = free_port(UNBOUND_ADDRESS)
    conf = directory / "unbound.conf"
    conf.write_text(
        f"""
server:
    interface: {UNBOUND_ADDRESS}
    port: {port}
    num-threads: 1
    do-daemonize: no
    chroot: ""
    username: ""
    directory: "{directory}"
    pidfile: "{directory}/unbound.pid"
    logfile: ""
    use-syslog: no
    verbosity: 0
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    module-config: "iterator"
    do-ip6: no
    so-reuseport: no
    outgoing-interface: {UNBOUND_ADDRESS}
    domain-insecure: "{ZONE}"
    local-zone: "test." nodefault
remote-control:
    control-enable: no
forward-zone:
    name: "."
    forward-addr: {upstream[0]}@{upstream[1]}
"""
    )
    binary = shutil.which("unbound") or "/usr/sbin/unbound"

    def start() -> subprocess.Popen[bytes]:
        log = (directory / "unbound.log").open("ab")
        return subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, binary, "-d", "-c", str(conf)],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(directory),
        )  # fmt: skip

    return Resolver("unbound", UNBOUND_ADDRESS, port, start)


def twisted_resolver(tmp: Path, upstream: tuple[str, int], python: str) -> Resolver:
    port = free_port(TWISTED_ADDRESS)
    log_path = tmp / "twisted.log"

    def start() -> subprocess.Popen[bytes]:
        log = log_path.open("ab")
        return subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, python, str(Path(__file__).resolve()), "serve-twisted",
             TWISTED_ADDRESS, str(port), upstream[0], str(upstream[1])],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    return Resolver("twisted", TWISTED_ADDRESS, port, start)


def serve_twisted(address: str, port: int, upstream: str, upstream_port: int) -> None:
    """A stock twisted.names caching forwarder: CacheResolver first, then a client.Resolver."""
    from twisted.internet import reactor as _reactor
    from twisted.names import cache, client, dns, server

    reactor: Any = _reactor
    factory = server.DNSServerFactory(
        caches=[cache.CacheResolver()],
        clients=[client.Resolver(servers=[(upstream, upstream_port)])],
    )
    reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface=address)
    reactor.listenTCP(port, factory, interface=address)
    reactor.run()


# --------------------------------------------------------------------------- measuring


def dnsperf(
    server: Resolver, queries: Path, *, seconds: float = 0, passes: int = 0, clients: int = 4,
    outstanding: int = 100,
) -> dict[str, Any]:  # fmt: skip
    argv = ["taskset", "-c", CLIENT_CPU, "dnsperf", "-s", server.address, "-p", str(server.port),
            "-a", CLIENT, "-d", str(queries), "-c", str(clients), "-q", str(outstanding),
            "-t", "2"]  # fmt: skip
    if seconds:
        argv += ["-l", str(seconds)]
    if passes:
        argv += ["-n", str(passes)]
    return run_dnsperf(argv, (seconds or 60) + 60)


def measure(server: Resolver, queries: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Start, warm, measure, stop one resolver: dnsperf's figures plus queries per CPU second.

    Queries per CPU second (completed queries / the server's user+system
    time) does not depend on how much of its CPU a busy shared machine left
    the server, so it is the steadier figure to compare.
    """
    server.start()
    try:
        wait_udp(server.address, server.port, f"h0.{ZONE}")
        # Warm: every name once, slowly enough that nothing is lost, so all are cached.
        warm = dnsperf(server, queries, passes=1, clients=1, outstanding=20)
        assert server.process is not None
        before = tree_cpu(server.process.pid)
        result = dnsperf(server, queries, seconds=args.seconds, clients=args.clients,
                         outstanding=args.outstanding)  # fmt: skip
        used = tree_cpu(server.process.pid) - before
        result["cpu"] = used
        result["per_cpu"] = result["completed"] / used if used > 0 else 0.0
        result["warm_lost"] = warm["lost"]
        return result
    finally:
        server.stop()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve-twisted":
        serve_twisted(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--names", type=int, default=1000)
    p.add_argument("--clients", type=int, default=4, help="dnsperf -c")
    p.add_argument("--outstanding", type=int, default=100, help="dnsperf -q")
    p.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"),
                   help="interpreter (virtualenv) for the appliance and twisted.names")  # fmt: skip
    p.add_argument("--only", default="appliance,unbound,twisted")
    args = p.parse_args()
    args.python = os.path.abspath(args.python)  # not resolve(): a venv's python is a symlink
    if os.geteuid() != 0:
        sys.exit("BIND needs root here")
    with tempfile.TemporaryDirectory(prefix="resolver-bench-") as temp:
        tmp = Path(temp)
        (tmp / "bind").mkdir()
        upstream = (BIND_ADDRESS, free_port(BIND_ADDRESS))
        bind = start_bind(tmp / "bind", upstream[1], args.names)
        try:
            queries = tmp / "queries.txt"
            queries.write_text("".join(f"h{i}.{ZONE} A\n" for i in range(args.names)))
            makers = {
                "appliance": lambda: appliance_resolver(tmp, upstream, args.python),
                "unbound": lambda: unbound_resolver(tmp, upstream),
                "twisted": lambda: twisted_resolver(tmp, upstream, args.python),
            }
            servers = [makers[name]() for name in args.only.split(",")]
            results: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
            for round_ in range(args.rounds):
                for s in servers:
                    r = measure(s, queries, args)
                    results[s.name].append(r)
                    print(
                        f"round {round_ + 1} {s.name:10s} {r['qps']:10.0f} qps  "
                        f"{r['per_cpu']:10.0f} q/CPU-s  CPU {r['cpu']:.1f} s  "
                        f"lost {r['lost']:.0f}  latency {r['latency_ms']:.2f} ms  {r['rcodes']}",
                        flush=True,
                    )
        finally:
            bind.stop()
    print()
    print(f"cache hits, best of {args.rounds} x {args.seconds:g} s, {args.names} names, "
          f"dnsperf -c {args.clients} -q {args.outstanding}, Python {args.python}")  # fmt: skip
    print(f"  {'':10s} {'QPS':>10s} {'q/CPU-s':>10s}")
    best = {name: max(r["qps"] for r in rs) for name, rs in results.items()}
    per_cpu = {name: max(r["per_cpu"] for r in rs) for name, rs in results.items()}
    for name in best:
        print(f"  {name:10s} {best[name]:10.0f} {per_cpu[name]:10.0f}")
    if "appliance" in best:
        for other, label, target in (("twisted", "twisted.names", ">= 2x"),
                                     ("unbound", "unbound", ">= 25%")):  # fmt: skip
            if other in best:
                qps = best["appliance"] / best[other]
                cpu = per_cpu["appliance"] / per_cpu[other] if per_cpu[other] else 0.0
                print(f"  appliance / {label:13s} = {qps:.2f}x by QPS, {cpu:.2f}x per CPU second "
                      f"(target {target})")  # fmt: skip


if __name__ == "__main__":
    main()
