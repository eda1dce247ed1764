"""Shared helpers for the spool, Maildir and runner tests: results of fired Deferreds, kill points."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from appliance.mail.interfaces import Envelope

T = TypeVar("T")


def result(d: Deferred[T]) -> T:
    """The result of a Deferred that has already fired; raises its failure."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]  # type: ignore[no-any-return]


def failure(d: Deferred[Any]) -> Failure:
    """The Failure of a Deferred that has already failed."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out and isinstance(out[0], Failure), f"expected a failure, got {out!r}"
    return out[0]


def envelope(*recipients: str, sender: str = "sender@remote.test", at: float = 1000.0) -> Envelope:
    return Envelope(
        sender=sender,
        recipients=tuple(recipients),
        client_address="127.0.2.5",
        client_helo="mx.remote.test",
        listener="outside",
        protocol="ESMTP",
        received_at=at,
    )


class Crash(Exception):
    """The simulated SIGKILL: raised at a kill point; afterwards every patched call raises it too."""


class KillPoints:
    """Counts filesystem operations and 'kills the process' at the n-th one.

    After the kill every further patched operation (including cleanup such as
    rmtree/unlink) raises Crash as well, so no error handler can tidy up: what
    is on disk is exactly what a SIGKILL at that point would leave.
    """

    NAMES = ("fsync", "rename", "replace", "link", "unlink", "write", "mkdir")

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kill_at: int | None) -> None:
        self.kill_at = kill_at
        self.count = 0
        self.crashed = False
        self.armed = True
        for name in self.NAMES:
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))
        monkeypatch.setattr(shutil, "rmtree", self._wrap(shutil.rmtree, counted=False))

    def _wrap(self, f: Callable[..., Any], counted: bool = True) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.armed:
                if self.crashed:
                    raise Crash("already dead")
                if counted:
                    self.count += 1
                    if self.count == self.kill_at:
                        self.crashed = True
                        raise Crash(f"killed at operation {self.count}")
            return f(*args, **kwargs)

        return wrapper


@contextmanager
def kill_points(monkeypatch: pytest.MonkeyPatch, kill_at: int | None) -> Iterator[KillPoints]:
    kp = KillPoints(monkeypatch, kill_at)
    try:
        yield kp
    finally:
        kp.armed = False


def check_commit_survives_kills(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_spool: Callable[[Path], Any],
    commit: Callable[[Any], str],
    body: bytes,
) -> None:
    """SIGKILL ``commit(spool)`` at each of its file-system operations in turn, then recover.

    Whatever recovery finds queued is complete; an acknowledged message is always
    there; tmp/ is empty and nothing was set aside as corrupt.
    """
    with kill_points(monkeypatch, None) as kp:
        commit(make_spool(tmp_path / "probe"))
    assert kp.count >= 5
    for kill_at in range(1, kp.count + 1):
        root = tmp_path / f"k{kill_at}"
        spool = make_spool(root)
        spool._make_dirs()
        acknowledged = None
        with kill_points(monkeypatch, kill_at):
            try:
                acknowledged = commit(spool)
            except Crash:
                pass
        after = make_spool(root)
        queued = after.recover()
        assert os.listdir(root / "tmp") == []
        assert not (root / "corrupt").exists()
        if acknowledged is not None:
            assert queued == [acknowledged]
        assert len(queued) <= 1
        for qid in queued:
            m = after.load(qid)
            assert m.data_path.read_bytes() == body
            assert m.size == len(body)
