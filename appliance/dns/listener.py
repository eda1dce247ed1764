"""DNS server protocols over UDP and TCP around a `Responder`, using our own wire codec.

Replaces ``twisted.names.dns.DNSDatagramProtocol``/``DNSProtocol`` and the
message handling of ``twisted.names.server``: those answer QR=1 packets, never
truncate, ignore EDNS and raise on malformed TCP frames (see
research/dns-anchors.md 2.1).  Here every packet is decoded by
``appliance.dns.wire``; malformed ones get FORMERR when their header can be
read, responses (QR=1) are dropped, unknown opcodes get NOTIMP, EDNS versions
above 0 get BADVERS, and a responder that raises produces SERVFAIL and a log
entry, never an exception in the reactor.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Collection, Coroutine
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IPushProducer
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from appliance.dns import wire
from appliance.dns.answercache import AnswerCache, question_key
from appliance.dns.rr import Opcode, RCode, RRType
from appliance.dns.wire import DEFAULT_UDP_SIZE, MAX_MESSAGE, MIN_UDP_SIZE, Message, WireError

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IListeningPort,
        IReactorTCP,
        IReactorTime,
        IReactorUDP,
    )

__all__ = [
    "DEFAULT_TCP_IDLE_TIMEOUT",
    "DNSDatagramProtocol",
    "DNSServerCore",
    "DNSStreamFactory",
    "DNSStreamProtocol",
    "Reply",
    "Responder",
    "listen_tcp",
    "listen_udp",
    "make_tcp_factory",
    "make_udp_protocol",
]

#: Responder(query, client (host, port), "udp" | "tcp", local (host, port)).
#: It returns the reply, None to send nothing, or a Deferred (or coroutine) giving either.
Responder = Callable[
    [Message, tuple[str, int], str, tuple[str, int]],
    "Message | defer.Deferred[Message | None] | Coroutine[Any, Any, Message | None] | None",
]

#: Seconds a TCP connection may sit with no query in flight (RFC 7766 6.2.3; BIND's default).
DEFAULT_TCP_IDLE_TIMEOUT = 30.0
#: Queries one TCP connection may have in flight before we stop reading from it (RFC 7766 6.2.1.1).
DEFAULT_TCP_PIPELINE = 64
#: TCP connections served at once per factory; more are closed at once.
DEFAULT_TCP_CONNECTIONS = 256

#: What the core hands a transport: one message, or several for a zone transfer over TCP.
Reply = bytes | list[bytes]

_LENGTH = struct.Struct("!H")
_TRANSFER_TYPES = frozenset({RRType.AXFR, RRType.IXFR})
_DEFAULT_OPCODES = frozenset({Opcode.QUERY})


def _host_port(address: IAddress) -> tuple[str, int]:
    """(host, port) of an IPv4Address/IPv6Address, ("", 0) for anything else."""
    host = getattr(address, "host", "")
    port = getattr(address, "port", 0)
    return (str(host), int(port))


class DNSServerCore:
    """Transport-independent handling of one packet: decode, screen, ask the responder, encode.

    ``udp_size`` is the EDNS buffer size we advertise and the ceiling for UDP
    replies; ``opcodes`` are passed to the responder, any other opcode is
    answered NOTIMP (RFC 1035 4.1.1).
    """

    def __init__(
        self,
        responder: Responder,
        *,
        udp_size: int = DEFAULT_UDP_SIZE,
        opcodes: Collection[int] = _DEFAULT_OPCODES,
        log: Logger | None = None,
    ) -> None:
        self.responder = responder
        self.udp_size = max(MIN_UDP_SIZE, min(udp_size, MAX_MESSAGE))
        self.opcodes = frozenset(opcodes)
        self.log = log if log is not None else Logger(namespace="appliance.dns.listener")
        self.cache = AnswerCache() if hasattr(responder, "cache_token") else None

    def reply_limit(self, query: Message | None, transport: str) -> int:
        """Largest reply for ``query``: TCP 65535, UDP max(512, min(client EDNS size, ours)) (RFC 6891 6.2.5)."""
        if transport == "tcp":
            return MAX_MESSAGE
        if query is None or query.edns is None:
            return MIN_UDP_SIZE
        return max(MIN_UDP_SIZE, min(query.edns.udp_size, self.udp_size))

    def handle(
        self,
        data: bytes,
        client: tuple[str, int],
        transport: str,
        local: tuple[str, int],
    ) -> Reply | defer.Deferred[Reply | None] | None:
        """Process one message; return the encoded reply, None for silence, or a Deferred of either.

        Never raises: anything unexpected becomes SERVFAIL (if a reply is
        possible at all) and a logged failure.  A responder that offers
        ``cache_token(client_ip)`` has its synchronous replies kept in an
        AnswerCache, and a repeated question is answered from there.
        """
        cache = self.cache
        if cache is not None:
            try:
                token = self.responder.cache_token(client[0])  # type: ignore[attr-defined]
            except Exception:
                self.log.failure("DNS cache token failed for {client}", client=client)
                token = None
            if token is not None:
                # The same bytes as a question answered before: only the ID differs.
                exact = (data[2:], transport, token)
                hit = cache.get_exact(exact, data)
                if hit is not None:
                    return hit
                found = question_key(data, transport)
                if found is not None:
                    key = (found[0], token)
                    hit = cache.get(key, data, found[1])
                    if hit is None:
                        result = self.process(data, client, transport, local)[1]
                        if not isinstance(result, bytes):
                            return result
                        cache.put(key, result)
                        hit = result
                    cache.put_exact(exact, hit)
                    return hit
        return self.process(data, client, transport, local)[1]

    def process(
        self,
        data: bytes,
        client: tuple[str, int],
        transport: str,
        local: tuple[str, int],
    ) -> tuple[bool, Reply | defer.Deferred[Reply | None] | None]:
        """Like `handle`, also saying whether the message was malformed (TCP closes on that)."""
        try:
            query = wire.decode(data)
        except WireError as exc:
            return True, self._formerr(exc)
        except Exception:
            self.log.failure("DNS decoder failed on a packet from {client}", client=client)
            return True, None
        return False, self._answer(query, client, transport, local)

    def _answer(
        self,
        query: Message,
        client: tuple[str, int],
        transport: str,
        local: tuple[str, int],
    ) -> Reply | defer.Deferred[Reply | None] | None:
        try:
            if query.qr:
                return None
            if query.edns is not None and query.edns.version > 0:
                # RFC 6891 6.1.3: BADVERS, advertising the version we do speak.
                return self._encode(
                    query,
                    wire.error_response(query, RCode.BADVERS, udp_size=self.udp_size),
                    transport,
                )
            if query.opcode not in self.opcodes:
                return self._encode(
                    query,
                    wire.error_response(query, RCode.NOTIMP, udp_size=self.udp_size),
                    transport,
                )
            if len(query.question) != 1:
                # RFC 9619: QUERY and NOTIFY carry exactly one question.
                return self._encode(
                    query,
                    wire.error_response(query, RCode.FORMERR, udp_size=self.udp_size),
                    transport,
                )
            result = self.responder(query, client, transport, local)
        except Exception:
            self.log.failure("DNS responder failed for {client}", client=client)
            return self._servfail(query, transport)
        if isinstance(result, Coroutine):
            result = defer.ensureDeferred(result)
        if isinstance(result, defer.Deferred):
            d: defer.Deferred[Reply | None] = result.addCallback(
                self._encode_checked, query, transport
            )
            d.addErrback(self._failed, query, client, transport)
            return d
        try:
            return self._encode_checked(result, query, transport)
        except Exception:
            self.log.failure("DNS reply for {client} could not be encoded", client=client)
            return self._servfail(query, transport)

    def _encode_checked(
        self, reply: Message | None, query: Message, transport: str
    ) -> Reply | None:
        if reply is None:
            return None
        if not isinstance(reply, Message):
            raise TypeError(f"responder returned {reply!r}, not a Message")
        if query.edns is None and reply.edns is not None and reply.rcode <= 0xF:
            # RFC 6891 7: no OPT in a reply to a query without one.
            reply = reply._replace(edns=None)
        elif query.edns is not None and reply.edns is None:
            # RFC 6891 7: a query with OPT gets OPT back.
            reply = reply._replace(edns=wire.Edns(udp_size=self.udp_size, do=query.edns.do))
        elif reply.edns is not None and reply.edns.udp_size != self.udp_size:
            # The listener owns the advertised size, whatever the responder put there.
            reply = reply._replace(edns=reply.edns._replace(udp_size=self.udp_size))
        return self._encode(query, reply, transport)

    def _encode(self, query: Message | None, reply: Message, transport: str) -> Reply:
        if (
            transport == "tcp"
            and reply.rcode == RCode.NOERROR
            and len(reply.question) == 1
            and reply.question[0].qtype in _TRANSFER_TYPES
        ):
            # A zone transfer may take many messages (RFC 5936 2.2).
            return wire.encode_stream(reply, MAX_MESSAGE)
        return wire.encode(reply, self.reply_limit(query, transport))

    def _failed(
        self, failure: Failure, query: Message, client: tuple[str, int], transport: str
    ) -> Reply | None:
        self.log.failure("DNS responder failed for {client}", failure, client=client)
        return self._servfail(query, transport)

    def _servfail(self, query: Message, transport: str) -> Reply | None:
        try:
            return self._encode(
                query,
                wire.error_response(query, RCode.SERVFAIL, udp_size=self.udp_size),
                transport,
            )
        except Exception:
            self.log.failure("DNS SERVFAIL could not be encoded")
            return None

    def _formerr(self, exc: WireError) -> bytes | None:
        """FORMERR for a malformed query whose header was readable; silence otherwise."""
        if exc.id is None or exc.qr:
            return None
        reply = Message(
            id=exc.id,
            qr=True,
            opcode=exc.opcode,
            rd=exc.rd,
            cd=exc.cd,
            rcode=exc.rcode,
            question=exc.question,
        )
        try:
            return wire.encode(reply, MIN_UDP_SIZE)
        except ValueError:
            # e.g. an echoed question we cannot re-encode: answer without it.
            return wire.encode(reply._replace(question=()), MIN_UDP_SIZE)


class DNSDatagramProtocol(DatagramProtocol):
    """DNS over UDP: one datagram in, at most one out (RFC 1035 4.2.1).

    Datagrams from source port 0 are ignored: nothing can be sent back to them
    and they are only seen in spoofed traffic.
    """

    noisy = False
    transport: Any

    def __init__(self, core: DNSServerCore) -> None:
        self.core = core
        self._local: tuple[str, int] | None = None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            client = (str(addr[0]), int(addr[1]))
            if client[1] == 0:
                return
            local = self._local
            if local is None:
                local = self._local = _host_port(self.transport.getHost())
            result = self.core.handle(datagram, client, "udp", local)
        except Exception:
            self.core.log.failure("DNS UDP handling failed")
            return
        if isinstance(result, defer.Deferred):
            result.addCallback(self._send, client)
            result.addErrback(self._lost)
        else:
            self._send(result, client)

    def _send(self, reply: Reply | None, client: tuple[str, int]) -> None:
        if reply is None or self.transport is None:
            return
        # Straight to the socket: Twisted's Port.write re-validates the address on every
        # datagram, though it came from recvfrom (a third of the time of a cached answer).
        sendto = getattr(getattr(self.transport, "socket", None), "sendto", None)
        try:
            for datagram in [reply] if isinstance(reply, bytes) else reply:
                if sendto is None:
                    self.transport.write(datagram, client)
                    continue
                try:
                    sendto(datagram, client)
                except InterruptedError:
                    sendto(datagram, client)
                except (BlockingIOError, ConnectionRefusedError):
                    # A full send buffer drops the reply, as a router would; the client retries.
                    pass
        except Exception:
            # e.g. ECONNREFUSED surfacing on some platforms, or the port being closed meanwhile.
            self.core.log.failure("DNS UDP reply to {client} not sent", client=client)

    def _lost(self, failure: Failure) -> None:
        self.core.log.failure("DNS UDP reply lost", failure)


@implementer(IPushProducer)
class DNSStreamProtocol(Protocol):
    """DNS over TCP: 2-octet length-prefixed messages, pipelined (RFC 1035 4.2.2, RFC 7766).

    Several queries may be in flight; replies go out as they complete, in any
    order (RFC 7766 6.2.1.1).  Queries are taken from the stream only while
    fewer than ``pipeline`` are outstanding and while the transport's write
    buffer has room (the protocol is registered as its producer), and reading
    from the socket pauses otherwise, so a client that does not read its
    replies cannot make us buffer without bound.  A frame too short to hold a
    header closes the connection; a malformed query is answered FORMERR when
    possible and the connection is closed once pending replies are written.
    The connection is closed after ``idle_timeout`` seconds with nothing
    received and nothing in flight.
    """

    factory: DNSStreamFactory
    # zope interfaces do not type-check without a plugin; the transport is an ITCPTransport.
    transport: Any

    def __init__(
        self, core: DNSServerCore, clock: IReactorTime, idle_timeout: float, pipeline: int
    ) -> None:
        self.core = core
        self.clock: Any = clock
        self.idle_timeout = idle_timeout
        self.pipeline = max(1, pipeline)
        self._buffer = b""
        self._pending = 0
        self._reading = True
        self._write_blocked = False
        self._draining = False
        self._closing = False
        self._connected = False
        self._registered = False
        self._timer: Any = None
        self._client: tuple[str, int] = ("", 0)
        self._local: tuple[str, int] = ("", 0)

    def connectionMade(self) -> None:
        self._connected = True
        self._client = _host_port(self.transport.getPeer())
        self._local = _host_port(self.transport.getHost())
        self.transport.registerProducer(self, True)
        self._registered = True
        self._arm_timer()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._connected = False
        self._closing = True
        self._registered = False
        self._buffer = b""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # IPushProducer, called by the transport about its write buffer.

    def pauseProducing(self) -> None:
        self._write_blocked = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._write_blocked = False
        self._drain()

    def stopProducing(self) -> None:
        self._closing = True
        self._buffer = b""

    def _arm_timer(self) -> None:
        if self.idle_timeout <= 0:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.idle_timeout)
        else:
            self._timer = self.clock.callLater(self.idle_timeout, self._idle)

    def _idle(self) -> None:
        self._timer = None
        if self._pending and not self._closing:
            self._arm_timer()
            return
        self._lose()

    def _lose(self) -> None:
        """Close once the write buffer is flushed.

        The producer is unregistered first: a transport with a paused
        producer would never finish closing.
        """
        self._closing = True
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._closing or not self._connected:
            return
        self._arm_timer()
        self._buffer = self._buffer + data if self._buffer else data
        self._drain()

    def _drain(self) -> None:
        """Answer the complete frames in the buffer while the limits allow, then adjust reading."""
        if self._draining:
            return
        self._draining = True
        try:
            buffer = self._buffer
            pos = 0
            end = len(buffer)
            while (
                not self._closing
                and not self._write_blocked
                and self._pending < self.pipeline
                and end - pos >= 2
            ):
                (length,) = _LENGTH.unpack_from(buffer, pos)
                if length < 12:
                    self._close(abort=True)
                    return
                if end - pos - 2 < length:
                    break
                frame = buffer[pos + 2 : pos + 2 + length]
                pos += 2 + length
                self._query(frame)
            if not self._closing:
                self._buffer = buffer[pos:]
            self._update_reading()
        except Exception:
            self.core.log.failure("DNS TCP handling failed for {client}", client=self._client)
            self._close()
        finally:
            self._draining = False

    def _update_reading(self) -> None:
        if not self._connected or self._closing:
            return
        want = not self._write_blocked and self._pending < self.pipeline
        if want != self._reading:
            self._reading = want
            if want:
                self.transport.resumeProducing()
            else:
                self.transport.pauseProducing()

    def _query(self, frame: bytes) -> None:
        malformed, result = self.core.process(frame, self._client, "tcp", self._local)
        if malformed:
            self._closing = True
            self._buffer = b""
        if isinstance(result, defer.Deferred):
            self._pending += 1
            result.addCallback(self._reply)
            result.addErrback(self._lost)
            result.addBoth(self._done)
        else:
            self._reply(result)
            if self._closing:
                self._close()

    def _reply(self, reply: Reply | None) -> None:
        if reply is None or not self._connected:
            return
        if isinstance(reply, bytes):
            self.transport.write(_LENGTH.pack(len(reply)) + reply)
        else:
            self.transport.writeSequence([_LENGTH.pack(len(m)) + m for m in reply])

    def _lost(self, failure: Failure) -> None:
        self.core.log.failure("DNS TCP reply lost for {client}", failure, client=self._client)

    def _done(self, _: object) -> None:
        self._pending -= 1
        if self._closing:
            self._close()
        elif self._connected:
            self._arm_timer()
            self._drain()

    def _close(self, abort: bool = False) -> None:
        """Stop reading; drop the connection now (abort) or once pending replies are written."""
        self._closing = True
        self._buffer = b""
        if not self._connected:
            return
        if abort or self._pending == 0:
            self._lose()


class DNSStreamFactory(Factory):
    """Builds `DNSStreamProtocol` instances and caps simultaneous connections."""

    # One log line per event: our own, not Twisted's per-connection factory start/stop.
    noisy = False

    def __init__(
        self,
        core: DNSServerCore,
        clock: IReactorTime,
        *,
        idle_timeout: float = DEFAULT_TCP_IDLE_TIMEOUT,
        pipeline: int = DEFAULT_TCP_PIPELINE,
        max_connections: int = DEFAULT_TCP_CONNECTIONS,
    ) -> None:
        self.core = core
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.pipeline = max(1, pipeline)
        self.max_connections = max_connections
        self.connections = 0

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if self.connections >= self.max_connections:
            return None
        proto = _CountedStreamProtocol(self.core, self.clock, self.idle_timeout, self.pipeline)
        proto.factory = self
        return proto


class _CountedStreamProtocol(DNSStreamProtocol):
    """Keeps the factory's connection count."""

    def connectionMade(self) -> None:
        self.factory.connections += 1
        super().connectionMade()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._connected:
            self.factory.connections -= 1
        super().connectionLost(reason)


def make_udp_protocol(
    responder: Responder,
    *,
    udp_size: int = DEFAULT_UDP_SIZE,
    opcodes: Collection[int] = _DEFAULT_OPCODES,
    log: Logger | None = None,
) -> DNSDatagramProtocol:
    """A UDP protocol answering with ``responder``; pass it to ``reactor.listenUDP`` or ``UDPServer``."""
    return DNSDatagramProtocol(
        DNSServerCore(responder, udp_size=udp_size, opcodes=opcodes, log=log)
    )


def make_tcp_factory(
    responder: Responder,
    clock: IReactorTime,
    *,
    udp_size: int = DEFAULT_UDP_SIZE,
    opcodes: Collection[int] = _DEFAULT_OPCODES,
    idle_timeout: float = DEFAULT_TCP_IDLE_TIMEOUT,
    pipeline: int = DEFAULT_TCP_PIPELINE,
    max_connections: int = DEFAULT_TCP_CONNECTIONS,
    log: Logger | None = None,
) -> DNSStreamFactory:
    """A TCP server factory answering with ``responder``; ``clock`` drives the idle timeout."""
    core = DNSServerCore(responder, udp_size=udp_size, opcodes=opcodes, log=log)
    return DNSStreamFactory(
        core,
        clock,
        idle_timeout=idle_timeout,
        pipeline=pipeline,
        max_connections=max_connections,
    )


def listen_udp(
    reactor: IReactorUDP, port: int, responder: Responder, *, interface: str = "", **kwargs: Any
) -> IListeningPort:
    """Bind a DNS UDP listener on ``interface``:``port`` (0 picks a free port)."""
    udp: Any = reactor
    return udp.listenUDP(port, make_udp_protocol(responder, **kwargs), interface=interface)  # type: ignore[no-any-return]


def listen_tcp(
    reactor: IReactorTCP,
    clock: IReactorTime,
    port: int,
    responder: Responder,
    *,
    interface: str = "",
    backlog: int = 50,
    **kwargs: Any,
) -> IListeningPort:
    """Bind a DNS TCP listener on ``interface``:``port`` (0 picks a free port)."""
    tcp: Any = reactor
    return tcp.listenTCP(  # type: ignore[no-any-return]
        port, make_tcp_factory(responder, clock, **kwargs), backlog=backlog, interface=interface
    )
