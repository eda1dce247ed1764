"""Maildir delivery: layout, names, sizes, line ends, idempotent redelivery, kill points, errors."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.mail.maildir import (
    create_maildir,
    crlf_to_lf,
    deliver,
    find_delivered,
    mailbox_path,
    sanitize_host,
)
from tests.test_mail_queue_support import Crash, kill_points

MSG = b"Subject: x\nFrom: a@b\n\nline 1\nline 2\n"


def files(maildir: Path, sub: str) -> list[str]:
    return sorted(os.listdir(maildir / sub))


def test_creates_maildir_and_delivers(tmp_path: Path) -> None:
    box = tmp_path / "example.test" / "alice"
    name = deliver(box, [MSG[:5], MSG[5:]], hostname="mx.example.test", now=1234.5678)
    assert sorted(os.listdir(box)) == ["cur", "new", "tmp"]
    assert (box / "new").stat().st_mode & 0o777 == 0o700
    assert name.startswith("new/1234.M567800P")
    crlf_size = len(MSG.replace(b"\n", b"\r\n"))
    assert name.endswith(f".mx.example.test,S={len(MSG)},W={crlf_size}")
    assert (box / name).read_bytes() == MSG
    assert files(box, "tmp") == []
    assert (box / name).stat().st_mode & 0o777 == 0o600


def test_unique_names(tmp_path: Path) -> None:
    names = {deliver(tmp_path / "m", [MSG], hostname="h", now=5.0) for _ in range(50)}
    assert len(names) == 50
    assert len(files(tmp_path / "m", "new")) == 50


def test_host_sanitised() -> None:
    assert sanitize_host("a/b:c,d") == "a\\057b\\072c\\054d"


def test_mailbox_path_stays_inside_root(tmp_path: Path) -> None:
    assert mailbox_path(tmp_path, "example.test/alice") == tmp_path / "example.test" / "alice"
    for bad in ("", "/etc", "../x", "a/../../x"):
        with pytest.raises(ValueError):
            mailbox_path(tmp_path, bad)


def test_create_maildir_idempotent(tmp_path: Path) -> None:
    create_maildir(tmp_path / "a" / "b")
    create_maildir(tmp_path / "a" / "b")
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["cur", "new", "tmp"]


def test_keyed_redelivery_is_idempotent(tmp_path: Path) -> None:
    box = tmp_path / "box"
    first = deliver(box, [MSG], hostname="h", now=9.0, key="ABC123", key_time=77.9)
    assert first.startswith("new/77.QABC123.h,S=")
    again = deliver(box, [MSG], hostname="h", now=99.0, key="ABC123", key_time=77.9)
    assert again == first
    # another content (a different Delivered-To) for the same key still stores once
    other = deliver(box, [b"X" + MSG], hostname="h", now=99.0, key="ABC123", key_time=77.9)
    assert other == first
    assert len(files(box, "new")) == 1
    # the POP3 side moved it to cur/ with flags; a different host name: still found
    os.rename(box / first, box / "cur" / (first[4:] + ":2,S"))
    third = deliver(box, [MSG], hostname="other", now=99.0, key="ABC123", key_time=77.9)
    assert third == "cur/" + first[4:] + ":2,S"
    assert files(box, "new") == [] and files(box, "tmp") == []
    # a different key is a different message
    deliver(box, [MSG], hostname="h", now=9.0, key="ABC124", key_time=77.9)
    assert len(files(box, "new")) == 1
    assert find_delivered(box, "77.QABC124.") is not None


def test_not_thorough_still_refuses_same_name(tmp_path: Path) -> None:
    box = tmp_path / "box"
    a = deliver(box, [MSG], hostname="h", now=1.0, key="K1", key_time=1.0, thorough=False)
    b = deliver(box, [MSG], hostname="h", now=1.0, key="K1", key_time=1.0, thorough=False)
    assert a == b
    assert len(files(box, "new")) == 1 and files(box, "tmp") == []


def test_bad_key_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        deliver(tmp_path / "b", [MSG], hostname="h", now=1.0, key="../x")


def test_redelivery_after_kill_at_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever step the process dies at, a retry leaves exactly one complete copy."""
    probe = tmp_path / "probe"
    with kill_points(monkeypatch, None) as kp:
        deliver(probe, [MSG], hostname="h", now=1.0, key="Q1", key_time=1.0)
    assert kp.count >= 6
    for kill_at in range(1, kp.count + 1):
        box = tmp_path / f"k{kill_at}"
        with kill_points(monkeypatch, kill_at):
            try:
                deliver(box, [MSG[:3], MSG[3:]], hostname="h", now=1.0, key="Q1", key_time=1.0)
            except Crash:
                pass
        # a reader never sees a partial message
        if (box / "new").exists():
            for n in files(box, "new"):
                assert (box / "new" / n).read_bytes() == MSG
        name = deliver(box, [MSG], hostname="h", now=2.0, key="Q1", key_time=1.0)
        assert files(box, "new") == [name[4:]]
        assert (box / name).read_bytes() == MSG
        assert files(box, "tmp") == []


@pytest.mark.parametrize("broken", ["fsync", "write", "link"])
def test_disk_errors_leave_no_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    box = tmp_path / "box"
    create_maildir(box)
    real = getattr(os, broken)

    def fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        if broken == "write" and args and args[0] in (0, 1, 2):
            return real(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, broken, fail)
    with pytest.raises(OSError):
        deliver(box, [MSG], hostname="h", now=1.0, key="Q1", key_time=1.0)
    monkeypatch.undo()
    assert files(box, "new") == []
    assert deliver(box, [MSG], hostname="h", now=1.0, key="Q1", key_time=1.0).startswith("new/")
    assert files(box, "tmp") == []


@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=6))
def test_crlf_to_lf_matches_whole_conversion(data: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert b"".join(crlf_to_lf(chunks)) == data.replace(b"\r\n", b"\n")
