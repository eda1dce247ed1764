"""The inside view's recursive resolver: cache, then forwarders, then iteration from root hints.

Forwarding (D-3) sends RD=1 to each forwarder in turn; in forward-only mode a
dead forwarder set means SERVFAIL within ``timeout`` and nothing goes
anywhere else (BIND's ``forward only``); otherwise ("forward first") the
resolver falls back to iteration.  Iteration (RFC 1034 5.3.3) starts at the
closest delegation in the cache, or the root hints, sends RD=0, follows
referrals downwards only, fetches missing glue addresses (bounded), follows
CNAME chains across zones (bounded, RFC 1034 3.6.2) and tries the next server
on a timeout or a lame answer.

Every response is read against the bailiwick of the server that sent it: the
zone it was asked as a delegated server for (the root for a forwarder).
Records outside that zone are neither cached nor used, glue is taken only for
the referral's own NS targets, and nothing from the additional section of an
answer is believed, which defeats Kaminsky-style poisoning through extra
records (RFC 5452 6, RFC 2181 5.4.1).  Every resolution has a deadline and a
budget of upstream queries, so no answer, however hostile, makes it loop.

`MailResolverAdapter` puts this resolver behind the mail code's
`MailResolver` contract (appliance.dns.lookup), asking the inside view's own
zones first so internal names never take a network hop (R-1 mapping:
NXDOMAIN is NoSuchDomain, everything else that is not an answer is a
TemporaryFailure).
"""

from __future__ import annotations

import ipaddress
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.dns import names
from appliance.dns.cache import (
    NODATA,
    NXDOMAIN,
    POSITIVE,
    RANK_ANSWER,
    RANK_AUTHORITY,
    RANK_GLUE,
    SERVFAIL,
    CachedAnswer,
    DNSCache,
)
from appliance.dns.client import DNSQueryError
from appliance.dns.lookup import NoSuchDomain, TemporaryFailure
from appliance.dns.rr import CLASS_IN, ROOT, RR, LookupResult, RCode
from appliance.dns.wire import Message

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

__all__ = [
    "MailResolverAdapter",
    "QueryClient",
    "Resolver",
    "load_root_hints",
]

log = Logger(namespace="appliance.dns.resolver")

_T_A = 1
_T_NS = 2
_T_CNAME = 5
_T_SOA = 6
_T_PTR = 12
_T_MX = 15
_T_TXT = 16
_T_AAAA = 28
_T_OPT = 41
_T_ANY = 255

#: How deep glue fetches may nest (resolving an NS name to reach another zone, and so on).
MAX_DEPTH = 4
#: CNAME links the mail adapter follows from one local zone to another.
MAX_LOCAL_CHAIN = 8
#: NS names without addresses looked up per zone.
MAX_GLUE_FETCHES = 3
#: A server that failed is asked last for this long (a crude stand-in for BIND's SRTT).
PENALTY_SECONDS = 60.0
_PENALTY_MAX = 4096

Server = tuple[str, int]
#: Where iteration starts: (zone, its NS names, known addresses per NS name).
_Start = tuple[bytes, list[bytes], dict[bytes, list[Server]]]


class QueryClient(Protocol):
    """What the resolver needs of `appliance.dns.client.DNSClient`."""

    def query(
        self,
        server: tuple[str, int],
        qname: bytes,
        qtype: int,
        qclass: int = CLASS_IN,
        *,
        rd: bool = False,
        timeout: float = 2.0,
    ) -> defer.Deferred[Message]: ...


class _Step:
    """What one response (or the cache) said about a name: a final kind, or where to go next."""

    __slots__ = ("authority", "chain", "glue", "kind", "next", "ns", "zone")

    def __init__(
        self,
        kind: str,
        chain: list[RR] | None = None,
        authority: tuple[RR, ...] = (),
        next: bytes = ROOT,
    ) -> None:
        self.kind = kind  # answer | nodata | nxdomain | cname | referral | fail
        self.chain: list[RR] = chain or []
        self.authority = authority
        self.next = next
        self.zone = ROOT
        self.ns: list[bytes] = []
        self.glue: dict[bytes, list[Server]] = {}


class _Budget:
    """One client question's allowance: a deadline and a number of upstream queries."""

    __slots__ = ("deadline", "pending", "queries")

    def __init__(self, deadline: float, queries: int) -> None:
        self.deadline = deadline
        self.queries = queries
        # NS names whose addresses are being looked up: asking again would go round in circles.
        self.pending: set[bytes] = set()


class _Hint(NamedTuple):
    name: bytes
    server: Server


def load_root_hints(
    path: str | os.PathLike[str], port: int = 53
) -> tuple[tuple[bytes, str, int], ...]:
    """Read a root hints file in BIND ``named.root`` format: (NS name, address, port) per address.

    Only the NS records of the root and the A/AAAA records of their targets
    matter; anything else is ignored.  Raise ValueError naming the line for a
    malformed file, or when it yields no address.
    """
    ns_names: set[bytes] = set()
    addresses: list[tuple[bytes, str]] = []
    with open(path, encoding="ascii", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            tokens = line.split(";", 1)[0].split()
            if not tokens:
                continue
            upper = [t.upper() for t in tokens]
            kind = next((t for t in upper[1:] if t in ("NS", "A", "AAAA")), None)
            if kind is None:
                continue
            try:
                owner = names.from_text(tokens[0] if tokens[0].endswith(".") else tokens[0] + ".")
                if kind == "NS":
                    if owner == ROOT:
                        ns_names.add(names.from_text(_absolute(tokens[-1])).lower())
                else:
                    address = ipaddress.ip_address(tokens[-1])
                    if (address.version == 4) != (kind == "A"):
                        raise ValueError(f"{tokens[-1]} is not an {kind} address")
                    addresses.append((owner.lower(), address.compressed))
            except ValueError as exc:
                raise ValueError(f"{os.fspath(path)}:{number}: {exc}") from None
    hints = tuple((owner, address, port) for owner, address in addresses if owner in ns_names)
    if not hints:
        raise ValueError(f"{os.fspath(path)}: no root server addresses")
    return hints


def _absolute(text: str) -> str:
    return text if text.endswith(".") else text + "."


def _wire_name(name: bytes | str) -> bytes:
    if isinstance(name, bytes):
        names.validate_wire(name)
        return name
    return names.from_text(_absolute(name))


class Resolver:
    """Resolves questions for the inside view (see the module docstring).

    ``forwarders`` are (address, port) pairs; ``root_hints`` is a tuple of
    (NS name, address, port) or the path of a ``named.root`` file.
    ``timeout`` bounds a whole resolution, ``query_timeout`` each packet;
    ``max_referrals`` bounds the referrals followed per name, ``max_cname``
    the CNAME links, ``max_queries`` the upstream queries per resolution.
    ``server_port`` is the port of servers learned from referrals (53; tests
    use another).  Only IPv4 servers are asked unless ``use_ipv6``.  ``rng``
    orders a zone's servers (tests pass one that keeps the given order).
    A server that failed is tried last for PENALTY_SECONDS.  ``stats``
    counts resolutions, upstream queries and failures, SERVFAILs.

    ``local_zones`` is the inside view's ``find_zone``: a CNAME chain that
    enters one of the view's own zones is completed from the zone, never from
    upstream data (split horizon), and a delegation below such a zone is
    followed to its internal servers.  ``max_recursions`` bounds the distinct
    resolutions in flight (BIND's ``recursive-clients``); past it, SERVFAIL.
    """

    def __init__(
        self,
        cache: DNSCache,
        client: QueryClient,
        clock: IReactorTime,
        forwarders: Sequence[Server] = (),
        forward_only: bool = False,
        root_hints: Sequence[tuple[bytes | str, str, int]] | str | os.PathLike[str] = (),
        *,
        timeout: float = 10.0,
        query_timeout: float = 2.0,
        max_referrals: int = 16,
        max_cname: int = 8,
        max_queries: int = 48,
        server_port: int = 53,
        use_ipv6: bool = False,
        rng: random.Random | None = None,
        local_zones: Callable[[bytes], Any] | None = None,
        max_recursions: int = 500,
    ) -> None:
        self.cache = cache
        self.client = client
        # zope interfaces as attribute types confuse mypy; the calls are IReactorTime's.
        self.clock: Any = clock
        self.forwarders: tuple[Server, ...] = tuple((str(a), int(p)) for a, p in forwarders)
        self.forward_only = forward_only
        if isinstance(root_hints, (str, os.PathLike)):
            root_hints = load_root_hints(root_hints, server_port)
        self.hints = tuple(
            _Hint(_wire_name(nm).lower(), (str(a), int(p))) for nm, a, p in root_hints
        )
        self.timeout = timeout
        self.query_timeout = query_timeout
        self.max_referrals = max_referrals
        self.max_cname = max_cname
        self.max_queries = max_queries
        self.server_port = server_port
        self.use_ipv6 = use_ipv6
        self.rng = rng if rng is not None else random.Random()
        self.local_zones = local_zones
        self.max_recursions = max_recursions
        self.stats: Counter[str] = Counter()
        self._penalty: dict[Server, float] = {}
        self._inflight: dict[tuple[bytes, int, int], list[defer.Deferred[LookupResult]]] = {}

    # -- public API --

    def cached_hit(self, qname: bytes, qtype: int, qclass: int = CLASS_IN) -> CachedAnswer | None:
        """The cache entry answering (qname, qtype) directly, TTLs counted down; the hot path.

        Positive, NODATA, NXDOMAIN or SERVFAIL alike; None means look further
        (a CNAME chain, or the network).
        """
        return self.cache.get(qname, qtype, qclass, RANK_AUTHORITY)

    def cached(self, qname: bytes, qtype: int, qclass: int = CLASS_IN) -> LookupResult | None:
        """The answer if the cache alone can give it (CNAME chains included), else None."""
        cache = self.cache
        hit = cache.get(qname, qtype, qclass, RANK_AUTHORITY)
        if hit is not None and hit.kind == POSITIVE:
            return LookupResult(RCode.NOERROR, False, hit.records)
        if qtype == _T_ANY:
            return None
        chain: list[RR] = []
        name = qname
        for _ in range(self.max_cname + 1):
            if hit is not None:
                return _final_from_cache(hit.kind, chain, hit.records)
            if qtype == _T_CNAME:
                return None
            link = cache.get(name, _T_CNAME, qclass, RANK_AUTHORITY)
            if link is None or link.kind != POSITIVE:
                return None
            chain.extend(link.records)
            name = link.records[0].rdata
            hit = cache.get(name, qtype, qclass, RANK_AUTHORITY)
        return None

    def resolve(
        self,
        qname: bytes,
        qtype: int,
        qclass: int = CLASS_IN,
        delegation: LookupResult | None = None,
    ) -> defer.Deferred[LookupResult]:
        """Resolve one question; the Deferred always fires with a result, SERVFAIL on failure.

        ``delegation`` is a referral from one of the view's own zones (NS in
        authority, glue in additional): the question is then asked of those
        servers directly, never of forwarders or the root, since an internal
        delegation is known nowhere else.
        """
        found = self.cached(qname, qtype, qclass)
        if found is not None:
            return defer.succeed(found)
        key = (qname.lower(), qtype, qclass)
        waiting = self._inflight.get(key)
        d: defer.Deferred[LookupResult] = defer.Deferred()
        if waiting is not None:
            waiting.append(d)
            return d
        if len(self._inflight) >= self.max_recursions:
            # BIND's recursive-clients: past the limit, fail fast rather than pile up sockets.
            self.stats["overload"] += 1
            return defer.succeed(LookupResult(RCode.SERVFAIL, False))
        self._inflight[key] = [d]
        start = self._delegation(delegation) if delegation is not None else None
        work = defer.ensureDeferred(self._top(qname, qtype, qclass, start))
        work.addBoth(self._deliver, key)
        return d

    def _deliver(self, result: LookupResult | Failure, key: tuple[bytes, int, int]) -> None:
        if isinstance(result, Failure):
            log.failure("resolver failed", result)
            result = LookupResult(RCode.SERVFAIL, False)
        for d in self._inflight.pop(key, []):
            d.callback(result)

    def _delegation(self, referral: LookupResult) -> _Start | None:
        """(zone, NS names, glue) from a local zone's referral, or None if it is not one."""
        ns_rrs = [rr for rr in referral.authority if rr.rtype == _T_NS]
        if not ns_rrs:
            return None
        zone = ns_rrs[0].name.lower()
        ns = [rr.rdata for rr in ns_rrs if rr.name.lower() == zone]
        targets = {t.lower() for t in ns}
        glue: dict[bytes, list[Server]] = {}
        types = (_T_A, _T_AAAA) if self.use_ipv6 else (_T_A,)
        for rr in referral.additional:
            if rr.rtype in types and rr.name.lower() in targets:
                glue.setdefault(rr.name.lower(), []).append((_address(rr), self.server_port))
        return zone, ns, glue

    async def _top(
        self, qname: bytes, qtype: int, qclass: int, start: _Start | None = None
    ) -> LookupResult:
        if qtype == _T_OPT or 128 <= qtype <= 254:
            return LookupResult(RCode.NOTIMP, False)
        budget = _Budget(self.clock.seconds() + self.timeout, self.max_queries)
        self.stats["resolutions"] += 1
        result = await self._resolve(qname, qtype, qclass, budget, 0, start)
        if result.rcode == RCode.SERVFAIL:
            self.stats["servfail"] += 1
            self.cache.put_servfail(qname, qtype, qclass)
        return result

    # -- resolution --

    async def _resolve(
        self,
        qname: bytes,
        qtype: int,
        qclass: int,
        budget: _Budget,
        depth: int,
        start: _Start | None = None,
    ) -> LookupResult:
        """Follow the chain from ``qname``: cache first, then the network, one link at a time."""
        chain: list[RR] = []
        name = qname
        seen: set[bytes] = set()
        for _ in range(self.max_cname + 1):
            key = name.lower()
            if key in seen:
                break  # a CNAME loop
            seen.add(key)
            step = self._local(name, qtype) if self.local_zones is not None else None
            if step is not None and step.kind == "delegate":
                local_start = (step.zone, step.ns, step.glue)
                step = self._from_cache(name, qtype, qclass)
                if step is None:
                    step = await self._iterate(name, qtype, qclass, budget, depth, local_start)
            elif step is None:
                step = self._from_cache(name, qtype, qclass)
                if step is None and start is not None and name == qname:
                    step = await self._iterate(name, qtype, qclass, budget, depth, start)
                elif step is None:
                    step = await self._fetch(name, qtype, qclass, budget, depth)
            chain.extend(step.chain)
            if sum(1 for rr in chain if rr.rtype == _T_CNAME) > self.max_cname:
                break  # RFC 1034 3.6.2: a chain this long is an error, not an answer
            if step.kind == "cname":
                name = step.next
                continue
            if step.kind == "answer":
                return LookupResult(RCode.NOERROR, False, tuple(chain))
            if step.kind == "nodata":
                return LookupResult(RCode.NOERROR, False, tuple(chain), step.authority)
            if step.kind == "nxdomain":
                return LookupResult(RCode.NXDOMAIN, False, tuple(chain), step.authority)
            return LookupResult(RCode.SERVFAIL, False)
        return LookupResult(RCode.SERVFAIL, False)

    def _local(self, name: bytes, qtype: int) -> _Step | None:
        """The view's own zones' answer for one link of a chain (split horizon: they win)."""
        assert self.local_zones is not None
        zone = self.local_zones(name)
        if zone is None:
            return None
        result: LookupResult = zone.lookup(name, qtype)
        if not result.authoritative and not result.answer and result.rcode == RCode.NOERROR:
            start = self._delegation(result)
            if start is None:
                return _Step("fail")
            step = _Step("delegate")
            step.zone, step.ns, step.glue = start
            return step
        chain = list(result.answer)
        chain_out = result.extra.get("chain_out")
        if isinstance(chain_out, bytes):
            return _Step("cname", chain, next=chain_out)
        if result.rcode == RCode.NXDOMAIN:
            return _Step("nxdomain", chain, result.authority)
        if result.rcode != RCode.NOERROR:
            return _Step("fail")
        if qtype in (_T_ANY, _T_CNAME):
            found = bool(chain)
        else:
            found = any(rr.rtype == qtype for rr in chain)
        if found:
            return _Step("answer", chain)
        return _Step("nodata", chain, result.authority)

    def _from_cache(self, name: bytes, qtype: int, qclass: int) -> _Step | None:
        if qtype == _T_ANY:
            return None
        hit = self.cache.get(name, qtype, qclass, RANK_AUTHORITY)
        if hit is None and qtype != _T_CNAME:
            link = self.cache.get(name, _T_CNAME, qclass, RANK_AUTHORITY)
            if link is not None and link.kind == POSITIVE:
                return _Step("cname", list(link.records), next=link.records[0].rdata)
        if hit is None:
            return None
        if hit.kind == POSITIVE:
            return _Step("answer", list(hit.records))
        if hit.kind == NODATA:
            return _Step("nodata", authority=hit.records)
        if hit.kind == NXDOMAIN:
            return _Step("nxdomain", authority=hit.records)
        return _Step("fail")

    async def _fetch(
        self, name: bytes, qtype: int, qclass: int, budget: _Budget, depth: int
    ) -> _Step:
        if self.forwarders:
            step = await self._forward(name, qtype, qclass, budget)
            if step is not None:
                return step
            if self.forward_only:
                self.stats["forward_failures"] += 1
                log.debug(
                    "dns resolver: no forwarder answered for {name}", name=names.to_text(name)
                )
                return _Step("fail")
        if not self.hints:
            return _Step("fail")
        return await self._iterate(name, qtype, qclass, budget, depth)

    async def _forward(self, name: bytes, qtype: int, qclass: int, budget: _Budget) -> _Step | None:
        """RD=1 to each forwarder in turn; the first usable answer wins (forwarders see everything)."""
        for server in self._by_health(self.forwarders):
            reply = await self._ask(server, name, qtype, qclass, True, budget)
            if reply is None or reply.rcode not in (RCode.NOERROR, RCode.NXDOMAIN):
                continue
            step = self._digest(name, qtype, qclass, reply, ROOT, forwarded=True)
            if step.kind in ("referral", "fail"):
                continue  # a forwarder that does not recurse
            return step
        return None

    async def _iterate(
        self,
        name: bytes,
        qtype: int,
        qclass: int,
        budget: _Budget,
        depth: int,
        start: _Start | None = None,
    ) -> _Step:
        """RFC 1034 5.3.3: from the closest known delegation down, following referrals."""
        zone, ns, glue = start if start is not None else self._closest(name)
        restarted = zone == ROOT or start is not None
        for _ in range(self.max_referrals):
            reply = await self._ask_zone(zone, ns, glue, name, qtype, qclass, budget, depth)
            if reply is None:
                if zone == ROOT or restarted:
                    return _Step("fail")
                # The cached delegation led nowhere (e.g. its glue expired): start from the hints.
                restarted = True
                zone, ns, glue = self._hints()
                continue
            step = self._digest(name, qtype, qclass, reply, zone)
            if step.kind != "referral":
                return step
            if step.chain:
                return _Step("cname", step.chain, next=step.next)
            zone, ns, glue = step.zone, step.ns, step.glue
        return _Step("fail")

    def _closest(self, name: bytes) -> tuple[bytes, list[bytes], dict[bytes, list[Server]]]:
        """The deepest zone enclosing ``name`` whose NS set is cached, else the root hints."""
        current = name
        while True:
            hit = self.cache.get(current, _T_NS)
            if hit is not None and hit.kind == POSITIVE:
                return current.lower(), [rr.rdata for rr in hit.records], {}
            if current == ROOT:
                break
            current = names.parent(current)
        return self._hints()

    def _hints(self) -> tuple[bytes, list[bytes], dict[bytes, list[Server]]]:
        glue: dict[bytes, list[Server]] = {}
        for hint in self.hints:
            if self.use_ipv6 or ":" not in hint.server[0]:
                glue.setdefault(hint.name, []).append(hint.server)
        return ROOT, list(glue), glue

    def _servers_for(
        self, ns: Iterable[bytes], glue: dict[bytes, list[Server]]
    ) -> tuple[list[Server], list[bytes]]:
        """Known addresses of the NS names (glue, then cache), and the names with none."""
        servers: list[Server] = []
        missing: list[bytes] = []
        types = (_T_A, _T_AAAA) if self.use_ipv6 else (_T_A,)
        for target in ns:
            key = target.lower()
            found = list(glue.get(key, ()))
            if not found:
                for rtype in types:
                    hit = self.cache.get(target, rtype)
                    if hit is not None and hit.kind == POSITIVE:
                        found.extend((_address(rr), self.server_port) for rr in hit.records)
            if found:
                servers.extend(s for s in found if s not in servers)
            else:
                missing.append(target)
        return servers, missing

    async def _ask_zone(
        self,
        zone: bytes,
        ns: list[bytes],
        glue: dict[bytes, list[Server]],
        name: bytes,
        qtype: int,
        qclass: int,
        budget: _Budget,
        depth: int,
    ) -> Message | None:
        """Ask the zone's servers in turn until one gives a usable reply; fetch missing glue if needed."""
        servers, missing = self._servers_for(ns, glue)
        self.rng.shuffle(servers)
        servers = self._by_health(servers)
        tried: set[Server] = set()
        for server in servers:
            tried.add(server)
            reply = await self._ask(server, name, qtype, qclass, False, budget)
            if reply is not None and _usable(reply, zone, name):
                return reply
        if depth >= MAX_DEPTH:
            return None
        fetched = 0
        for target in missing:
            # An in-zone NS name without glue could only be found through this very zone.
            key = target.lower()
            if (
                names.is_subdomain(target, zone)
                or key in budget.pending
                or fetched >= MAX_GLUE_FETCHES
            ):
                continue
            fetched += 1
            budget.pending.add(key)
            try:
                result = await self._resolve(target, _T_A, CLASS_IN, budget, depth + 1)
            finally:
                budget.pending.discard(key)
            for rr in result.answer:
                if rr.rtype != _T_A:
                    continue
                server = (_address(rr), self.server_port)
                if server in tried:
                    continue
                tried.add(server)
                reply = await self._ask(server, name, qtype, qclass, False, budget)
                if reply is not None and _usable(reply, zone, name):
                    return reply
        return None

    async def _ask(
        self, server: Server, name: bytes, qtype: int, qclass: int, rd: bool, budget: _Budget
    ) -> Message | None:
        """One upstream query within the budget; None on timeout or error."""
        remaining = budget.deadline - self.clock.seconds()
        if remaining <= 0 or budget.queries <= 0:
            return None
        budget.queries -= 1
        self.stats["upstream_queries"] += 1
        try:
            return await self.client.query(
                server, name, qtype, qclass, rd=rd, timeout=min(self.query_timeout, remaining)
            )
        except DNSQueryError as exc:
            log.debug("dns resolver: {server}: {error}", server=server, error=exc)
        except Exception:
            log.failure("dns resolver: query to {server} failed", server=server)
        self.stats["upstream_failures"] += 1
        if len(self._penalty) >= _PENALTY_MAX:
            self._penalty.clear()
        self._penalty[server] = self.clock.seconds() + PENALTY_SECONDS
        return None

    def _by_health(self, servers: Sequence[Server]) -> list[Server]:
        """``servers`` with those that failed in the last PENALTY_SECONDS moved to the end."""
        if not self._penalty:
            return list(servers)
        now = self.clock.seconds()
        penalty = self._penalty
        return sorted(servers, key=lambda server: penalty.get(server, 0.0) > now)

    # -- reading a response --

    def _digest(
        self,
        name: bytes,
        qtype: int,
        qclass: int,
        reply: Message,
        bailiwick: bytes,
        forwarded: bool = False,
    ) -> _Step:
        """Cache and interpret ``reply`` to (name, qtype), believing only data within ``bailiwick``."""
        cache = self.cache
        sets: dict[tuple[bytes, int], list[RR]] = {}
        for rr in reply.answer:
            if rr.rclass == qclass and names.is_subdomain(rr.name, bailiwick):
                sets.setdefault((rr.name.lower(), rr.rtype), []).append(rr)
        rank = RANK_ANSWER if (reply.aa or forwarded) else RANK_AUTHORITY
        chain: list[RR] = []
        current = name
        seen: set[bytes] = set()
        for _ in range(self.max_cname + 1):
            key = current.lower()
            if key in seen:
                break
            seen.add(key)
            if qtype == _T_ANY:
                found = [rr for (owner, _t), rrs in sets.items() if owner == key for rr in rrs]
                if found:
                    chain.extend(found)
                    return _Step("answer", chain)
            else:
                rrset = sets.get((key, qtype))
                if rrset:
                    cache.put_rrset(rrset, rank, bailiwick)
                    chain.extend(rrset)
                    return _Step("answer", chain)
            link = sets.get((key, _T_CNAME))
            if not link or qtype == _T_CNAME:
                break
            cache.put_rrset(link[:1], rank, bailiwick)
            chain.append(link[0])
            current = link[0].rdata
            if self.local_zones is not None and self.local_zones(current) is not None:
                # Into one of our own zones: the rest comes from the zone, not from upstream.
                return _Step("cname", chain, next=current)
        in_zone = names.is_subdomain(current, bailiwick)
        soa = next(
            (
                rr
                for rr in reply.authority
                if rr.rtype == _T_SOA
                and names.is_subdomain(rr.name, bailiwick)
                and names.is_subdomain(current, rr.name)
            ),
            None,
        )
        authority = (soa,) if soa is not None else ()
        if reply.rcode == RCode.NXDOMAIN:
            if not in_zone:
                return _Step("cname", chain, next=current)
            if soa is not None:
                cache.put_negative(current, qtype, qclass, True, soa, bailiwick)
            return _Step("nxdomain", chain, _negative_soa(authority))
        if reply.rcode != RCode.NOERROR:
            return _Step("fail")
        if soa is not None and in_zone:
            cache.put_negative(current, qtype, qclass, False, soa, bailiwick)
            return _Step("nodata", chain, _negative_soa(authority))
        referral = _referral(reply, bailiwick, current)
        if referral is not None:
            zone, ns_rrs = referral
            cache.put_rrset(ns_rrs, RANK_GLUE, bailiwick)
            step = _Step("referral", chain, next=current)
            step.zone = zone
            step.ns = [rr.rdata for rr in ns_rrs]
            targets = {t.lower() for t in step.ns}
            glue_sets: dict[tuple[bytes, int], list[RR]] = {}
            for rr in reply.additional:
                if (
                    rr.rtype in (_T_A, _T_AAAA)
                    and rr.rclass == CLASS_IN
                    and rr.name.lower() in targets
                    and names.is_subdomain(rr.name, bailiwick)
                ):
                    glue_sets.setdefault((rr.name.lower(), rr.rtype), []).append(rr)
            for (owner, rtype), rrs in glue_sets.items():
                cache.put_rrset(rrs, RANK_GLUE, bailiwick)
                if rtype == _T_A or self.use_ipv6:
                    step.glue.setdefault(owner, []).extend(
                        (_address(rr), self.server_port) for rr in rrs
                    )
            return step
        if chain:
            return _Step("cname", chain, next=current)
        if forwarded and not reply.ra:
            return _Step("fail")
        # NOERROR, no data, no SOA: an empty answer we cannot cache (RFC 2308 2.2 type 3).
        return _Step("nodata", chain)


def _final_from_cache(kind: int, chain: list[RR], records: tuple[RR, ...]) -> LookupResult:
    if kind == POSITIVE:
        return LookupResult(RCode.NOERROR, False, tuple(chain) + records)
    if kind == NODATA:
        return LookupResult(RCode.NOERROR, False, tuple(chain), records)
    if kind == NXDOMAIN:
        return LookupResult(RCode.NXDOMAIN, False, tuple(chain), records)
    assert kind == SERVFAIL
    return LookupResult(RCode.SERVFAIL, False)


def _negative_soa(authority: tuple[RR, ...]) -> tuple[RR, ...]:
    """The SOA as a negative answer carries it: TTL min(SOA TTL, MINIMUM) (RFC 2308 3)."""
    if not authority:
        return ()
    soa = authority[0]
    minimum = int.from_bytes(soa.rdata[-4:], "big") if len(soa.rdata) >= 22 else 0
    return (soa._replace(ttl=min(soa.ttl, minimum)),)


def _referral(reply: Message, bailiwick: bytes, name: bytes) -> tuple[bytes, list[RR]] | None:
    """(child zone, its NS RRs) if ``reply`` delegates ``name`` to a zone strictly below ``bailiwick``."""
    if reply.rcode != RCode.NOERROR:
        return None
    ns_rrs = [rr for rr in reply.authority if rr.rtype == _T_NS and rr.rclass == CLASS_IN]
    if not ns_rrs:
        return None
    zone = ns_rrs[0].name.lower()
    ns_rrs = [rr for rr in ns_rrs if rr.name.lower() == zone]
    if zone == bailiwick.lower() or not names.is_subdomain(zone, bailiwick):
        return None
    if not names.is_subdomain(name, zone):
        return None
    return zone, ns_rrs


def _usable(reply: Message, zone: bytes, name: bytes) -> bool:
    """Whether a server of ``zone`` answered ``name`` usefully (not lame, not an upward referral)."""
    if reply.rcode not in (RCode.NOERROR, RCode.NXDOMAIN):
        return False
    if reply.answer or reply.rcode == RCode.NXDOMAIN:
        return True
    if any(rr.rtype == _T_SOA for rr in reply.authority):
        return True
    if any(rr.rtype == _T_NS for rr in reply.authority):
        return _referral(reply, zone, name) is not None
    return reply.aa


def _address(rr: RR) -> str:
    return str(ipaddress.ip_address(rr.rdata))


# --------------------------------------------------------------------------- the mail side


class _Zone(Protocol):
    def lookup(self, qname: bytes, qtype: int) -> LookupResult: ...


class _View(Protocol):
    def find_zone(self, qname: bytes) -> Any: ...


class MailResolverAdapter:
    """`appliance.dns.lookup.MailResolver` on the inside view's zones, then the resolver.

    A name inside one of ``authoritative_view``'s zones is answered from the
    zone itself (no network hop); a CNAME leaving the zone or a delegation
    below it goes on through the resolver.  Results map per R-1: NXDOMAIN is
    `NoSuchDomain`, NOERROR without records is ``[]``, anything else (SERVFAIL,
    REFUSED, timeouts) is `TemporaryFailure`.
    """

    def __init__(self, resolver: Resolver, authoritative_view: _View | None = None) -> None:
        self.resolver = resolver
        self.view = authoritative_view

    # -- the contract --

    def mx(self, domain: str) -> defer.Deferred[list[tuple[int, str]]]:
        """(preference, exchange) pairs; a null MX (RFC 7505) is (0, "")."""
        return defer.ensureDeferred(self._mx(domain))

    async def _mx(self, domain: str) -> list[tuple[int, str]]:
        records = await self._records(domain, _T_MX)
        out: list[tuple[int, str]] = []
        for rr in records:
            if len(rr.rdata) < 3:
                raise TemporaryFailure(f"malformed MX record for {domain}")
            out.append((int.from_bytes(rr.rdata[:2], "big"), _text(rr.rdata[2:])))
        return out

    def addresses(self, host: str) -> defer.Deferred[list[str]]:
        """A then AAAA addresses; a temporary failure of one type is fatal only if the other is empty."""
        return defer.ensureDeferred(self._addresses(host))

    async def _addresses(self, host: str) -> list[str]:
        pending = [defer.ensureDeferred(self._records(host, t)) for t in (_T_A, _T_AAAA)]
        found: list[str] = []
        errors: list[Exception] = []
        for d in pending:
            try:
                found.extend(_address(rr) for rr in await d)
            except (NoSuchDomain, TemporaryFailure) as exc:
                errors.append(exc)
        if found:
            return found
        for problem in errors:
            if isinstance(problem, NoSuchDomain):
                raise problem
        if errors:
            raise errors[0]
        return []

    def txt(self, name: str) -> defer.Deferred[list[bytes]]:
        """Each TXT record's character-strings joined."""
        return defer.ensureDeferred(self._txt(name))

    async def _txt(self, name: str) -> list[bytes]:
        out: list[bytes] = []
        for rr in await self._records(name, _T_TXT):
            data = rr.rdata
            parts: list[bytes] = []
            offset = 0
            while offset < len(data):
                length = data[offset]
                parts.append(data[offset + 1 : offset + 1 + length])
                offset += 1 + length
            out.append(b"".join(parts))
        return out

    def ptr(self, address: str) -> defer.Deferred[list[str]]:
        """The names ``address`` maps back to (in-addr.arpa / ip6.arpa)."""
        try:
            reverse = ipaddress.ip_address(address).reverse_pointer
        except ValueError:
            return defer.fail(NoSuchDomain(f"not an IP address: {address!r}"))
        return defer.ensureDeferred(self._ptr(reverse))

    async def _ptr(self, reverse: str) -> list[str]:
        return [_text(rr.rdata) for rr in await self._records(reverse, _T_PTR)]

    # -- lookups --

    async def _records(self, text: str, qtype: int) -> list[RR]:
        try:
            qname = names.from_text(_absolute(text.strip()))
        except (ValueError, IndexError) as exc:
            raise NoSuchDomain(f"{text!r} is not a domain name: {exc}") from None
        result = await self._lookup(qname, qtype)
        if result.rcode == RCode.NXDOMAIN:
            raise NoSuchDomain(text)
        if result.rcode != RCode.NOERROR:
            raise TemporaryFailure(f"{text}: {_rcode_text(result.rcode)}")
        return [rr for rr in result.answer if rr.rtype == qtype]

    async def _lookup(self, qname: bytes, qtype: int) -> LookupResult:
        """Local zones first, following CNAMEs from zone to zone, then the resolver."""
        answer: tuple[RR, ...] = ()
        name = qname
        for _ in range(MAX_LOCAL_CHAIN):
            zone = self.view.find_zone(name) if self.view is not None else None
            if zone is None:
                rest = await self.resolver.resolve(name, qtype)
                return LookupResult(rest.rcode, False, answer + rest.answer, rest.authority)
            result: LookupResult = zone.lookup(name, qtype)
            if not result.authoritative and not result.answer and result.rcode == RCode.NOERROR:
                # A delegation below an inside zone: ask the child zone's servers.
                rest = await self.resolver.resolve(name, qtype, CLASS_IN, result)
                return LookupResult(rest.rcode, False, answer + rest.answer, rest.authority)
            answer += result.answer
            chain_out = result.extra.get("chain_out")
            if not isinstance(chain_out, bytes):
                return LookupResult(result.rcode, result.authoritative, answer, result.authority)
            name = chain_out
        return LookupResult(RCode.SERVFAIL, False)


def _text(name: bytes) -> str:
    """Lower-case text without the trailing dot; the root is the empty string (null MX)."""
    if name == ROOT:
        return ""
    return names.to_text(name).rstrip(".").lower()


def _rcode_text(rcode: int) -> str:
    try:
        return RCode(rcode).name
    except ValueError:
        return f"rcode {rcode}"
