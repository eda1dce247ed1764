"""The queue runner's two outward hooks: remote delivery and bounces.

`RemoteDelivery` groups a message's remote recipients by next hop (static
route, smart host or MX: appliance.mail.routing) and makes one attempt per
group with appliance.mail.smtp_client, so several recipients for one
destination share one transaction (M-6).  `BounceWriter` turns failed
recipients into an RFC 3464 report and puts it into the spool with the null
sender; a report about a report goes to postmaster, and one about a failed
postmaster report is dropped (M-5).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from appliance.mail.connections import SessionPool
from appliance.mail.dsn import DELAYED, FAILED, bounce_recipient, build_bounce
from appliance.mail.interfaces import Envelope, MessageStore, Reply
from appliance.mail.queue import QueuedMessage, RecipientState
from appliance.mail.routing import Route, Router, group_by_route
from appliance.mail.runner import RemoteReply
from appliance.mail.slots import Slots
from appliance.mail.smtp_client import OutboundSettings, Outcome, attempt

log = Logger(namespace="appliance.mail.outbound")

#: How much of the original message a bounce quotes (its header block is what matters).
_ORIGINAL_LIMIT = 64 * 1024


class RemoteDelivery:
    """``remote_delivery`` hook of the queue runner: one attempt per next hop, a Reply per recipient."""

    def __init__(
        self,
        router: Router,
        resolver: Any,
        settings: OutboundSettings,
        clock: Any,
        endpoints: Callable[[str, int], Any],
        rng: random.Random | None = None,
        concurrency: int = 20,
        destination_concurrency: int = 20,
        pool: SessionPool | None = None,
    ) -> None:
        self.router = router
        self.resolver = resolver
        self.settings = settings
        self.clock = clock
        self.endpoints = endpoints
        self.rng = rng or random.SystemRandom()
        self.pool = pool if pool is not None else SessionPool(clock)
        self.destination_concurrency = max(1, destination_concurrency)
        self._slots = Slots(concurrency)
        self._per_route: dict[Route, Slots] = {}

    def close(self) -> Deferred[None]:
        """Say QUIT on the connections kept for reuse (at shutdown)."""
        return self.pool.close_all()

    async def _attempt(
        self, route: Route, sender: str, members: list[str], message: QueuedMessage
    ) -> dict[str, Outcome]:
        """One attempt for one next hop, holding a slot overall and one for the destination."""
        per_route = self._per_route.get(route)
        if per_route is None:
            per_route = self._per_route[route] = Slots(self.destination_concurrency)
        wait = per_route.take()
        if wait is not None:
            await wait
        try:
            wait = self._slots.take()
            if wait is not None:
                await wait
            try:
                return await attempt(
                    route,
                    sender,
                    members,
                    message.data if message.data is not None else message.data_path,
                    self.resolver,
                    self.settings,
                    self.clock,
                    self.endpoints,
                    self.rng,
                    self.pool,
                )
            finally:
                self._slots.release()
        finally:
            per_route.release()
            if per_route.idle and self._per_route.get(route) is per_route:
                del self._per_route[route]

    def __call__(
        self, message: QueuedMessage, recipients: Sequence[RecipientState]
    ) -> Deferred[Mapping[str, Reply]]:
        return defer.ensureDeferred(self.deliver(message, recipients))

    async def deliver(
        self, message: QueuedMessage, recipients: Sequence[RecipientState]
    ) -> Mapping[str, Reply]:
        """:meth:`__call__` as a coroutine: the runner awaits it directly, one layer less."""
        groups = group_by_route(self.router, [r.address for r in recipients])
        sender = message.envelope.sender
        results: list[dict[str, Outcome]]
        if len(groups) == 1:  # the usual case: no DeferredList around one attempt
            ((route, members),) = groups.items()
            results = [await self._attempt(route, sender, members, message)]
        else:
            results = await defer.gatherResults(
                [
                    defer.ensureDeferred(self._attempt(route, sender, members, message))
                    for route, members in groups.items()
                ],
                consumeErrors=True,
            )
        replies: dict[str, Reply] = {}
        for outcomes in results:
            for recipient, outcome in outcomes.items():
                reply = outcome.reply
                if outcome.remote_mta:
                    # The text keeps the host for mailq and the log; the DSN takes it
                    # from remote_mta (Remote-MTA, RFC 3464 2.3.5).
                    reply = RemoteReply(
                        reply.code,
                        reply.enhanced,
                        f"{outcome.remote_mta} said: {reply.text}",
                        remote_mta=outcome.remote_mta,
                    )
                replies[recipient] = reply
                relay = outcome.remote_mta or "none"
                # Formatted here (C speed); the fields stay in the event for observers.
                log.info(
                    "{line}",
                    line=f"{message.queue_id}: to=<{recipient}> relay={relay}"
                    f" status={reply.code} {reply.enhanced} {reply.text}",
                    qid=message.queue_id,
                    rcpt=recipient,
                    relay=relay,
                    code=reply.code,
                )
        return replies


class BounceWriter:
    """``bounce`` hook of the queue runner: queue a DSN for failed recipients, never to ``<>``.

    Also the ``delay_notice`` hook (:meth:`delay_notice`: an ``Action: delayed``
    report, never to ``<>`` either).  With ``copy_to_postmaster`` every failure
    report to a sender also goes, as a separate message with the null sender,
    to postmaster (sendmail's PostMasterCopy); like every report it carries
    the original message's headers only (RFC 3462 ``text/rfc822-headers``).
    """

    def __init__(
        self,
        store: MessageStore,
        hostname: str,
        postmaster: str,
        clock: Any,
        copy_to_postmaster: bool = False,
    ) -> None:
        self.store = store
        self.hostname = hostname
        self.postmaster = postmaster
        self.clock = clock
        self.copy_to_postmaster = copy_to_postmaster

    def __call__(self, message: QueuedMessage, failed: Sequence[RecipientState]) -> Deferred[None]:
        return defer.ensureDeferred(self._bounce(message, failed))

    def delay_notice(
        self, message: QueuedMessage, delayed: Sequence[RecipientState], retry_until: float
    ) -> Deferred[None]:
        """Queue the "still being retried" report for ``delayed`` (RFC 3464 2.3.3, 2.3.8)."""
        return defer.ensureDeferred(self._delay_notice(message, delayed, retry_until))

    async def _bounce(self, message: QueuedMessage, failed: Sequence[RecipientState]) -> None:
        addresses = [r.original or r.address for r in failed]
        to = bounce_recipient(message.envelope.sender, self.postmaster, addresses)
        if to is None:
            log.warn(
                "{qid}: undeliverable report to postmaster dropped (recipients {rcpts})",
                qid=message.queue_id,
                rcpts=", ".join(addresses),
            )
            return
        original = self._original(message)
        entries = [(r.original or r.address, _reply(r), r.remote_mta) for r in failed]
        report = build_bounce(
            message.envelope,
            original,
            entries,
            self.hostname,
            message.envelope.received_at,
            to=to,
            now=self.clock.seconds(),
        )
        queue_id = await self._queue(report, to)
        log.info(
            "{qid}: sender non-delivery notification: {bounce} to <{to}>",
            qid=message.queue_id,
            bounce=queue_id,
            to=to,
        )
        if not self.copy_to_postmaster or to.lower() == self.postmaster.lower():
            # A report that goes to postmaster anyway (a double bounce) needs no copy.
            return
        copy = build_bounce(
            message.envelope,
            original,
            entries,
            self.hostname,
            message.envelope.received_at,
            FAILED,
            to=self.postmaster,
            now=self.clock.seconds(),
            subject="Postmaster Copy: Undelivered Mail",
        )
        try:
            copy_id = await self._queue(copy, self.postmaster)
        except Exception:
            # The sender's report is queued: a failed copy must not make the runner repeat it.
            log.failure("{qid}: could not queue the postmaster copy", qid=message.queue_id)
            return
        log.info(
            "{qid}: postmaster non-delivery notification: {bounce} to <{to}>",
            qid=message.queue_id,
            bounce=copy_id,
            to=self.postmaster,
        )

    async def _delay_notice(
        self, message: QueuedMessage, delayed: Sequence[RecipientState], retry_until: float
    ) -> None:
        to = bounce_recipient(message.envelope.sender, self.postmaster, kind=DELAYED)
        if to is None:
            return
        entries = [(r.original or r.address, _delay_reply(r), r.remote_mta) for r in delayed]
        report = build_bounce(
            message.envelope,
            self._original(message),
            entries,
            self.hostname,
            message.envelope.received_at,
            DELAYED,
            to=to,
            now=self.clock.seconds(),
            retry_until=retry_until,
        )
        queue_id = await self._queue(report, to)
        log.info(
            "{qid}: sender delay notification: {notice} to <{to}>",
            qid=message.queue_id,
            notice=queue_id,
            to=to,
        )

    def _original(self, message: QueuedMessage) -> bytes:
        with message.data_path.open("rb") as f:
            return f.read(_ORIGINAL_LIMIT)

    async def _queue(self, report: bytes, to: str) -> str:
        """Commit ``report`` to the spool for ``to`` with the null sender ``<>``; its queue id."""
        incoming = self.store.begin()
        try:
            incoming.write(report)
            return await incoming.commit(
                Envelope(
                    sender="",
                    recipients=(to,),
                    client_address="127.0.0.1",
                    client_helo=self.hostname,
                    listener="local",
                    protocol="local",
                    received_at=self.clock.seconds(),
                )
            )
        except BaseException:
            incoming.abort()
            raise


_FAILED_REPLY = Reply(550, "5.0.0", "Delivery failed")
_DELAYED_REPLY = Reply(451, "4.0.0", "Delivery delayed")


def _reply(state: RecipientState, default: Reply = _FAILED_REPLY) -> Reply:
    """The reply to report for ``state``, as recorded (a remote one names its host in the text)."""
    return state.last_reply or default


def _delay_reply(state: RecipientState) -> Reply:
    """The reply for a delay notice: always a temporary one (Status 4.X.X, RFC 3464 2.3.4)."""
    reply = _reply(state, _DELAYED_REPLY)
    if reply.temporary:
        return reply
    return Reply(451, "4.0.0", reply.text)


def postmaster_address(local_domains: Sequence[str], hostname: str) -> str:
    """Where reports about reports go: postmaster of the first local domain (RFC 5321 4.5.1)."""
    return f"postmaster@{local_domains[0] if local_domains else hostname}"


__all__ = ["BounceWriter", "RemoteDelivery", "postmaster_address"]
