"""Maildir delivery (https://cr.yp.to/proto/maildir.html): no locks, no partial messages (M-4).

A message is written to ``tmp/<name>``, fsynced, hard-linked into
``new/<name>,S=<size>,W=<crlf size>``, the tmp name is unlinked and ``new/`` is
fsynced.  A reader therefore never sees a partial message: only complete,
durable files ever appear in ``new/``.  Messages are stored with LF line ends,
as the Maildir tools (qmail, Dovecot, mutt) expect; ``S`` is the file size and
``W`` the size with CRLF line ends (what POP3 LIST reports), Dovecot's
convention.  The POP3 side converts LF back to CRLF when it sends.

Unique names:

* an ordinary delivery is ``<sec>.M<usec>P<pid>Q<counter>.<host>`` as the
  spec suggests (pid read at delivery time, so it is right after a fork);
* a delivery from the queue passes a ``key`` (the queue id) and the message's
  arrival time and gets ``<sec>.Q<key>.<host>``, the same name on every retry.

Idempotent redelivery: the queue marks a recipient delivered only after the
Maildir delivery returned, so a crash in between makes the runner deliver
again.  With a ``key`` the second delivery first looks in ``new/`` then
``cur/`` (in that order, so a POP3 client moving the file between them cannot
hide it) for a name starting ``<sec>.Q<key>.`` (host and flags may differ)
and, when it finds one, writes nothing and returns that name; a leftover
``tmp/`` file from the crash is simply overwritten.  Because the name does not
depend on the recipient, several recipients of one message that reach the
same mailbox (alice@ and alice+news@) store it once.  One window remains: if
the user downloads *and deletes* the message between the delivery and the
queue's state update and the box then crashes, the retry delivers it again;
that is a duplicate, never a loss.  ``thorough=False`` skips the directory
scans for a first attempt that cannot have happened before (the hard link
still refuses an identical name).

:func:`deliver_many` does the same for several copies at once, pass by pass
(write all, fsync all, link all, fsync each new/ once), for direct delivery
(appliance.mail.direct); :func:`local_copy` gives the bytes both paths store.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from twisted.logger import Logger

log = Logger()

_counter = itertools.count(1)
# Maildirs this process has delivered into: their tmp/new/cur are not checked
# again (each check is a stat and three mkdirs, each a trip through the GIL).
_known: set[Path] = set()
_KEY_RE = re.compile(r"\A[0-9A-Za-z]{1,64}\Z")
SUBDIRS = ("tmp", "new", "cur")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sanitize_host(hostname: str) -> str:
    """The host part of a unique name: ``/`` and ``:`` (and our ``,``) escaped as the spec says."""
    return (
        hostname.replace("\\", "\\134")
        .replace("/", "\\057")
        .replace(":", "\\072")
        .replace(",", "\\054")
    ) or "localhost"


@functools.lru_cache(maxsize=4096)  # asked for every message received and delivered
def mailbox_path(mail_root: Path, relative: str) -> Path:
    """``mail_root / relative``, refusing absolute paths and ``..`` that would leave the root."""
    rel = Path(relative)
    if not relative or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"mailbox path {relative!r} is not inside the mail root")
    return Path(mail_root) / rel


def create_maildir(path: Path, sync: bool = True) -> None:
    """Create ``path`` with tmp, new and cur (mode 0700) when missing; durable when new."""
    path = Path(path)
    created: list[Path] = []
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
            created.append(d)
        except FileExistsError:
            pass
    for sub in SUBDIRS:
        try:
            os.mkdir(path / sub, 0o700)
            created.append(path / sub)
        except FileExistsError:
            pass
    if sync:
        for d in {c.parent for c in created}:
            _fsync_dir(d)


def crlf_to_lf(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Turn CRLF line ends into LF across chunk boundaries (a lone CR is kept)."""
    carry = b""
    for chunk in chunks:
        buf = carry + chunk
        if buf.endswith(b"\r"):
            carry, buf = b"\r", buf[:-1]
        else:
            carry = b""
        if buf:
            yield buf.replace(b"\r\n", b"\n")
    if carry:
        yield carry


def local_copy(sender: str, address: str, chunks: Iterable[bytes]) -> Iterator[bytes]:
    """A spooled message (CRLF) as a local delivery stores it in one Maildir.

    ``Return-Path`` (RFC 5321 4.4) and ``Delivered-To`` (the address that reached
    this mailbox, for loop detection) are prepended, and line ends become LF.
    Both the queue runner and direct delivery (appliance.mail.direct) use it, so
    a copy has the same bytes, hence the same keyed name, whichever path wrote it.
    """
    yield f"Return-Path: <{sender}>\nDelivered-To: {address}\n".encode("utf-8", "surrogateescape")
    yield from crlf_to_lf(chunks)


def find_delivered(maildir: Path, prefix: str) -> str | None:
    """The name of a message in new/ or cur/ whose name starts with ``prefix``, if any."""
    for sub in ("new", "cur"):
        try:
            with os.scandir(maildir / sub) as it:
                for entry in it:
                    if entry.name.startswith(prefix):
                        return f"{sub}/{entry.name}"
        except FileNotFoundError:
            continue
    return None


def deliver(
    maildir: Path,
    chunks: Iterable[bytes],
    *,
    hostname: str,
    now: float,
    key: str | None = None,
    key_time: float | None = None,
    thorough: bool = True,
    sync: bool = True,
) -> str:
    """Deliver one message (bytes as stored: LF line ends) into ``maildir``.

    Blocking (fsync): call it from a thread.  Returns the message's path
    relative to the Maildir (``new/<name>``), or the already delivered one when
    ``key`` says this message was delivered there before.  Raises OSError
    (ENOSPC, EDQUOT, EIO...) with nothing but a tmp/ file left behind.
    """
    maildir = Path(maildir)
    host = sanitize_host(hostname)
    base = _base_name(host, now, key, key_time)
    if key is not None:
        prefix = base[: -len(host)]
        if thorough:
            existing = find_delivered(maildir, prefix)
            if existing is not None:
                log.info("{path}: already delivered as {name}", path=maildir, name=existing)
                try:
                    os.unlink(maildir / "tmp" / base)  # left by a crash after the link
                except FileNotFoundError:
                    pass
                return existing
    tmp = maildir / "tmp" / base
    fd = _open_tmp(maildir, tmp, sync)
    size = lines = 0
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            size += len(chunk)
            lines += chunk.count(b"\n")
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    name = f"{base},S={size},W={size + lines}"
    _publish(maildir, tmp, name, keyed=key is not None)
    if sync:
        _fsync_dir(maildir / "new")
    _known.add(maildir)
    return f"new/{name}"


def _base_name(host: str, now: float, key: str | None, key_time: float | None) -> str:
    """The unique part of a name: keyed ``<sec>.Q<key>.<host>`` or ``<sec>.M<usec>P<pid>Q<n>.<host>``."""
    if key is not None:
        if not _KEY_RE.match(key):
            raise ValueError(f"bad delivery key {key!r}")
        return f"{int(key_time if key_time is not None else 0)}.Q{key}.{host}"
    usec = int(now * 1_000_000) % 1_000_000
    return f"{int(now)}.M{usec}P{os.getpid()}Q{next(_counter)}.{host}"


def _open_tmp(maildir: Path, tmp: Path, sync: bool) -> int:
    """Create ``tmp`` (truncating a crash's leftover), making the Maildir first when unknown."""
    if maildir not in _known:
        create_maildir(maildir, sync=sync)
    try:
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        if maildir not in _known:
            raise
        # Removed since we last saw it (an administrator): make it again, once.
        _known.discard(maildir)
        create_maildir(maildir, sync=sync)
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


def _publish(maildir: Path, tmp: Path, name: str, *, keyed: bool) -> None:
    """Hard-link the complete ``tmp`` file as ``new/<name>`` and unlink the tmp name.

    A keyed name already in new/ is the same message delivered before (logged,
    not an error).  Not durable until new/ is fsynced.
    """
    target = maildir / "new" / name
    try:
        os.link(tmp, target)
    except FileNotFoundError:
        _known.discard(maildir)  # new/ is gone: the retry creates it again
        raise
    except FileExistsError:
        os.unlink(tmp)
        if not keyed:
            raise
        log.info("{path}: already delivered as new/{name}", path=maildir, name=name)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # A file system without hard links: rename is atomic too, it just may replace.
        os.rename(tmp, target)
    else:
        os.unlink(tmp)


class Copy(NamedTuple):
    """One message for one Maildir in :func:`deliver_many`: bytes as stored (LF line ends).

    ``key``/``key_time`` as for :func:`deliver`; a keyed copy is assumed new (no
    directory scan; an identical name already in new/ still counts as delivered).
    """

    maildir: Path
    data: bytes
    key: str | None = None
    key_time: float | None = None


#: deliver_many keeps at most this many tmp files open at once (written, then fsynced).
OPEN_FILES = 64


def deliver_many(
    items: Sequence[Copy], *, hostname: str, now: float, sync: bool = True
) -> list[str | OSError]:
    """Deliver several copies in four passes; per copy its ``new/<name>`` or its OSError.

    Blocking (fsync).  The passes, each over every copy: write the tmp files;
    fsync them; link them into new/ and unlink the tmp names; fsync each
    distinct new/ once.  On a journaling file system the fsyncs then share
    journal commits instead of waiting for one each.  A copy counts as
    delivered only when its file and its new/ were fsynced: if the fsync of a
    new/ fails, every copy linked into it is reported failed (it may have
    landed all the same; a keyed redelivery recognises it).  Two copies must
    not share a Maildir and a key.
    """
    host = sanitize_host(hostname)
    out: list[str | OSError] = [OSError(errno.EIO, "not attempted")] * len(items)
    staged: list[tuple[int, Path, str]] = []  # index, tmp path, final name
    for start in range(0, len(items), OPEN_FILES):
        written: list[tuple[int, Path, str, int]] = []
        for i in range(start, min(start + OPEN_FILES, len(items))):
            item = items[i]
            maildir = Path(item.maildir)
            tmp = maildir / "tmp" / _base_name(host, now, item.key, item.key_time)
            try:
                fd = _open_tmp(maildir, tmp, sync)
            except OSError as e:
                out[i] = e
                continue
            try:
                view = memoryview(item.data)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError as e:
                os.close(fd)
                _unlink_quietly(tmp)
                out[i] = e
                continue
            size = len(item.data)
            lines = item.data.count(b"\n")
            name = f"{tmp.name},S={size},W={size + lines}"
            written.append((i, tmp, name, fd))
        for i, tmp, name, fd in written:
            try:
                if sync:
                    os.fsync(fd)
            except OSError as e:
                _unlink_quietly(tmp)
                out[i] = e
            else:
                staged.append((i, tmp, name))
            finally:
                os.close(fd)
    linked: dict[Path, list[tuple[int, str]]] = {}
    for i, tmp, name in staged:
        maildir = Path(items[i].maildir)
        try:
            _publish(maildir, tmp, name, keyed=items[i].key is not None)
        except OSError as e:
            _unlink_quietly(tmp)
            out[i] = e
        else:
            linked.setdefault(maildir, []).append((i, name))
    for maildir, copies in linked.items():
        try:
            if sync:
                _fsync_dir(maildir / "new")
        except OSError as e:
            for i, _ in copies:
                out[i] = e
        else:
            _known.add(maildir)
            for i, name in copies:
                out[i] = f"new/{name}"
    return out


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
