"""Zone transfer client: SOA serial checks over UDP and AXFR/IXFR over TCP, with our wire codec.

A secondary zone asks its master for the SOA (RFC 1034 4.3.5), and if the
serial went up fetches the zone: IXFR (RFC 1995) when it already holds a
version, else AXFR (RFC 5936).  Both leave from the configured
``transfer_source`` (BIND's transfer-source) and are bounded by a timeout, a
record count and a message size.  The reply stream is checked as it arrives:
message ids, rcode, the question echoed in the first message, class IN,
every owner inside the zone, the SOA first and last.  An IXFR reply is
parsed into its difference sequences (RFC 1995 4); one that cannot be an
IXFR becomes an ``XfrError`` so that the caller falls back to AXFR.
"""

from __future__ import annotations

import ipaddress
import secrets
import struct
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.dns import names, wire
from appliance.dns.client import DNSClient
from appliance.dns.notify import serial_gt, soa_serial
from appliance.dns.rr import CLASS_IN, RR, RCode, RRType, canonical
from appliance.dns.wire import Message, Question, WireError

__all__ = [
    "Difference",
    "TransferResult",
    "XfrClient",
    "XfrError",
    "check_records",
]

log = Logger(namespace="appliance.dns.xfr")

Master = tuple[str, int]

#: Seconds a whole transfer may take (BIND's max-transfer-time-in is 120 minutes; ours is
#: shorter because the zones an appliance holds are small).
DEFAULT_TRANSFER_TIMEOUT = 300.0
#: Seconds to wait for the SOA answer.
DEFAULT_SOA_TIMEOUT = 5.0
#: Records one transfer may carry before it is abandoned (a runaway master must not exhaust memory).
DEFAULT_MAX_RECORDS = 2_000_000

_LENGTH = struct.Struct("!H")


class XfrError(Exception):
    """A transfer or SOA check that failed; ``rcode`` is the master's rcode when it sent one."""

    def __init__(self, reason: str, rcode: int | None = None) -> None:
        super().__init__(reason)
        self.rcode = rcode


@dataclass(frozen=True)
class Difference:
    """One IXFR difference sequence (RFC 1995 4): from ``old`` SOA to ``new`` SOA."""

    old: RR
    deleted: tuple[RR, ...]
    new: RR
    added: tuple[RR, ...]


@dataclass(frozen=True)
class TransferResult:
    """What a transfer brought.

    ``kind`` is "axfr" (``records`` is the whole zone, SOA once, first),
    "ixfr" (``differences`` to apply in order) or "current" (a single-SOA
    IXFR reply whose serial is not newer than ours: nothing to do).  ``soa``
    is the master's SOA.
    """

    kind: str
    soa: RR
    records: tuple[RR, ...] = ()
    differences: tuple[Difference, ...] = field(default=())


def check_records(origin: bytes, records: list[RR] | tuple[RR, ...]) -> None:
    """Raise XfrError unless every record is class IN and owned at or below ``origin``."""
    apex = canonical(origin)
    for rr in records:
        if rr.rclass != CLASS_IN:
            raise XfrError(f"record of class {rr.rclass} in the transfer")
        if not names.is_subdomain(canonical(rr.name), apex):
            raise XfrError(f"record {names.to_text(rr.name)} outside the zone")


class _Stream:
    """Collects the answer RRs of a transfer reply and says when the last one arrived.

    AXFR ends at the second SOA (RFC 5936 2.2).  IXFR ends at the SOA that
    closes the last difference sequence (RFC 1995 4), or after one SOA that
    the single-message reply carries alone.
    """

    def __init__(self, qtype: int, origin: bytes, serial: int | None, max_records: int) -> None:
        self.qtype = qtype
        self.origin = origin
        self.apex = canonical(origin)
        self.serial = serial
        self.max_records = max_records
        self.records: list[RR] = []
        self.done = False
        self._ixfr_incremental: bool | None = None
        self._phase = ""  # IXFR: "delete" or "add" within a difference sequence
        self._final = -1

    def message(self, message: Message, query_id: int, first: bool) -> None:
        if message.id != query_id or not message.qr:
            raise XfrError("reply with a wrong id")
        if message.rcode != RCode.NOERROR:
            raise XfrError(f"master answered rcode {message.rcode}", message.rcode)
        if first or message.question:
            if len(message.question) != 1 or canonical(message.question[0].name) != self.apex:
                raise XfrError("reply for another question")
        if not message.answer and not self.records:
            raise XfrError("empty transfer")
        for rr in message.answer:
            if self.done:
                raise XfrError("records after the end of the transfer")
            self._record(rr)
        if first and self.qtype == RRType.IXFR and len(self.records) == 1:
            # A single SOA in the first message, alone: up to date, or "use AXFR" (RFC 1995 4).
            self.done = len(message.answer) == 1

    def _record(self, rr: RR) -> None:
        if rr.rclass != CLASS_IN:
            raise XfrError(f"record of class {rr.rclass} in the transfer")
        if not names.is_subdomain(canonical(rr.name), self.apex):
            raise XfrError(f"record {names.to_text(rr.name)} outside the zone")
        records = self.records
        if len(records) >= self.max_records:
            raise XfrError("too many records in the transfer")
        is_soa = rr.rtype == RRType.SOA
        if is_soa and canonical(rr.name) != self.apex:
            raise XfrError("SOA record below the apex")
        if not records:
            if not is_soa:
                raise XfrError("transfer does not start with the SOA")
            self._final = soa_serial(rr)
            records.append(rr)
            return
        records.append(rr)
        if self.qtype == RRType.AXFR or self._ixfr_incremental is False:
            if is_soa:
                if soa_serial(rr) != self._final:
                    raise XfrError("closing SOA differs from the first")
                self.done = True
            return
        if self._ixfr_incremental is None:
            # The second record tells an incremental reply (an SOA) from a full one (RFC 1995 4).
            self._ixfr_incremental = is_soa and len(records) == 2
            if not self._ixfr_incremental:
                return
            self._phase = "delete"
            return
        if not is_soa:
            return
        if self._phase == "delete":
            self._phase = "add"
        elif soa_serial(rr) == self._final:
            self.done = True
        else:
            self._phase = "delete"

    def result(self) -> TransferResult:
        records = self.records
        first = records[0]
        if self.qtype == RRType.AXFR or self._ixfr_incremental is False:
            if len(records) < 2:
                raise XfrError("transfer ended without the closing SOA")
            return TransferResult("axfr", first, tuple(records[:-1]))
        if len(records) == 1:
            if self.serial is not None and soa_serial(first) == self.serial:
                return TransferResult("current", first)
            if self.serial is not None and not serial_gt(soa_serial(first), self.serial):
                return TransferResult("current", first)
            raise XfrError("single-SOA IXFR reply: the master wants AXFR")
        return TransferResult("ixfr", first, differences=_differences(records))


def _differences(records: list[RR]) -> tuple[Difference, ...]:
    """Split an incremental IXFR answer (first SOA, sequences, final SOA) into Differences."""
    body = records[1:-1]
    out: list[Difference] = []
    i = 0
    while i < len(body):
        old = body[i]
        i += 1
        deleted: list[RR] = []
        while i < len(body) and body[i].rtype != RRType.SOA:
            deleted.append(body[i])
            i += 1
        if i >= len(body):
            raise XfrError("IXFR difference sequence without its new SOA")
        new = body[i]
        i += 1
        added: list[RR] = []
        while i < len(body) and body[i].rtype != RRType.SOA:
            added.append(body[i])
            i += 1
        out.append(Difference(old, tuple(deleted), new, tuple(added)))
    if not out:
        raise XfrError("IXFR reply without differences")
    return tuple(out)


class _TransferProtocol(Protocol):
    """One TCP connection carrying one transfer: send the framed query, read framed replies."""

    def __init__(self, exchange: _Transfer) -> None:
        self.exchange = exchange
        self.buffer = b""

    def connectionMade(self) -> None:
        self.exchange.connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2:
            (length,) = _LENGTH.unpack_from(self.buffer)
            if len(self.buffer) < 2 + length:
                return
            frame = self.buffer[2 : 2 + length]
            self.buffer = self.buffer[2 + length :]
            if not self.exchange.frame(frame):
                return

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.exchange.lost()


class _TransferFactory(ClientFactory):
    def __init__(self, exchange: _Transfer) -> None:
        self.exchange = exchange

    def buildProtocol(self, addr: Any) -> Protocol:
        return _TransferProtocol(self.exchange)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.exchange.fail(XfrError(f"cannot connect: {reason.getErrorMessage()}"))


class _Transfer:
    """The state of one transfer: its Deferred, timer, connection and stream parser."""

    def __init__(
        self,
        client: XfrClient,
        master: Master,
        origin: bytes,
        qtype: int,
        serial_soa: RR | None,
    ) -> None:
        self.client = client
        self.master = master
        self.origin = origin
        self.qtype = qtype
        self.id = secrets.randbelow(0x10000)
        serial = soa_serial(serial_soa) if serial_soa is not None else None
        self.stream = _Stream(qtype, origin, serial, client.max_records)
        authority = (serial_soa,) if serial_soa is not None and qtype == RRType.IXFR else ()
        query = Message(
            id=self.id,
            question=(Question(origin, qtype, CLASS_IN),),
            authority=authority,
        )
        self.query_frame = wire.encode(query)
        self.deferred: defer.Deferred[TransferResult] = defer.Deferred(self._cancel)
        self.protocol: _TransferProtocol | None = None
        self.connector: Any = None
        self.timer: Any = None
        self.messages = 0
        self.finished = False

    def start(self, timeout: float, source: str) -> defer.Deferred[TransferResult]:
        self.timer = self.client.clock.callLater(timeout, self._timed_out)
        try:
            self.connector = self.client.reactor.connectTCP(
                self.master[0],
                self.master[1],
                _TransferFactory(self),
                timeout=timeout,
                bindAddress=(source, 0),
            )
        except Exception as exc:
            self.fail(XfrError(f"cannot connect: {exc}"))
        return self.deferred

    def connected(self, protocol: _TransferProtocol) -> None:
        if self.finished:
            protocol.transport.loseConnection()  # type: ignore[union-attr,misc]
            return
        self.protocol = protocol
        frame = self.query_frame
        protocol.transport.write(_LENGTH.pack(len(frame)) + frame)  # type: ignore[union-attr,call-arg,misc]

    def frame(self, data: bytes) -> bool:
        """Handle one reply message; False once the transfer is over."""
        if self.finished:
            return False
        try:
            message = wire.decode(data)
            self.stream.message(message, self.id, self.messages == 0)
            self.messages += 1
            if self.stream.done:
                result = self.stream.result()
            else:
                return True
        except WireError as exc:
            self.fail(XfrError(f"malformed reply: {exc}"))
            return False
        except XfrError as exc:
            self.fail(exc)
            return False
        except Exception as exc:
            log.failure("dns: transfer reply from {master} not understood", master=self.master)
            self.fail(XfrError(f"reply not understood: {exc}"))
            return False
        self._finish(result)
        return False

    def lost(self) -> None:
        if not self.finished:
            self.fail(XfrError("connection closed before the end of the transfer"))

    def _timed_out(self) -> None:
        self.timer = None
        self.fail(XfrError("transfer timed out"))

    def _cancel(self, _: object) -> None:
        self.finished = True
        self._cleanup()

    def fail(self, exc: XfrError) -> None:
        if self.finished:
            return
        self.finished = True
        self._cleanup()
        self.deferred.errback(Failure(exc))

    def _finish(self, result: TransferResult) -> None:
        if self.finished:
            return
        self.finished = True
        self._cleanup()
        self.deferred.callback(result)

    def _cleanup(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.loseConnection()  # type: ignore[misc]
        elif self.connector is not None:
            try:
                self.connector.disconnect()
            except Exception:
                pass
        self.protocol = None


class XfrClient:
    """SOA checks and zone transfers of one view's secondary zones, from one source address.

    ``reactor`` provides connectTCP and listenUDP, ``clock`` callLater; both
    are injected so tests can drive them.
    """

    def __init__(
        self,
        reactor: Any,
        clock: Any = None,
        source: str = "127.0.0.1",
        *,
        soa_timeout: float = DEFAULT_SOA_TIMEOUT,
        transfer_timeout: float = DEFAULT_TRANSFER_TIMEOUT,
        max_records: int = DEFAULT_MAX_RECORDS,
    ) -> None:
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.source = source
        self.soa_timeout = soa_timeout
        self.transfer_timeout = transfer_timeout
        self.max_records = max_records
        v4 = _is_v4(source)
        self._dns = DNSClient(
            reactor,
            self.clock,
            source if v4 else "0.0.0.0",
            source_address6=None if v4 else source,
        )

    def query_soa(self, master: Master, origin: bytes) -> defer.Deferred[RR]:
        """The master's SOA for ``origin``, from an authoritative answer (RFC 1034 4.3.5)."""
        d = self._dns.query(master, origin, RRType.SOA, timeout=self.soa_timeout)
        return d.addCallback(_soa_of, origin)

    def transfer(
        self, master: Master, origin: bytes, current: RR | None = None, *, ixfr: bool = True
    ) -> defer.Deferred[TransferResult]:
        """Fetch the zone: IXFR from ``current`` (our SOA) when given and ``ixfr``, else AXFR."""
        qtype = RRType.IXFR if current is not None and ixfr else RRType.AXFR
        return _Transfer(self, master, origin, qtype, current).start(
            self.transfer_timeout, self.source
        )


def _is_v4(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).version == 4
    except ValueError:
        return True


def _soa_of(reply: Message, origin: bytes) -> RR:
    if reply.rcode != RCode.NOERROR:
        raise XfrError(f"SOA query answered rcode {reply.rcode}", reply.rcode)
    if not reply.aa:
        raise XfrError("SOA answer is not authoritative")
    apex = canonical(origin)
    for rr in reply.answer:
        if rr.rtype == RRType.SOA and canonical(rr.name) == apex and rr.rclass == CLASS_IN:
            return rr
    raise XfrError("no SOA in the answer")
