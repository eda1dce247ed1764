"""Micro-benchmark of the DNS wire path in one process: decode, make_response, encode, UDP handling.

Run: ``.venv/bin/python bench/dns/wire_bench.py [--count N]``.  It prints
microseconds per operation and the implied single-core ceiling in queries/s
(socket and reactor costs not included; see README.md for the loopback test).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import dns.message
from twisted.internet.address import IPv4Address

from appliance.dns import listener, wire
from appliance.dns.rr import RR, LookupResult


def name(text: str) -> bytes:
    return (
        b"".join(bytes([len(label)]) + label.encode() for label in text.split(".") if label)
        + b"\x00"
    )


RESULT = LookupResult(
    rcode=0,
    authoritative=True,
    answer=(RR(name("www.example.com"), 1, 1, 300, b"\xc0\x00\x02\x01"),),
    authority=(
        RR(name("example.com"), 2, 1, 300, name("ns1.example.com")),
        RR(name("example.com"), 2, 1, 300, name("ns2.example.com")),
    ),
    additional=(
        RR(name("ns1.example.com"), 1, 1, 300, b"\xc0\x00\x02\x35"),
        RR(name("ns2.example.com"), 1, 1, 300, b"\xc0\x00\x02\x36"),
    ),
)


def responder(query: wire.Message, *args: Any) -> wire.Message:
    return wire.make_response(query, RESULT)


class NullTransport:
    def write(self, data: bytes, addr: Any) -> None:
        pass

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "127.0.0.1", 53)


def timed(label: str, count: int, fn: Callable[[], object], repeat: int = 7) -> None:
    """Best of ``repeat`` runs: the machine is shared, so the minimum is the least noisy figure."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(count // repeat):
            fn()
        best = min(best, (time.perf_counter() - start) / (count // repeat))
    print(f"{label:<28} {best * 1e6:8.2f} us   {1 / best:12,.0f} /s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=50_000)
    count = parser.parse_args().count
    packet = dns.message.make_query("WwW.Example.com", "A", use_edns=0, payload=1232).to_wire()
    query = wire.decode(packet)
    reply = wire.make_response(query, RESULT)
    proto = listener.make_udp_protocol(responder)
    proto.makeConnection(NullTransport())  # type: ignore[arg-type]
    timed("decode(query)", count, lambda: wire.decode(packet))
    timed("make_response", count, lambda: wire.make_response(query, RESULT))
    timed("encode(reply, 1232)", count, lambda: wire.encode(reply, 1232))
    timed(
        "UDP datagramReceived", count, lambda: proto.datagramReceived(packet, ("127.0.0.1", 5300))
    )


if __name__ == "__main__":
    main()
