"""The addresses to try, in order, for one route (RFC 5321 5.1, RFC 7505; MISSION M-6, R-1).

For an MX route: the MX records sorted by preference with random order among
equal preferences, the domain itself as an implicit MX when it has none,
a null MX as an immediate permanent failure, and the lower-MX rule: when this
box is one of the MX hosts, it and every MX whose preference is not lower than
its own are dropped, so that two MXs never pass mail back and forth.  Then each
address of each host, in order.  A DNS answer that did not come is always a
temporary failure; only an authoritative "no such domain" for the recipient's
own domain is permanent.  A name that a *configured* route points at and that
does not resolve is a configuration error, so it is temporary too: the mail
waits for the administrator instead of bouncing.
"""

from __future__ import annotations

import ipaddress
import random as random_module
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults

from appliance.dns import lookup
from appliance.dns.lookup import MailResolver
from appliance.mail.interfaces import Reply
from appliance.mail.routing import MX, Route, normalise_domain

#: Postfix's smtp_mx_address_limit is 5 per attempt; a few more are cheap here.
DEFAULT_MAX_ADDRESSES = 20


@dataclass(frozen=True)
class Destination:
    """One address to connect to; ``host`` is the MX (or route) name it came from."""

    host: str
    address: str
    port: int
    preference: int = 0


@dataclass(frozen=True)
class Destinations:
    """Addresses to try in this order; never empty."""

    hosts: tuple[Destination, ...]


@dataclass(frozen=True)
class PermanentFailure:
    """Delivery to this route can never succeed: bounce with ``reply``."""

    reply: Reply


@dataclass(frozen=True)
class TemporaryFailure:
    """Try again later; ``reply`` says why."""

    reply: Reply


@dataclass(frozen=True)
class SelfIsBestMX:
    """This box is the best remaining MX (or a route points back at it).

    The caller turns this into 5.4.6 "mail loops back to myself", or, when so
    configured, delivers to the domain's address records (sendmail's
    TryNullMXList).  :attr:`reply` is the usual bounce.
    """

    domain: str

    @property
    def reply(self) -> Reply:
        return Reply(554, "5.4.6", f"mail for {self.domain} loops back to myself")


Result = Destinations | PermanentFailure | TemporaryFailure | SelfIsBestMX


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class _Self:
    """This box's names and addresses, normalised for comparison."""

    def __init__(self, names: Iterable[str], addresses: Iterable[str]) -> None:
        self.names = frozenset(normalise_domain(n) for n in names)
        self.addresses = frozenset(a for a in (_address(t) for t in addresses) if a is not None)

    def has_name(self, name: str) -> bool:
        return normalise_domain(name) in self.names

    def has_address(self, text: str) -> bool:
        return _address(text) in self.addresses

    def unreachable(self, text: str) -> bool:
        """Never connect there: this box, or 0.0.0.0 / :: (which reach this host too)."""
        address = _address(text)
        return address is None or address in self.addresses or address.is_unspecified


@dataclass
class _Host:
    name: str
    preference: int
    addresses: list[str]
    temporary: bool = False
    missing: bool = False


def _shuffled_by_preference(
    records: Sequence[tuple[int, str]], rng: random_module.Random
) -> list[tuple[int, str]]:
    """Sorted by preference; equal preferences in random order (RFC 5321 5.1)."""
    groups: dict[int, list[str]] = {}
    for preference, exchange in records:
        names = groups.setdefault(preference, [])
        if exchange not in names:
            names.append(exchange)
    ordered: list[tuple[int, str]] = []
    for preference in sorted(groups):
        names = groups[preference]
        rng.shuffle(names)
        ordered.extend((preference, name) for name in names)
    return ordered


async def _resolve(resolver: MailResolver, host: _Host) -> None:
    """Fill in one host's addresses, or mark why there are none; never raises."""
    literal = _address(host.name)
    if literal is not None:  # an address where a name belongs; harmless to use
        host.addresses = [str(literal)]
        return
    try:
        host.addresses = list(await resolver.addresses(host.name))
    except lookup.NoSuchDomain:
        host.missing = True
    except Exception:
        host.temporary = True


async def _resolve_hosts(resolver: MailResolver, hosts: list[_Host]) -> None:
    """Look up every host's addresses at once."""
    await gatherResults([ensureDeferred(_resolve(resolver, host)) for host in hosts])


def _temporary(text: str, enhanced: str = "4.4.3") -> TemporaryFailure:
    return TemporaryFailure(Reply(451, enhanced, text))


async def _destinations(
    route: Route,
    resolver: MailResolver,
    own: _Self,
    rng: random_module.Random,
    max_addresses: int,
) -> Result:
    recipient_domain = route.kind == MX
    name = route.host

    def not_found(text: str, enhanced: str) -> Result:
        # Only the recipient's own domain may bounce; a configured route's target waits for a fix.
        if recipient_domain:
            return PermanentFailure(Reply(550, enhanced, text))
        return _temporary(f"{text} (check the route configuration)", "4.4.4")

    if not route.mx_lookup:
        if own.has_name(name):
            return SelfIsBestMX(name)
        hosts = [_Host(name, 0, [])]
    else:
        try:
            records = await resolver.mx(name)
        except lookup.NoSuchDomain:
            return not_found(f"domain {name} does not exist", "5.1.2")
        except Exception as e:
            return _temporary(f"MX lookup for {name} failed: {type(e).__name__}")
        cleaned = [(p, normalise_domain(x)) for p, x in records]
        real = [(p, x) for p, x in cleaned if x]
        if cleaned and not real:
            # RFC 7505 3: a null MX says the domain accepts no mail at all.
            return not_found(f"domain {name} accepts no mail (null MX)", "5.1.10")
        if not real:
            # RFC 5321 5.1: no MX records, the domain itself is the implicit MX.
            real = [(0, name)]
        hosts = [_Host(x, p, []) for p, x in _shuffled_by_preference(real, rng)]
    await _resolve_hosts(resolver, hosts)

    # The lower-MX rule (RFC 5321 5.1): drop this box and every MX not strictly better.
    self_preference = min(
        (
            h.preference
            for h in hosts
            if own.has_name(h.name) or any(own.has_address(a) for a in h.addresses)
        ),
        default=None,
    )
    if self_preference is not None:
        hosts = [h for h in hosts if h.preference < self_preference]
        if not hosts:
            return SelfIsBestMX(name)

    out: list[Destination] = []
    seen: set[str] = set()
    for host in hosts:
        for text in host.addresses:
            address = _address(text)
            if address is None or str(address) in seen or own.unreachable(text):
                continue
            seen.add(str(address))
            out.append(Destination(host.name, str(address), route.port, host.preference))
    if out:
        return Destinations(tuple(out[:max_addresses]))
    if any(h.temporary for h in hosts):
        return _temporary(f"address lookup for the mail hosts of {name} failed")
    if route.mx_lookup and hosts and hosts[0].name == name and hosts[0].missing:
        return not_found(f"domain {name} does not exist", "5.1.2")
    return not_found(f"no address found for the mail hosts of {name}", "5.4.4")


def destinations(
    route: Route,
    resolver: MailResolver,
    own_names: Iterable[str],
    own_addresses: Iterable[str],
    random: random_module.Random,
    *,
    max_addresses: int = DEFAULT_MAX_ADDRESSES,
) -> Deferred[Result]:
    """Where to connect for ``route``, best first; always fires, never errbacks.

    ``random`` orders MX hosts of equal preference (inject a seeded
    ``random.Random`` in tests).  The result is :class:`Destinations`,
    :class:`PermanentFailure` (bounce), :class:`TemporaryFailure` (retry later)
    or :class:`SelfIsBestMX`.
    """
    own = _Self(own_names, own_addresses)

    async def guarded() -> Result:
        try:
            return await _destinations(route, resolver, own, random, max_addresses)
        except Exception as e:
            return _temporary(f"routing {route.host} failed: {type(e).__name__}", "4.3.0")

    return ensureDeferred(guarded())
