"""The queue runner: takes committed messages out of the spool and delivers the local recipients.

For each message it resolves every due local recipient (aliases, extensions,
role addresses: appliance.mail.local), writes one copy per mailbox into the
Maildir tree (appliance.mail.maildir) with ``Return-Path`` and
``Delivered-To`` prepended (the Received header the SMTP side wrote is kept,
RFC 5321 4.4), and records the outcome per recipient in the spool:

* delivered: ``delivered``; an alias that also reached remote addresses:
  ``expanded``, and the remote addresses are appended as new pending
  recipients in the same atomic state update;
* unknown user: ``failed`` 550 5.1.1; more than ``max_received`` Received
  headers: every open recipient ``failed`` 554 5.4.6 (RFC 5321 6.3, loop);
  a ``Delivered-To`` for the very address we would add (the message went out
  through a forward and came back): that recipient ``failed`` 554 5.4.6;
* directory down, disk error: ``deferred`` with the next attempt after a
  back-off; past ``lifetime`` a deferred recipient becomes ``failed``.

Remote recipients are left to the ``remote_delivery`` hook (None: they stay
pending for whoever delivers them); a :class:`RemoteReply` it returns names the
remote server, which is kept as the recipient's ``remote_mta``.  ``failed``
recipients are handed to the ``bounce`` hook (the DSN writer) and marked
``dsn_sent`` once it returned.  A message is removed when every recipient is
final and every DSN is sent.  With ``delay_warning`` set, a recipient still
deferred that long after the message arrived is handed once to the
``delay_notice`` hook (an RFC 3464 ``Action: delayed`` report, never for a
message from ``<>``) and marked ``delay_notified``, so that a restart does not
warn again.

Crash safety: the state is written only after the Maildir copy is durable.
A crash in between makes the next run deliver again, and the Maildir layer
recognises the copy by the queue id in its name, so each mailbox holds the
message exactly once (see appliance.mail.maildir).  Messages are processed
right after commit (``notify``, registered as the spool's commit listener),
at start (everything recovered), and by a retry timer on the injected clock.
A message the operator put on hold (appliance.mail.queuetools) is skipped
until :meth:`QueueRunner.force` is called for it.

A message just committed comes with its state and header section from
memory (:meth:`Spool.take_fresh`), and the Maildir copies of all messages
waiting for a thread go in one trip (:class:`appliance.mail.queue.Batched`):
under load the hand-offs to the thread pool, not the disk, were the cost.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from appliance.directory.base import DirectoryUnavailable
from appliance.mail import maildir
from appliance.mail.interfaces import Reply
from appliance.mail.local import LocalRecipients, MailboxTarget, RemoteTarget, UnknownRecipient
from appliance.mail.queue import (
    DEFERRED,
    DELIVERED,
    EXPANDED,
    FAILED,
    Batched,
    Blocking,
    QueuedMessage,
    RecipientState,
    Spool,
    UnknownMessage,
    inline,
    read_file,
)
from appliance.mail.slots import Slots

log = Logger()

#: Delivers the given remote recipients of a message; a Deferred or a coroutine
#: that gives the reply per recipient address.  A recipient missing from the
#: mapping stays queued (R-4).
RemoteDelivery = Callable[[QueuedMessage, Sequence[RecipientState]], Awaitable[Mapping[str, Reply]]]
#: Sends (enqueues) the DSN for the given failed recipients; may return a Deferred.
Bounce = Callable[[QueuedMessage, Sequence[RecipientState]], "Deferred[Any] | None"]
#: Sends (enqueues) the delay notice for the given deferred recipients, whose
#: lifetime ends at the given time (RFC 3464 2.3.8 Will-Retry-Until).
DelayNotice = Callable[[QueuedMessage, Sequence[RecipientState], float], "Deferred[Any] | None"]

DEFAULT_RETRY = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
READ_CHUNK = 64 * 1024
HEADER_LIMIT = 1024 * 1024
#: Up to this size a message's header is read on the reactor thread: a thread trip
#: costs more than reading a few kilobytes from the page cache.
INLINE_READ = 256 * 1024


@dataclass(frozen=True)
class RemoteReply(Reply):
    """A reply from a remote server, as the ``remote_delivery`` hook may return it.

    ``remote_mta`` is that server's name; the runner keeps it next to the reply
    (``RecipientState.remote_mta``) for the DSN's Remote-MTA field (RFC 3464
    2.3.5) and stores the reply itself as a plain :class:`Reply`.
    """

    remote_mta: str = field(default="", kw_only=True)


@dataclass(frozen=True)
class Trace:
    """The trace fields of a message's header: hop count and earlier Delivered-To addresses."""

    received: int
    delivered_to: frozenset[str]


def read_trace(path: Path, limit: int = HEADER_LIMIT) -> Trace:
    """Count Received fields and collect Delivered-To addresses in the header section."""
    with open(path, "rb") as f:
        head = f.read(min(READ_CHUNK, limit))
        # Most header sections end in the first chunk: a big message is not read whole.
        if b"\n\n" not in head and b"\n\r\n" not in head and len(head) < limit:
            head += f.read(limit - len(head))
        return parse_trace(head)


def parse_trace(head: bytes) -> Trace:
    """The trace fields of the start of a message (its header section, or more)."""
    received = 0
    delivered: set[str] = set()
    # Only the header section is split into lines, not a whole message's body.
    end = head.find(b"\n\r\n")
    if end < 0:
        end = head.find(b"\n\n")
    if end >= 0:
        head = head[: end + 1]
    for line in head.split(b"\n"):
        line = line.rstrip(b"\r")
        if not line:
            break
        name = line[:13].lower()
        if name.startswith(b"received:"):
            received += 1
        elif name == b"delivered-to:":
            delivered.add(line[13:].strip().decode("utf-8", "replace").lower())
    return Trace(received, frozenset(delivered))


def count_received(path: Path, limit: int = HEADER_LIMIT) -> int:
    """How many Received header fields the message's header section has (hop count)."""
    return read_trace(path, limit).received


class QueueRunner:
    """Delivers local recipients from the spool and keeps the retry schedule."""

    def __init__(
        self,
        spool: Spool,
        local_recipients: LocalRecipients,
        mail_root: Path,
        hostname: str,
        clock: IReactorTime,
        *,
        remote_delivery: RemoteDelivery | None = None,
        bounce: Bounce | None = None,
        delay_notice: DelayNotice | None = None,
        delay_warning: float = 0.0,
        blocking: Blocking | None = None,
        sync: bool = True,
        retry_intervals: Sequence[float] = DEFAULT_RETRY,
        poll_interval: float = 60.0,
        lifetime: float = 5 * 86400.0,
        lifetime_for: Callable[[str], float] | None = None,
        max_received: int = 25,
        concurrency: int = 20,
    ) -> None:
        self.spool = spool
        self.recipients = local_recipients
        self.mail_root = Path(mail_root)
        self.hostname = hostname
        # zope interfaces as attribute types confuse mypy; the calls below are IReactorTime's.
        self.clock: Any = clock
        self.remote_delivery = remote_delivery
        self.bounce = bounce
        self.delay_notice = delay_notice
        #: Seconds after arrival when a still-deferred recipient earns a delay notice (0: never).
        self.delay_warning = delay_warning
        self.sync = sync
        self.retry_intervals = tuple(retry_intervals) or DEFAULT_RETRY
        self.poll_interval = poll_interval
        self.lifetime = lifetime
        self.lifetime_for = lifetime_for
        self.max_received = max_received
        self._blocking: Blocking = Batched(blocking if blocking is not None else inline)
        self._slots = Slots(concurrency)
        self._due: dict[str, float] = {}
        self._inflight: dict[str, Deferred[None]] = {}
        self._again: set[str] = set()
        self._fresh: set[str] = set()
        self._forced: set[str] = set()
        self._boxes: dict[str, set[str]] = {}
        self._timer: Any = None
        self._running = False
        self._listening = False

    # -- life cycle ----------------------------------------------------------

    def start(self) -> None:
        """Recover the spool, schedule everything in it now, start the retry timer.

        Call before the SMTP listeners start, so no mail is accepted before recovery.
        """
        if self._running:
            return
        self._running = True
        if not self._listening:
            self._listening = True
            self.spool.add_commit_listener(self.notify)
        for queue_id in self.spool.recover():
            self._due[queue_id] = 0.0
        log.info("queue runner started: {n} messages in the queue", n=len(self._due))
        self._tick()

    def stop(self) -> Deferred[None]:
        """Stop the timer; fires when the deliveries under way have finished."""
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        d = defer.DeferredList(list(self._inflight.values()), consumeErrors=True)
        return d.addCallback(lambda _: None)

    def notify(self, queue_id: str) -> None:
        """A message was just committed (or an operator flushed it): process it now."""
        self._fresh.add(queue_id)
        self._due[queue_id] = 0.0
        if self._running:
            self._start(queue_id)

    def flush(self) -> Deferred[None]:
        """Process every queued message now, whatever its retry time (``sendmail -q``)."""
        for queue_id in self.spool.messages():
            self._due[queue_id] = 0.0
            self._forced.add(queue_id)
        return self.run()

    def force(self, queue_id: str) -> Deferred[None]:
        """Attempt one message now, whatever its retry times (``appliance flush ID``, release)."""
        self._forced.add(queue_id)
        self._due[queue_id] = 0.0
        if not self._running:
            return defer.succeed(None)
        return self._start(queue_id)

    def forget(self, queue_id: str) -> None:
        """Drop a message from the schedule (an operator deleted it)."""
        self._forget(queue_id)

    def run(self) -> Deferred[None]:
        """Process every message that is due; fires when they are done."""
        now = self.clock.seconds()
        started = [self._start(q) for q, due in sorted(self._due.items()) if due <= now]
        d = defer.DeferredList(started, consumeErrors=True)
        return d.addCallback(lambda _: None)

    def _tick(self) -> None:
        self._timer = None
        if not self._running:
            return
        self.run()
        self._timer = self.clock.callLater(self.poll_interval, self._tick)

    def _start(self, queue_id: str) -> Deferred[None]:
        running = self._inflight.get(queue_id)
        if running is not None:
            self._again.add(queue_id)
            return running
        self._due.pop(queue_id, None)
        d: Deferred[None] = Deferred.fromCoroutine(self._process_safely(queue_id))
        self._inflight[queue_id] = d

        def finished(_: object) -> None:
            del self._inflight[queue_id]
            if queue_id in self._again:
                self._again.discard(queue_id)
                self._start(queue_id)

        d.addBoth(finished)
        return d

    # -- one message ------------------------------------------------------------

    async def _process_safely(self, queue_id: str) -> None:
        wait = self._slots.take()
        if wait is not None:
            await wait
        try:
            await self.process(queue_id)
        except Exception:
            log.failure("{qid}: processing failed; retrying later", qid=queue_id)
            self._due[queue_id] = self.clock.seconds() + self.poll_interval
        finally:
            self._slots.release()

    async def process(self, queue_id: str) -> None:
        """Deliver what is due in one message, record it, bounce, remove when done."""
        fresh = self.spool.take_fresh(queue_id)
        try:
            message = fresh.message if fresh is not None else self.spool.load(queue_id)
        except UnknownMessage:
            self._forget(queue_id)
            return
        if self.spool.is_held(queue_id):
            # Released by the operator through force(); until then nothing is due.
            log.info("{qid}: on hold", qid=queue_id)
            self._forget(queue_id)
            return
        now = self.clock.seconds()
        open_ = [r for r in message.recipients if not r.final]
        forced = queue_id in self._forced
        self._forced.discard(queue_id)
        due = [r for r in open_ if forced or r.next_attempt <= now]
        local = [r for r in due if self.recipients.is_local(r.address)]
        remote = [r for r in due if not self.recipients.is_local(r.address)]
        if self.remote_delivery is None:
            remote = []
        updates: list[RecipientState] = []
        added: list[RecipientState] = []
        trace = Trace(0, frozenset())
        if local or remote:
            if fresh is not None:
                trace = parse_trace(fresh.head)
            elif message.size <= INLINE_READ:
                # Read once, on the reactor thread (as small as the envelope load()):
                # the trace comes from it and remote delivery sends it.
                data = read_file(message.data_path)
                trace = parse_trace(data[:HEADER_LIMIT])
                message = replace(message, data=data)
            else:
                trace = await self._blocking(read_trace, message.data_path)
            hops = trace.received
            if hops > self.max_received:
                reply = Reply(554, "5.4.6", f"Routing loop detected: {hops} Received headers")
                log.warn("{qid}: {text}", qid=queue_id, text=reply.text)
                updates = [self._failed(r, reply, now) for r in open_]
                local = remote = []
        for r in local:
            state, more = await self._deliver_local(message, r, now, trace)
            updates.append(state)
            added.extend(more)
        if remote and self.remote_delivery is not None:
            updates.extend(await self._deliver_remote(message, remote, now))
        updates = [self._expire(message, r, now) for r in updates]
        bounce_failed = False
        if updates and not added:
            # The common case, every recipient done in this pass: the removal is the
            # state change, which saves a state write.  A crash before it only
            # repeats idempotent deliveries (and at worst a DSN).
            final = message.with_updates(updates)
            if final.all_final:
                if await self._bounce_owed(final):
                    await self.spool.remove(queue_id, force=True)
                    self._forget(queue_id)
                    return
                bounce_failed = True
        if updates or added:
            message = await self.spool.update_recipients(queue_id, updates, added)
        if not bounce_failed:
            message = await self._send_bounces(message)
        message = await self._send_delay_notices(message, now)
        if message.all_final and (self.bounce is None or self._dsns_done(message)):
            await self.spool.remove(queue_id)
            self._forget(queue_id)
            return
        self._schedule(message, now)

    def _forget(self, queue_id: str) -> None:
        self._due.pop(queue_id, None)
        self._fresh.discard(queue_id)
        self._forced.discard(queue_id)
        self._boxes.pop(queue_id, None)

    def _schedule(self, message: QueuedMessage, now: float) -> None:
        mine = [
            r
            for r in message.recipients
            if not r.final
            and (self.remote_delivery is not None or self.recipients.is_local(r.address))
        ]
        if mine:
            self._due[message.queue_id] = max(now, min(r.next_attempt for r in mine))
        elif self.bounce is not None and not self._dsns_done(message):
            self._due[message.queue_id] = now + self.poll_interval
        else:
            self._due.pop(message.queue_id, None)

    @staticmethod
    def _dsns_done(message: QueuedMessage) -> bool:
        return all(r.dsn_sent for r in message.recipients if r.status == FAILED)

    # -- outcomes -----------------------------------------------------------------

    def _failed(
        self, r: RecipientState, reply: Reply, now: float, remote_mta: str | None = None
    ) -> RecipientState:
        log.info(
            "{rcpt}: failed {code} {enh} {text}",
            rcpt=r.address,
            code=reply.code,
            enh=reply.enhanced,
            text=reply.text,
        )
        return replace(
            r,
            status=FAILED,
            attempts=r.attempts + 1,
            last_reply=reply,
            updated_at=now,
            remote_mta=remote_mta,
        )

    def _deferred(
        self, r: RecipientState, reply: Reply, now: float, remote_mta: str | None = None
    ) -> RecipientState:
        attempts = r.attempts + 1
        delay = self.retry_intervals[min(attempts, len(self.retry_intervals)) - 1]
        log.info(
            "{rcpt}: deferred {code} {enh} {text}; retry in {delay}s",
            rcpt=r.address,
            code=reply.code,
            enh=reply.enhanced,
            text=reply.text,
            delay=delay,
        )
        return replace(
            r,
            status=DEFERRED,
            attempts=attempts,
            next_attempt=now + delay,
            last_reply=reply,
            updated_at=now,
            remote_mta=remote_mta,
        )

    def lifetime_of(self, address: str) -> float:
        """How long mail for ``address`` may wait (longer for backup-MX domains, M-5)."""
        return self.lifetime if self.lifetime_for is None else self.lifetime_for(address)

    def _expire(self, message: QueuedMessage, r: RecipientState, now: float) -> RecipientState:
        lifetime = self.lifetime_of(r.address)
        if r.status != DEFERRED or now - message.envelope.received_at < lifetime:
            return r
        last = r.last_reply or Reply(451, "4.4.7", "no answer")
        days = lifetime / 86400
        reply = Reply(
            last.code, last.enhanced, f"gave up after {days:g} days in the queue: {last.text}"
        )
        return replace(r, status=FAILED, last_reply=reply)

    # -- local delivery -------------------------------------------------------------

    async def _deliver_local(
        self, message: QueuedMessage, r: RecipientState, now: float, trace: Trace
    ) -> tuple[RecipientState, list[RecipientState]]:
        qid = message.queue_id
        try:
            targets = await self.recipients.resolve(r.address)
        except UnknownRecipient as e:
            return self._failed(r, e.reply, now), []
        except DirectoryUnavailable as e:
            log.warn(
                "{qid}: directory unavailable for {rcpt}: {err}", qid=qid, rcpt=r.address, err=e
            )
            return self._deferred(r, Reply(451, "4.4.3", "Directory unavailable"), now), []
        boxes = self._boxes.setdefault(qid, set())
        delivered = []
        for target in targets:
            if not isinstance(target, MailboxTarget):
                continue
            if target.address in trace.delivered_to:
                # qmail's and Postfix's rule: our own Delivered-To line came back.
                text = f"Mail loop: already delivered to {target.address}"
                return self._failed(r, Reply(554, "5.4.6", text), now), []
            try:
                path = maildir.mailbox_path(self.mail_root, target.mailbox)
            except ValueError as e:
                log.error("{qid}: {rcpt}: {err}", qid=qid, rcpt=r.address, err=e)
                return self._deferred(r, Reply(451, "4.3.5", "Mailbox misconfigured"), now), []
            thorough = qid not in self._fresh or r.attempts > 0 or target.mailbox in boxes
            try:
                name = await self._blocking(
                    self._write_mailbox, message, path, target.address, thorough, now
                )
            except OSError as e:
                log.error(
                    "{qid}: {rcpt}: cannot write {path}: {err}",
                    qid=qid,
                    rcpt=r.address,
                    path=path,
                    err=e,
                )
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    return self._deferred(r, Reply(452, "4.2.2", "Mailbox full"), now), []
                return self._deferred(r, Reply(451, "4.3.0", "Mailbox write error"), now), []
            boxes.add(target.mailbox)
            delivered.append(target.mailbox)
            log.info(
                "{line}",
                line=f"{qid}: to=<{r.address}> delivered to {target.mailbox} as {name}",
                qid=qid,
                rcpt=r.address,
                box=target.mailbox,
            )
        remotes = [t.address for t in targets if isinstance(t, RemoteTarget)]
        if remotes:
            reply = Reply(
                250, "2.1.5", f"expanded to {len(delivered)} mailboxes, {len(remotes)} remote"
            )
            added = [
                RecipientState(address=a, updated_at=now, original=r.original or r.address)
                for a in remotes
            ]
            log.info(
                "{qid}: {rcpt} forwarded to {to}", qid=qid, rcpt=r.address, to=", ".join(remotes)
            )
            return replace(
                r, status=EXPANDED, attempts=r.attempts + 1, last_reply=reply, updated_at=now
            ), added
        reply = Reply(250, "2.0.0", "Delivered to " + ", ".join(delivered))
        return replace(
            r, status=DELIVERED, attempts=r.attempts + 1, last_reply=reply, updated_at=now
        ), []

    def _write_mailbox(
        self, message: QueuedMessage, path: Path, address: str, thorough: bool, now: float
    ) -> str:
        """Blocking: the copy direct delivery would write (maildir.local_copy), fsynced."""
        with open(message.data_path, "rb") as f:
            return maildir.deliver(
                path,
                maildir.local_copy(
                    message.envelope.sender, address, iter(lambda: f.read(READ_CHUNK), b"")
                ),
                hostname=self.hostname,
                now=now,
                key=message.queue_id,
                key_time=message.envelope.received_at,
                thorough=thorough,
                sync=self.sync,
            )

    # -- remote delivery and bounces ---------------------------------------------------

    async def _deliver_remote(
        self, message: QueuedMessage, remote: list[RecipientState], now: float
    ) -> list[RecipientState]:
        assert self.remote_delivery is not None
        try:
            replies: Mapping[str, Reply] = await self.remote_delivery(message, remote)
        except Exception as e:
            log.failure("{qid}: remote delivery failed", qid=message.queue_id)
            replies = {}
            fallback = Reply(451, "4.4.0", f"Delivery attempt failed: {e}")
        else:
            fallback = Reply(451, "4.4.0", "No result from the delivery attempt")
        out = []
        for r in remote:
            reply = replies.get(r.address, fallback)
            remote_mta = None
            if isinstance(reply, RemoteReply):
                remote_mta = reply.remote_mta or None
                reply = Reply(reply.code, reply.enhanced, reply.text)
            if 200 <= reply.code < 300:
                out.append(
                    replace(
                        r,
                        status=DELIVERED,
                        attempts=r.attempts + 1,
                        last_reply=reply,
                        updated_at=now,
                        remote_mta=remote_mta,
                    )
                )
            elif reply.permanent:
                out.append(self._failed(r, reply, now, remote_mta))
            else:
                out.append(self._deferred(r, reply, now, remote_mta))
        return out

    async def _bounce_owed(self, message: QueuedMessage) -> bool:
        """Hand the DSNs still owed to the bounce hook; False when it failed."""
        owed = [r for r in message.recipients if r.status == FAILED and not r.dsn_sent]
        if not owed or self.bounce is None:
            return True
        try:
            await defer.maybeDeferred(self.bounce, message, owed)
        except Exception:
            log.failure("{qid}: could not send the DSN; will retry", qid=message.queue_id)
            return False
        return True

    async def _send_bounces(self, message: QueuedMessage) -> QueuedMessage:
        owed = [r for r in message.recipients if r.status == FAILED and not r.dsn_sent]
        if not owed or self.bounce is None or not await self._bounce_owed(message):
            return message
        return await self.spool.update_recipients(
            message.queue_id, [replace(r, dsn_sent=True) for r in owed]
        )

    async def _send_delay_notices(self, message: QueuedMessage, now: float) -> QueuedMessage:
        """Warn the sender once per recipient still deferred ``delay_warning`` after arrival.

        RFC 3464 ``Action: delayed`` reports, grouped by the recipients' expiry
        (Will-Retry-Until, RFC 3464 2.3.8).  A message from ``<>`` gets none
        (RFC 5321 4.5.5, appliance.mail.dsn.bounce_recipient).  The recipients
        are marked ``delay_notified`` once the hook returned; if it fails, the
        next pass tries again.
        """
        if (
            self.delay_notice is None
            or self.delay_warning <= 0
            or not message.envelope.sender
            or now < message.envelope.received_at + self.delay_warning
        ):
            return message
        owed = [r for r in message.recipients if r.status == DEFERRED and not r.delay_notified]
        if not owed:
            return message
        by_expiry: dict[float, list[RecipientState]] = {}
        for r in owed:
            expiry = message.envelope.received_at + self.lifetime_of(r.address)
            by_expiry.setdefault(expiry, []).append(r)
        notified: list[RecipientState] = []
        for expiry, group in sorted(by_expiry.items()):
            try:
                await defer.maybeDeferred(self.delay_notice, message, group, expiry)
            except Exception:
                log.failure(
                    "{qid}: could not send the delay notice; will retry", qid=message.queue_id
                )
                continue
            notified.extend(replace(r, delay_notified=True) for r in group)
        if not notified:
            return message
        return await self.spool.update_recipients(message.queue_id, notified)
