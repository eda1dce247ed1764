"""Does the sender's (or a relayed recipient's) domain exist in the DNS?  Seed 004 check (3).

A domain exists for mail when it has an MX, or failing that an A or AAAA
record (RFC 5321 5.1).  Only an authoritative NXDOMAIN (or a name with
neither) is a permanent answer; a timeout or SERVFAIL is 451 4.4.3 and never
5xx (MISSION R-1): the seed's gateway lost no mail while the DNS of a
domain hit by an earthquake was down.  A local list of domains that are
always wrong (``localhost.localdomain`` from unconfigured hosts, typing
mistakes seen before) fails at once without a lookup, so mail to or from
them is not retried for five days.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from appliance.dns.lookup import MailResolver, NoSuchDomain
from appliance.mail.gate.verdict import with_deadline

#: The default of unconfigured hosts (seed 004) and the RFC 6761 names that never
#: resolve.  ``test`` and ``example`` are left out on purpose: test setups use them.
DEFAULT_ALWAYS_WRONG: tuple[str, ...] = (
    "localhost",
    "localhost.localdomain",
    "localdomain",
    "invalid",
)


class Existence(enum.Enum):
    """The answer about one domain."""

    EXISTS = "exists"
    NO_SUCH_DOMAIN = "no such domain"
    NO_MAIL_RECORDS = "no MX, A or AAAA record"
    NULL_MX = "null MX: the domain accepts no mail"
    ALWAYS_WRONG = "in the list of domains that are always wrong"
    TEMPORARY = "DNS lookup failed temporarily"


@dataclass(frozen=True)
class DomainSettings:
    """Settings of the sender/recipient domain checks.

    ``nxdomain_action``: ``reject`` (553 5.1.8, the default), ``tempfail``
    (451 4.1.8: seed 004 retries even "no such domain", since only the list
    of always-wrong domains is certain) or ``tag``.  ``check_recipients``
    checks the recipient domain of mail that inside clients relay out.
    ``always_wrong`` entries match the domain and its subdomains;
    ``always_wrong_file`` adds one domain per line (``#`` comments).
    """

    check_sender: bool = True
    check_recipients: bool = True
    nxdomain_action: str = "reject"
    always_wrong: tuple[str, ...] = DEFAULT_ALWAYS_WRONG
    always_wrong_file: str | None = None
    timeout: float = 20.0

    def __post_init__(self) -> None:
        if self.nxdomain_action not in ("reject", "tempfail", "tag"):
            raise ValueError(
                f"nxdomain_action must be reject, tempfail or tag, not {self.nxdomain_action!r}"
            )


def read_domain_list(path: str) -> tuple[str, ...]:
    """Domains from a file, one a line; blank lines and ``#`` comments ignored."""
    domains: list[str] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        entry = line.split("#", 1)[0].strip().lower().rstrip(".")
        if entry:
            domains.append(entry)
    return tuple(domains)


class DomainExistence:
    """Answers "may mail be addressed to or from this domain?" with an :class:`Existence`."""

    name = "domain"

    def __init__(
        self, settings: DomainSettings, resolver: MailResolver, clock: IReactorTime
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.clock = clock
        entries: list[str] = list(settings.always_wrong)
        if settings.always_wrong_file:
            entries.extend(read_domain_list(settings.always_wrong_file))
        self.always_wrong = frozenset(e.strip().lower().rstrip(".") for e in entries if e.strip())

    def is_always_wrong(self, domain: str) -> bool:
        """True when ``domain`` or one of its parent domains is in the list."""
        labels = domain.lower().rstrip(".").split(".")
        return any(".".join(labels[i:]) in self.always_wrong for i in range(len(labels)))

    def lookup(self, domain: str) -> Deferred[Existence]:
        """MX first, then A/AAAA; never fails (errors become TEMPORARY)."""
        domain = domain.lower().rstrip(".")
        if domain.startswith("["):
            return succeed(Existence.EXISTS)
        if self.is_always_wrong(domain):
            return succeed(Existence.ALWAYS_WRONG)
        d: Deferred[Any] = with_deadline(
            self.resolver.mx(domain), self.settings.timeout, self.clock
        )
        d.addCallback(self._got_mx, domain)
        d.addErrback(self._failed)
        return d

    def _got_mx(
        self, records: list[tuple[int, str]], domain: str
    ) -> Existence | Deferred[Existence]:
        if records:
            if len(records) == 1 and records[0][1] in ("", "."):
                return Existence.NULL_MX
            return Existence.EXISTS
        d: Deferred[Any] = with_deadline(
            self.resolver.addresses(domain), self.settings.timeout, self.clock
        )
        d.addCallback(lambda found: Existence.EXISTS if found else Existence.NO_MAIL_RECORDS)
        return d

    @staticmethod
    def _failed(failure: Failure) -> Existence:
        if failure.check(NoSuchDomain):
            return Existence.NO_SUCH_DOMAIN
        # TemporaryFailure, or anything unexpected: never a permanent answer.
        return Existence.TEMPORARY
