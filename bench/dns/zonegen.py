"""The benchmark zone (1,000 owner names) and a dnsperf query file, both deterministic.

The zone is written without parentheses, one record per line and TXT
strings without spaces, so that every server under test parses the same
file: the appliance, NSD, BIND and twisted.names' ``BindAuthority`` (which
on Twisted 26 handles no parentheses).
"""

from __future__ import annotations

import random
from pathlib import Path

ORIGIN = "bench.test"
NAMES = 1000


def owner(i: int) -> str:
    return f"h{i}"


def is_cname(i: int) -> bool:
    """Every tenth name is an alias of the name before it."""
    return i % 10 == 9


def zone_text(ns_address: str = "192.0.2.53") -> str:
    """The zone: SOA, NS, apex MX; per name an A, and AAAA/MX/TXT on a share; every tenth a CNAME."""
    lines = [
        f"$ORIGIN {ORIGIN}.",
        "$TTL 3600",
        f"@ 3600 IN SOA ns1.{ORIGIN}. hostmaster.{ORIGIN}. 2026112201 3600 900 1209600 300",
        f"@ 3600 IN NS ns1.{ORIGIN}.",
        f"@ 3600 IN MX 10 h0.{ORIGIN}.",
        f"ns1 3600 IN A {ns_address}",
    ]
    for i in range(NAMES):
        name = owner(i)
        if is_cname(i):
            lines.append(f"{name} 3600 IN CNAME {owner(i - 1)}.{ORIGIN}.")
            continue
        lines.append(f"{name} 3600 IN A 10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        if i % 2 == 0:
            lines.append(f"{name} 3600 IN AAAA 2001:db8::{i:x}")
        if i % 5 == 0:
            lines.append(f"{name} 3600 IN MX 10 mx{i % 3}.{ORIGIN}.")
        if i % 7 == 0:
            lines.append(f'{name} 3600 IN TXT "v=bench-id-{i}"')
    for j in range(3):
        lines.append(f"mx{j} 3600 IN A 192.0.2.{10 + j}")
    return "\n".join(lines) + "\n"


def query_lines(count: int = 10_000, seed: int = 1) -> list[str]:
    """A dnsperf data file: ~55% A, 10% AAAA, 8% MX, 5% TXT, 7% CNAME owners, 15% NXDOMAIN.

    AAAA on odd names and MX/TXT on names without them give NODATA answers.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        roll = rng.random()
        i = rng.randrange(NAMES)
        if roll < 0.15:
            out.append(f"nx{rng.randrange(100_000)}.{ORIGIN} A")
            continue
        if roll < 0.22:
            out.append(f"{owner(i - i % 10 + 9)}.{ORIGIN} A")
            continue
        if roll < 0.32:
            qtype = "AAAA"
        elif roll < 0.40:
            qtype = "MX"
        elif roll < 0.45:
            qtype = "TXT"
        else:
            qtype = "A"
        if is_cname(i):
            i -= 1
        out.append(f"{owner(i)}.{ORIGIN} {qtype}")
    return out


def write(directory: Path, count: int = 10_000) -> tuple[Path, Path]:
    """Write ``bench.test`` (the zone; the file name is its origin for BindAuthority) and ``queries.txt``."""
    directory.mkdir(parents=True, exist_ok=True)
    zone = directory / ORIGIN
    zone.write_text(zone_text())
    queries = directory / "queries.txt"
    queries.write_text("\n".join(query_lines(count)) + "\n")
    return zone, queries


if __name__ == "__main__":
    import sys

    z, q = write(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
    print(z, q)
