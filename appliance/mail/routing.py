"""Where mail for a remote recipient domain goes next (MISSION M-6): static route, smart host or MX.

The static routes are a ``mailertable`` / ``smtproutes`` map from a domain
(``example.com``, or ``.example.com`` for every subdomain of it) to a target:

* ``[host]`` or ``[192.0.2.1]`` / ``[2001:db8::1]``: connect to exactly that
  host or address, no MX lookup;
* ``host``: deliver as if the mail were for the domain ``host`` (MX lookup of
  ``host``, as Postfix does for a bare ``relayhost``);
* either form with ``:port``;
* an empty target: normal MX delivery for that domain (an exception to a
  wider route or to the smart host, as qmail's ``example.com:``).

An exact entry wins over a suffix entry, and a longer suffix over a shorter
one.  Without a static route the smart host (same target syntax) is used,
else the recipient domain's MX.  Domains that name this box itself, by host
name or by address literal, route ``local``.  The router is pure: it never
looks anything up, so it is cheap to call per recipient and to test.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SMTP_PORT = 25

#: Route kinds.
STATIC = "static"
SMART_HOST = "smarthost"
MX = "mx"
LITERAL = "literal"
LOCAL = "local"


class RouteError(ValueError):
    """A static route or smart host target that cannot be understood (a configuration error)."""


@dataclass(frozen=True)
class Route:
    """The next hop for one recipient domain.

    ``host`` is a name or an address; when ``mx_lookup`` is true it is the
    domain whose MX records give the hosts, else it is connected to directly.
    Recipients whose routes compare equal can share one SMTP transaction.
    """

    kind: str
    host: str
    port: int
    mx_lookup: bool

    @property
    def is_address(self) -> bool:
        """Whether ``host`` is an IP address rather than a name."""
        return _ip(self.host) is not None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def normalise_domain(domain: str) -> str:
    """Lower case, without surrounding blanks or the root dot."""
    return domain.strip().lower().rstrip(".")


def parse_address_literal(domain: str) -> str | None:
    """The address inside an RFC 5321 4.1.3 literal ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``, or None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        address = _ip(inner[5:])
        return str(address) if isinstance(address, ipaddress.IPv6Address) else None
    address = _ip(inner)
    return str(address) if isinstance(address, ipaddress.IPv4Address) else None


def parse_target(target: str, kind: str) -> tuple[str, int, bool] | None:
    """``(host, port, mx_lookup)`` for a route target; None for the empty target (use the MX).

    Raises :class:`RouteError` for a target that is not one of the documented forms.
    """
    text = target.strip()
    if not text:
        return None
    port = SMTP_PORT
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise RouteError(f"{kind} target {target!r}: missing ']'")
        host, rest = text[1:close], text[close + 1 :]
        if host.lower().startswith("ipv6:"):
            host = host[5:]
        if rest:
            if not rest.startswith(":"):
                raise RouteError(f"{kind} target {target!r}: unexpected {rest!r} after ']'")
            port = _port(rest[1:], target, kind)
        mx_lookup = False
    else:
        if text.count(":") > 1:
            raise RouteError(f"{kind} target {target!r}: write IPv6 addresses as [address]")
        host, colon, port_text = text.partition(":")
        if colon:
            port = _port(port_text, target, kind)
        mx_lookup = _ip(host) is None
    host = host.strip()
    address = _ip(host)
    if address is not None:
        host = str(address)
    else:
        host = normalise_domain(host)
        labels = host.split(".")
        if not host or any(
            not label or len(label) > 63 or not all(c.isalnum() or c in "-_" for c in label)
            for label in labels
        ):
            raise RouteError(f"{kind} target {target!r}: {host!r} is not a host name or address")
    return host, port, mx_lookup


def _port(text: str, target: str, kind: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise RouteError(f"{kind} target {target!r}: bad port {text!r}")
    return int(text)


class Router:
    """Chooses the :class:`Route` for a recipient domain; pure and safe to call for any input.

    ``static_routes`` maps domains (``.example.com`` for subdomains) to
    targets, ``smart_host`` is a target or None, ``own_names`` are this box's
    host names and ``own_addresses`` its addresses: a recipient domain that is
    one of them routes ``local``.  Bad targets raise :class:`RouteError` here,
    at construction, so that a configuration check reports them.
    """

    def __init__(
        self,
        static_routes: Mapping[str, str],
        smart_host: str | None,
        own_names: Iterable[str],
        own_addresses: Iterable[str],
    ) -> None:
        self._exact: dict[str, tuple[str, int, bool] | None] = {}
        self._suffixes: list[tuple[str, tuple[str, int, bool] | None]] = []
        for domain, target in static_routes.items():
            parsed = parse_target(target, f"route for {domain!r}")
            if domain.strip().startswith("."):
                key = normalise_domain(domain.strip()[1:])
                if not key:
                    raise RouteError(f"route key {domain!r} is empty")
                self._suffixes.append(("." + key, parsed))
            else:
                key = normalise_domain(domain)
                if not key:
                    raise RouteError(f"route key {domain!r} is empty")
                self._exact[key] = parsed
        self._suffixes.sort(key=lambda item: len(item[0]), reverse=True)
        self._smart = parse_target(smart_host, "smart host") if smart_host else None
        self._own_names = frozenset(normalise_domain(n) for n in own_names)
        self._own_addresses = frozenset(
            str(a) for a in (_ip(text.strip()) for text in own_addresses) if a is not None
        )

    def _static(self, domain: str) -> tuple[bool, tuple[str, int, bool] | None]:
        if domain in self._exact:
            return True, self._exact[domain]
        for suffix, parsed in self._suffixes:
            if domain.endswith(suffix):
                return True, parsed
        return False, None

    def route(self, domain: str) -> Route:
        """The next hop for mail to ``domain`` (a name, or an address literal in brackets)."""
        literal = parse_address_literal(domain.strip())
        if literal is not None:
            if literal in self._own_addresses:
                return Route(LOCAL, literal, SMTP_PORT, False)
            if self._smart is not None:
                return Route(SMART_HOST, *self._smart)
            return Route(LITERAL, literal, SMTP_PORT, False)
        name = normalise_domain(domain)
        if name in self._own_names:
            return Route(LOCAL, name, SMTP_PORT, False)
        found, parsed = self._static(name)
        if found:
            if parsed is None:
                return Route(MX, name, SMTP_PORT, True)
            return Route(STATIC, *parsed)
        if self._smart is not None:
            return Route(SMART_HOST, *self._smart)
        return Route(MX, name, SMTP_PORT, True)


def group_by_route(router: Router, recipients: Iterable[str]) -> dict[Route, list[str]]:
    """Recipients grouped by next hop, in first-seen order: one SMTP transaction per group (M-6)."""
    groups: dict[Route, list[str]] = {}
    for recipient in recipients:
        domain = recipient.rpartition("@")[2] if "@" in recipient else ""
        members = groups.setdefault(router.route(domain), [])
        if recipient not in members:
            members.append(recipient)
    return groups
