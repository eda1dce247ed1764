"""Shared helpers for the resolver tests: record builders and a fake upstream DNS server.

The fake server listens on loopback only (127.0.2.x, "the Internet" of the
demo topology), over UDP and TCP on the same port, and answers from a table
built of `Zone` objects, as a real authoritative server would, or from a
callable.  Modes: ``normal``, ``silent`` (never answers), ``other-port``
(answers from a different socket), ``wrong-id``, ``truncate`` (UDP replies
with TC=1, so the client must retry over TCP), ``formerr-edns`` (FORMERR to
any query carrying EDNS).  Every received query is recorded.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import deferLater

from appliance.dns import names, wire
from appliance.dns.rr import RR, LookupResult, RCode
from appliance.dns.wire import Message
from appliance.dns.zone import Zone

R: Any = reactor


def n(text: str) -> bytes:
    """Wire form of an absolute name written as text."""
    return names.from_text(text if text.endswith(".") else text + ".")


def rr_a(name: str, address: str, ttl: int = 300) -> RR:
    return RR(n(name), 1, 1, ttl, ipaddress.IPv4Address(address).packed)


def rr_aaaa(name: str, address: str, ttl: int = 300) -> RR:
    return RR(n(name), 28, 1, ttl, ipaddress.IPv6Address(address).packed)


def rr_ns(name: str, target: str, ttl: int = 3600) -> RR:
    return RR(n(name), 2, 1, ttl, n(target))


def rr_cname(name: str, target: str, ttl: int = 300) -> RR:
    return RR(n(name), 5, 1, ttl, n(target))


def rr_mx(name: str, pref: int, target: str, ttl: int = 300) -> RR:
    return RR(n(name), 15, 1, ttl, struct.pack("!H", pref) + n(target))


def rr_txt(name: str, *strings: bytes, ttl: int = 300) -> RR:
    return RR(n(name), 16, 1, ttl, b"".join(bytes([len(s)]) + s for s in strings))


def rr_ptr(name: str, target: str, ttl: int = 300) -> RR:
    return RR(n(name), 12, 1, ttl, n(target))


def under(label: str, zone: str) -> str:
    """``label`` as a child of ``zone`` (which may be the root, ".")."""
    return label + "." if zone == "." else label + "." + zone.rstrip(".") + "."


def rr_soa(zone: str, ttl: int = 3600, minimum: int = 60, serial: int = 1) -> RR:
    rdata = (
        n(under("ns", zone))
        + n(under("hostmaster", zone))
        + struct.pack("!IIIII", serial, 3600, 600, 86400, minimum)
    )
    return RR(n(zone), 6, 1, ttl, rdata)


def make_zone(origin: str, *records: RR, soa_ttl: int = 3600, minimum: int = 60) -> Zone:
    """A zone with an SOA (and an apex NS unless records give one) plus ``records``."""
    recs = [rr_soa(origin, soa_ttl, minimum), *records]
    if not any(r.rtype == 2 and r.name.lower() == n(origin).lower() for r in records):
        recs.append(rr_ns(origin, under("ns", origin)))
    return Zone(n(origin), recs)


Answerer = Callable[[Message], "Message | None"]


def zone_answerer(*zones: Zone) -> Answerer:
    """Answer like an authoritative server for ``zones`` (REFUSED outside them)."""

    def answer(query: Message) -> Message | None:
        q = query.question[0]
        best: Zone | None = None
        for zone in zones:
            if zone.contains(q.name) and (best is None or len(zone.origin) > len(best.origin)):
                best = zone
        if best is None:
            return wire.error_response(query, RCode.REFUSED)
        result: LookupResult = best.lookup(q.name, q.qtype)
        return wire.make_response(query, result)

    return answer


class FakeUpstream:
    """A fake DNS server on ``host``:``port`` (UDP and TCP), recording every query it receives."""

    def __init__(self, host: str, answer: Answerer, mode: str = "normal") -> None:
        self.host = host
        self.answer = answer
        self.mode = mode
        self.queries: list[tuple[str, Message]] = []
        self.sources: list[tuple[str, int]] = []
        self.udp: Any = None
        self.tcp: Any = None
        self.other: Any = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def port(self) -> int:
        return int(self.udp.getHost().port)

    def start(self, port: int = 0) -> None:
        """Bind UDP (on ``port``, 0 for any free one) and TCP on the same port number."""
        self.udp = R.listenUDP(port, _FakeUDP(self), interface=self.host)
        factory = Factory.forProtocol(_FakeTCP)
        factory.upstream = self  # type: ignore[attr-defined]
        try:
            self.tcp = R.listenTCP(self.port, factory, interface=self.host)
        except Exception:
            self.udp.stopListening()
            raise
        self.other = R.listenUDP(0, DatagramProtocol(), interface=self.host)

    def stop(self) -> defer.Deferred[Any]:
        return defer.gatherResults(
            [defer.maybeDeferred(p.stopListening) for p in (self.udp, self.tcp, self.other) if p]
        )

    def reply(self, query: Message, transport: str) -> Message | None:
        self.queries.append((transport, query))
        if self.mode == "silent":
            return None
        if self.mode == "formerr-edns" and query.edns is not None:
            return wire.error_response(query, RCode.FORMERR)._replace(edns=None)
        reply = self.answer(query)
        if reply is None:
            return None
        if self.mode == "wrong-id":
            reply = reply._replace(id=(reply.id + 1) & 0xFFFF)
        if self.mode == "truncate" and transport == "udp":
            reply = reply._replace(tc=True, answer=(), authority=(), additional=())
        return reply


class _FakeUDP(DatagramProtocol):
    def __init__(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            query = wire.decode(datagram)
        except wire.WireError:
            return
        self.upstream.sources.append((addr[0], addr[1]))
        reply = self.upstream.reply(query, "udp")
        if reply is None:
            return
        data = wire.encode(reply, 4096)
        if self.upstream.mode == "other-port":
            self.upstream.other.write(data, addr)
        else:
            assert self.transport is not None
            self.transport.write(data, addr)


class _FakeTCP(Protocol):
    buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2:
            (length,) = struct.unpack("!H", self.buffer[:2])
            if len(self.buffer) < 2 + length:
                return
            frame, self.buffer = self.buffer[2 : 2 + length], self.buffer[2 + length :]
            query = wire.decode(frame)
            reply = self.factory.upstream.reply(query, "tcp")  # type: ignore[attr-defined]
            if reply is not None:
                data_out = wire.encode(reply)
                assert self.transport is not None
                self.transport.write(struct.pack("!H", len(data_out)) + data_out)


def free_common_port(hosts: list[str]) -> int:
    """A port number free for UDP and TCP on every host in ``hosts`` (checked by binding)."""
    for _ in range(50):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.bind((hosts[0], 0))
        port = int(probe.getsockname()[1])
        probe.close()
        ok = True
        for host in hosts:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                s = socket.socket(socket.AF_INET, kind)
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
                finally:
                    s.close()
        if ok:
            return port
    raise RuntimeError("no common free port")


async def turns(count: int = 3) -> None:
    """Let the real reactor run a few iterations (delivering loopback datagrams)."""
    for _ in range(count):
        await deferLater(R, 0.001, lambda: None)


async def until(predicate: Callable[[], bool], limit: int = 2000) -> None:
    """Spin the real reactor until ``predicate`` holds (bounded)."""
    for _ in range(limit):
        if predicate():
            return
        await deferLater(R, 0.001, lambda: None)
    raise AssertionError("condition not reached")
