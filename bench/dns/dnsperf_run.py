"""Run dnsperf and read its summary: the two DNS benchmarks share this."""

from __future__ import annotations

import re
import subprocess
from typing import Any

_FIELDS = {
    "qps": r"Queries per second:\s+([\d.]+)",
    "sent": r"Queries sent:\s+(\d+)",
    "completed": r"Queries completed:\s+(\d+)",
    "lost": r"Queries lost:\s+(\d+)",
    "latency_ms": r"Average Latency \(s\):\s+([\d.]+)",
}


def run_dnsperf(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run ``argv`` (a dnsperf command line); its figures, latency in ms, and the rcode line."""
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout).stdout
    result: dict[str, Any] = {}
    for key, pattern in _FIELDS.items():
        m = re.search(pattern, out)
        if m is None:
            raise RuntimeError(f"dnsperf output without {key}:\n{out}")
        result[key] = float(m.group(1))
    result["latency_ms"] *= 1000
    rcodes = re.search(r"Response codes:\s+(.*)", out)
    result["rcodes"] = rcodes.group(1) if rcodes else ""
    return result
