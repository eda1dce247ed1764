"""DNS block lists on the client address (RFC 5782), failing open (MISSION R-3).

The query name is the client address reversed (IPv4 octets, IPv6 nibbles,
RFC 5782 2.1 and 2.4) under the list's zone.  Only answers in the list's
configured codes count as listed.  Answers in 127.255.255.0/24 are the error
codes lists send to queries through public resolvers (Spamhaus
127.255.255.254, mail-in-a-box#2288): they, timeouts and SERVFAIL mean "not
listed" and are logged as errors, never as "everything is listed".
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.dns.lookup import MailResolver, NoSuchDomain, TemporaryFailure
from appliance.mail.gate.verdict import Verdict, accept, parse_ip, reject, tag, with_deadline
from appliance.mail.interfaces import Reply

log = Logger(namespace="appliance.mail.gate.dnsbl")

_ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")
_DEFAULT_CODES = ("127.0.0.2-127.0.0.255",)


def reverse_name(client_ip: str) -> str | None:
    """The address as a DNSBL label sequence (``2.0.0.127``; IPv6: 32 nibbles), or None."""
    address = parse_ip(client_ip)
    if address is None:
        return None
    if address.version == 4:
        return ".".join(reversed(str(address).split(".")))
    return ".".join(reversed(address.exploded.replace(":", "")))


def _parse_codes(codes: Sequence[str]) -> tuple[tuple[int, int], ...]:
    ranges: list[tuple[int, int]] = []
    for code in codes:
        if "-" in code:
            low, high = code.split("-", 1)
            ranges.append(
                (int(ipaddress.IPv4Address(low.strip())), int(ipaddress.IPv4Address(high.strip())))
            )
        elif "/" in code:
            net = ipaddress.IPv4Network(code.strip(), strict=False)
            ranges.append((int(net.network_address), int(net.broadcast_address)))
        else:
            value = int(ipaddress.IPv4Address(code.strip()))
            ranges.append((value, value))
    return tuple(ranges)


@dataclass(frozen=True)
class DNSBLZone:
    """One block list: its zone, the answers that count as listed, and what a listing does.

    ``codes`` are addresses, ``low-high`` ranges or CIDRs (``127.0.0.2-127.0.0.11``);
    ``action`` is ``reject`` (554 5.7.1 with the list's TXT reason) or ``tag``.
    """

    zone: str
    codes: tuple[str, ...] = _DEFAULT_CODES
    action: str = "reject"

    def __post_init__(self) -> None:
        if self.action not in ("reject", "tag"):
            raise ValueError(
                f"DNSBL {self.zone}: action must be reject or tag, not {self.action!r}"
            )
        _parse_codes(self.codes)


@dataclass(frozen=True)
class DNSBLSettings:
    """The lists, queried in parallel; the first listing (in this order) that rejects decides."""

    zones: tuple[DNSBLZone, ...] = ()
    timeout: float = 10.0
    #: Seconds a client's verdict is reused (postscreen_dnsbl_ttl); 0 asks every time.
    cache_ttl: float = 300.0


@dataclass(frozen=True)
class _Listing:
    zone: DNSBLZone
    code: str
    reason: str


class DNSBL:
    """Looks the client address up in every configured list; see the module docstring."""

    name = "dnsbl"

    def __init__(
        self, settings: DNSBLSettings, resolver: MailResolver, clock: IReactorTime
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.clock: Any = clock
        self._codes = {zone.zone: _parse_codes(zone.codes) for zone in settings.zones}
        self._verdicts: dict[str, tuple[float, Verdict]] = {}

    def check(self, client_ip: str) -> Deferred[Verdict]:
        """Fires with reject (first rejecting listing), tag (only tagging listings) or accept."""
        reversed_ip = reverse_name(client_ip)
        if reversed_ip is None or not self.settings.zones:
            return succeed(accept(self.name, "no lists or no address"))
        now = self.clock.seconds()
        cached = self._verdicts.get(client_ip)
        if cached is not None and cached[0] > now:
            return succeed(cached[1])
        failures: list[str] = []
        queries = [
            self._query(zone, reversed_ip, client_ip, failures) for zone in self.settings.zones
        ]
        d: Deferred[Any] = DeferredList(queries, consumeErrors=True)
        d.addCallback(self._decide, client_ip)
        d.addCallback(self._remember, client_ip, failures)
        return d

    def _remember(self, verdict: Verdict, client_ip: str, failures: list[str]) -> Verdict:
        """Keep a verdict every list answered for (a failed lookup is asked again next time)."""
        if self.settings.cache_ttl > 0 and not failures:
            if len(self._verdicts) >= 10_000:
                self._verdicts = {}
            self._verdicts[client_ip] = (self.clock.seconds() + self.settings.cache_ttl, verdict)
        return verdict

    def _query(
        self, zone: DNSBLZone, reversed_ip: str, client_ip: str, failures: list[str]
    ) -> Deferred[_Listing | None]:
        name = f"{reversed_ip}.{zone.zone.strip('.').lower()}"
        d: Deferred[Any] = with_deadline(
            self.resolver.addresses(name), self.settings.timeout, self.clock
        )
        d.addCallbacks(
            self._answered,
            self._failed,
            callbackArgs=(zone, name, client_ip, failures),
            errbackArgs=(zone, client_ip, failures),
        )
        return d

    def _answered(
        self, answers: list[str], zone: DNSBLZone, name: str, client_ip: str, failures: list[str]
    ) -> Deferred[_Listing | None] | _Listing | None:
        listed: list[str] = []
        for answer in answers:
            address = parse_ip(answer)
            if address is None or address.version != 4:
                continue
            if address in _ERROR_CODES:
                failures.append(zone.zone)
                log.error(
                    "DNSBL {zone} answered error code {code} for {client}: treated as not listed "
                    "(is the list queried through a public resolver?)",
                    zone=zone.zone,
                    code=str(address),
                    client=client_ip,
                )
                return None
            value = int(address)
            if any(low <= value <= high for low, high in self._codes[zone.zone]):
                listed.append(str(address))
        if not listed:
            return None
        code = listed[0]
        d: Deferred[Any] = with_deadline(self.resolver.txt(name), self.settings.timeout, self.clock)

        def reason(records: list[bytes]) -> _Listing:
            text = b" ".join(records).decode("utf-8", "replace").strip()
            return _Listing(zone, code, _clean(text) or f"listed in {zone.zone} ({code})")

        def no_reason(_: Failure) -> _Listing:
            return _Listing(zone, code, f"listed in {zone.zone} ({code})")

        d.addCallbacks(reason, no_reason)
        return d

    def _failed(
        self, failure: Failure, zone: DNSBLZone, client_ip: str, failures: list[str]
    ) -> None:
        if failure.check(NoSuchDomain):
            return None
        failures.append(zone.zone)
        kind = "timeout or SERVFAIL" if failure.check(TemporaryFailure) else "lookup error"
        log.error(
            "DNSBL {zone} lookup for {client} failed ({kind}: {error}): treated as not listed",
            zone=zone.zone,
            client=client_ip,
            kind=kind,
            error=failure.getErrorMessage(),
        )
        return None

    def _decide(self, results: list[tuple[bool, object]], client_ip: str) -> Verdict:
        listings = [value for ok, value in results if ok and isinstance(value, _Listing)]
        for listing in listings:
            if listing.zone.action == "reject":
                return reject(
                    Reply(
                        554,
                        "5.7.1",
                        f"Service unavailable; client [{client_ip}] blocked using {listing.zone.zone}; {listing.reason}",
                    ),
                    self.name,
                    f"listed in {listing.zone.zone} ({listing.code}): {listing.reason}",
                )
        if listings:
            lines = tuple(
                f"X-DNSBL: {listing.zone.zone} {listing.code} client=[{client_ip}]; {listing.reason}"
                for listing in listings
            )
            zones = ", ".join(listing.zone.zone for listing in listings)
            return tag(lines, self.name, f"listed in {zones} (tag only)")
        return accept(self.name, "not listed")


def _clean(text: str) -> str:
    """A TXT reason made safe for one reply line and one header line."""
    return "".join(ch if 32 <= ord(ch) < 127 else " " for ch in text)[:200].strip()
