"""Outgoing NOTIFY (RFC 1996) and serial number arithmetic (RFC 1982).

When a primary zone's serial goes up, each ``also_notify`` secondary gets a
NOTIFY over UDP (RFC 1996 3.1: opcode NOTIFY, AA, the zone's SOA as the
question, the new SOA in the answer as a hint, 3.7), sent from the address of
the side that serves the zone so the secondary recognises its primary.  An
unanswered NOTIFY is sent again after a growing interval, a few times
(RFC 1996 3.6); an answer with any rcode ends the retries for that target.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Iterable
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from appliance.dns import names, wire
from appliance.dns.rr import CLASS_IN, RR, Opcode, RCode, RRType, canonical
from appliance.dns.wire import Message, Question, WireError

__all__ = ["NotifyRound", "NotifySender", "serial_gt", "serial_lt", "soa_serial"]

log = Logger(namespace="appliance.dns.notify")

_HALF = 1 << 31
_MOD = 1 << 32

#: Seconds before the first retransmission; each further one waits twice as long.
DEFAULT_TIMEOUT = 2.0
#: Transmissions per target, the first included (BIND sends 5).
DEFAULT_ATTEMPTS = 5

Target = tuple[str, int]


def serial_gt(a: int, b: int) -> bool:
    """``a > b`` in serial number arithmetic (RFC 1982 3.2); undefined pairs compare False."""
    a %= _MOD
    b %= _MOD
    return (a < b and b - a > _HALF) or (a > b and a - b < _HALF)


def serial_lt(a: int, b: int) -> bool:
    """``a < b`` in serial number arithmetic (RFC 1982 3.2)."""
    return serial_gt(b, a)


def soa_serial(soa: RR) -> int:
    """The SERIAL field of SOA rdata (RFC 1035 3.3.13): the fifth-from-last 32-bit word."""
    return int.from_bytes(soa.rdata[-20:-16], "big")


class _Endpoint(DatagramProtocol):
    """The UDP socket one round sends from; replies are handed to the round."""

    noisy = False

    def __init__(self, round_: NotifyRound) -> None:
        self.round = round_

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        try:
            self.round.received(datagram, (str(addr[0]), int(addr[1])))
        except Exception:
            log.failure("NOTIFY reply from {addr} could not be handled", addr=addr)


class NotifyRound:
    """One zone's NOTIFY to its targets: send, retry on a timer, stop when all have answered."""

    def __init__(
        self,
        reactor: Any,
        zone: bytes,
        soa: RR | None,
        targets: Iterable[Target],
        *,
        source: str = "",
        timeout: float = DEFAULT_TIMEOUT,
        attempts: int = DEFAULT_ATTEMPTS,
        label: str = "dns",
    ) -> None:
        self.reactor = reactor
        self.zone = zone
        self.soa = soa
        self.source = source
        self.timeout = timeout
        self.attempts = attempts
        self.label = label
        # Per target: message id, transmissions so far, pending timer.
        self.pending: dict[Target, tuple[int, int, Any]] = {}
        self.results: dict[Target, int | None] = {}
        self.done: defer.Deferred[dict[Target, int | None]] = defer.Deferred()
        self._ports: dict[int, Any] = {}
        self._targets = list(dict.fromkeys(targets))

    def start(self) -> defer.Deferred[dict[Target, int | None]]:
        """Send to every target; the Deferred fires with target -> rcode (None: never answered)."""
        for target in self._targets:
            self.results[target] = None
            try:
                self._port_for(target[0])
            except Exception as e:
                log.error(
                    "{label}: NOTIFY {zone} to {target}: cannot open a socket from {source}: {error}",
                    label=self.label,
                    zone=names.to_text(self.zone),
                    target=_fmt(target),
                    source=self.source or "any address",
                    error=e,
                )
                continue
            self.pending[target] = (secrets.randbelow(0x10000), 0, None)
            self._send(target)
        self._maybe_finish()
        return self.done

    def cancel(self) -> None:
        """Stop retrying (a newer round for the same zone replaces this one)."""
        for target in list(self.pending):
            self._drop(target)
        self._maybe_finish()

    def _port_for(self, host: str) -> Any:
        family = ipaddress.ip_address(host.split("%", 1)[0]).version
        port = self._ports.get(family)
        if port is None:
            source = self.source
            if source and ipaddress.ip_address(source.split("%", 1)[0]).version != family:
                source = ""
            interface = source or ("::" if family == 6 else "")
            port = self.reactor.listenUDP(0, _Endpoint(self), interface=interface)
            self._ports[family] = port
        return port

    def message(self, msg_id: int) -> Message:
        """The NOTIFY itself (RFC 1996 3.7): SOA question, AA set, SOA answer as a hint."""
        return Message(
            id=msg_id,
            opcode=Opcode.NOTIFY,
            aa=True,
            question=(Question(self.zone, RRType.SOA, CLASS_IN),),
            answer=(self.soa,) if self.soa is not None else (),
        )

    def _send(self, target: Target) -> None:
        entry = self.pending.get(target)
        if entry is None:
            return
        msg_id, sent, _ = entry
        if sent >= self.attempts:
            log.warn(
                "{label}: NOTIFY {zone} to {target}: no answer after {n} attempts",
                label=self.label,
                zone=names.to_text(self.zone),
                target=_fmt(target),
                n=sent,
            )
            self._drop(target)
            self._maybe_finish()
            return
        try:
            port: Any = self._port_for(target[0])
            port.write(wire.encode(self.message(msg_id)), target)
        except Exception as e:
            log.warn(
                "{label}: NOTIFY {zone} to {target} not sent: {error}",
                label=self.label,
                zone=names.to_text(self.zone),
                target=_fmt(target),
                error=e,
            )
        delay = self.timeout * (2**sent)
        timer = self.reactor.callLater(delay, self._send, target)
        self.pending[target] = (msg_id, sent + 1, timer)
        if sent == 0:
            log.info(
                "{label}: NOTIFY {zone} serial {serial} sent to {target}",
                label=self.label,
                zone=names.to_text(self.zone),
                serial=soa_serial(self.soa) if self.soa is not None else "?",
                target=_fmt(target),
            )

    def received(self, datagram: bytes, addr: Target) -> None:
        """A datagram on our socket: the reply to one of our NOTIFYs, or noise to ignore."""
        try:
            reply = wire.decode(datagram)
        except WireError:
            return
        host = _normal(addr[0])
        for target, (msg_id, _sent, _timer) in list(self.pending.items()):
            if _normal(target[0]) != host or target[1] != addr[1] or reply.id != msg_id:
                continue
            if not reply.qr or reply.opcode != Opcode.NOTIFY:
                return
            if len(reply.question) == 1 and canonical(reply.question[0].name) != canonical(
                self.zone
            ):
                return
            self.results[target] = reply.rcode
            rcode = _rcode_text(reply.rcode)
            if reply.rcode == RCode.NOERROR:
                log.info(
                    "{label}: NOTIFY {zone} acknowledged by {target}",
                    label=self.label,
                    zone=names.to_text(self.zone),
                    target=_fmt(target),
                )
            else:
                log.warn(
                    "{label}: NOTIFY {zone} answered {rcode} by {target}",
                    label=self.label,
                    zone=names.to_text(self.zone),
                    rcode=rcode,
                    target=_fmt(target),
                )
            self._drop(target)
            self._maybe_finish()
            return

    def _drop(self, target: Target) -> None:
        entry = self.pending.pop(target, None)
        if entry is not None and entry[2] is not None and entry[2].active():
            entry[2].cancel()

    def _maybe_finish(self) -> None:
        if self.pending or self.done.called:
            return
        for port in self._ports.values():
            try:
                port.stopListening()
            except Exception:
                log.failure("NOTIFY socket could not be closed")
        self._ports = {}
        self.done.callback(dict(self.results))


class NotifySender:
    """Sends NOTIFY rounds for one side, one round per zone at a time (a newer serial wins)."""

    def __init__(
        self,
        reactor: Any,
        *,
        source: str = "",
        timeout: float = DEFAULT_TIMEOUT,
        attempts: int = DEFAULT_ATTEMPTS,
        label: str = "dns",
    ) -> None:
        self.reactor = reactor
        self.source = source
        self.timeout = timeout
        self.attempts = attempts
        self.label = label
        self.rounds: dict[bytes, NotifyRound] = {}

    def notify(
        self, zone: bytes, soa: RR | None, targets: Iterable[Target]
    ) -> defer.Deferred[dict[Target, int | None]]:
        """NOTIFY ``targets`` that ``zone`` changed; replaces a round still running for it."""
        key = zone.lower()
        previous = self.rounds.pop(key, None)
        if previous is not None:
            previous.cancel()
        round_ = NotifyRound(
            self.reactor,
            zone,
            soa,
            targets,
            source=self.source,
            timeout=self.timeout,
            attempts=self.attempts,
            label=self.label,
        )
        self.rounds[key] = round_

        def forget(result: dict[Target, int | None]) -> dict[Target, int | None]:
            if self.rounds.get(key) is round_:
                del self.rounds[key]
            return result

        return round_.start().addCallback(forget)

    def stop(self) -> None:
        """Cancel every round (service shutdown)."""
        for round_ in list(self.rounds.values()):
            round_.cancel()
        self.rounds = {}


def _normal(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _fmt(target: Target) -> str:
    host = f"[{target[0]}]" if ":" in target[0] else target[0]
    return f"{host}:{target[1]}"


def _rcode_text(rcode: int) -> str:
    try:
        return RCode(rcode).name
    except ValueError:
        return str(rcode)
