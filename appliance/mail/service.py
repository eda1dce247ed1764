"""The mail service: the spool, its runner, the recipient tables and relay policy the SMTP listeners share.

Remote recipients are delivered by appliance.mail.outbound through the
in-process resolver (the inside view's zones first, then its cache and
upstreams); without a resolver they stay queued.

Started before any listener, so the spool is recovered and the runner is
delivering before the first client is accepted.  A reload re-reads the aliases
and the domain settings and hands the new tables to every SMTP listener; a
broken aliases file is refused and the old table stays in service.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from appliance.config import Config, Listener
from appliance.directory.base import Directory
from appliance.directory.popbeforesmtp import PopBeforeSMTP
from appliance.directory.throttle import LoginThrottle
from appliance.mail.aliases import AliasTable, load_aliases
from appliance.mail.direct import DirectDelivery
from appliance.mail.local import LocalRecipients
from appliance.mail.masquerade import Masquerader, MasqueradingDelivery
from appliance.mail.outbound import BounceWriter, RemoteDelivery, postmaster_address
from appliance.mail.queue import Blocking, Spool
from appliance.mail.relay import RelayPolicy
from appliance.mail.routing import Route, Router, parse_target
from appliance.mail.runner import QueueRunner
from appliance.mail.smtp import SMTPServerFactory
from appliance.mail.smtp_client import OutboundSettings, tcp_endpoint
from appliance.mail.submission import SenderPolicy

log = Logger(namespace="appliance.mail")


def _aliases(config: Config) -> AliasTable:
    if config.mail.aliases is None:
        return AliasTable()
    return load_aliases(config.mail.aliases)


def _relay_policy(config: Config, pop_before_smtp: PopBeforeSMTP | None = None) -> RelayPolicy:
    return RelayPolicy(
        config.inside.networks,
        config.mail.local_domains,
        config.mail.relay_domains,
        config.mail.hostnames,
        inside_predicates=(pop_before_smtp,) if pop_before_smtp is not None else (),
    )


def _sender_policy(config: Config) -> SenderPolicy:
    return SenderPolicy(
        allow_any_sender=config.submission.allow_any_sender,
        extension_separators=config.mail.extension_separators,
    )


def _router(config: Config) -> Router:
    return Router(
        config.delivery.static_routes,
        config.delivery.smart_host,
        config.mail.hostnames,
        (*config.outside.addresses, *config.inside.addresses),
    )


def _outbound_settings(config: Config) -> OutboundSettings:
    fallback = None
    if config.delivery.fallback_relay:
        parsed = parse_target(config.delivery.fallback_relay, "fallback_relay")
        if parsed is not None:
            fallback = Route("fallback", *parsed)
    return OutboundSettings(
        helo_name=config.hostname,
        own_names=config.mail.hostnames,
        own_addresses=(*config.outside.addresses, *config.inside.addresses),
        opportunistic_tls=config.delivery.opportunistic_tls,
        self_is_best_mx=config.delivery.self_is_best_mx,
        fallback=fallback,
        smart_host_credentials=config.delivery.smart_host_credentials,
    )


def _lifetime_for(config: Config) -> Callable[[str], float]:
    relay_domains = frozenset(config.mail.relay_domains)

    def lifetime_for(address: str) -> float:
        domain = address.rpartition("@")[2].lower()
        if domain in relay_domains:
            return config.delivery.relay_lifetime
        return config.delivery.lifetime

    return lifetime_for


def _masquerader(config: Config) -> Masquerader:
    return Masquerader(
        config.mail.masquerade_as,
        config.mail.masquerade_domains,
        config.mail.masquerade_exceptions,
    )


def _recipients(config: Config, directory: Directory, aliases: AliasTable) -> LocalRecipients:
    return LocalRecipients(
        directory,
        aliases,
        # A box without local domains still takes postmaster@ its own names (RFC 5321 4.5.1).
        config.mail.local_domains or config.mail.hostnames,
        extension_separators=config.mail.extension_separators,
    )


class MailService(Service):
    """Owns the spool and the queue runner; builds the SMTP listener factories."""

    name = "mail"

    def __init__(
        self,
        config: Config,
        reactor: Any,
        directory: Directory,
        blocking: Blocking | None,
        resolver: Any = None,
        throttle: LoginThrottle | None = None,
        pop_before_smtp: PopBeforeSMTP | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.directory = directory
        self.throttle = throttle
        self.pop_before_smtp = pop_before_smtp
        self.spool = Spool(config.mail.spool, reactor, blocking=blocking)
        self.recipients = _recipients(config, directory, _aliases(config))
        self.relay = _relay_policy(config, pop_before_smtp)
        self.resolver = resolver
        self.gate: Any = None
        self.remote: RemoteDelivery | None = None
        if resolver is not None:
            self.remote = RemoteDelivery(
                _router(config),
                resolver,
                _outbound_settings(config),
                reactor,
                lambda address, port: tcp_endpoint(reactor, address, port),
                concurrency=config.delivery.concurrency,
                destination_concurrency=config.delivery.destination_concurrency,
            )
        # Masquerading happens on the way out (appliance.mail.masquerade explains why).
        self.masquerading: MasqueradingDelivery | None = None
        if self.remote is not None:
            self.masquerading = MasqueradingDelivery(
                self.remote.deliver, _masquerader(config), blocking
            )
        self.bounces = BounceWriter(
            self.spool,
            config.hostname,
            postmaster_address(config.mail.local_domains, config.hostname),
            reactor,
            copy_to_postmaster=config.delivery.bounce_copy_to_postmaster,
        )
        self.runner = QueueRunner(
            self.spool,
            self.recipients,
            config.mail.mail_root,
            config.hostname,
            reactor,
            remote_delivery=None if self.masquerading is None else self.masquerading.deliver,
            bounce=self.bounces,
            delay_notice=self.bounces.delay_notice,
            delay_warning=config.delivery.delay_warning,
            blocking=blocking,
            retry_intervals=config.delivery.retry_intervals,
            lifetime=config.delivery.lifetime,
            lifetime_for=_lifetime_for(config),
            concurrency=config.delivery.concurrency,
        )
        # What the SMTP listeners store into: the spool, or direct delivery in front of it.
        # No sync argument: its default is the one the bench's --no-fsync shim patches.
        self.direct = DirectDelivery(
            self.spool,
            self.recipients,
            config.mail.mail_root,
            config.hostname,
            blocking=blocking,
            max_received=self.runner.max_received,
        )
        self.factories: list[SMTPServerFactory] = []

    def control_handlers(self) -> dict[str, Any]:
        """The queue and routing commands of the control socket (appliance.mail.queuetools)."""
        from appliance.mail.queuetools import queue_handlers

        return queue_handlers(self.spool, self.runner, lambda: self.recipients, lambda: self.remote)

    def _make_gate(self) -> Any:
        """The anti-spam gate for the port-25 listeners (opens the greylist database)."""
        from appliance.mail.gate import Gate

        settings = self.config.gate
        if settings.greylist.enabled and settings.greylist.path:
            Path(settings.greylist.path).parent.mkdir(parents=True, exist_ok=True)
        return Gate(
            settings,
            self.resolver,
            self.reactor,
            is_inside=lambda ip: self.relay.is_inside_client(ip, False),
            is_local_domain=self.relay.accepts_for,
        )

    def smtp_factory(self, listener: Listener, tls: Any) -> SMTPServerFactory:
        """The factory for one SMTP-speaking listener (port 25, submission or SMTPS)."""
        submission = listener.role in ("submission", "smtps")
        # AUTH on port 25 is opt-in; it is offered only after STARTTLS either way.
        auth = submission or self.config.submission.auth_on_port_25
        factory = SMTPServerFactory(
            "submission" if submission else listener.side,
            self.config.hostname,
            self.direct if self.config.mail.direct_delivery else self.spool,
            self.recipients,
            self.relay,
            tls,
            self.reactor,
            max_message_size=self.config.mail.max_message_size,
            max_recipients=self.config.mail.max_recipients,
            implicit_tls=listener.implicit_tls,
            require_auth=submission,
            authenticator=self.directory if auth else None,
            throttle=self.throttle,
            sender_policy=_sender_policy(self.config),
            complete_headers=self.config.submission.add_missing_headers,
        )
        self.factories.append(factory)
        return factory

    def startService(self) -> None:
        Service.startService(self)
        self.config.mail.mail_root.mkdir(parents=True, exist_ok=True)
        if self.config.gate is not None and self.resolver is not None:
            # Built at start, not in the constructor: it opens the greylist database.
            self.gate = self._make_gate()
            for factory in self.factories:
                if factory.listener_name != "submission":
                    factory.gate = self.gate
        self.runner.start()
        log.info(
            "mail: spool {spool} recovered, delivering into {root}",
            spool=str(self.config.mail.spool),
            root=str(self.config.mail.mail_root),
        )

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self.gate is not None:
            self.gate.close()
        stopped = self.runner.stop()
        if self.remote is not None:
            remote = self.remote
            stopped.addCallback(lambda _: remote.close())
        # Removals still on their way to the disk finish before the thread pool stops.
        spool = self.spool
        stopped.addCallback(lambda _: spool.drain())
        return stopped

    def reconfigure(self, config: Config) -> None:
        recipients = _recipients(config, self.directory, _aliases(config))
        relay = _relay_policy(config, self.pop_before_smtp)
        self.config, self.recipients, self.relay = config, recipients, relay
        if self.pop_before_smtp is not None:
            self.pop_before_smtp.duration = config.pop3.pop_before_smtp
        self.runner.recipients = recipients
        self.direct.recipients = recipients
        self.runner.retry_intervals = config.delivery.retry_intervals
        self.runner.lifetime = config.delivery.lifetime
        self.runner.lifetime_for = _lifetime_for(config)
        self.runner.delay_warning = config.delivery.delay_warning
        self.bounces.copy_to_postmaster = config.delivery.bounce_copy_to_postmaster
        if self.remote is not None:
            self.remote.router = _router(config)
            self.remote.settings = _outbound_settings(config)
            self.remote.destination_concurrency = config.delivery.destination_concurrency
        if self.masquerading is not None:
            self.masquerading.masquerader = _masquerader(config)
        for factory in self.factories:
            factory.store = self.direct if config.mail.direct_delivery else self.spool
            factory.recipients = recipients
            factory.relay = relay
            factory.sender_policy = _sender_policy(config)
            factory.complete_headers = config.submission.add_missing_headers
        if self.gate is not None:
            for problem in self.gate.reload():
                log.error("gate: access map not reloaded: {problem}", problem=problem)
        log.info("mail: aliases and domains reloaded")
