"""Outgoing DNS queries for the resolver, on our own codec, hardened against off-path spoofing.

Written instead of ``twisted.names.client`` because Twisted 22.4 accepts a
reply from any address (twisted#12696) and retries TC answers on whichever
server comes next.  Here every query gets a fresh random 16-bit ID and its own
UDP socket (so a fresh kernel-chosen source port, RFC 5452 9.2), bound to the
configured ``query-source`` address; a reply counts only if it comes from the
queried address and port, with our ID and our question (RFC 5452 9.1),
optionally with the 0x20 case pattern we sent.  Anything else is counted and
ignored, and the wait goes on until the timeout.  EDNS advertises 1232 octets
(RFC 6891, DNS flag day 2020); FORMERR or NOTIMP to an EDNS query is retried
once without it (RFC 6891 7); TC=1 is retried over TCP to the same server
(RFC 1035 4.2.2, RFC 7766 5).
"""

from __future__ import annotations

import ipaddress
import secrets
import struct
from collections import Counter
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, error
from twisted.internet.protocol import ClientFactory, DatagramProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.dns import wire
from appliance.dns.rr import CLASS_IN, RCode
from appliance.dns.wire import DEFAULT_UDP_SIZE, Edns, Message, Question, WireError

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

__all__ = ["DNSClient", "DNSQueryError", "DNSTimeoutError", "DNSTransportError"]

log = Logger(namespace="appliance.dns.client")

_LENGTH = struct.Struct("!H")
_NO_EDNS_MEMORY = 1024


class DNSQueryError(Exception):
    """A query got no usable reply."""


class DNSTimeoutError(DNSQueryError):
    """No acceptable reply came before the timeout."""


class DNSTransportError(DNSQueryError):
    """The query could not be sent or the TCP exchange broke."""


def _mix_case(name: bytes) -> bytes:
    """Randomise the case of every ASCII letter (draft-vixie-dnsext-dns0x20)."""
    bits = secrets.randbits(len(name))
    out = bytearray(name)
    for i, b in enumerate(out):
        if 0x61 <= b <= 0x7A or 0x41 <= b <= 0x5A:
            out[i] = (b | 0x20) if (bits >> i) & 1 else (b & ~0x20)
    return bytes(out)


class DNSClient:
    """Sends one question to one server and returns a Deferred firing with the validated reply.

    ``reactor`` provides ``listenUDP`` and ``connectTCP``; ``clock`` (default:
    the reactor) drives timeouts.  ``source_address`` is the IPv4
    ``query-source``; ``source_address6`` the IPv6 one (None: IPv6 servers
    are not queried).  ``stats`` counts sent queries, rejected packets,
    timeouts, TCP retries and EDNS fallbacks.
    """

    def __init__(
        self,
        reactor: Any,
        clock: IReactorTime | None = None,
        source_address: str = "127.0.0.1",
        *,
        source_address6: str | None = None,
        edns_size: int = DEFAULT_UDP_SIZE,
        randomize_case: bool = False,
    ) -> None:
        self.reactor = reactor
        # zope interfaces as attribute types confuse mypy; the calls are IReactorTime's.
        self.clock: Any = clock if clock is not None else reactor
        self.source_address = source_address
        self.source_address6 = source_address6
        self.edns_size = edns_size
        self.randomize_case = randomize_case
        self.stats: Counter[str] = Counter()
        self._no_edns: set[tuple[str, int]] = set()

    def query(
        self,
        server: tuple[str, int],
        qname: bytes,
        qtype: int,
        qclass: int = CLASS_IN,
        *,
        rd: bool = False,
        timeout: float = 2.0,
    ) -> defer.Deferred[Message]:
        """Ask ``server`` (address, port) one question; fail with DNSQueryError if no answer."""
        try:
            host = ipaddress.ip_address(server[0])
        except ValueError:
            return defer.fail(DNSTransportError(f"not an IP address: {server[0]!r}"))
        source = self.source_address if host.version == 4 else self.source_address6
        if source is None:
            return defer.fail(DNSTransportError(f"no query source for {host}"))
        exchange = _Exchange(
            self, (host.compressed, int(server[1])), source, qname, qtype, qclass, rd
        )
        return exchange.start(timeout)

    def _forget_edns(self, server: tuple[str, int]) -> None:
        if len(self._no_edns) >= _NO_EDNS_MEMORY:
            self._no_edns.clear()
        self._no_edns.add(server)


class _Exchange:
    """The life of one query: UDP, maybe again without EDNS, maybe over TCP; one timer throughout."""

    def __init__(
        self,
        client: DNSClient,
        server: tuple[str, int],
        source: str,
        qname: bytes,
        qtype: int,
        qclass: int,
        rd: bool,
    ) -> None:
        self.client = client
        self.server = server
        self.source = source
        self.qname = qname
        self.qtype = qtype
        self.qclass = qclass
        self.rd = rd
        self.edns = server not in client._no_edns
        self.id = 0
        self.sent_name = qname
        self.port: Any = None
        self.connector: Any = None
        self.timer: Any = None
        self.deferred: defer.Deferred[Message] = defer.Deferred(self._cancel)

    def start(self, timeout: float) -> defer.Deferred[Message]:
        self.timer = self.client.clock.callLater(max(timeout, 0.0), self._timed_out)
        self._send_udp()
        return self.deferred

    # -- UDP --

    def _build(self) -> bytes:
        self.id = secrets.randbits(16)
        self.sent_name = _mix_case(self.qname) if self.client.randomize_case else self.qname
        message = Message(
            id=self.id,
            rd=self.rd,
            question=(Question(self.sent_name, self.qtype, self.qclass),),
            edns=Edns(udp_size=self.client.edns_size) if self.edns else None,
        )
        return wire.encode(message)

    def _send_udp(self) -> None:
        self._close_port()
        try:
            data = self._build()
            self.port = self.client.reactor.listenUDP(
                0, _UDPReceiver(self), interface=self.source, maxPacketSize=65535
            )
            self.port.write(data, self.server)
        except Exception as exc:
            self._finish(Failure(DNSTransportError(f"cannot send to {self.server}: {exc}")))
            return
        self.client.stats["sent"] += 1

    def datagram(self, data: bytes, addr: Any) -> None:
        if self.deferred.called:
            return
        if (addr[0], addr[1]) != self.server:
            self.client.stats["rejected_address"] += 1
            return
        reply = self._validate(data)
        if reply is None:
            return
        if reply.rcode in (RCode.FORMERR, RCode.NOTIMP) and self.edns and reply.edns is None:
            # RFC 6891 7: a responder that does not know EDNS; ask again without it.
            self.client.stats["edns_fallback"] += 1
            self.client._forget_edns(self.server)
            self.edns = False
            self._send_udp()
            return
        if reply.tc:
            self.client.stats["tcp"] += 1
            self._close_port()
            self._send_tcp()
            return
        self._finish(reply)

    def _validate(self, data: bytes) -> Message | None:
        """The reply if it answers our question (RFC 5452 9.1), else None (counted)."""
        try:
            reply = wire.decode(data)
        except WireError:
            self.client.stats["rejected_malformed"] += 1
            return None
        if not reply.qr or reply.id != self.id or reply.opcode != 0:
            self.client.stats["rejected_id"] += 1
            return None
        if not reply.question and reply.rcode in (RCode.FORMERR, RCode.NOTIMP):
            return reply
        if len(reply.question) != 1:
            self.client.stats["rejected_question"] += 1
            return None
        name, qtype, qclass = reply.question[0]
        if qtype != self.qtype or qclass != self.qclass:
            self.client.stats["rejected_question"] += 1
            return None
        if self.client.randomize_case:
            same = name == self.sent_name
        else:
            same = name.lower() == self.qname.lower()
        if not same:
            self.client.stats["rejected_question"] += 1
            return None
        return reply

    # -- TCP --

    def _send_tcp(self) -> None:
        # A new ID for the TCP leg: the UDP one was exposed.
        try:
            data = self._build()
            factory = _TCPFactory(self, _LENGTH.pack(len(data)) + data)
            self.connector = self.client.reactor.connectTCP(
                self.server[0], self.server[1], factory, bindAddress=(self.source, 0)
            )
        except Exception as exc:
            self._finish(Failure(DNSTransportError(f"cannot connect to {self.server}: {exc}")))

    def stream_reply(self, data: bytes) -> None:
        if self.deferred.called:
            return
        reply = self._validate(data)
        if reply is None:
            self._finish(Failure(DNSTransportError(f"bad TCP reply from {self.server}")))
        else:
            self._finish(reply)

    def stream_failed(self, reason: str) -> None:
        if not self.deferred.called:
            self._finish(Failure(DNSTransportError(f"TCP to {self.server} failed: {reason}")))

    # -- the end --

    def _timed_out(self) -> None:
        self.timer = None
        self.client.stats["timeouts"] += 1
        self._finish(Failure(DNSTimeoutError(f"no reply from {self.server[0]}#{self.server[1]}")))

    def _cancel(self, _: object) -> None:
        self._cleanup()

    def _finish(self, result: Message | Failure) -> None:
        self._cleanup()
        if not self.deferred.called:
            if isinstance(result, Failure):
                self.deferred.errback(result)
            else:
                self.deferred.callback(result)

    def _cleanup(self) -> None:
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None
        self._close_port()
        if self.connector is not None:
            connector, self.connector = self.connector, None
            try:
                connector.disconnect()
            except Exception:
                log.failure("closing a DNS TCP connection")

    def _close_port(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            try:
                port.stopListening()
            except Exception:
                log.failure("closing a DNS query socket")


class _UDPReceiver(DatagramProtocol):
    """The socket of one outgoing query (a fresh random port each time)."""

    noisy = False

    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            self.exchange.datagram(datagram, addr)
        except Exception:
            log.failure("DNS client failed on a datagram")


class _TCPProtocol(Protocol):
    def __init__(self, exchange: _Exchange, frame: bytes) -> None:
        self.exchange = exchange
        self.frame = frame
        self.buffer = b""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self.frame)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) < 2:
            return
        (length,) = _LENGTH.unpack_from(self.buffer)
        if len(self.buffer) < 2 + length:
            return
        message = self.buffer[2 : 2 + length]
        transport: Any = self.transport
        transport.loseConnection()
        try:
            self.exchange.stream_reply(message)
        except Exception:
            log.failure("DNS client failed on a TCP reply")

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self.exchange.stream_failed("connection closed before a reply")


class _TCPFactory(ClientFactory):
    def __init__(self, exchange: _Exchange, frame: bytes) -> None:
        self.exchange = exchange
        self.frame = frame

    def buildProtocol(self, addr: Any) -> Protocol:
        return _TCPProtocol(self.exchange, self.frame)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.exchange.stream_failed(reason.getErrorMessage())
