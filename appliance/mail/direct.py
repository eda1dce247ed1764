"""Direct delivery: a small message for local mailboxes only goes into them before the 250.

:class:`DirectDelivery` is the MessageStore the SMTP listeners use in front of
the spool (``[mail] direct_delivery``).  At end of data it decides, on the
reactor thread and without waiting for anything, whether a message is
*eligible*: still held in memory by the spool (not spilled), every recipient
local and already resolved (a lookup still pending, an unknown user or a
directory error: not eligible) to mailboxes only, no more Received fields
than the runner allows and no Delivered-To for a target address (the runner's
loop rules), every mailbox path valid, and not too many or too large copies.

An ineligible message is committed to the spool exactly as without this
class.  An eligible one becomes a job of a group commit (jobs that arrive while
a batch is in flight form the next batch, one thread trip each): its copies are
written by :func:`appliance.mail.maildir.deliver_many`, with the bytes
(:func:`appliance.mail.maildir.local_copy`) and keyed name (the queue id and
arrival time) the queue runner would give them.  Then the message's Deferred
fires with its queue id and nothing was ever spooled.

Never a 250 before the data is durable (M-5): a recipient counts as delivered
only when every copy it reaches is fsynced together with its new/ directory.
The recipients with a failed copy (ENOSPC, EDQUOT, EIO...) are committed to
the spool as a normal message, and the Deferred fires with that commit's
outcome (a failure gives the client 452 as before).  A copy that landed in a
mailbox despite reporting failure is recognised by its keyed name when the
runner retries.  A crash before the 250 can leave copies the client then sends
again: a duplicate, never a loss, as with any MTA.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.mail import maildir
from appliance.mail.interfaces import Envelope, IncomingMessage
from appliance.mail.local import LocalRecipients, MailboxTarget, Target
from appliance.mail.queue import Blocking, inline
from appliance.mail.runner import parse_trace

log = Logger()

#: A message is delivered directly only up to this many mailbox copies ...
MAX_COPIES = 50
#: ... and this many bytes in all its copies (they are held in memory until written).
MAX_BYTES = 4 * 1024 * 1024


class SpoolIncoming(IncomingMessage, Protocol):
    """The spool's incoming message, which can show its bytes while they are in memory."""

    def in_memory(self) -> bytes | None:
        """The whole message while it is open and only in memory, else None."""


class SpoolStore(Protocol):
    """What DirectDelivery needs of the spool (appliance.mail.queue.Spool)."""

    def begin(self) -> SpoolIncoming:
        """Start receiving a new message."""


def _fired(d: Deferred[list[Target]]) -> list[Target] | None:
    """The result of a lookup that has already succeeded; None when pending or failed.

    A failure is consumed here: the runner resolves the address again and
    reports it.  A pending lookup is left to finish; its result is dropped.
    """
    out: list[list[Target]] = []
    d.addCallbacks(out.append, lambda _: None)
    return out[0] if out else None


@dataclass
class _Job:
    """One eligible message: its copies and, per recipient, the copies it reaches."""

    incoming: SpoolIncoming
    envelope: Envelope
    copies: list[maildir.Copy]
    #: Per recipient address: (mailbox target, index into ``copies``) for each target.
    recipients: list[tuple[str, list[tuple[MailboxTarget, int]]]]
    deferred: Deferred[str] = field(default_factory=Deferred)


class _Incoming:
    """The SMTP side's view of one message: the spool's, with a commit that may deliver."""

    def __init__(self, owner: DirectDelivery, incoming: SpoolIncoming) -> None:
        self.queue_id = incoming.queue_id
        self._owner = owner
        self._incoming = incoming
        self._committing = False

    def write(self, data: bytes) -> None:
        """Append bytes (kept by the spool's message: in memory or in tmp/)."""
        self._incoming.write(data)

    def commit(self, envelope: Envelope) -> Deferred[str]:
        """Deliver directly when eligible, else commit to the spool; fires with the queue id."""
        if self._committing:
            return defer.fail(ValueError(f"{self.queue_id}: second commit"))
        self._committing = True
        return self._owner._commit(self._incoming, envelope)

    def abort(self) -> None:
        """Discard the message; harmless once commit started (the commit owns it then)."""
        if not self._committing:
            self._incoming.abort()


class DirectDelivery:
    """MessageStore in front of the spool that delivers eligible messages straight to Maildirs.

    ``recipients`` is read at every commit, so the service swaps in a reloaded
    table by assigning it.  ``blocking`` runs the fsync-bound batch off the
    reactor (inline when None); ``sync=False`` skips fsync (tests, analysis).
    """

    def __init__(
        self,
        spool: SpoolStore,
        recipients: LocalRecipients,
        mail_root: Path,
        hostname: str,
        *,
        blocking: Blocking | None = None,
        max_received: int = 25,
        sync: bool = True,
    ) -> None:
        self.spool = spool
        self.recipients = recipients
        self.mail_root = Path(mail_root)
        self.hostname = hostname
        self.max_received = max_received
        self.sync = sync
        self._blocking: Blocking = blocking if blocking is not None else inline
        self._pending: list[_Job] = []
        self._busy = False

    def begin(self) -> _Incoming:
        """Start a message in the spool (in memory); raises OSError when it is unusable."""
        return _Incoming(self, self.spool.begin())

    # -- the decision ---------------------------------------------------------------

    def _commit(self, incoming: SpoolIncoming, envelope: Envelope) -> Deferred[str]:
        try:
            job = self._plan(incoming, envelope)
        except Exception:
            log.failure("{qid}: direct delivery check failed; queueing", qid=incoming.queue_id)
            job = None
        if job is None:
            return incoming.commit(envelope)
        self._pending.append(job)
        if not self._busy:
            self._next()
        return job.deferred

    def _plan(self, incoming: SpoolIncoming, envelope: Envelope) -> _Job | None:
        """The job for an eligible message (module docstring); None: commit to the spool."""
        data = incoming.in_memory()
        rcpts = list(dict.fromkeys(envelope.recipients))
        if data is None or not rcpts:
            return None
        recipients = self.recipients
        if not all(recipients.is_local(r) for r in rcpts):
            return None
        trace = parse_trace(data)
        if trace.received > self.max_received:
            return None  # the runner fails it as a routing loop
        copies: list[maildir.Copy] = []
        by_box: dict[str, tuple[MailboxTarget, int]] = {}
        plan: list[tuple[str, list[tuple[MailboxTarget, int]]]] = []
        for rcpt in rcpts:
            targets = _fired(recipients.resolve(rcpt))
            if targets is None:
                return None
            reached: list[tuple[MailboxTarget, int]] = []
            for target in targets:
                if not isinstance(target, MailboxTarget) or target.address in trace.delivered_to:
                    return None  # remote (expanded by the runner) or a loop (it fails it)
                seen = by_box.get(target.mailbox)
                if seen is not None:
                    if seen[0].address != target.address:
                        # Stored once under the first address, as the runner does; kept for
                        # the runner so that a partial failure cannot make a second copy.
                        return None
                    reached.append((target, seen[1]))
                    continue
                try:
                    path = maildir.mailbox_path(self.mail_root, target.mailbox)
                except ValueError:
                    return None
                content = b"".join(maildir.local_copy(envelope.sender, target.address, [data]))
                copy = maildir.Copy(path, content, incoming.queue_id, envelope.received_at)
                by_box[target.mailbox] = (target, len(copies))
                reached.append((target, len(copies)))
                copies.append(copy)
                if len(copies) > MAX_COPIES or len(copies) * len(data) > MAX_BYTES:
                    return None
            plan.append((rcpt, reached))
        return _Job(incoming, envelope, copies, plan)

    # -- group commit -----------------------------------------------------------------

    def _next(self) -> None:
        if self._busy or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._busy = True
        items = [copy for job in batch for copy in job.copies]
        self._blocking(self._write, items).addBoth(self._batch_done, batch)

    def _write(self, items: list[maildir.Copy]) -> list[str | OSError]:
        """Blocking: every copy of the batch, in one deliver_many."""
        return maildir.deliver_many(items, hostname=self.hostname, now=time.time(), sync=self.sync)

    def _batch_done(self, outcome: list[str | OSError] | Failure, batch: list[_Job]) -> None:
        self._busy = False
        offset = 0
        for job in batch:
            n = len(job.copies)
            if isinstance(outcome, Failure):
                # Unexpected: nothing is known to be durable, so all of it goes to the spool.
                error = OSError(errno.EIO, f"direct delivery failed: {outcome.value}")
                results: list[str | OSError] = [error] * n
            else:
                results = outcome[offset : offset + n]
            offset += n
            try:
                self._finish(job, results)
            except Exception:
                log.failure("{qid}: finishing direct delivery", qid=job.incoming.queue_id)
                if not job.deferred.called:
                    job.deferred.errback()
        self._next()

    def _finish(self, job: _Job, results: list[str | OSError]) -> None:
        """Log the delivered recipients; queue the others, or fire with the queue id."""
        qid = job.incoming.queue_id
        failed: list[str] = []
        for rcpt, reached in job.recipients:
            errors = [(t, results[i]) for t, i in reached if isinstance(results[i], OSError)]
            if errors:
                for target, err in errors:
                    log.error(
                        "{qid}: {rcpt}: cannot write {box}: {err}",
                        qid=qid,
                        rcpt=rcpt,
                        box=target.mailbox,
                        err=err,
                    )
                failed.append(rcpt)
                continue
            for target, i in reached:
                log.info(
                    "{line}",
                    line=f"{qid}: to=<{rcpt}> delivered to {target.mailbox} as {results[i]}",
                    qid=qid,
                    rcpt=rcpt,
                    box=target.mailbox,
                )
        if not failed:
            job.incoming.abort()  # nothing of it was written to the spool
            job.deferred.callback(qid)
            return
        log.warn(
            "{qid}: queueing {rcpts} after mailbox write errors",
            qid=qid,
            rcpts=", ".join(failed),
        )
        envelope = replace(job.envelope, recipients=tuple(failed))
        defer.maybeDeferred(job.incoming.commit, envelope).chainDeferred(job.deferred)
