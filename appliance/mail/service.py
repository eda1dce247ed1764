"""The mail service: the spool, its runner, the recipient tables and relay policy the SMTP listeners share.

Started before any listener, so the spool is recovered and the runner is
delivering before the first client is accepted.  A reload re-reads the aliases
and the domain settings and hands the new tables to every SMTP listener; a
broken aliases file is refused and the old table stays in service.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from appliance.config import Config, Listener
from appliance.directory.base import Directory
from appliance.mail.aliases import AliasTable, load_aliases
from appliance.mail.local import LocalRecipients
from appliance.mail.queue import Spool
from appliance.mail.relay import RelayPolicy
from appliance.mail.runner import QueueRunner
from appliance.mail.smtp import SMTPServerFactory

log = Logger(namespace="appliance.mail")

Blocking = Callable[..., Deferred[Any]]


def _aliases(config: Config) -> AliasTable:
    if config.mail.aliases is None:
        return AliasTable()
    return load_aliases(config.mail.aliases)


def _relay_policy(config: Config) -> RelayPolicy:
    return RelayPolicy(
        config.inside.networks,
        config.mail.local_domains,
        config.mail.relay_domains,
        config.mail.hostnames,
    )


def _recipients(config: Config, directory: Directory, aliases: AliasTable) -> LocalRecipients:
    return LocalRecipients(
        directory,
        aliases,
        config.mail.local_domains,
        extension_separators=config.mail.extension_separators,
    )


class MailService(Service):
    """Owns the spool and the queue runner; builds the SMTP listener factories."""

    name = "mail"

    def __init__(
        self, config: Config, reactor: Any, directory: Directory, blocking: Blocking | None
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.directory = directory
        self.spool = Spool(config.mail.spool, reactor, blocking=blocking)
        self.recipients = _recipients(config, directory, _aliases(config))
        self.relay = _relay_policy(config)
        self.runner = QueueRunner(
            self.spool,
            self.recipients,
            config.mail.mail_root,
            config.hostname,
            reactor,
            blocking=blocking,
        )
        self.factories: list[SMTPServerFactory] = []

    def smtp_factory(self, listener: Listener, tls: Any) -> SMTPServerFactory:
        """The factory for one SMTP-speaking listener (port 25, submission or SMTPS)."""
        submission = listener.role in ("submission", "smtps")
        factory = SMTPServerFactory(
            "submission" if submission else listener.side,
            self.config.hostname,
            self.spool,
            self.recipients,
            self.relay,
            tls,
            self.reactor,
            max_message_size=self.config.mail.max_message_size,
            max_recipients=self.config.mail.max_recipients,
            implicit_tls=listener.implicit_tls,
            require_auth=submission,
        )
        self.factories.append(factory)
        return factory

    def startService(self) -> None:
        Service.startService(self)
        self.config.mail.mail_root.mkdir(parents=True, exist_ok=True)
        self.runner.start()
        log.info(
            "mail: spool {spool} recovered, delivering into {root}",
            spool=str(self.config.mail.spool),
            root=str(self.config.mail.mail_root),
        )

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return self.runner.stop()

    def reconfigure(self, config: Config) -> None:
        recipients = _recipients(config, self.directory, _aliases(config))
        relay = _relay_policy(config)
        self.config, self.recipients, self.relay = config, recipients, relay
        self.runner.recipients = recipients
        for factory in self.factories:
            factory.recipients = recipients
            factory.relay = relay
        log.info("mail: aliases and domains reloaded")
