"""The POP3 view of a Maildir: encoding, sizes, UIDLs, snapshot, deferred deletion, locks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.pop3 import mailbox as mb
from appliance.pop3.mailbox import (
    LineEncoder,
    MailboxLocks,
    MaildirMailbox,
    NoSuchMessage,
    SizeCache,
    crlf_size,
    encode_message,
    uidl_for,
)

# -- wire encoding -------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "stuffed"),
    [
        (b"", b""),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\r\nb", b"a\r\nb\r\n"),
        (b".\n", b"..\r\n"),
        (b".a\n.\n..\nx.\n", b"..a\r\n..\r\n...\r\nx.\r\n"),
        (b"a\r\n.\r\n", b"a\r\n..\r\n"),
        (b"bare\rcr\n", b"bare\rcr\r\n"),
        (b"mixed\r\n\n.", b"mixed\r\n\r\n..\r\n"),
    ],
)
def test_encode_message(raw: bytes, stuffed: bytes) -> None:
    assert encode_message(raw) == stuffed
    assert crlf_size(raw) == len(encode_message(raw, stuff=False))


# Text mapped to bytes: st.binary trips a BytesWarning inside hypothesis under `python -b`.
chunks = st.lists(
    st.text(alphabet="ab .\r\n\xe9", max_size=40).map(lambda s: s.encode("utf-8")),
    max_size=30,
)


@given(chunks)
@settings(max_examples=300, deadline=None)
def test_line_encoder_matches_whole_buffer(parts: list[bytes]) -> None:
    whole = b"".join(parts)
    saved = mb._MAX_CARRY
    try:
        # A tiny carry limit exercises the split-inside-a-long-line path too.
        for carry in (saved, 3):
            mb._MAX_CARRY = carry
            for stuff in (True, False):
                enc = LineEncoder(stuff=stuff)
                out = b"".join(enc.feed(p) for p in parts) + enc.finish()
                assert out == encode_message(whole, stuff=stuff)
    finally:
        mb._MAX_CARRY = saved
    assert crlf_size(whole) == len(encode_message(whole, stuff=False))


def test_line_encoder_long_line_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mb, "_MAX_CARRY", 8)
    data = b"." + b"x.." * 10 + b"\r" + b"\n.y" * 3 + b"z." * 20 + b"\r"
    for size in range(1, 12):
        enc = LineEncoder()
        out = b"".join(enc.feed(data[i : i + size]) for i in range(0, len(data), size))
        assert out + enc.finish() == encode_message(data)


def test_file_crlf_size_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mb, "CHUNK", 7)
    path = tmp_path / "m"
    data = b"Subject: x\n\n" + b"line\r\n.dot\nend"
    path.write_bytes(data)
    assert mb.file_crlf_size(str(path)) == len(encode_message(data, stuff=False))


# -- UIDLs ---------------------------------------------------------------


def test_uidl_ignores_flags_and_size_fields() -> None:
    base = "1700000000.M1P2Q3.host,S=1234"
    assert uidl_for(base) == "1700000000.M1P2Q3.host"
    assert uidl_for(base + ":2,S") == uidl_for(base)
    assert uidl_for("1700000000.M1P2Q3.host,S=1234,W=1300:2,FS") == uidl_for(base)
    assert uidl_for("1700000000.M1P2Q3.host,extra") == "1700000000.M1P2Q3.host,extra"


def test_uidl_hashes_names_outside_the_rfc_alphabet() -> None:
    long_name = "1700000000." + "x" * 80
    for name in (long_name, "17000.caf\u00e9.host"):
        u = uidl_for(name)
        assert len(u) == 40 and all(c in "0123456789abcdef" for c in u)
    assert uidl_for(long_name + ":2,S") == uidl_for(long_name)


# -- the mailbox ---------------------------------------------------------


def make_maildir(root: Path) -> Path:
    for sub in ("tmp", "new", "cur"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def deliver(maildir: Path, name: str, data: bytes, sub: str = "new") -> Path:
    path = maildir / sub / name
    path.write_bytes(data)
    return path


@pytest.fixture
def maildir(tmp_path: Path) -> Path:
    md = make_maildir(tmp_path / "example.test" / "alice")
    deliver(md, "1700000002.M2P1.host,S=10", b"two\nlines\n")
    deliver(md, "1700000001.M1P1.host,S=6", b"one\r\n\r\n")
    deliver(md, "1700000003.M3P1.host,S=3:2,F", b"cur", "cur")
    deliver(md, ".hidden", b"ignored")
    deliver(md, "1700000004.M4P1.host", b"in tmp", "tmp")
    return md


def test_snapshot_order_sizes_and_uidls(maildir: Path) -> None:
    box = MaildirMailbox.open(str(maildir), SizeCache())
    assert [(m.subdir, m.uidl, m.size) for m in box.messages] == [
        ("new", "1700000001.M1P1.host", 7),
        ("new", "1700000002.M2P1.host", 12),
        ("cur", "1700000003.M3P1.host", 5),
    ]
    assert box.stat() == (3, 24)
    assert box.read(2) == b"two\nlines\n"
    # Mail arriving during the session is not part of it (RFC 1939 snapshot).
    deliver(maildir, "1700000009.M9P1.host", b"late\n")
    assert len(box) == 3


def test_missing_maildir_is_empty(tmp_path: Path) -> None:
    box = MaildirMailbox.open(str(tmp_path / "nobody"), SizeCache())
    assert box.stat() == (0, 0)
    assert box.commit() == []


def test_virtual_size_and_cache(maildir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deliver(maildir, "1700000005.M5P1.host,S=2,W=99", b"x\n")
    cache = SizeCache()
    first = MaildirMailbox.open(str(maildir), cache)
    assert first.messages[-1].size == 99

    def no_reading(path: str) -> int:
        raise AssertionError(f"read {path} again")

    monkeypatch.setattr(mb, "file_crlf_size", no_reading)
    second = MaildirMailbox.open(str(maildir), cache)
    assert [m.size for m in second.messages] == [m.size for m in first.messages]


def test_delete_reset_and_numbers(maildir: Path) -> None:
    box = MaildirMailbox.open(str(maildir), SizeCache())
    box.delete(2)
    assert box.stat() == (2, 12)
    assert [n for n, _ in box.live()] == [1, 3]
    for bad in (0, 2, 4):
        with pytest.raises(NoSuchMessage):
            box.get(bad)
    with pytest.raises(NoSuchMessage):
        box.delete(2)
    box.reset()
    assert box.stat() == (3, 24)


def test_commit_unlinks_deleted_and_marks_retrieved_seen(maildir: Path) -> None:
    box = MaildirMailbox.open(str(maildir), SizeCache())
    uidls = [m.uidl for m in box.messages]
    box.delete(1)
    box.mark_retrieved(2)
    box.mark_retrieved(3)
    assert os.listdir(maildir / "new") != []  # nothing happens before UPDATE
    assert box.commit() == []
    assert sorted(os.listdir(maildir / "new")) == [".hidden"]
    assert sorted(os.listdir(maildir / "cur")) == [
        "1700000002.M2P1.host,S=10:2,S",
        "1700000003.M3P1.host,S=3:2,FS",
    ]
    again = MaildirMailbox.open(str(maildir), SizeCache())
    assert [m.uidl for m in again.messages] == uidls[1:]


def test_commit_tolerates_vanished_files_and_reports_failures(
    maildir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = MaildirMailbox.open(str(maildir), SizeCache())
    os.unlink(maildir / "new" / "1700000001.M1P1.host,S=6")
    os.unlink(maildir / "new" / "1700000002.M2P1.host,S=10")
    box.delete(1)
    box.mark_retrieved(2)
    box.delete(3)
    real_unlink = os.unlink

    def unlink(path: str, *, dir_fd: int | None = None) -> None:
        if "M3P1" in str(path):
            raise PermissionError(13, "Permission denied")
        real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(mb.os, "unlink", unlink)
    failures = box.commit()
    assert len(failures) == 1 and "M3P1" in failures[0] and "Permission denied" in failures[0]


def test_open_file_of_vanished_message(maildir: Path) -> None:
    box = MaildirMailbox.open(str(maildir), SizeCache())
    os.unlink(maildir / "cur" / "1700000003.M3P1.host,S=3:2,F")
    with pytest.raises(FileNotFoundError):
        box.open_file(3)
    msg, f = box.open_file(1)
    with f:
        assert f.read() == b"one\r\n\r\n"
    assert msg.uidl == "1700000001.M1P1.host"


def test_locks(tmp_path: Path) -> None:
    locks = MailboxLocks()
    a = str(tmp_path / "a")
    assert locks.acquire(a)
    assert not locks.acquire(a + "/")
    assert locks.held(a)
    assert locks.acquire(str(tmp_path / "b"))
    locks.release(a)
    assert locks.acquire(a)
