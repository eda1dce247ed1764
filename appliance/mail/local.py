"""Who a local address reaches: aliases, address extensions, virtual domains, role addresses (M-4).

An address in a local domain resolves in this order (first hit wins):

1. the alias ``local@domain``; for a *primary* domain also the bare alias
   ``local`` (bare keys are the classic /etc/aliases names; they do not leak
   into virtual domains, whose user spaces are separate);
2. the directory's user for the full address (virtual domains: ``bob@a.test``
   and ``bob@b.test`` are different users);
3. the address without its extension: the local part is cut at the *last*
   extension separator (``mary-ann+news`` -> ``mary-ann`` -> ``mary``) and
   resolved again from step 1, so an exact name always beats a shorter one;
4. the RFC 2142 role addresses (postmaster, abuse, hostmaster; RFC 5321 4.5.1
   for postmaster) of *every* local domain go to ``role_target`` when nothing
   above matched, so they are always routable.

Alias targets are resolved recursively; an address already on the expansion
path is not expanded again but looked up as a user (so ``alice: alice, bob``
keeps a copy for alice and ``a: b`` + ``b: a`` ends instead of looping).
Targets outside the local domains come back as RemoteTarget for the queue to
relay.  Inside an alias, an unknown local target is logged and skipped; a
recipient that reaches nothing at all is unknown (550 5.1.1).  A directory
that cannot answer makes the answer temporary (451 4.4.3, R-2), never 550.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.directory.base import Directory, DirectoryUnavailable
from appliance.mail.aliases import AliasTable
from appliance.mail.interfaces import Reply

log = Logger()

DEFAULT_ROLES = ("postmaster", "abuse", "hostmaster")


@dataclass(frozen=True)
class MailboxTarget:
    """Deliver into this Maildir (relative to the mail root); ``address`` goes in Delivered-To."""

    mailbox: str
    address: str


@dataclass(frozen=True)
class RemoteTarget:
    """An alias led outside the local domains: relay to this address."""

    address: str


Target = MailboxTarget | RemoteTarget


class UnknownRecipient(Exception):
    """The address reaches no mailbox; ``reply`` is the 550 to give."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


@dataclass
class _Expansion:
    targets: list[Target] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    truncated: bool = False
    _mailboxes: set[str] = field(default_factory=set)
    _remote: set[str] = field(default_factory=set)

    def add(self, target: Target) -> None:
        if isinstance(target, MailboxTarget):
            if target.mailbox in self._mailboxes:
                return
            self._mailboxes.add(target.mailbox)
        else:
            if target.address in self._remote:
                return
            self._remote.add(target.address)
        self.targets.append(target)


class LocalRecipients:
    """RecipientCheck for the SMTP side and ``resolve`` for the queue runner.

    ``local_domains`` are the domains delivered here; ``primary_domains`` (by
    default the first local domain) are those the bare alias keys apply to;
    ``role_target`` (default ``postmaster@<first primary domain>``) receives
    role mail for domains that route it nowhere else, and must itself resolve
    through an alias or a user.
    """

    def __init__(
        self,
        directory: Directory,
        aliases: AliasTable,
        local_domains: Iterable[str],
        *,
        primary_domains: Iterable[str] | None = None,
        extension_separators: str = "+-",
        role_addresses: Iterable[str] = DEFAULT_ROLES,
        role_target: str | None = None,
        max_depth: int = 10,
        max_targets: int = 1000,
    ) -> None:
        self.directory = directory
        self.aliases = aliases
        self.local_domains = tuple(d.lower().rstrip(".") for d in local_domains)
        if not self.local_domains:
            raise ValueError("at least one local domain is needed")
        primary = (
            tuple(d.lower().rstrip(".") for d in primary_domains)
            if primary_domains is not None
            else self.local_domains[:1]
        )
        self.primary_domains = frozenset(primary)
        self.default_domain = primary[0] if primary else self.local_domains[0]
        self.separators = extension_separators
        self.roles = frozenset(r.lower() for r in role_addresses)
        self.role_target = (role_target or f"postmaster@{self.default_domain}").lower()
        self.max_depth = max_depth
        self.max_targets = max_targets

    def set_aliases(self, aliases: AliasTable) -> None:
        """Swap in a reloaded alias table (SIGHUP)."""
        self.aliases = aliases

    def normalise(self, address: str) -> str:
        """Lower case, no trailing dot on the domain; a bare local part gets the default domain."""
        address = address.strip().lower()
        local, at, domain = address.rpartition("@")
        if not at:
            return f"{address}@{self.default_domain}"
        return f"{local}@{domain.rstrip('.')}"

    def is_local(self, address: str) -> bool:
        """Whether the address is in one of the local domains (delivered here)."""
        return _domain(self.normalise(address)) in self.local_domains

    def check_recipient(self, address: str) -> Deferred[Reply | None]:
        """None when deliverable (or not ours to judge), 550 5.1.1 unknown, 451 4.4.3 directory down."""
        if not self.is_local(address):
            d: Deferred[Reply | None] = Deferred()
            d.callback(None)
            return d
        d2 = self.resolve(address)

        def ok(_: list[Target]) -> Reply | None:
            return None

        def err(f: Failure) -> Reply:
            if isinstance(f.value, UnknownRecipient):
                return f.value.reply
            if f.check(DirectoryUnavailable):
                log.warn("directory unavailable checking {rcpt}: {err}", rcpt=address, err=f.value)
                return Reply(451, "4.4.3", "Directory temporarily unavailable, try again later")
            log.failure("checking recipient {rcpt}", f, rcpt=address)
            return Reply(451, "4.3.0", "Temporary local problem, try again later")

        return d2.addCallbacks(ok, err)

    def resolve(self, address: str) -> Deferred[list[Target]]:
        """Every mailbox and remote address ``address`` reaches.

        Errbacks with UnknownRecipient (550 5.1.1) or DirectoryUnavailable.
        """
        return Deferred.fromCoroutine(self._resolve_top(address))

    async def _resolve_top(self, address: str) -> list[Target]:
        address = self.normalise(address)
        out = _Expansion()
        await self._resolve(address, frozenset(), 0, True, out)
        if out.unknown and out.targets:
            log.warn(
                "{rcpt}: alias targets reach nobody: {unknown}",
                rcpt=address,
                unknown=", ".join(out.unknown),
            )
        if out.truncated:
            log.warn("{rcpt}: expansion cut at {n} targets", rcpt=address, n=self.max_targets)
        if not out.targets:
            raise UnknownRecipient(Reply(550, "5.1.1", f"<{address}>: no such user here"))
        return out.targets

    async def _resolve(
        self,
        address: str,
        path: frozenset[str],
        depth: int,
        roles: bool,
        out: _Expansion,
        extended: str | None = None,
    ) -> None:
        # ``extended``: the address with its extension, kept for Delivered-To.
        if len(out.targets) >= self.max_targets:
            out.truncated = True
            return
        address = self.normalise(address)
        local, _, domain = address.rpartition("@")
        if domain not in self.local_domains:
            out.add(RemoteTarget(address))
            return
        if depth > self.max_depth:
            log.warn("{rcpt}: alias nesting deeper than {n}", rcpt=address, n=self.max_depth)
            out.unknown.append(address)
            return
        inner = path | {address}
        if address not in path:
            targets = self.aliases.lookup(address, bare=domain in self.primary_domains)
            if targets is not None:
                for target in targets:
                    await self._resolve(target, inner, depth + 1, roles, out)
                return
        user = await self.directory.find_user(address)
        if user is not None:
            out.add(MailboxTarget(user.mailbox, extended or address))
            return
        cut = max(local.rfind(s) for s in self.separators) if self.separators else -1
        if cut > 0:
            base = f"{local[:cut]}@{domain}"
            await self._resolve(base, inner, depth + 1, roles, out, extended or address)
            return
        if roles and local in self.roles and self.role_target not in path:
            await self._resolve(self.role_target, inner, depth + 1, False, out)
            return
        out.unknown.append(address)
