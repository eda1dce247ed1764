"""The relay decision f(client, sender, recipient) of MISSION M-2 (shared/relay-matrix.md).

A client is *inside* when its address is in the inside networks, when it has
authenticated, or when an extra predicate says so (POP-before-SMTP).  Inside
clients may send anywhere.  Everyone else may send only to recipients this box
accepts mail for: the local domains, the relay (backup-MX) domains and the
appliance's own names.  What the envelope sender claims never matters, and the
refusal comes at RCPT time so that the sending side owns the bounce.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from appliance.mail.address import domain_of
from appliance.mail.interfaces import Reply

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
InsidePredicate = Callable[[str], bool]

RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied")


def _normalise_domain(domain: str) -> str:
    return domain.strip().lower().rstrip(".") if not domain.startswith("[") else domain.lower()


class _DomainSet:
    """Exact domain names, plus ``.example.com`` entries that match every subdomain of it."""

    def __init__(self, domains: Iterable[str]) -> None:
        self.exact: frozenset[str] = frozenset()
        self.suffixes: tuple[str, ...] = ()
        exact: set[str] = set()
        suffixes: list[str] = []
        for entry in domains:
            if entry.startswith("."):
                suffixes.append("." + _normalise_domain(entry[1:]))
            else:
                exact.add(_normalise_domain(entry))
        self.exact = frozenset(exact)
        self.suffixes = tuple(suffixes)

    def __contains__(self, domain: object) -> bool:
        if not isinstance(domain, str):
            return False
        domain = _normalise_domain(domain)
        if domain in self.exact:
            return True
        return bool(self.suffixes) and domain.endswith(self.suffixes)


class RelayPolicy:
    """Decides at RCPT time whether a recipient may be accepted from a client (relay-matrix.md).

    ``inside_networks`` are networks (objects or strings such as
    ``"192.168.0.0/24"``) whose clients may relay.  ``local_domains``,
    ``relay_domains`` and ``own_names`` match exactly and case-insensitively;
    an entry with a leading dot (``.example.com``) matches every subdomain of
    ``example.com`` but not ``example.com`` itself.  ``inside_predicates``
    are extra callables ``(ip) -> bool`` that make a client inside
    (POP-before-SMTP); more can be added with :meth:`add_inside_predicate`.
    """

    def __init__(
        self,
        inside_networks: Iterable[IPNetwork | str],
        local_domains: Iterable[str],
        relay_domains: Iterable[str],
        own_names: Iterable[str],
        inside_predicates: Iterable[InsidePredicate] = (),
    ) -> None:
        self.inside_networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(net, strict=False) if isinstance(net, str) else net
            for net in inside_networks
        )
        self._local = _DomainSet(local_domains)
        self._relay = _DomainSet(relay_domains)
        self._own = _DomainSet(own_names)
        self._predicates: list[InsidePredicate] = list(inside_predicates)

    def add_inside_predicate(self, predicate: InsidePredicate) -> None:
        """Also treat clients for which ``predicate(ip)`` is true as inside."""
        self._predicates.append(predicate)

    def is_inside_network(self, client_ip: str) -> bool:
        """Whether the address is in an inside network (IPv4-mapped IPv6 counts as IPv4)."""
        try:
            address = ipaddress.ip_address(client_ip.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.inside_networks)

    def is_inside_client(self, client_ip: str, authenticated: bool = False) -> bool:
        """Whether the client may relay: inside network, authenticated, or an inside predicate."""
        if authenticated or self.is_inside_network(client_ip):
            return True
        for predicate in self._predicates:
            if predicate(client_ip):
                return True
        return False

    def is_local_domain(self, domain: str) -> bool:
        """Whether mail for ``domain`` is delivered here: a local domain or one of our own names."""
        return domain in self._local or domain in self._own

    def is_relay_domain(self, domain: str) -> bool:
        """Whether this box is a backup MX for ``domain`` (accepted from anyone, then forwarded)."""
        return domain in self._relay

    def accepts_for(self, domain: str) -> bool:
        """Whether the domain is "inside" for the recipient column: local, own name or relay."""
        return self.is_local_domain(domain) or self.is_relay_domain(domain)

    def decide(
        self, client_ip: str, authenticated: bool, sender: str, recipient: str
    ) -> Reply | None:
        """None when ``recipient`` may be accepted from this client, else the refusal (550 5.7.1).

        ``sender`` is deliberately not consulted (relay-matrix.md: "whatever
        the sender claims"); it is part of the signature so the call site
        reads as the matrix does.
        """
        del sender
        if self.accepts_for(domain_of(recipient)):
            return None
        if self.is_inside_client(client_ip, authenticated):
            return None
        return RELAY_DENIED
