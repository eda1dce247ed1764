"""One POP3 session's view of a Maildir: snapshot, sizes, stable UIDLs, deferred deletion.

The Maildir layout is ``tmp/``, ``new/`` and ``cur/`` directly inside the
user's mailbox directory.  At login the session takes a snapshot of ``new/``
and ``cur/`` (RFC 1939 section 8: the maildrop does not change under a
session); sizes are the octets as sent, with every line ending counted as
CRLF.  DELE only marks; the UPDATE state (QUIT) unlinks the marked files and
moves retrieved messages from ``new/`` to ``cur/`` with the ``S`` (seen)
flag, the way mutt and Dovecot do, so both agree on what is read.

UIDLs (RFC 1939 section 7) come from the unique part of the file name, the
part before ``:2,`` minus ``,S=``/``,W=`` size fields, so they survive flag
changes, moves from new/ to cur/, and restarts.

Locking: one appliance process serves every POP3 listener, so an
in-process registry (:class:`MailboxLocks`) is enough for ``[IN-USE]``
(RFC 2449 section 8.1.1).  It does not stop a local mutt; Maildir makes that
safe anyway (a vanished file is reported, not fatal).

This module also holds the wire encoding of a message (CRLF normalisation
and dot-stuffing over the whole message, chunk boundaries included), since
sizes are defined by it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

__all__ = [
    "DEFAULT_LOCKS",
    "LineEncoder",
    "MailboxLocks",
    "MaildirMailbox",
    "Message",
    "NoSuchMessage",
    "SizeCache",
    "crlf_size",
    "encode_message",
    "uidl_for",
]

_SIZE_FIELD = re.compile(r"^[A-Za-z]=\d+$")
_VIRTUAL_SIZE = re.compile(r",W=(\d+)")
_UIDL_OK = re.compile(r"^[\x21-\x7e]{1,70}$")

# Files up to this size are read whole; larger ones are streamed in chunks this big.
CHUNK = 256 * 1024
# Longest run without a newline kept back while waiting for the end of a line.
_MAX_CARRY = 64 * 1024


# ----------------------------------------------------------------------------
# Wire encoding


def _to_crlf(data: bytes) -> bytes:
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def encode_message(data: bytes, stuff: bool = True) -> bytes:
    """A whole message as sent: CRLF line ends, a final CRLF, and (``stuff``) dot-stuffing.

    RFC 1939 section 3: every line starting with "." gets another ".".  The
    terminating ".CRLF" is not included.
    """
    out = _to_crlf(data)
    if out and not out.endswith(b"\r\n"):
        out += b"\r\n"
    if stuff:
        if out.startswith(b"."):
            out = b"." + out
        out = out.replace(b"\r\n.", b"\r\n..")
    return out


def crlf_size(data: bytes) -> int:
    """The size of a message as sent (RFC 1939 section 5, LIST/STAT): CRLF line ends, unstuffed."""
    if b"\r" not in data:
        size = len(data) + data.count(b"\n")
        if data and not data.endswith(b"\n"):
            size += 2
        return size
    return len(encode_message(data, stuff=False))


class LineEncoder:
    """:func:`encode_message` for a message fed in arbitrary chunks.

    Only whole lines are converted, so a "." or a CRLF split across two
    chunks is handled exactly as in the whole buffer (the bug in
    twisted.mail.pop3, which stuffs each 16 KB chunk on its own).
    """

    def __init__(self, stuff: bool = True) -> None:
        self._stuff = stuff
        self._carry = b""
        self._at_line_start = True

    def _convert(self, piece: bytes) -> bytes:
        out = _to_crlf(piece)
        if self._stuff:
            if self._at_line_start and out.startswith(b"."):
                out = b"." + out
            out = out.replace(b"\r\n.", b"\r\n..")
        if out:
            self._at_line_start = out.endswith(b"\n")
        return out

    def feed(self, data: bytes) -> bytes:
        """Encoded bytes for everything up to the last complete line seen so far."""
        data = self._carry + data
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            if len(data) <= _MAX_CARRY:
                self._carry = data
                return b""
            # An enormous line: pass it on, but never split a CR from its LF.
            cut = len(data) - 1 if data.endswith(b"\r") else len(data)
        self._carry = data[cut:]
        return self._convert(data[:cut])

    def finish(self) -> bytes:
        """The rest, with a final CRLF when the message did not end with a line end."""
        out = self._convert(self._carry) if self._carry else b""
        self._carry = b""
        if not self._at_line_start:
            out += b"\r\n"
            self._at_line_start = True
        return out


def file_crlf_size(path: str) -> int:
    """:func:`crlf_size` of a file, reading big files in chunks."""
    with open(path, "rb") as f:
        data = f.read(CHUNK + 1)
        if len(data) <= CHUNK:
            return crlf_size(data)
        enc = LineEncoder(stuff=False)
        size = len(enc.feed(data))
        while chunk := f.read(CHUNK):
            size += len(enc.feed(chunk))
        return size + len(enc.finish())


# ----------------------------------------------------------------------------
# Names


def unique_part(filename: str) -> str:
    """The Maildir unique name: the file name before the ``:2,`` info."""
    return filename.split(":", 1)[0]


def uidl_for(filename: str) -> str:
    """A UIDL that does not change with flags or new/ -> cur/ moves (RFC 1939 section 7).

    The unique part minus ``,S=``/``,W=``-style fields, used as it is when
    it fits the RFC's 1-70 printable characters, otherwise its SHA-1.
    """
    parts = unique_part(filename).split(",")
    base = ",".join([parts[0], *(p for p in parts[1:] if not _SIZE_FIELD.match(p))])
    if _UIDL_OK.match(base):
        return base
    return hashlib.sha1(base.encode("utf-8", "surrogateescape")).hexdigest()


def _sort_key(filename: str) -> tuple[int, str]:
    stamp = filename.split(".", 1)[0]
    return (int(stamp) if stamp.isdigit() else 1 << 62, filename)


# ----------------------------------------------------------------------------
# Locks and size cache


class MailboxLocks:
    """Which Maildirs have a POP3 session in the TRANSACTION state (in-process: one process serves POP3)."""

    def __init__(self) -> None:
        self._held: set[str] = set()

    @staticmethod
    def key(path: str) -> str:
        return os.path.realpath(path)

    def acquire(self, path: str) -> bool:
        """Take the lock; False when another session holds it."""
        key = self.key(path)
        if key in self._held:
            return False
        self._held.add(key)
        return True

    def release(self, path: str) -> None:
        self._held.discard(self.key(path))

    def held(self, path: str) -> bool:
        return self.key(path) in self._held


DEFAULT_LOCKS = MailboxLocks()


class SizeCache:
    """Sizes as sent, remembered per Maildir by unique name (message files never change).

    Saves re-reading every file at each login; pruned to the current listing
    on every scan, so it stays as big as the mailboxes.
    """

    def __init__(self) -> None:
        self._sizes: dict[str, dict[str, int]] = {}

    def get(self, maildir: str) -> dict[str, int]:
        return self._sizes.get(maildir, {})

    def put(self, maildir: str, sizes: dict[str, int]) -> None:
        self._sizes[maildir] = sizes

    def forget(self, maildir: str) -> None:
        self._sizes.pop(maildir, None)


DEFAULT_SIZES = SizeCache()


# ----------------------------------------------------------------------------
# The mailbox


class NoSuchMessage(LookupError):
    """A message number that is out of range or marked deleted."""


@dataclass
class Message:
    """One message of the snapshot."""

    subdir: str  # "new" or "cur"
    filename: str
    uidl: str
    size: int
    deleted: bool = False
    retrieved: bool = False


class MaildirMailbox:
    """The snapshot one POP3 session works on; numbers are 1-based as in RFC 1939."""

    def __init__(self, path: str, messages: list[Message]) -> None:
        self.path = path
        self.messages = messages

    @classmethod
    def open(cls, path: str, sizes: SizeCache | None = None) -> MaildirMailbox:
        """Scan ``new/`` and ``cur/`` (blocking I/O).  A missing Maildir is an empty mailbox.

        Raises OSError when a directory exists but cannot be read.
        """
        cache = DEFAULT_SIZES if sizes is None else sizes
        known = cache.get(path)
        fresh: dict[str, int] = {}
        found: list[tuple[tuple[int, str], str, str]] = []
        for subdir in ("new", "cur"):
            try:
                names = os.listdir(os.path.join(path, subdir))
            except FileNotFoundError:
                continue
            for name in names:
                if name.startswith("."):
                    continue
                found.append((_sort_key(name), subdir, name))
        found.sort()
        messages: list[Message] = []
        seen: set[str] = set()
        for _, subdir, name in found:
            unique = unique_part(name)
            size = known.get(unique)
            if size is None:
                m = _VIRTUAL_SIZE.search(unique)
                if m:
                    size = int(m.group(1))
                else:
                    try:
                        size = file_crlf_size(os.path.join(path, subdir, name))
                    except (FileNotFoundError, IsADirectoryError):
                        continue  # moved or deleted under us, or not a message
            fresh[unique] = size
            uidl = uidl_for(name)
            if uidl in seen:
                uidl = hashlib.sha1(
                    f"{subdir}/{name}".encode("utf-8", "surrogateescape")
                ).hexdigest()
            seen.add(uidl)
            messages.append(Message(subdir, name, uidl, size))
        cache.put(path, fresh)
        return cls(path, messages)

    def __len__(self) -> int:
        return len(self.messages)

    def get(self, number: int) -> Message:
        """The live (not deleted) message with this number; NoSuchMessage otherwise."""
        if not 1 <= number <= len(self.messages):
            raise NoSuchMessage(number)
        msg = self.messages[number - 1]
        if msg.deleted:
            raise NoSuchMessage(number)
        return msg

    def live(self) -> Iterator[tuple[int, Message]]:
        """(number, message) for every message not marked deleted."""
        for i, msg in enumerate(self.messages, 1):
            if not msg.deleted:
                yield i, msg

    def stat(self) -> tuple[int, int]:
        """Count and total size of the messages not marked deleted (STAT)."""
        count = total = 0
        for msg in self.messages:
            if not msg.deleted:
                count += 1
                total += msg.size
        return count, total

    def file_path(self, msg: Message) -> str:
        return os.path.join(self.path, msg.subdir, msg.filename)

    def open_file(self, number: int) -> tuple[Message, BinaryIO]:
        """The message and its file opened for binary reading (the caller closes it).

        Raises NoSuchMessage, or OSError (FileNotFoundError when another
        program removed the file).
        """
        msg = self.get(number)
        # Unbuffered: a message up to CHUNK is then one read() (a buffered file costs an
        # fstat, an ioctl and an lseek more, measurable on a RETR at a time).
        return msg, open(self.file_path(msg), "rb", buffering=0)

    def read(self, number: int) -> bytes:
        """The whole stored message (raw bytes, as on disk)."""
        msg = self.get(number)
        with open(self.file_path(msg), "rb") as f:
            return f.read()

    def mark_retrieved(self, number: int) -> None:
        """Remember that RETR sent this message (it moves to cur/ with S at UPDATE)."""
        self.get(number).retrieved = True

    def delete(self, number: int) -> None:
        """Mark for deletion at UPDATE (DELE)."""
        self.get(number).deleted = True

    def reset(self) -> None:
        """Unmark every deletion (RSET)."""
        for msg in self.messages:
            msg.deleted = False

    def commit(self) -> list[str]:
        """The UPDATE state: unlink the deleted, move the retrieved to cur/ with ``S``.

        Returns a description of each failure (empty when all went well);
        files another program already removed or moved count as done.
        """
        failures: list[str] = []
        touched: set[str] = set()
        # Names relative to directory descriptors: the kernel does not walk the
        # mailbox path again for each of thousands of renames.
        fds: dict[str, int] = {}
        try:
            for subdir in ("new", "cur"):
                with contextlib.suppress(FileNotFoundError):
                    fds[subdir] = os.open(
                        os.path.join(self.path, subdir),
                        os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                    )
            for msg in self.messages:
                if not (msg.deleted or msg.retrieved):
                    continue
                fd = fds.get(msg.subdir)
                if fd is None:
                    continue  # its directory is gone: nothing left to remove or move
                if msg.deleted:
                    try:
                        os.unlink(msg.filename, dir_fd=fd)
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        failures.append(f"{msg.subdir}/{msg.filename}: {e.strerror or e}")
                        continue
                    touched.add(msg.subdir)
                    continue
                unique, _, info = msg.filename.partition(":")
                flags = info[2:] if info.startswith("2,") else ""
                if msg.subdir == "cur" and "S" in flags:
                    continue
                new_name = f"{unique}:2,{''.join(sorted(set(flags) | {'S'}))}"
                cur = fds.get("cur")
                if cur is None:
                    continue  # no cur/ to move it to (as a rename into it would fail)
                try:
                    os.rename(msg.filename, new_name, src_dir_fd=fd, dst_dir_fd=cur)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    failures.append(f"{msg.subdir}/{msg.filename}: {e.strerror or e}")
                    continue
                msg.subdir, msg.filename = "cur", new_name
                touched.update(("new", "cur"))
            for subdir in sorted(touched):
                with contextlib.suppress(OSError):
                    os.fsync(fds[subdir])
        finally:
            for fd in fds.values():
                os.close(fd)
        return failures
