"""What every benchmark script needs: free loopback ports (the tests' own), server CPU time, stopping a server.

Imported as ``bench.common`` (each script puts the repository root on
``sys.path`` first, since it runs as ``python bench/<name>/run.py``).
"""

from __future__ import annotations

import os
import signal
import subprocess

from tests.harness import free_port

__all__ = ["free_port", "stop", "tree_cpu"]


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system, reaped children included) of ``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
