"""NOTIFY out (RFC 1996) and the DNS service's serial tracking, on a fake reactor and a Clock."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from appliance.config import DNSConfig, ViewConfig, ZoneConfig
from appliance.dns import names, wire
from appliance.dns.notify import NotifyRound, NotifySender, serial_gt, serial_lt, soa_serial
from appliance.dns.rr import CLASS_IN, RR, Opcode, RCode, RRType
from appliance.dns.service import SERIAL_STATE_FILE, DNSService
from appliance.dns.view import ServedZone
from appliance.dns.zone import Zone

ORIGIN = names.from_text("example.test.")
TARGET = ("127.0.2.53", 5300)
OTHER = ("127.0.2.54", 53)


class FakePort:
    def __init__(self, protocol: Any, interface: str) -> None:
        self.protocol = protocol
        self.interface = interface
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.closed = False

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))

    def stopListening(self) -> None:
        self.closed = True


class FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.ports: list[FakePort] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "") -> FakePort:
        assert port == 0
        fake = FakePort(protocol, interface)
        self.ports.append(fake)
        return fake


def soa(serial: int) -> RR:
    rdata = (
        names.from_text("ns.example.test.")
        + names.from_text("hostmaster.example.test.")
        + b"".join(v.to_bytes(4, "big") for v in (serial, 3600, 900, 1209600, 300))
    )
    return RR(ORIGIN, RRType.SOA, CLASS_IN, 3600, rdata)


def zone(serial: int, extra: str = "") -> Zone:
    ns = RR(ORIGIN, RRType.NS, CLASS_IN, 3600, names.from_text("ns.example.test."))
    records = [soa(serial), ns]
    if extra:
        records.append(RR(names.from_text(extra), RRType.A, CLASS_IN, 60, b"\xc6\x12\x00\x01"))
    return Zone(ORIGIN, records)


def reply_to(data: bytes, rcode: int = RCode.NOERROR, msg_id: int | None = None) -> bytes:
    query = wire.decode(data)
    return wire.encode(
        wire.Message(
            id=query.id if msg_id is None else msg_id,
            qr=True,
            opcode=Opcode.NOTIFY,
            aa=True,
            rcode=rcode,
            question=query.question,
        )
    )


def test_notify_message_follows_rfc1996() -> None:
    reactor = FakeReactor()
    NotifyRound(reactor, ORIGIN, soa(7), [TARGET], source="127.0.0.10").start()
    (port,) = reactor.ports
    assert port.interface == "127.0.0.10"
    data, addr = port.sent[0]
    assert addr == TARGET
    message = wire.decode(data)
    assert message.opcode == Opcode.NOTIFY and message.aa and not message.qr
    assert message.question == (wire.Question(ORIGIN, RRType.SOA, CLASS_IN),)
    assert [soa_serial(rr) for rr in message.answer] == [7]


def test_unanswered_notify_is_retried_then_given_up() -> None:
    reactor = FakeReactor()
    done = NotifyRound(reactor, ORIGIN, soa(7), [TARGET], timeout=2.0, attempts=5).start()
    (port,) = reactor.ports
    times = [0.0]
    for _ in range(5):
        assert not done.called
        call: Any = reactor.getDelayedCalls()[0]
        reactor.advance(call.getTime() - reactor.seconds())
        times.append(reactor.seconds())
    assert len(port.sent) == 5
    assert times == [0.0, 2.0, 6.0, 14.0, 30.0, 62.0]  # 2 s, doubling (RFC 1996 3.6)
    assert len({wire.decode(d).id for d, _ in port.sent}) == 1
    assert done.called and done.result == {TARGET: None}
    assert port.closed and not reactor.getDelayedCalls()


def test_answer_stops_retries_and_noise_is_ignored() -> None:
    reactor = FakeReactor()
    done = NotifyRound(reactor, ORIGIN, soa(7), [TARGET, OTHER]).start()
    (port,) = reactor.ports
    first = {addr: data for data, addr in port.sent}
    endpoint = port.protocol
    endpoint.datagramReceived(b"\x00garbage", TARGET)
    endpoint.datagramReceived(
        reply_to(first[TARGET], msg_id=(wire.decode(first[TARGET]).id + 1) % 65536), TARGET
    )
    endpoint.datagramReceived(reply_to(first[TARGET]), ("127.9.9.9", TARGET[1]))  # wrong source
    endpoint.datagramReceived(first[TARGET], TARGET)  # a query, not a reply
    assert not done.called
    endpoint.datagramReceived(reply_to(first[TARGET]), TARGET)
    assert not done.called
    endpoint.datagramReceived(reply_to(first[OTHER], RCode.NOTIMP), OTHER)
    assert done.result == {TARGET: RCode.NOERROR, OTHER: RCode.NOTIMP}
    assert port.closed and not reactor.getDelayedCalls()
    assert len(port.sent) == 2


def test_a_newer_round_replaces_the_running_one() -> None:
    reactor = FakeReactor()
    sender = NotifySender(reactor)
    first = sender.notify(ORIGIN, soa(7), [TARGET])
    second = sender.notify(names.from_text("EXAMPLE.test."), soa(8), [TARGET])
    assert first.called and first.result == {TARGET: None}
    old, new = reactor.ports
    assert old.closed and not new.closed
    data, _ = new.sent[0]
    new.protocol.datagramReceived(reply_to(data), TARGET)
    assert second.result == {TARGET: RCode.NOERROR} and not sender.rounds


def test_socket_failure_is_logged_not_raised() -> None:
    class Broken(FakeReactor):
        def listenUDP(self, port: int, protocol: Any, interface: str = "") -> FakePort:
            raise OSError("cannot bind")

    done = NotifyRound(Broken(), ORIGIN, soa(1), [TARGET], source="192.0.2.1").start()
    assert done.result == {TARGET: None}


def test_ipv6_target_gets_its_own_socket() -> None:
    reactor = FakeReactor()
    NotifyRound(reactor, ORIGIN, soa(1), [TARGET, ("::1", 53)], source="127.0.0.10").start()
    assert sorted(p.interface for p in reactor.ports) == ["127.0.0.10", "::"]


@given(st.integers(0, 2**32 - 1), st.integers(1, 2**31 - 1))
def test_serial_arithmetic_rfc1982(a: int, d: int) -> None:
    b = (a + d) % 2**32
    assert serial_gt(b, a) and serial_lt(a, b)
    assert not serial_gt(a, b) and not serial_lt(b, a)


# --------------------------------------------------------------------------- the DNS service


class Loader:
    def __init__(self) -> None:
        self.zones: dict[str, ServedZone | Exception] = {}

    def __call__(self, path: Path, origin: str) -> ServedZone:
        found = self.zones[origin]
        if isinstance(found, Exception):
            raise found
        return found


def service(
    loader: Loader, reactor: FakeReactor, state: Path | None = None, notify: bool = True
) -> DNSService:
    zc = ZoneConfig("example.test", Path("x.zone"), also_notify=(TARGET,) if notify else ())
    settings = DNSConfig((ViewConfig("outside", (zc,), ()),))
    return DNSService(
        settings, loader, reactor=reactor, sources={"outside": "127.0.0.10"}, serial_state=state
    )


def notified_serials(reactor: FakeReactor) -> list[int]:
    return [
        soa_serial(wire.decode(port.sent[0][0]).answer[0]) for port in reactor.ports if port.sent
    ]


def test_service_notifies_on_first_load_and_on_a_higher_serial(tmp_path: Path) -> None:
    reactor, loader = FakeReactor(), Loader()
    loader.zones["example.test"] = zone(10)
    svc = service(loader, reactor, tmp_path / SERIAL_STATE_FILE)
    svc.startService()
    assert notified_serials(reactor) == [10]
    assert reactor.ports[0].interface == "127.0.0.10"
    svc.reconfigure(_config(svc))
    assert notified_serials(reactor) == [10]  # same serial: nothing to say
    loader.zones["example.test"] = zone(11)
    svc.reconfigure(_config(svc))
    assert notified_serials(reactor) == [10, 11]
    assert svc.view("outside").find_zone(ORIGIN) is loader.zones["example.test"]
    state = json.loads((tmp_path / SERIAL_STATE_FILE).read_text())
    assert state == {"outside/example.test.": 11}
    svc.stopService()
    assert not reactor.getDelayedCalls()


def test_service_logs_a_serial_that_went_backwards_and_does_not_notify(
    tmp_path: Path,
) -> None:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    observer: Any = events.append
    globalLogPublisher.addObserver(observer)
    try:
        reactor, loader = FakeReactor(), Loader()
        loader.zones["example.test"] = zone(10)
        svc = service(loader, reactor)
        svc.startService()
        loader.zones["example.test"] = zone(9)
        svc.reconfigure(_config(svc))
        loader.zones["example.test"] = zone(9, extra="new.example.test.")
        svc.reconfigure(_config(svc))
        loader.zones["example.test"] = ValueError("broken")
        svc.reconfigure(_config(svc))
        svc.stopService()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert notified_serials(reactor) == [10]
    formats = [str(e.get("log_format", "")) for e in events]
    assert any("serial went backwards" in f for f in formats)
    assert any("changed but its serial" in f for f in formats)
    assert svc.view("outside").find_zone(ORIGIN) is not None  # kept after the failed load


def test_service_compares_with_the_state_file_across_restarts(tmp_path: Path) -> None:
    state = tmp_path / SERIAL_STATE_FILE
    state.write_text(json.dumps({"outside/example.test.": 20}))
    reactor, loader = FakeReactor(), Loader()
    loader.zones["example.test"] = zone(15)
    svc = service(loader, reactor, state)
    svc.startService()
    assert notified_serials(reactor) == []  # lower than what was served before the restart
    assert json.loads(state.read_text()) == {"outside/example.test.": 15}
    svc.stopService()


def test_service_without_also_notify_opens_no_socket() -> None:
    reactor, loader = FakeReactor(), Loader()
    loader.zones["example.test"] = zone(1)
    svc = service(loader, reactor, notify=False)
    svc.startService()
    assert reactor.ports == []
    svc.stopService()


def _config(svc: DNSService) -> Any:
    class Stub:
        dns = svc.settings

    return Stub()


def test_ixfr_over_udp_gets_the_soa_alone_and_axfr_over_udp_formerr() -> None:
    """RFC 1995 2: a UDP IXFR we cannot answer in one packet gets our SOA ("use TCP")."""
    from appliance.dns.view import View

    net = ipaddress.ip_network("127.0.2.0/24")
    view = View("outside", {ORIGIN: zone(42)}, allow_transfer={ORIGIN: (net,)})

    def ask(qtype: int, client: str, transport: str) -> wire.Message:
        query = wire.Message(id=7, question=(wire.Question(ORIGIN, qtype, CLASS_IN),))
        reply = view(query, (client, 5353), transport, ("127.0.0.10", 53))
        assert reply is not None
        return reply

    ixfr = ask(RRType.IXFR, "127.0.2.9", "udp")
    assert ixfr.rcode == RCode.NOERROR and ixfr.aa
    assert [soa_serial(rr) for rr in ixfr.answer] == [42]
    assert ask(RRType.IXFR, "127.0.3.9", "udp").rcode == RCode.REFUSED
    assert ask(RRType.AXFR, "127.0.2.9", "udp").rcode == RCode.FORMERR
    full = ask(RRType.IXFR, "127.0.2.9", "tcp")
    assert [rr.rtype for rr in full.answer] == [RRType.SOA, RRType.NS, RRType.SOA]
