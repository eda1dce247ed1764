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

from appliance.mail.dsn import bounce_recipient, build_bounce
from appliance.mail.interfaces import Envelope, MessageStore, Reply
from appliance.mail.queue import QueuedMessage, RecipientState
from appliance.mail.routing import Router, group_by_route
from appliance.mail.smtp_client import OutboundSettings, attempt_route

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
    ) -> None:
        self.router = router
        self.resolver = resolver
        self.settings = settings
        self.clock = clock
        self.endpoints = endpoints
        self.rng = rng or random.SystemRandom()
        self._slots = defer.DeferredSemaphore(max(1, concurrency))

    def __call__(
        self, message: QueuedMessage, recipients: Sequence[RecipientState]
    ) -> Deferred[Mapping[str, Reply]]:
        return defer.ensureDeferred(self._deliver(message, [r.address for r in recipients]))

    async def _deliver(self, message: QueuedMessage, recipients: list[str]) -> Mapping[str, Reply]:
        groups = group_by_route(self.router, recipients)
        attempts = [
            self._slots.run(
                attempt_route,
                route,
                message.envelope.sender,
                members,
                message.data_path,
                self.resolver,
                self.settings,
                self.clock,
                self.endpoints,
                self.rng,
            )
            for route, members in groups.items()
        ]
        replies: dict[str, Reply] = {}
        for outcomes in await defer.gatherResults(attempts, consumeErrors=True):
            for recipient, outcome in outcomes.items():
                reply = outcome.reply
                if outcome.remote_mta:
                    reply = Reply(
                        reply.code, reply.enhanced, f"{outcome.remote_mta} said: {reply.text}"
                    )
                replies[recipient] = reply
                log.info(
                    "{qid}: to=<{rcpt}> relay={relay} status={code} {enhanced} {text}",
                    qid=message.queue_id,
                    rcpt=recipient,
                    relay=outcome.remote_mta or "none",
                    code=reply.code,
                    enhanced=reply.enhanced,
                    text=reply.text,
                )
        return replies


class BounceWriter:
    """``bounce`` hook of the queue runner: queue a DSN for failed recipients, never to ``<>``."""

    def __init__(self, store: MessageStore, hostname: str, postmaster: str, clock: Any) -> None:
        self.store = store
        self.hostname = hostname
        self.postmaster = postmaster
        self.clock = clock

    def __call__(self, message: QueuedMessage, failed: Sequence[RecipientState]) -> Deferred[None]:
        return defer.ensureDeferred(self._bounce(message, failed))

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
        with message.data_path.open("rb") as f:
            original = f.read(_ORIGINAL_LIMIT)
        report = build_bounce(
            message.envelope,
            original,
            [(r.original or r.address, _reply(r), None) for r in failed],
            self.hostname,
            message.envelope.received_at,
            to=to,
            now=self.clock.seconds(),
        )
        incoming = self.store.begin()
        try:
            incoming.write(report)
            queue_id = await incoming.commit(
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
        log.info(
            "{qid}: sender non-delivery notification: {bounce} to <{to}>",
            qid=message.queue_id,
            bounce=queue_id,
            to=to,
        )


def _reply(state: RecipientState) -> Reply:
    return state.last_reply or Reply(550, "5.0.0", "Delivery failed")


def postmaster_address(local_domains: Sequence[str], hostname: str) -> str:
    """Where reports about reports go: postmaster of the first local domain (RFC 5321 4.5.1)."""
    return f"postmaster@{local_domains[0] if local_domains else hostname}"


__all__ = ["BounceWriter", "RemoteDelivery", "postmaster_address"]
