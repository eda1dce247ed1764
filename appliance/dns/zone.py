"""An authoritative zone in memory and the lookup algorithm that answers from it.

``Zone.lookup`` follows RFC 1034 4.3.2 as BIND 9.18 applies it to an
authoritative-only server (checked against a live named and the Ferret
corpus): zone cuts give referrals (AA off, NS in authority, glue in
additional); DNAME rewrites names below its owner (RFC 6672 3.3, synthesised
CNAME with the DNAME's TTL, YXDOMAIN when the result is too long); CNAME
chains are followed inside the zone, at most 12 CNAMEs, and a loop or a longer
chain gives SERVFAIL with the chain so far; wildcards synthesise records where
no name exists (RFC 4592; empty non-terminals block them, an empty wildcard
gives NODATA); negative answers carry the SOA with TTL min(SOA TTL, MINIMUM)
(RFC 2308 3; TTL 0 for an SOA query that ends in NXDOMAIN); positive answers
carry the apex NS in authority; authoritative A/AAAA for NS, MX and SRV
targets go in the additional section (none for ANY).  Data is indexed by
canonical (lower-case) wire name in plain dictionaries so lookups allocate
little.

``LookupResult.extra`` may say why a chain stopped: ``chain_out`` (the name
the chain left the zone at, for a view that serves the next zone), ``loop`` or
``chain_limit``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from appliance.dns import names, rdata, zonefile
from appliance.dns.rr import CLASS_IN, RR, LookupResult, RCode, canonical

__all__ = ["Zone", "ZoneSet", "load_zone"]

# Lookups per query: BIND 9.18 follows at most 11 restarts (12 CNAMEs), then SERVFAIL.
MAX_CHAIN = 12
_T_NS = 2
_T_CNAME = 5
_T_SOA = 6
_T_MX = 15
_T_SRV = 33
_T_DNAME = 39
_T_DS = 43
_T_ANY = 255
_ADDR_TYPES = (1, 28)
YXDOMAIN = 6

RRSet = tuple[RR, ...]
_EMPTY: dict[int, RRSet] = {}


class Zone:
    """One zone's data: ``origin`` (wire name), RRsets by canonical owner, SOA and serial.

    ``records`` come from the zone-file loader or a zone transfer; records
    outside the origin are ignored (RFC 1035 4.3.2 step 2 never reaches them).
    """

    def __init__(self, origin: bytes, records: Iterable[RR], warnings: Iterable[str] = ()) -> None:
        self.origin = origin
        self.apex = canonical(origin)
        self.warnings = list(warnings)
        grouped: dict[bytes, dict[int, list[RR]]] = {}
        for rr in records:
            key = canonical(rr.name)
            if self._relative(key) is not None:
                grouped.setdefault(key, {}).setdefault(rr.rtype, []).append(rr)
        self._nodes: dict[bytes, dict[int, RRSet]] = {
            k: {t: tuple(v) for t, v in types.items()} for k, types in grouped.items()
        }
        # Every name that exists, empty non-terminals included (RFC 4592 2.2.2).
        self._names: set[bytes] = set()
        # Names below the apex where the walk down must stop: delegations and DNAME owners.
        self._special: dict[bytes, int] = {}
        for key, types in self._nodes.items():
            n = key
            while n not in self._names:
                self._names.add(n)
                if n == self.apex or n == b"\x00":
                    break
                n = names.parent(n)
            if _T_NS in types and key != self.apex:
                self._special[key] = _T_NS
            elif _T_DNAME in types:
                self._special[key] = _T_DNAME
        apex = self._nodes.get(self.apex, {})
        soa = apex.get(_T_SOA)
        if not soa:
            raise ValueError(f"zone {names.to_text(origin)} has no SOA record")
        self.soa: RR = soa[0]
        self.apex_ns: RRSet = apex.get(_T_NS, ())
        minimum = int.from_bytes(self.soa.rdata[-4:], "big")
        # Additional-section addresses per target name as written (the zone never changes).
        self._addr_cache: dict[bytes, RRSet] = {}
        self._neg_soa = RR(
            self.soa.name, _T_SOA, self.soa.rclass, min(self.soa.ttl, minimum), self.soa.rdata
        )
        self._nx_soa_zero = self._neg_soa._replace(ttl=0)

    @property
    def serial(self) -> int:
        """The SOA serial (RFC 1035 3.3.13)."""
        return int.from_bytes(self.soa.rdata[-20:-16], "big")

    def __len__(self) -> int:
        return sum(len(s) for types in self._nodes.values() for s in types.values())

    def __iter__(self) -> Iterator[RR]:
        """Every RR in DNSSEC canonical order (RFC 4034 6.1), SOA first at the apex."""
        for key in sorted(self._nodes, key=_canonical_key):
            types = self._nodes[key]
            for t in sorted(types, key=lambda t: (t != _T_SOA, t)):
                yield from types[t]

    def rrset(self, name: bytes, rtype: int) -> RRSet:
        """The RRset stored at exactly ``name`` (no wildcard, cut or CNAME processing)."""
        node = self._nodes.get(canonical(name))
        return node.get(rtype, ()) if node else ()

    def contains(self, name: bytes) -> bool:
        """True if ``name`` is at or below this zone's origin."""
        return names.is_subdomain(name, self.apex)

    # -- lookup --

    def lookup(self, qname: bytes, qtype: int) -> LookupResult:
        """Answer one question from this zone (see the module docstring for the rules)."""
        answer: list[RR] = []
        cur = qname
        seen: set[bytes] = set()
        rcode = RCode.NOERROR
        for _ in range(MAX_CHAIN):
            ckey = canonical(cur)
            if ckey in seen:
                # A CNAME/DNAME loop: BIND 9.18 answers the chain so far with SERVFAIL.
                return LookupResult(RCode.SERVFAIL, True, tuple(answer), (), (), {"loop": cur})
            seen.add(ckey)
            rel = self._relative(ckey)
            if rel is None:
                if not answer:
                    return LookupResult(RCode.REFUSED, False)  # not a name of this zone
                # The chain left the zone: no authority data (as BIND); a view may go on from here.
                return LookupResult(rcode, True, tuple(answer), (), (), {"chain_out": cur})
            if self._special and rel:
                stop = self._find_special(ckey, rel, qtype)
                if stop is not None:
                    key, kind = stop
                    if kind == _T_NS:
                        return self._referral(answer, key)
                    # DNAME (RFC 6672 3.3): answer the DNAME and a CNAME to the rewritten name.
                    dname = self._nodes[key][_T_DNAME][0]
                    if dname not in answer:
                        answer.append(dname)
                    prefix_len = len(ckey) - len(key)
                    try:
                        target = names.concat(cur[:prefix_len], dname.rdata)
                    except names.NameSyntaxError:
                        return self._final(answer, YXDOMAIN, ())
                    answer.append(RR(cur, _T_CNAME, dname.rclass, dname.ttl, target))
                    if qtype == _T_CNAME:
                        return self._final(answer, rcode, None)  # the CNAME is the answer
                    if qtype == _T_ANY:
                        return LookupResult(rcode, True, tuple(answer), self._auth_ns(answer))
                    cur = target
                    continue
            node = self._nodes.get(ckey)
            wildcard = False
            if node is None:
                if ckey in self._names:
                    return self._final(answer, rcode, (self._neg_soa,))  # empty non-terminal
                node = self._wildcard(ckey)
                if node is None:
                    # BIND sends the SOA with TTL 0 when an SOA query ends in NXDOMAIN.
                    soa = self._nx_soa_zero if qtype == _T_SOA else self._neg_soa
                    return self._final(answer, RCode.NXDOMAIN, (soa,))
                wildcard = True
            if qtype == _T_ANY and node:
                for each in node.values():
                    self._add(answer, each, cur, wildcard)
                # BIND does no additional processing for ANY.
                return LookupResult(rcode, True, tuple(answer), self._auth_ns(answer), ())
            rrset = node.get(qtype)
            if rrset:
                self._add(answer, rrset, cur, wildcard)
                if qtype == _T_DS and self._special.get(ckey) == _T_NS:
                    # DS is parent-side data at a cut: BIND adds neither NS nor addresses.
                    return LookupResult(rcode, True, tuple(answer))
                return self._final(answer, rcode, None)
            cname = node.get(_T_CNAME)
            if cname:
                self._add(answer, cname, cur, wildcard)
                cur = cname[0].rdata
                continue
            return self._final(answer, rcode, (self._neg_soa,))
        return LookupResult(RCode.SERVFAIL, True, tuple(answer), (), (), {"chain_limit": cur})

    def _find_special(self, ckey: bytes, rel: bytes, qtype: int) -> tuple[bytes, int] | None:
        """The highest delegation or DNAME on the way down from the apex to ``ckey``."""
        apex_dname = self._special.get(self.apex)
        if apex_dname == _T_DNAME:
            return self.apex, _T_DNAME
        offsets = names.label_offsets(rel + b"\x00")[:-1]
        for off in reversed(offsets):
            kind = self._special.get(ckey[off:])
            if kind is None:
                continue
            if off == 0:
                # At the owner itself: a DNAME does not apply, a cut does (except for DS).
                if kind == _T_NS and qtype != _T_DS:
                    return ckey, kind
                return None
            return ckey[off:], kind
        return None

    def _wildcard(self, ckey: bytes) -> dict[int, RRSet] | None:
        """The wildcard node at the closest encloser of a non-existent name (RFC 4592 3.3.1).

        A wildcard that exists only as an empty non-terminal still matches (giving NODATA).
        """
        encloser = names.parent(ckey)
        while encloser not in self._names:
            if encloser == self.apex or encloser == b"\x00":
                return None
            encloser = names.parent(encloser)
        wild = b"\x01*" + encloser
        if wild not in self._names:
            return None
        return self._nodes.get(wild, _EMPTY)

    @staticmethod
    def _add(answer: list[RR], rrset: RRSet, owner: bytes, force: bool) -> None:
        """Append an RRset with the owner spelt as asked (synthesised owner for wildcards)."""
        if not force and rrset[0].name == owner:
            answer.extend(rrset)
            return
        answer.extend(RR(owner, rr.rtype, rr.rclass, rr.ttl, rr.rdata) for rr in rrset)

    def _final(self, answer: list[RR], rcode: int, authority: RRSet | None) -> LookupResult:
        if authority is None:
            authority = self._auth_ns(answer)
        additional = self._additional(answer, authority)
        return LookupResult(rcode, True, tuple(answer), authority, additional)

    def _auth_ns(self, answer: list[RR]) -> RRSet:
        """The apex NS for the authority section, unless the answer already holds it."""
        for rr in answer:
            if rr.rtype == _T_NS and canonical(rr.name) == self.apex:
                return ()
        return self.apex_ns

    def _referral(self, answer: list[RR], cut: bytes) -> LookupResult:
        ns = self._nodes[cut][_T_NS]
        # Glue only: addresses held at or below a zone cut, not authoritative data (as BIND).
        out: list[RR] = []
        done: set[bytes] = set()
        for rr in ns:
            key = canonical(rr.rdata)
            if key not in done and self._occluded(key):
                done.add(key)
                node = self._nodes.get(key)
                if node:
                    for t in _ADDR_TYPES:
                        out.extend(node.get(t, ()))
        additional = tuple(out)
        return LookupResult(RCode.NOERROR, bool(answer), tuple(answer), ns, additional)

    def _occluded(self, key: bytes) -> bool:
        """True if ``key`` is at or below a zone cut (glue) or below a DNAME (RFC 6672 2.3)."""
        if not self._special:
            return False
        rel = self._relative(key)
        if not rel:
            return False
        for off in names.label_offsets(rel + b"\x00")[:-1]:
            kind = self._special.get(key[off:])
            if kind == _T_NS or (kind == _T_DNAME and off):
                return True
        return False

    def _additional(self, answer: list[RR], authority: RRSet) -> tuple[RR, ...]:
        """A/AAAA for NS, MX and SRV targets held in this zone (RFC 1034 3.7, RFC 2782)."""
        out: list[RR] = []
        done: set[bytes] = set()
        for rr in answer:
            if rr.rtype == _T_NS or rr.rtype == _T_MX or rr.rtype == _T_SRV:
                self._addresses(_target(rr), out, done, answer)
        for rr in authority:
            if rr.rtype == _T_NS:
                self._addresses(rr.rdata, out, done, answer)
        return tuple(out)

    def _addresses(self, target: bytes, out: list[RR], done: set[bytes], answer: list[RR]) -> None:
        """Add the target's addresses unless already present (in ``done`` or the answer)."""
        key = canonical(target)
        if key in done:
            return
        done.add(key)
        found = self._addr_cache.get(target)
        if found is None:
            found = self._addr_cache[target] = self._find_addresses(target, key)
        # The answer may carry the same RRset under the question's spelling (RFC 4343).
        answered = {rr.rtype for rr in answer if canonical(rr.name) == key}
        for rr in found:
            if rr.rtype not in answered:
                out.append(rr)

    def _find_addresses(self, target: bytes, key: bytes) -> RRSet:
        """Authoritative A/AAAA of one target (wildcards apply, glue does not), as BIND adds them."""
        if self._relative(key) is None or self._occluded(key):
            return ()
        node = self._nodes.get(key)
        wildcard = False
        if node is None:
            if key in self._names:
                return ()
            node = self._wildcard(key)
            if not node:
                return ()
            wildcard = True
        found: list[RR] = []
        for t in _ADDR_TYPES:
            rrset = node.get(t)
            if rrset:
                self._add(found, rrset, target, wildcard)
        return tuple(found)

    def _relative(self, ckey: bytes) -> bytes | None:
        """The labels of canonical ``ckey`` above the apex, or None if not in this zone."""
        apex = self.apex
        if not ckey.endswith(apex):
            return None
        cut = len(ckey) - len(apex)
        i = 0
        while i < cut:
            i += ckey[i] + 1
        return ckey[:cut] if i == cut else None


def _target(rr: RR) -> bytes:
    if rr.rtype == _T_MX:
        return rr.rdata[2:]
    if rr.rtype == _T_SRV:
        return rr.rdata[6:]
    return rr.rdata


def _canonical_key(name: bytes) -> list[bytes]:
    return list(reversed(names.labels(name)))


def load_zone(
    path: str, origin: bytes | str, rclass: int = CLASS_IN, check_names: str = "fail"
) -> Zone:
    """Parse a master file with BIND's rules and build the Zone (raises zonefile.ZoneFileError)."""
    if isinstance(origin, str):
        origin = names.from_text(origin if origin.endswith(".") else origin + ".")
    loaded = zonefile.load(path, origin, rclass, check_names)
    return Zone(origin, loaded.records, loaded.warnings)


class ZoneSet:
    """The zones of one view, found by closest enclosing origin (RFC 1034 4.3.2 step 2)."""

    def __init__(self, zones: Iterable[Zone] = ()) -> None:
        self._zones: dict[bytes, Zone] = {}
        for z in zones:
            self.add(z)

    def add(self, zone: Zone) -> None:
        """Add or replace the zone with this origin."""
        self._zones[zone.apex] = zone

    def remove(self, origin: bytes) -> None:
        """Forget the zone with this origin, if present."""
        self._zones.pop(canonical(origin), None)

    def get(self, origin: bytes) -> Zone | None:
        """The zone whose origin is exactly ``origin``."""
        return self._zones.get(canonical(origin))

    def __iter__(self) -> Iterator[Zone]:
        return iter(list(self._zones.values()))

    def __len__(self) -> int:
        return len(self._zones)

    def find(self, qname: bytes) -> Zone | None:
        """The zone with the longest origin that encloses ``qname``, or None."""
        key = canonical(qname)
        zones = self._zones
        while True:
            z = zones.get(key)
            if z is not None:
                return z
            if key == b"\x00":
                return None
            key = key[key[0] + 1 :]


def rr_text(rr: RR) -> str:
    """One RR in presentation form, for logs and tests."""
    return (
        f"{names.to_text(rr.name)} {rr.ttl} {rdata.class_to_text(rr.rclass)} "
        f"{rdata.type_to_text(rr.rtype)} {rdata.to_text(rr.rtype, rr.rdata)}"
    )
