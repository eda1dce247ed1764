"""The durable mail spool: a message is acknowledged only once it is safely on disk (M-5).

On-disk format (one directory per message, qmail's spirit, JSON instead of pickles)::

    <root>/tmp/<qid>/           a message being received, or a message being removed
                                (``<qid>.del``); everything in tmp/ is deleted at recovery
    <root>/queue/<qid>/data     the message bytes exactly as the SMTP side wrote them
                                (Received header first, CRLF line ends, dot-unstuffed)
    <root>/queue/<qid>/envelope.json
                                the envelope and the state of every recipient
    <root>/queue/<qid>/held     present while an operator holds the message
                                (``appliance queue hold``): the runner skips it
    <root>/corrupt/<qid>/       a queue entry recovery could not read: kept for the
                                operator, never deleted, never delivered

``envelope.json`` is ``{"version": 1, "queue_id", "size", "envelope": {...the
Envelope fields...}, "recipients": [{"address", "status", "attempts",
"next_attempt", "last_reply": {"code", "enhanced", "text"} | null,
"updated_at", "original", "dsn_sent", "remote_mta", "delay_notified"}, ...]}``.
``status`` is ``pending`` (never tried), ``deferred`` (tried, temporary
failure, retry at ``next_attempt``), ``delivered``, ``failed`` (permanent; a
DSN is owed until ``dsn_sent``) or ``expanded`` (an alias whose remote targets
were appended as new recipients with ``original`` naming it).  The last three
are final.  ``remote_mta`` names the remote server that gave ``last_reply``
(null when the outcome was decided here; the DSN's Remote-MTA field, RFC 3464
2.3.5) and ``delay_notified`` records that the sender got the delay notice
for this recipient (RFC 3464 ``Action: delayed``), so a restart never sends it
twice.  Both were added later: an entry without them reads as null / false.

Every step is crash-safe because each state change is one ``rename``:

* commit: write ``tmp/<qid>/data``, fsync it, write ``tmp/<qid>/envelope.json``,
  fsync it, fsync ``tmp/<qid>``, rename ``tmp/<qid>`` to ``queue/<qid>``,
  fsync ``queue/``.  Only then does the Deferred fire (and the SMTP side say 250).
  A crash before the rename leaves a tmp/ leftover that recovery deletes (the
  client got no 250 and will retry); after it the message is complete.
  Commits are grouped: those that arrive while a batch is being made durable
  form the next batch, which does the above for each message in one thread
  trip and fsyncs ``queue/`` once at its end, before any of them fires.  A
  message of up to ``MEMORY_LIMIT`` bytes is held in memory while it is
  received, so ``tmp/<qid>`` is created by the commit (a larger one spills to
  ``tmp/<qid>/data`` as it arrives).
* state update: write ``envelope.json.new`` in the message directory, fsync,
  rename over ``envelope.json``, fsync the directory.  A crash leaves either the
  old or the new state; a stale ``.new`` is deleted at recovery.
* removal: the message leaves the queue as this process sees it at once; a
  background trip (many messages per trip) renames ``queue/<qid>`` to
  ``tmp/<qid>.del`` (atomic: the removal on disk), then deletes the tree.
  Not fsynced: a removal lost in a crash (or still waiting for its trip) only
  brings the message back for an idempotent redelivery.

While it runs, the spool process is the only writer of the queue (the queue
tools ask it over the control socket), so it keeps each message's state as
it last wrote or read it (bounded by ``STATE_CACHE``) and the hold markers
it found at recovery: processing a message reads no ``envelope.json``.

Queue ids are 23 upper-case hex digits: 13 of microseconds since the epoch,
4 of a per-process counter, 6 random, so they sort by arrival and never
collide between processes or restarts.

Disk I/O that waits for the platter (fsync) runs through an injected
``blocking`` callable (for example ``partial(deferToThreadPool, reactor,
pool)``); without one it runs inline, which is what the unit tests use.
State updates and removals go through :class:`Batched`, so that those queued
behind a thread trip share the next one.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.mail.interfaces import Envelope, Reply

log = Logger()

T = TypeVar("T")

#: Runs a blocking function off the reactor thread and returns its Deferred.
Blocking = Callable[..., "Deferred[Any]"]

PENDING = "pending"
DEFERRED = "deferred"
DELIVERED = "delivered"
FAILED = "failed"
EXPANDED = "expanded"
STATUSES = frozenset({PENDING, DEFERRED, DELIVERED, FAILED, EXPANDED})
FINAL = frozenset({DELIVERED, FAILED, EXPANDED})

FORMAT_VERSION = 1
QUEUE_ID_RE = re.compile(r"\A[0-9A-F]{23}\Z")
ENVELOPE = "envelope.json"
DATA = "data"
HELD = "held"
#: How many messages' states the spool keeps in memory (see Spool.load).
STATE_CACHE = 20_000


class UnknownMessage(KeyError):
    """No message with that queue id is in the spool."""


class CorruptMessage(ValueError):
    """A queue entry exists but its envelope cannot be read."""


def inline(f: Callable[..., T], *args: Any) -> Deferred[T]:
    """A :data:`Blocking` that runs ``f`` at once, on the calling thread (tests, small reads)."""
    return defer.execute(f, *args)


class Batched:
    """A :data:`Blocking` that runs the calls made while a trip is under way in one trip.

    Each trip to a thread pool costs a hand-off and a GIL round trip each way;
    under load the calls that queue up behind a trip (state writes, removals,
    Maildir copies of many messages) go together in the next one, in order.
    Every call still gets its own result or failure.
    """

    def __init__(self, blocking: Blocking) -> None:
        self._blocking = blocking
        self._pending: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []
        self._busy = False

    def __call__(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        self._pending.append((f, args, d))
        if not self._busy:
            self._next()
        return d

    def _next(self) -> None:
        if self._busy or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._busy = True
        self._blocking(self._run, batch).addBoth(self._done, batch)

    @staticmethod
    def _run(batch: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]]) -> list[Any]:
        out: list[Any] = []
        for f, args, _ in batch:
            try:
                out.append(f(*args))
            except Exception:
                out.append(Failure())
        return out

    def _done(
        self,
        outcome: Any,
        batch: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]],
    ) -> None:
        self._busy = False
        for i, (_, _, d) in enumerate(batch):
            value = outcome if isinstance(outcome, Failure) else outcome[i]
            if isinstance(value, Failure):
                d.errback(value)
            else:
                d.callback(value)
        self._next()


def _remove_dirs(queue_dir: Path, tmp_dir: Path, queue_ids: list[str]) -> list[tuple[str, OSError]]:
    """Blocking: rename removed messages out of queue/ (the removal on disk), then delete them.

    No fsync of queue/: if a crash loses a rename, the message comes back and
    is delivered again, which the Maildir layer recognises (one copy per box).
    Returns the messages that could not be renamed, with the error.
    """
    failed: list[tuple[str, OSError]] = []
    graves: list[Path] = []
    for queue_id in queue_ids:
        directory, grave = queue_dir / queue_id, tmp_dir / (queue_id + ".del")
        try:
            try:
                os.rename(directory, grave)
            except FileNotFoundError:
                if not directory.exists():
                    continue
                tmp_dir.mkdir(mode=0o700, exist_ok=True)
                os.rename(directory, grave)
        except OSError as e:
            failed.append((queue_id, e))
            continue
        graves.append(grave)
    _delete_graves(graves)
    return failed


def _delete_graves(graves: list[Path]) -> None:
    """Blocking: delete removed messages' directories (renamed into tmp/)."""
    for grave in graves:
        try:
            # The usual content, without rmtree's directory scan and stats.
            for name in (DATA, ENVELOPE):
                os.unlink(grave / name)
            os.rmdir(grave)
        except OSError:
            shutil.rmtree(grave, ignore_errors=True)


def read_file(path: str | Path) -> bytes:
    """The whole content of a (small) file in the fewest system calls.

    ``open()`` with a buffered reader costs nine calls for a small file (fstat
    twice, an isatty ioctl, two lseeks); this costs four.  The runner reads two
    files per message it processes.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, mode: int = 0o600, sync: bool = True) -> None:
    """Create or truncate ``path``, write all of ``data`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content."""
    temp = path.with_name(path.name + ".new")
    write_file(temp, data, sync=sync)
    os.replace(temp, path)
    if sync:
        fsync_dir(path.parent)


@dataclass(frozen=True)
class RecipientState:
    """What the queue knows about one recipient of one message."""

    address: str
    status: str = PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_reply: Reply | None = None
    updated_at: float = 0.0
    original: str | None = None
    dsn_sent: bool = False
    remote_mta: str | None = None
    delay_notified: bool = False

    @property
    def final(self) -> bool:
        """Delivered, failed or expanded: nothing more will be tried."""
        return self.status in FINAL

    def to_json(self) -> dict[str, Any]:
        """The recipient's entry in envelope.json."""
        # vars() rather than asdict(): asdict deep-copies every field, a measurable
        # cost on the path that commits each message.
        d = dict(vars(self))
        reply = self.last_reply
        d["last_reply"] = (
            None
            if reply is None
            else {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text}
        )
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RecipientState:
        """Read an entry of envelope.json; raises ValueError/KeyError/TypeError when malformed."""
        reply = d.get("last_reply")
        status = str(d["status"])
        if status not in STATUSES:
            raise ValueError(f"unknown recipient status {status!r}")
        return cls(
            address=str(d["address"]),
            status=status,
            attempts=int(d.get("attempts", 0)),
            next_attempt=float(d.get("next_attempt", 0.0)),
            last_reply=None
            if reply is None
            else Reply(int(reply["code"]), str(reply["enhanced"]), str(reply["text"])),
            updated_at=float(d.get("updated_at", 0.0)),
            original=None if d.get("original") is None else str(d["original"]),
            dsn_sent=bool(d.get("dsn_sent", False)),
            remote_mta=None if d.get("remote_mta") is None else str(d["remote_mta"]),
            delay_notified=bool(d.get("delay_notified", False)),
        )


@dataclass(frozen=True)
class QueuedMessage:
    """A committed message: its envelope, recipient states and where its bytes are."""

    queue_id: str
    envelope: Envelope
    recipients: tuple[RecipientState, ...]
    size: int
    data_path: Path
    #: The content of ``data_path`` when the runner already read it (a small message).
    data: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def all_final(self) -> bool:
        """Whether no recipient needs another attempt."""
        return all(r.final for r in self.recipients)

    def recipient(self, address: str) -> RecipientState:
        """The state of one recipient; KeyError when the message has no such recipient."""
        for r in self.recipients:
            if r.address == address:
                return r
        raise KeyError(address)

    def with_updates(
        self, updates: Iterable[RecipientState], add: Iterable[RecipientState] = ()
    ) -> QueuedMessage:
        """This message with some recipient states replaced and new recipients appended."""
        by_address = {u.address: u for u in updates}
        unknown = set(by_address) - {r.address for r in self.recipients}
        if unknown:
            raise KeyError(f"{self.queue_id}: no such recipients {sorted(unknown)}")
        recipients = [by_address.get(r.address, r) for r in self.recipients]
        seen = {r.address for r in recipients}
        for r in add:
            if r.address not in seen:
                seen.add(r.address)
                recipients.append(r)
        return replace(self, recipients=tuple(recipients))

    def to_json(self) -> bytes:
        """The content of envelope.json."""
        doc = {
            "version": FORMAT_VERSION,
            "queue_id": self.queue_id,
            "size": self.size,
            "envelope": _envelope_to_json(self.envelope),
            "recipients": [r.to_json() for r in self.recipients],
        }
        # No indent: json's C encoder only runs without one; the file is still one
        # line of sorted keys, readable with any JSON tool.
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _envelope_to_json(envelope: Envelope) -> dict[str, Any]:
    d = dict(vars(envelope))
    d["recipients"] = list(envelope.recipients)
    d["mail_parameters"] = dict(envelope.mail_parameters)
    return d


def _envelope_from_json(d: Mapping[str, Any]) -> Envelope:
    auth = d.get("authenticated_user")
    return Envelope(
        sender=str(d["sender"]),
        recipients=tuple(str(r) for r in d["recipients"]),
        client_address=str(d["client_address"]),
        client_helo=str(d["client_helo"]),
        listener=str(d["listener"]),
        protocol=str(d["protocol"]),
        received_at=float(d["received_at"]),
        authenticated_user=None if auth is None else str(auth),
        mail_parameters={str(k): str(v) for k, v in dict(d.get("mail_parameters", {})).items()},
    )


def parse_envelope_file(raw: bytes, queue_id: str, data_path: Path) -> QueuedMessage:
    """Decode ``envelope.json``; raises CorruptMessage when it is not a valid one."""
    try:
        doc = json.loads(raw.decode("utf-8"))
        if doc.get("version") != FORMAT_VERSION or doc.get("queue_id") != queue_id:
            raise ValueError("wrong version or queue id")
        return QueuedMessage(
            queue_id=queue_id,
            envelope=_envelope_from_json(doc["envelope"]),
            recipients=tuple(RecipientState.from_json(r) for r in doc["recipients"]),
            size=int(doc["size"]),
            data_path=data_path,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptMessage(f"{queue_id}: unreadable envelope: {e}") from e


#: A message up to this size is held in memory until commit, so that receiving it
#: costs the reactor thread no file-system call; a larger one spills to tmp/.
MEMORY_LIMIT = 256 * 1024
#: take_fresh() keeps the state and header section of up to HEAD_CACHE fresh
#: messages, each only when the header section ends within HEAD_LIMIT bytes.
HEAD_CACHE = 1024
HEAD_LIMIT = 64 * 1024


@dataclass(frozen=True)
class Fresh:
    """A message as committed: its state and its header section (up to the empty line)."""

    message: QueuedMessage
    head: bytes


class _Incoming:
    """A message being received: invisible until commit.

    The bytes stay in memory up to :data:`MEMORY_LIMIT`; beyond that they go to
    ``tmp/<qid>/data``.  Commit writes whatever is still in memory in the commit
    batch's thread (see :meth:`Spool._commit_batch`).
    """

    def __init__(self, spool: Spool, queue_id: str, directory: Path) -> None:
        self.queue_id = queue_id
        self._spool = spool
        self._dir = directory
        self._buffer: bytearray | None = bytearray()
        self._file: BinaryIO | None = None
        self._size = 0
        self._error: OSError | None = None
        self._state = "open"  # open -> committing -> committed | aborted

    def write(self, data: bytes) -> None:
        """Append bytes; a write error is remembered and reported by commit()."""
        if self._state != "open" or self._error is not None:
            return
        try:
            if self._file is not None:
                self._file.write(data)
            elif self._buffer is not None:
                self._buffer += data
                if len(self._buffer) > MEMORY_LIMIT:
                    self._spill()
            else:
                return
            self._size += len(data)
        except OSError as e:
            self._error = e

    def _spill(self) -> None:
        """Move the buffered bytes to ``tmp/<qid>/data`` (a large message)."""
        assert self._buffer is not None
        os.mkdir(self._dir, 0o700)
        try:
            file = open(self._dir / DATA, "xb")
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._file = file
        buffer, self._buffer = self._buffer, None
        file.write(buffer)

    def in_memory(self) -> bytes | None:
        """A copy of the whole message while it is open and only in memory, else None.

        None once it spilled to tmp/, after a write error, or after commit/abort.
        For a store that may deliver a small message without spooling it
        (appliance.mail.direct).
        """
        if self._state != "open" or self._error is not None or self._file is not None:
            return None
        return None if self._buffer is None else bytes(self._buffer)

    def commit(self, envelope: Envelope) -> Deferred[str]:
        """Make the message durable, then fire with its queue id (see the module docstring)."""
        if self._state != "open":
            return defer.fail(ValueError(f"{self.queue_id}: commit after {self._state}"))
        self._state = "committing"
        try:
            if self._error is not None:
                raise self._error
            message = QueuedMessage(
                queue_id=self.queue_id,
                envelope=envelope,
                recipients=tuple(
                    RecipientState(address=a, updated_at=envelope.received_at)
                    for a in dict.fromkeys(envelope.recipients)
                ),
                size=self._size,
                data_path=self._spool.queue_dir / self.queue_id / DATA,
            )
            envelope_json = message.to_json()
        except Exception:
            self._discard()
            self._state = "aborted"
            self._spool._active.discard(self.queue_id)
            return defer.fail()
        file, self._file = self._file, None
        buffer, self._buffer = self._buffer, None
        job = _CommitJob(self.queue_id, self._dir, file, buffer, envelope_json, message)
        d: Deferred[Any] = self._spool._enqueue_commit(job)

        def done(_: None) -> str:
            self._state = "committed"
            self._spool._active.discard(self.queue_id)
            self._spool._committed(self.queue_id)
            return self.queue_id

        def failed(f: Any) -> Any:
            self._state = "aborted"
            self._spool._active.discard(self.queue_id)
            log.error("{qid}: commit failed: {err}", qid=self.queue_id, err=f.value)
            return f

        d.addCallbacks(done, failed)
        return d

    def abort(self) -> None:
        """Discard the message; harmless after commit started or a second time."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._discard()
        self._spool._active.discard(self.queue_id)

    def _discard(self) -> None:
        self._buffer = None
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
            shutil.rmtree(self._dir, ignore_errors=True)


@dataclass
class _CommitJob:
    """One message of a commit batch: what the batch's thread writes and renames."""

    queue_id: str
    directory: Path
    file: BinaryIO | None
    buffer: bytearray | None
    envelope_json: bytes
    message: QueuedMessage
    deferred: Deferred[None] = field(default_factory=Deferred)
    renamed: bool = False
    error: Exception | None = None


class Spool:
    """The queue directory: implements MessageStore for the SMTP side, and the runner's view.

    ``clock`` supplies the time for queue ids; ``blocking`` runs fsync-bound work
    off the reactor (inline when None); ``sync=False`` skips fsync (tests only).
    """

    def __init__(
        self,
        root: Path,
        clock: IReactorTime,
        *,
        blocking: Blocking | None = None,
        sync: bool = True,
    ) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.queue_dir = self.root / "queue"
        self.corrupt_dir = self.root / "corrupt"
        self.clock = clock
        self.now: Callable[[], float] = clock.seconds  # type: ignore[misc]
        self.sync = sync
        self._blocking: Blocking = blocking if blocking is not None else inline
        self._state_blocking: Blocking = Batched(self._blocking)
        # Removed in memory, still to be renamed out of queue/ and deleted (_dig).
        self._graves: list[str] = []
        self._removing: set[str] = set()
        self._digging = False
        self._drained: list[Deferred[None]] = []
        self._counter = secrets.randbelow(0x10000)
        # Seeded once from the system: ids differ between processes and restarts
        # without a getrandom() call per message (they are names, not secrets).
        self._random = random.Random(secrets.randbits(64))
        self._locks: dict[str, defer.DeferredLock] = {}
        self._listeners: list[Callable[[str], object]] = []
        # Messages of this process in tmp/ (being received or committed): recover() spares them.
        self._active: set[str] = set()
        self._dirs_made = False
        self._fresh: dict[str, Fresh] = {}
        self._pending_commits: list[_CommitJob] = []
        self._committing = False
        # The state of each message as this process last wrote or read it: it is the
        # only writer while it runs (the queue tools go through it), so load() need
        # not read envelope.json again.  Bounded; a message not in it is read.
        self._states: dict[str, QueuedMessage] = {}
        # Held messages, known from recover() on (None before: ask the disk).
        self._held: set[str] | None = None

    # -- identity -----------------------------------------------------------

    def new_queue_id(self) -> str:
        """A fresh id: microseconds, counter and randomness, upper-case hex, sortable."""
        usec = int(self.now() * 1_000_000) & ((1 << 52) - 1)
        self._counter = (self._counter + 1) & 0xFFFF
        return f"{usec:013X}{self._counter:04X}{self._random.getrandbits(24):06X}"

    @staticmethod
    def valid_queue_id(queue_id: str) -> bool:
        """Whether a string has the form of a queue id (checked before it becomes a path)."""
        return bool(QUEUE_ID_RE.match(queue_id))

    # -- receiving (MessageStore) -------------------------------------------

    def begin(self) -> _Incoming:
        """Start a message (in memory); raises OSError when the spool is unusable."""
        if not self._dirs_made:
            self._make_dirs()
            self._dirs_made = True
        # The id is unique without a look at the disk (time, counter, randomness);
        # the commit's mkdir refuses a clash all the same.
        queue_id = self.new_queue_id()
        self._active.add(queue_id)
        return _Incoming(self, queue_id, self.tmp_dir / queue_id)

    # -- group commit ------------------------------------------------------------

    def _enqueue_commit(self, job: _CommitJob) -> Deferred[None]:
        """Queue a commit; it joins the next batch (one thread trip, one fsync of queue/)."""
        self._pending_commits.append(job)
        if not self._committing:
            self._next_batch()
        return job.deferred

    def _next_batch(self) -> None:
        if self._committing or not self._pending_commits:
            return
        batch, self._pending_commits = self._pending_commits, []
        self._committing = True
        self._blocking(self._commit_batch, batch).addBoth(self._batch_done, batch)

    def _batch_done(self, outcome: Any, batch: list[_CommitJob]) -> None:
        self._committing = False
        for job in batch:
            buffer, job.buffer = job.buffer, None
            if isinstance(outcome, Failure):
                job.deferred.errback(outcome)
            elif job.error is not None:
                job.deferred.errback(Failure(job.error))
            else:
                self._remember(job.message, buffer)
                self._keep_state(job.message)
                job.deferred.callback(None)
        self._next_batch()

    def _remember(self, message: QueuedMessage, buffer: bytearray | None) -> None:
        if buffer is None or not self._listeners or len(self._fresh) >= HEAD_CACHE:
            return
        end = buffer.find(b"\r\n\r\n", 0, HEAD_LIMIT)
        if end >= 0:
            self._fresh[message.queue_id] = Fresh(message, bytes(buffer[: end + 2]))

    def _keep_state(self, message: QueuedMessage) -> None:
        states = self._states
        if message.queue_id not in states and len(states) >= STATE_CACHE:
            del states[next(iter(states))]  # the oldest entry
        states[message.queue_id] = message

    def take_fresh(self, queue_id: str) -> Fresh | None:
        """State and header section of a message just committed and not changed since, once.

        Saves the runner reading envelope.json and a thread trip to read the
        data file for its trace fields.  None when not (or no longer) known.
        """
        return self._fresh.pop(queue_id, None)

    def _commit_batch(self, batch: list[_CommitJob]) -> None:
        """Blocking: make every message of the batch durable, fsync queue/ once.

        Per message (module docstring): data and envelope.json written and fsynced,
        ``tmp/<qid>`` fsynced and renamed into queue/.  A message that fails is
        removed and reported alone; if the final fsync of queue/ fails, every
        renamed message of the batch is removed, since none may be acknowledged.
        """
        renamed: list[_CommitJob] = []
        try:
            for job in batch:
                try:
                    self._commit_one(job)
                except Exception as e:
                    job.error = e
                else:
                    renamed.append(job)
            if renamed and self.sync:
                fsync_dir(self.queue_dir)
        except BaseException as e:
            # The clients will be told 452: nothing of these messages may stay behind.
            for job in renamed:
                shutil.rmtree(self.queue_dir / job.queue_id, ignore_errors=True)
                if isinstance(e, Exception):
                    job.error = e
            if not isinstance(e, Exception):
                raise

    def _commit_one(self, job: _CommitJob) -> None:
        sync = self.sync
        final = self.queue_dir / job.queue_id
        if job.file is None:
            # A clash (EEXIST) leaves the other directory alone: nothing here is ours yet.
            try:
                os.mkdir(job.directory, 0o700)
            except FileNotFoundError:  # tmp/ vanished under us: make it again
                self._make_dirs()
                os.mkdir(job.directory, 0o700)
        try:
            if job.file is not None:
                file, job.file = job.file, None
                try:
                    file.flush()
                    if sync:
                        os.fsync(file.fileno())
                finally:
                    file.close()
            else:
                write_file(job.directory / DATA, bytes(job.buffer or b""), sync=sync)
            write_file(job.directory / ENVELOPE, job.envelope_json, sync=sync)
            if sync:
                fsync_dir(job.directory)
            os.rename(job.directory, final)
            job.renamed = True
        except BaseException:
            shutil.rmtree(final if job.renamed else job.directory, ignore_errors=True)
            raise

    def add_commit_listener(self, listener: Callable[[str], object]) -> None:
        """Call ``listener(queue_id)`` after each message becomes durable (the runner's notify)."""
        self._listeners.append(listener)

    def _committed(self, queue_id: str) -> None:
        # No log line of its own: every caller logs the transaction with the queue id.
        for listener in self._listeners:
            try:
                listener(queue_id)
            except Exception:
                log.failure("{qid}: commit listener failed", qid=queue_id)

    def _make_dirs(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (self.tmp_dir, self.queue_dir):
            d.mkdir(mode=0o700, exist_ok=True)

    # -- recovery and listing -------------------------------------------------

    def recover(self) -> list[str]:
        """Clean up after a crash (tmp/ leftovers, half-written state) and list the queue.

        Meant for start-up, before the listeners accept mail; messages this Spool
        object is receiving or removing right now are left alone all the same.
        """
        self._make_dirs()
        for entry in os.scandir(self.tmp_dir):
            base = entry.name.removesuffix(".del")
            if base in self._active or base in self._locks or base in self._removing:
                continue
            log.info("recovery: removing unfinished {name}", name=entry.name)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        good = []
        held: set[str] = set()
        self._states.clear()
        for queue_id in self.messages():
            directory = self.queue_dir / queue_id
            stale = directory / (ENVELOPE + ".new")
            if stale.exists():
                stale.unlink()
            try:
                self._keep_state(self._read(queue_id))
            except (CorruptMessage, OSError) as e:
                log.error(
                    "recovery: {qid} is unreadable ({err}); moved to corrupt/", qid=queue_id, err=e
                )
                self.corrupt_dir.mkdir(mode=0o700, exist_ok=True)
                os.rename(directory, self.corrupt_dir / queue_id)
                continue
            good.append(queue_id)
            if (directory / HELD).exists():
                held.add(queue_id)
        self._held = held
        if self.sync:
            fsync_dir(self.tmp_dir)
            fsync_dir(self.queue_dir)
        return good

    def messages(self) -> list[str]:
        """Queue ids of every committed message, oldest first."""
        try:
            names = os.listdir(self.queue_dir)
        except FileNotFoundError:
            return []
        removing = self._removing
        return sorted(n for n in names if QUEUE_ID_RE.match(n) and n not in removing)

    def has(self, queue_id: str) -> bool:
        """Whether a message with this id is in the queue (and not being removed)."""
        if queue_id in self._states:
            return True
        try:
            return self._message_dir(queue_id).is_dir()
        except UnknownMessage:
            return False

    def load(self, queue_id: str) -> QueuedMessage:
        """One message's envelope and state: from memory when this process knows it, else read."""
        known = self._states.get(queue_id)
        if known is not None:
            return known
        # Not remembered from here: a read may race an update in a thread.
        return self._read(queue_id)

    def _read(self, queue_id: str) -> QueuedMessage:
        """Read one message's envelope.json (small: done inline)."""
        directory = self._message_dir(queue_id)
        try:
            raw = read_file(directory / ENVELOPE)
        except FileNotFoundError:
            if directory.is_dir():
                raise CorruptMessage(f"{queue_id}: no envelope") from None
            raise UnknownMessage(queue_id) from None
        return parse_envelope_file(raw, queue_id, directory / DATA)

    def open_data(self, queue_id: str) -> BinaryIO:
        """The message bytes, for reading."""
        return open(self._message_dir(queue_id) / DATA, "rb")

    def _message_dir(self, queue_id: str) -> Path:
        if not QUEUE_ID_RE.match(queue_id) or queue_id in self._removing:
            raise UnknownMessage(queue_id)
        return self.queue_dir / queue_id

    # -- state changes ----------------------------------------------------------

    def _lock(self, queue_id: str) -> defer.DeferredLock:
        lock = self._locks.get(queue_id)
        if lock is None:
            lock = self._locks[queue_id] = defer.DeferredLock()
        return lock

    def _release(self, queue_id: str, lock: defer.DeferredLock) -> None:
        lock.release()
        if not lock.locked and not lock.waiting and self._locks.get(queue_id) is lock:
            del self._locks[queue_id]

    def _locked(
        self, queue_id: str, f: Callable[..., T], *args: Any, at_once: bool = False
    ) -> Deferred[T]:
        """Run ``f`` while holding the message's lock, in the state thread trip.

        ``at_once``: ``f`` is a quick metadata change run on the calling thread;
        when nobody holds the lock (the usual case) it runs without taking one,
        since nothing can come in between on the reactor thread.
        """
        if at_once and queue_id not in self._locks:
            return inline(f, *args)
        lock = self._lock(queue_id)
        run = inline if at_once else self._state_blocking
        d: Deferred[T] = lock.acquire().addCallback(lambda _: run(f, *args))

        def release(result: Any) -> Any:
            self._release(queue_id, lock)
            return result

        d.addBoth(release)
        return d

    def update_recipients(
        self,
        queue_id: str,
        updates: Iterable[RecipientState],
        add: Iterable[RecipientState] = (),
    ) -> Deferred[QueuedMessage]:
        """Atomically replace the states of some recipients and append new ones.

        Recipients in ``add`` whose address the message already has are dropped,
        so an alias expanding twice to the same remote address delivers once.
        Fires with the new state.
        """
        self._fresh.pop(queue_id, None)
        return self._locked(queue_id, self._update_blocking, queue_id, list(updates), list(add))

    def update_recipient(self, queue_id: str, state: RecipientState) -> Deferred[QueuedMessage]:
        """Atomically replace the state of one recipient."""
        return self.update_recipients(queue_id, [state])

    def _update_blocking(
        self, queue_id: str, updates: list[RecipientState], add: list[RecipientState]
    ) -> QueuedMessage:
        self._states.pop(queue_id, None)  # should the write fail, the disk says what holds
        message = self._read(queue_id).with_updates(updates, add)
        write_atomic(message.data_path.with_name(ENVELOPE), message.to_json(), sync=self.sync)
        self._keep_state(message)
        return message

    def remove(self, queue_id: str, force: bool = False) -> Deferred[None]:
        """Delete a message whose recipients are all final (any message with ``force``).

        Fires as soon as the message is out of the queue as this process sees it
        (:meth:`messages`, :meth:`load` and the rest no longer know it).  The
        rename out of queue/ and the deletion of its files follow in the
        background, many messages per thread trip (:meth:`_dig`); :meth:`drain`
        waits for them.
        """
        self._fresh.pop(queue_id, None)
        return self._locked(queue_id, self._detach, queue_id, force, at_once=True)

    def _detach(self, queue_id: str, force: bool) -> None:
        if not force and not self.load(queue_id).all_final:
            raise ValueError(f"{queue_id}: recipients still pending")
        if not self.has(queue_id):
            raise UnknownMessage(queue_id)
        self._removing.add(queue_id)
        self._forget(queue_id)
        log.info("{line}", line=f"{queue_id}: removed", qid=queue_id)
        self._graves.append(queue_id)
        if not self._digging:
            self._dig()

    def drain(self) -> Deferred[None]:
        """Fires once every removal so far is done on disk (at shutdown)."""
        if not self._digging and not self._graves:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    def _forget(self, queue_id: str) -> None:
        self._states.pop(queue_id, None)
        if self._held is not None:
            self._held.discard(queue_id)

    # -- holding ----------------------------------------------------------------

    def is_held(self, queue_id: str) -> bool:
        """Whether the operator put the message on hold (``queue/<qid>/held`` exists)."""
        if self._held is not None:
            return queue_id in self._held
        return self.valid_queue_id(queue_id) and os.path.exists(
            os.path.join(os.fspath(self.queue_dir), queue_id, HELD)
        )

    def set_held(self, queue_id: str, held: bool) -> None:
        """Create or remove the hold marker; UnknownMessage when there is no such message."""
        directory = self._message_dir(queue_id)
        marker = directory / HELD
        try:
            if held:
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
                os.close(fd)
            else:
                marker.unlink(missing_ok=True)
                if not directory.is_dir():
                    raise FileNotFoundError(directory)
        except FileNotFoundError:
            raise UnknownMessage(queue_id) from None
        if self._held is not None:
            if held:
                self._held.add(queue_id)
            else:
                self._held.discard(queue_id)

    def _dig(self) -> None:
        """Take the removed messages out of queue/ and delete them, off the reactor thread.

        Renaming and unlinking cost the reactor thread more than anything else
        in a delivery's bookkeeping, and nobody needs to wait for them: the
        removals made meanwhile go together in the next round of trips.
        """
        queue_ids, self._graves = self._graves, []
        self._digging = True
        # Two threads at a time: most of an unlink's time is spent waiting in the file
        # system, not computing, so two halves finish sooner than one whole.
        half = (len(queue_ids) + 1) // 2
        parts = [part for part in (queue_ids[:half], queue_ids[half:]) if part]
        trips = [self._blocking(_remove_dirs, self.queue_dir, self.tmp_dir, p) for p in parts]
        defer.gatherResults(trips, consumeErrors=True).addBoth(self._dug, queue_ids)

    def _dug(self, result: object, queue_ids: list[str]) -> None:
        self._digging = False
        self._removing.difference_update(queue_ids)
        if isinstance(result, Failure):
            log.failure("removing messages from the queue", result)
        else:
            for queue_id, error in (f for part in result for f in part):  # type: ignore[attr-defined]
                # It stays in queue/: the next start sees it again (at worst a redelivery).
                log.error(
                    "{qid}: could not remove it from the queue: {err}", qid=queue_id, err=error
                )
        if self._graves:
            self._dig()
        else:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)
