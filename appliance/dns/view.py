"""A DNS view: the zones one side of the box serves, who may ask, and how a question is answered.

The outside and inside views are separate objects bound to separate
listeners, so an answer can only come from the view whose socket received the
query; nothing (zones, cache) is shared between them.  The outside view is
authoritative only: a name outside its zones is REFUSED and recursion is never
offered (D-2).  A reload replaces the whole zone table at once.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Iterator, Mapping
from typing import Protocol

from twisted.logger import Logger

from appliance.dns.rr import CLASS_ANY, CLASS_IN, RR, LookupResult, Opcode, RCode, RRType, canonical
from appliance.dns.wire import DEFAULT_UDP_SIZE, Message, error_response, make_response

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = Logger(namespace="appliance.dns")

_DS = 43  # RFC 4034 5 (not in the shared RRType enum)


class ServedZone(Protocol):
    """What a view needs of a zone (appliance.dns.zone.Zone provides it)."""

    @property
    def origin(self) -> bytes: ...

    @property
    def soa(self) -> RR: ...

    def lookup(self, qname: bytes, qtype: int) -> LookupResult: ...

    def __iter__(self) -> Iterator[RR]: ...


def transfer_records(zone: ServedZone) -> tuple[RR, ...]:
    """Every record of the zone in AXFR order: the SOA first and last (RFC 5936 2.2)."""
    return (zone.soa, *(rr for rr in zone if rr.rtype != RRType.SOA), zone.soa)


def _label_boundary(name: bytes, offset: int) -> bool:
    """Whether a label of wire name ``name`` starts at ``offset``."""
    i = 0
    while i < offset:
        i += name[i] + 1
    return i == offset


def _allowed(client: str, networks: tuple[Network, ...]) -> bool:
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return False
    return any(ip in net for net in networks)


class View:
    """The responder for one side's DNS listeners."""

    def __init__(
        self,
        side: str,
        zones: Mapping[bytes, ServedZone],
        *,
        allow_query: tuple[Network, ...] = (),
        allow_transfer: Mapping[bytes, tuple[Network, ...]] | None = None,
        udp_size: int = DEFAULT_UDP_SIZE,
        minimal_any: bool = False,
    ) -> None:
        self.side = side
        self.udp_size = udp_size
        self.minimal_any = minimal_any
        self.generation = 0
        self._acl_memo: dict[str, bool] = {}
        self.allow_query = allow_query
        self.replace_zones(zones, allow_transfer or {})

    @property
    def allow_query(self) -> tuple[Network, ...]:
        return self._allow_query

    @allow_query.setter
    def allow_query(self, networks: tuple[Network, ...]) -> None:
        self._allow_query = networks
        self._acl_memo = {}
        self.generation += 1

    def replace_zones(
        self, zones: Mapping[bytes, ServedZone], allow_transfer: Mapping[bytes, tuple[Network, ...]]
    ) -> None:
        """Swap in a new zone table at once (a reload); answers cached for the old one stop matching."""
        table = {canonical(origin): zone for origin, zone in zones.items()}
        # Origin lengths, longest first: find_zone tries only the suffixes that could be a zone.
        self._origin_lengths = tuple(sorted({len(origin) for origin in table}, reverse=True))
        self.zones = table
        self.allow_transfer = {canonical(origin): nets for origin, nets in allow_transfer.items()}
        self.generation += 1

    def invalidate(self) -> None:
        """A zone's data changed in place (a secondary zone's transfer or expiry): drop cached answers."""
        self.generation += 1

    def allows(self, client: str) -> bool:
        """Whether ``client`` passes allow_query (memoised: the ACL is checked on every query)."""
        allowed = self._acl_memo.get(client)
        if allowed is None:
            allowed = _allowed(client, self._allow_query)
            if len(self._acl_memo) >= 65536:
                self._acl_memo = {}
            self._acl_memo[client] = allowed
        return allowed

    def cache_token(self, client: str) -> Hashable:
        """What, besides the question, an answer of this view depends on (see appliance.dns.answercache)."""
        return (self.generation, self.allows(client))

    def find_zone(self, qname: bytes) -> ServedZone | None:
        """The closest enclosing zone this view is authoritative for.

        Called for every query of the inside resolver, so it looks up only
        the suffixes as long as some origin, and walks the labels only to
        confirm that a matching suffix starts at a label boundary.
        """
        zones = self.zones
        key = canonical(qname)
        size = len(key)
        for length in self._origin_lengths:
            if length > size:
                continue
            zone = zones.get(key[size - length :])
            if zone is not None and _label_boundary(key, size - length):
                return zone
        return None

    def _parent_zone(self, zone: ServedZone) -> ServedZone | None:
        origin = canonical(zone.origin)
        if origin == b"\x00":
            return None
        return self.find_zone(origin[origin[0] + 1 :])

    def __call__(
        self, query: Message, client: tuple[str, int], transport: str, local: tuple[str, int]
    ) -> Message | None:
        if len(query.question) != 1:
            return error_response(query, RCode.FORMERR, udp_size=self.udp_size)
        question = query.question[0]
        if query.opcode == Opcode.NOTIFY:
            return self._notify(query, client[0])
        if not self.allows(client[0]):
            log.debug(
                "dns/{side}: query from {client} refused by allow_query",
                side=self.side,
                client=client[0],
            )
            return error_response(query, RCode.REFUSED, udp_size=self.udp_size)
        if question.qclass not in (CLASS_IN, CLASS_ANY):
            return error_response(query, RCode.REFUSED, udp_size=self.udp_size)
        if question.qtype in (RRType.AXFR, RRType.IXFR):
            return self._transfer(query, client[0], transport)
        zone = self.find_zone(question.name)
        if zone is None:
            return error_response(query, RCode.REFUSED, udp_size=self.udp_size)
        if question.qtype == _DS and canonical(zone.origin) == canonical(question.name):
            # DS belongs to the parent side of a cut: answer from the parent zone if we serve it
            # too (RFC 4035 3.1.4.1), as BIND does.
            parent = self._parent_zone(zone)
            if parent is not None:
                zone = parent
        result = zone.lookup(question.name, question.qtype)
        if self.minimal_any and question.qtype == RRType.ANY and result.answer:
            result = _minimal_any(result)
        return make_response(query, result, udp_size=self.udp_size)

    def _notify(self, query: Message, client: str) -> Message:
        """NOTIFY in (RFC 1996 3.7, 4.7): a secondary zone checks its masters; AA set in the reply.

        Only secondary zones take NOTIFY; who may send it is the zone's
        ``allow_notify`` (not ``allow_query``), as in BIND.
        """
        question = query.question[0]
        zone = self.zones.get(canonical(question.name))
        handler = getattr(zone, "notify", None)
        if zone is None or handler is None or question.qtype != RRType.SOA:
            return error_response(query, RCode.NOTAUTH, udp_size=self.udp_size)
        soa = next((rr for rr in query.answer if rr.rtype == RRType.SOA), None)
        rcode = handler(client, soa)
        if rcode != RCode.NOERROR:
            return error_response(query, rcode, udp_size=self.udp_size)
        return make_response(query, LookupResult(RCode.NOERROR, True), udp_size=self.udp_size)

    def _transfer(self, query: Message, client: str, transport: str) -> Message:
        """AXFR (and IXFR, answered with a full transfer, RFC 1995 4) over TCP to allowed clients only.

        IXFR over UDP gets the SOA alone, telling the client to come back over TCP (RFC 1995 2).
        """
        question = query.question[0]
        zone = self.zones.get(canonical(question.name))
        if transport != "tcp" and question.qtype != RRType.IXFR:
            return error_response(query, RCode.FORMERR, udp_size=self.udp_size)
        if zone is None:
            return error_response(query, RCode.NOTAUTH, udp_size=self.udp_size)
        if not getattr(zone, "serving", True):
            # A secondary zone not loaded yet or expired has nothing to give (BIND: SERVFAIL).
            return error_response(query, RCode.SERVFAIL, udp_size=self.udp_size)
        if not self.allow_transfer.get(canonical(question.name)) or not _allowed(
            client, self.allow_transfer[canonical(question.name)]
        ):
            log.info(
                "dns/{side}: zone transfer of {zone} to {client} refused",
                side=self.side,
                zone=_text(question.name),
                client=client,
            )
            return error_response(query, RCode.REFUSED, udp_size=self.udp_size)
        if transport != "tcp":
            # RFC 1995 2: IXFR over UDP that does not fit gets our SOA alone: "use TCP".
            return make_response(
                query, LookupResult(RCode.NOERROR, True, answer=(zone.soa,)), udp_size=self.udp_size
            )
        records = transfer_records(zone)
        log.info(
            "dns/{side}: zone transfer of {zone} to {client}: {count} records",
            side=self.side,
            zone=_text(question.name),
            client=client,
            count=len(records),
        )
        return make_response(
            query, LookupResult(RCode.NOERROR, True, answer=records), udp_size=self.udp_size
        )


def _minimal_any(result: LookupResult) -> LookupResult:
    """RFC 8482 4.1: answer ANY with one RRset of the name rather than all of them."""
    first = result.answer[0]
    keep = tuple(rr for rr in result.answer if rr.rtype == first.rtype and rr.name == first.name)
    return LookupResult(result.rcode, result.authoritative, keep, result.authority, ())


def _text(name: bytes) -> str:
    labels = []
    offset = 0
    while name[offset]:
        length = name[offset]
        labels.append(name[offset + 1 : offset + 1 + length].decode("ascii", "backslashreplace"))
        offset += length + 1
    return ".".join(labels) + "."
