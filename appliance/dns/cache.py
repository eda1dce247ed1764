"""The inside view's resolver cache: RRsets and negative answers with TTLs counted down.

Positive data is kept per RRset, keyed by (canonical owner, type, class), as
RFC 2181 5 treats the RRset as the unit; negative answers are cached per RFC
2308 5: NXDOMAIN per name (it covers every type), NODATA per name and type,
each with the zone's SOA and a lifetime of min(SOA TTL, SOA MINIMUM) capped by
``max_ncache_ttl`` (BIND's default, 10800 s).  A SERVFAIL is remembered for a
few seconds (RFC 2308 7.1, RFC 9520 3.2) so a broken name cannot make every
client query go upstream.  Every entry records the RFC 2181 5.4.1 rank of its
source: glue never replaces answer data, and answers to clients never come
from glue.  The cache never stores data outside the bailiwick the resolver
says the sending server speaks for, which is what defeats the classic
additional-section poisoning.

The hit path is one dictionary lookup; records are rebuilt with the remaining
TTL at most once per second per entry.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from appliance.dns import names
from appliance.dns.rr import CLASS_IN, ROOT, RR

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

__all__ = [
    "NODATA",
    "NXDOMAIN",
    "POSITIVE",
    "RANK_ANSWER",
    "RANK_AUTHORITY",
    "RANK_GLUE",
    "SERVFAIL",
    "CachedAnswer",
    "DNSCache",
    "negative_ttl",
]

#: Kinds of cache entry.
POSITIVE = 0
NODATA = 1
NXDOMAIN = 2
SERVFAIL = 3

#: Trust ranks (RFC 2181 5.4.1), lowest first: referral NS and additional-section addresses,
#: the authority section of an authoritative answer, the answer section.
RANK_GLUE = 1
RANK_AUTHORITY = 2
RANK_ANSWER = 3

#: Key type used for a name's NXDOMAIN entry; no wire type is negative.
_NX_TYPE = -1

_T_SOA = 6


class CachedAnswer(NamedTuple):
    """What the cache holds for a question.

    ``records`` is the RRset (POSITIVE), or the SOA (NODATA, NXDOMAIN) with
    the remaining TTL, or empty (SERVFAIL).  ``rank`` is the trust rank.
    """

    kind: int
    records: tuple[RR, ...]
    rank: int


class _Entry:
    """One cached RRset or negative answer; ``memo`` is the answer last built, at ``memo_ttl``."""

    __slots__ = ("expires", "kind", "memo", "memo_ttl", "rank", "records")

    def __init__(self, expires: float, kind: int, records: tuple[RR, ...], rank: int) -> None:
        self.expires = expires
        self.kind = kind
        self.records = records
        self.rank = rank
        self.memo_ttl = -1
        self.memo: CachedAnswer | None = None


def negative_ttl(soa: RR) -> int:
    """RFC 2308 5: a negative answer lives min(SOA TTL, SOA MINIMUM) seconds."""
    if soa.rtype != _T_SOA or len(soa.rdata) < 22:
        return 0
    minimum = int.from_bytes(soa.rdata[-4:], "big")
    return min(_ttl(soa.ttl), _ttl(minimum))


def _ttl(value: int) -> int:
    """RFC 2181 8: a TTL with the top bit set is treated as zero."""
    return 0 if value >= 0x80000000 else value


class DNSCache:
    """A bounded RRset and negative-answer cache whose clock is an injected ``IReactorTime``.

    ``max_entries`` bounds the number of entries (RRsets plus negative
    entries); past it the least recently used go first.  ``max_ttl`` caps
    positive TTLs, ``max_ncache_ttl`` negative ones, ``servfail_ttl`` is how
    long a SERVFAIL is remembered (0 disables that).
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_entries: int = 100_000,
        max_ttl: int = 86400,
        max_ncache_ttl: int = 10800,
        servfail_ttl: int = 5,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        # zope interfaces as attribute types confuse mypy; the calls are IReactorTime's.
        self._clock: Any = clock
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.max_ncache_ttl = max_ncache_ttl
        self.servfail_ttl = servfail_ttl
        self._data: OrderedDict[tuple[bytes, int, int], _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    # -- reading --

    def get(
        self, name: bytes, rtype: int, rclass: int = CLASS_IN, min_rank: int = RANK_GLUE
    ) -> CachedAnswer | None:
        """The live entry for (name, type, class), else the name's NXDOMAIN, else None.

        Entries ranked below ``min_rank`` count as absent (answers to clients
        pass RANK_AUTHORITY so glue is never served as an answer).
        """
        data = self._data
        key = (name.lower(), rtype, rclass)
        entry = data.get(key)
        if entry is None or entry.rank < min_rank:
            key = (key[0], _NX_TYPE, rclass)
            entry = data.get(key)
            if entry is None or entry.rank < min_rank:
                self.misses += 1
                return None
        remaining = entry.expires - self._clock.seconds()
        if remaining <= 0:
            del data[key]
            self.misses += 1
            return None
        data.move_to_end(key)
        self.hits += 1
        ttl = int(remaining)
        if ttl == entry.memo_ttl:
            return entry.memo
        answer = CachedAnswer(
            entry.kind, tuple([RR(r[0], r[1], r[2], ttl, r[4]) for r in entry.records]), entry.rank
        )
        entry.memo_ttl = ttl
        entry.memo = answer
        return answer

    # -- writing --

    def put_rrset(
        self, records: Sequence[RR], rank: int = RANK_ANSWER, bailiwick: bytes = ROOT
    ) -> bool:
        """Cache one RRset (all records share owner, type and class); return whether it was kept.

        Refused: an owner outside ``bailiwick``, a TTL of 0, records that are
        not one RRset, and anything ranked below a live entry it would replace.
        The TTL is the smallest in the set (RFC 2181 5.2), capped at ``max_ttl``.
        """
        if not records:
            return False
        first = records[0]
        owner = first.name.lower()
        for rr in records:
            if rr.rtype != first.rtype or rr.rclass != first.rclass or rr.name.lower() != owner:
                raise ValueError("records do not form one RRset")
        if not names.is_subdomain(owner, bailiwick):
            return False
        ttl = min(_ttl(min(rr.ttl for rr in records)), self.max_ttl)
        if ttl <= 0:
            return False
        stored = self._store(
            (owner, first.rtype, first.rclass), ttl, POSITIVE, tuple(records), rank
        )
        if stored:
            self._data.pop((owner, _NX_TYPE, first.rclass), None)
        return stored

    def put_negative(
        self,
        name: bytes,
        rtype: int,
        rclass: int,
        nxdomain: bool,
        soa: RR,
        bailiwick: bytes = ROOT,
        rank: int = RANK_AUTHORITY,
    ) -> bool:
        """Cache NXDOMAIN for ``name`` (any type) or NODATA for (name, type); return whether kept.

        ``soa`` is the SOA from the authority section: it must own a zone that
        encloses ``name`` and lies within ``bailiwick`` (RFC 2308 2.1, 5).
        """
        if soa.rtype != _T_SOA:
            return False
        zone = soa.name.lower()
        if not names.is_subdomain(zone, bailiwick) or not names.is_subdomain(name, zone):
            return False
        ttl = min(negative_ttl(soa), self.max_ncache_ttl)
        if ttl <= 0:
            return False
        key = (name.lower(), _NX_TYPE if nxdomain else rtype, rclass)
        return self._store(key, ttl, NXDOMAIN if nxdomain else NODATA, (soa,), rank)

    def put_servfail(self, name: bytes, rtype: int, rclass: int = CLASS_IN) -> bool:
        """Remember for ``servfail_ttl`` seconds that (name, type) could not be resolved."""
        if self.servfail_ttl <= 0:
            return False
        key = (name.lower(), rtype, rclass)
        return self._store(key, self.servfail_ttl, SERVFAIL, (), RANK_AUTHORITY)

    def _store(
        self, key: tuple[bytes, int, int], ttl: int, kind: int, records: tuple[RR, ...], rank: int
    ) -> bool:
        data = self._data
        now = self._clock.seconds()
        old = data.get(key)
        if old is not None:
            if old.expires > now and old.rank > rank and old.kind != SERVFAIL:
                return False
            del data[key]
        elif len(data) >= self.max_entries:
            data.popitem(last=False)
            self.evictions += 1
        data[key] = _Entry(now + ttl, kind, records, rank)
        return True

    # -- maintenance --

    def flush(self, name: bytes | None = None) -> int:
        """Drop everything, or every entry at or below ``name``; return how many went."""
        if name is None:
            count = len(self._data)
            self._data.clear()
            return count
        doomed = [key for key in self._data if names.is_subdomain(key[0], name)]
        for key in doomed:
            del self._data[key]
        return len(doomed)

    def expire(self) -> int:
        """Drop every entry whose TTL has run out; return how many went."""
        now = self._clock.seconds()
        doomed = [key for key, entry in self._data.items() if entry.expires <= now]
        for key in doomed:
            del self._data[key]
        return len(doomed)
