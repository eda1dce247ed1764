"""The inside view's responder: its own zones first, recursion for allowed clients after (D-3).

`RecursiveView` wraps the lead's `View`.  A question inside one of the view's
zones is always answered from the zone (split horizon: internal data wins over
anything the resolver could find); a CNAME that leaves the zones is completed
through the resolver for clients that may recurse, as a recursive BIND does.
Other names go to the resolver only for clients in ``allow_recursion`` asking
with RD=1, else REFUSED (BIND's ``allow-recursion``).  Replies to such
clients carry RA=1 (RFC 1035 4.1.1); a resolver failure is SERVFAIL, never
NXDOMAIN (R-1).  A cache hit is answered synchronously; anything else
returns a Deferred, which the listener accepts.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.dns.cache import NXDOMAIN, POSITIVE, SERVFAIL, CachedAnswer
from appliance.dns.rr import CLASS_IN, RR, LookupResult, RCode
from appliance.dns.wire import DEFAULT_UDP_SIZE, Edns, Message, error_response, make_response

__all__ = ["RecursiveView"]

log = Logger(namespace="appliance.dns.recursion")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_T_NS = 2
_T_CNAME = 5
_T_AXFR = 252
_T_IXFR = 251
_T_ANY = 255
#: CNAME links followed from a local zone into other zones or the resolver.
MAX_CHAIN = 8
#: Client addresses whose ACL verdicts are remembered (an inside network has few).
_MEMO_MAX = 4096


class _Resolver(Protocol):
    clock: Any

    def cached_hit(
        self, qname: bytes, qtype: int, qclass: int = CLASS_IN
    ) -> CachedAnswer | None: ...

    def cached(self, qname: bytes, qtype: int, qclass: int = CLASS_IN) -> LookupResult | None: ...

    def resolve(
        self,
        qname: bytes,
        qtype: int,
        qclass: int = CLASS_IN,
        delegation: LookupResult | None = None,
    ) -> defer.Deferred[LookupResult]: ...


def _allowed(client: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


class RecursiveView:
    """The inside view's responder: ``view`` for its zones, ``resolver`` for the rest.

    ``allow_recursion`` lists the client networks that may recurse (empty:
    nobody).  The view's own ``allow_query`` still applies to everything.  A
    `Resolver` built without ``local_zones`` gets the view's ``find_zone``.
    """

    def __init__(
        self, view: Any, resolver: _Resolver, allow_recursion: tuple[Network, ...]
    ) -> None:
        self.view = view
        self.resolver = resolver
        self.allow_recursion = tuple(allow_recursion)
        self.udp_size = int(getattr(view, "udp_size", DEFAULT_UDP_SIZE))
        if getattr(resolver, "local_zones", False) is None:
            # Chains entering the view's zones must end in the view's data (split horizon).
            setattr(resolver, "local_zones", view.find_zone)  # noqa: B010
        self._memo: dict[str, tuple[bool, bool]] = {}
        self._memo_acl: object = None

    def cache_token(self, client: str) -> Hashable:
        """Lets the listener reuse a reply for one second (see appliance.dns.answercache).

        The second is part of the token so that TTLs counted down by the
        resolver's cache are never more than a second stale.
        """
        return (
            getattr(self.view, "generation", 0),
            self._policy(client),
            int(self.resolver.clock.seconds()),
        )

    def _policy(self, host: str) -> tuple[bool, bool]:
        """(may query the view, may recurse) for a client address, memoised per address."""
        allow_query = getattr(self.view, "allow_query", ())
        if allow_query is not self._memo_acl:  # the view was reconfigured
            self._memo.clear()
            self._memo_acl = allow_query
        found = self._memo.get(host)
        if found is None:
            query_ok = not allow_query or _allowed(host, allow_query)
            found = (query_ok, _allowed(host, self.allow_recursion))
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()
            self._memo[host] = found
        return found

    def __call__(
        self, query: Message, client: tuple[str, int], transport: str, local: tuple[str, int]
    ) -> Message | defer.Deferred[Message | None] | None:
        view = self.view
        if len(query.question) != 1:
            return view(query, client, transport, local)  # type: ignore[no-any-return]
        qname, qtype, qclass = query.question[0]
        query_ok, recursive = self._policy(client[0])
        if not query_ok:
            return view(query, client, transport, local)  # type: ignore[no-any-return]
        if qtype in (_T_AXFR, _T_IXFR) or view.find_zone(qname) is not None:
            reply: Message | None = view(query, client, transport, local)
            if reply is None or not recursive:
                return reply
            reply = reply._replace(ra=True)
            if not query.rd or qtype in (_T_AXFR, _T_IXFR) or qclass != CLASS_IN:
                return reply
            if _is_referral(reply):
                # A delegation below an inside zone: recurse into it (its servers are internal).
                delegation = LookupResult(
                    RCode.NOERROR, False, (), reply.authority, reply.additional
                )
                below = self.resolver.resolve(qname, qtype, qclass, delegation)
                return below.addCallback(self._respond, query).addErrback(self._failed, query)
            target = _chain_target(reply, qtype)
            if target is None:
                return reply
            followed = defer.ensureDeferred(self._follow(target, qtype))
            return followed.addCallback(_extend, reply).addErrback(self._failed, query)
        if not recursive or not query.rd or qclass != CLASS_IN:
            return error_response(query, RCode.REFUSED, ra=recursive, udp_size=self.udp_size)
        resolver = self.resolver
        hit = resolver.cached_hit(qname, qtype, qclass)
        if hit is not None:
            kind = hit.kind
            if kind == SERVFAIL:
                return error_response(query, RCode.SERVFAIL, ra=True, udp_size=self.udp_size)
            edns = query.edns
            return Message(
                id=query.id,
                qr=True,
                opcode=query.opcode,
                rd=True,
                ra=True,
                cd=query.cd,
                rcode=RCode.NXDOMAIN if kind == NXDOMAIN else RCode.NOERROR,
                question=query.question,
                answer=hit.records if kind == POSITIVE else (),
                authority=() if kind == POSITIVE else hit.records,
                edns=None if edns is None else Edns(self.udp_size, 0, edns.do),
            )
        result = resolver.cached(qname, qtype, qclass)
        if result is not None:
            return make_response(query, result, ra=True, udp_size=self.udp_size)
        answer = resolver.resolve(qname, qtype, qclass)
        return answer.addCallback(self._respond, query).addErrback(self._failed, query)

    def _respond(self, result: LookupResult, query: Message) -> Message | None:
        return make_response(query, result, ra=True, udp_size=self.udp_size)

    def _failed(self, failure: Failure, query: Message) -> Message | None:
        log.failure("dns/inside: resolution failed", failure)
        return error_response(query, RCode.SERVFAIL, ra=True, udp_size=self.udp_size)

    async def _follow(self, target: bytes, qtype: int) -> LookupResult:
        """Complete a chain that left a local zone: other local zones, then the resolver."""
        answer: list[RR] = []
        for _ in range(MAX_CHAIN):
            zone = self.view.find_zone(target)
            if zone is None:
                rest = await self.resolver.resolve(target, qtype)
                return LookupResult(rest.rcode, False, tuple(answer) + rest.answer, rest.authority)
            result: LookupResult = zone.lookup(target, qtype)
            if not result.authoritative and not result.answer:
                # Delegated below a local zone.
                rest = await self.resolver.resolve(target, qtype, CLASS_IN, result)
                return LookupResult(rest.rcode, False, tuple(answer) + rest.answer, rest.authority)
            answer.extend(result.answer)
            chain_out = result.extra.get("chain_out")
            if not isinstance(chain_out, bytes):
                return LookupResult(result.rcode, False, tuple(answer), result.authority)
            target = chain_out
        return LookupResult(RCode.SERVFAIL, False)


def _is_referral(reply: Message) -> bool:
    """A local zone's referral: NOERROR, not authoritative, no answer, NS records in authority."""
    return (
        reply.rcode == RCode.NOERROR
        and not reply.aa
        and not reply.answer
        and any(rr.rtype == _T_NS for rr in reply.authority)
    )


def _chain_target(reply: Message, qtype: int) -> bytes | None:
    """The name a local answer's CNAME chain points to if the answer stops there, else None."""
    if reply.rcode != RCode.NOERROR or not reply.answer or qtype in (_T_CNAME, _T_ANY):
        return None
    last = reply.answer[-1]
    if last.rtype != _T_CNAME:
        return None
    target = last.rdata.lower()
    if any(rr.name.lower() == target for rr in reply.answer):
        return None
    return last.rdata


def _extend(rest: LookupResult, reply: Message) -> Message | None:
    """The local reply with the rest of the chain appended (RFC 6604: the rcode is the last link's)."""
    if rest.rcode == RCode.SERVFAIL:
        return reply._replace(rcode=RCode.SERVFAIL, answer=(), authority=(), additional=())
    return reply._replace(
        rcode=rest.rcode,
        answer=reply.answer + rest.answer,
        authority=rest.authority,
        additional=(),
    )
