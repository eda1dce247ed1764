"""Secondary zones (D-6): refresh/retry/expire on a task.Clock, RFC 1982 serials, NOTIFY in,
IXFR with AXFR fallback, the saved copy, the view and the DNS service around them.

The network is a fake transferer whose masters are plain dictionaries, so
every step is synchronous and timing is exact.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from appliance import config as config_module
from appliance.config import DNSConfig, ViewConfig, ZoneConfig
from appliance.dns import names
from appliance.dns.listener import DNSServerCore
from appliance.dns.notify import serial_gt
from appliance.dns.rr import CLASS_IN, RR, Opcode, RCode, RRType
from appliance.dns.secondary import SecondaryZone, soa_timers, write_zone_file
from appliance.dns.service import DNSService
from appliance.dns.view import View
from appliance.dns.wire import Message, Question, decode, encode
from appliance.dns.xfr import Difference, TransferResult, XfrError
from appliance.dns.zone import Zone, load_zone

ORIGIN = names.from_text("example.test.")
M1 = ("127.0.2.53", 53)
M2 = ("127.0.2.54", 5353)
WWW = names.from_text("www.example.test.")
REFRESH, RETRY, EXPIRE = 100, 10, 300


def soa(serial: int, refresh: int = REFRESH, retry: int = RETRY, expire: int = EXPIRE) -> RR:
    rdata = (
        names.from_text("ns.example.test.")
        + names.from_text("hostmaster.example.test.")
        + b"".join(v.to_bytes(4, "big") for v in (serial, refresh, retry, expire, 300))
    )
    return RR(ORIGIN, RRType.SOA, CLASS_IN, 3600, rdata)


def records(serial: int, last: int = 80, **timers: int) -> list[RR]:
    return [
        soa(serial, **timers),
        RR(ORIGIN, RRType.NS, CLASS_IN, 3600, names.from_text("ns.example.test.")),
        RR(names.from_text("ns.example.test."), RRType.A, CLASS_IN, 300, bytes([192, 0, 2, 1])),
        RR(WWW, RRType.A, CLASS_IN, 300, bytes([192, 0, 2, last])),
    ]


class FakeTransferer:
    """Masters as data: ``zones[master]`` is the records it serves, or absent when it is down."""

    def __init__(self) -> None:
        self.zones: dict[tuple[str, int], list[RR]] = {}
        self.ixfr: dict[tuple[str, int], Any] = {}
        self.calls: list[tuple[str, tuple[str, int]]] = []

    def query_soa(self, master: tuple[str, int], origin: bytes) -> defer.Deferred[RR]:
        self.calls.append(("soa", master))
        data = self.zones.get(master)
        if data is None:
            return defer.fail(XfrError("timed out"))
        return defer.succeed(data[0])

    def transfer(
        self,
        master: tuple[str, int],
        origin: bytes,
        current: RR | None = None,
        *,
        ixfr: bool = True,
    ) -> defer.Deferred[TransferResult]:
        kind = "ixfr" if current is not None and ixfr else "axfr"
        self.calls.append((kind, master))
        data = self.zones.get(master)
        if data is None:
            return defer.fail(XfrError("connection refused"))
        if kind == "ixfr":
            answer = self.ixfr.get(master)
            if isinstance(answer, Exception):
                return defer.fail(answer)
            if answer is not None:
                return defer.succeed(answer)
        return defer.succeed(TransferResult("axfr", data[0], tuple(data)))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.calls]


class Harness:
    def __init__(self, tmp_path: Path, masters: tuple[tuple[str, int], ...] = (M1,), **kw: Any):
        self.clock = Clock()
        self.net = FakeTransferer()
        self.changes = 0
        self.file = tmp_path / "example.test.zone"
        self.wall = [1_000_000.0]
        self.zone = SecondaryZone(
            ORIGIN,
            masters,
            self.net,
            self.clock,
            file=self.file,
            on_change=self._changed,
            wall=lambda: self.wall[0],
            **kw,
        )

    def _changed(self) -> None:
        self.changes += 1

    def serial(self) -> int | None:
        return self.zone.serial

    def rcode(self) -> int:
        return self.zone.lookup(WWW, RRType.A).rcode


def test_soa_timers_are_read_from_the_soa() -> None:
    assert soa_timers(soa(1, 7, 8, 9)) == (7, 8, 9)


@pytest.mark.parametrize(
    ("a", "b", "greater"),
    [
        (0, 0xFFFFFFFF, True),  # wrap-around: 0 follows 2^32-1 (RFC 1982 3.1)
        (0xFFFFFFFF, 0, False),
        (1, 0xFFFFFFFF, True),
        (2**31 - 1, 0, True),  # the largest step that is still "greater"
        (2**31, 0, False),  # exactly 2^31 apart: undefined, compared as not greater
        (0, 2**31, False),
        (5, 5, False),
    ],
)
def test_serial_arithmetic_boundaries(a: int, b: int, greater: bool) -> None:
    assert serial_gt(a, b) is greater


def test_first_check_transfers_by_axfr_and_saves_the_zone(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.net.zones[M1] = records(5)
    h.zone.start()
    assert h.rcode() == RCode.SERVFAIL  # nothing yet: SERVFAIL, not REFUSED
    h.clock.advance(0)
    assert h.serial() == 5
    assert h.net.kinds() == ["soa", "axfr"]
    assert h.rcode() == RCode.NOERROR and h.changes >= 1
    saved = load_zone(str(h.file), ORIGIN)
    assert set(saved) == set(records(5))
    assert not list(tmp_path.glob(".*tmp"))


def test_refresh_at_refresh_interval_and_only_a_newer_serial_is_transferred(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.net.zones[M1] = records(5)
    h.zone.start()
    h.clock.advance(0)
    h.net.calls.clear()
    h.clock.advance(REFRESH - 1)
    assert h.net.calls == []
    h.clock.advance(1)
    assert h.net.kinds() == ["soa"]  # same serial: no transfer
    h.net.zones[M1] = records(6, last=81)
    h.net.calls.clear()
    h.clock.advance(REFRESH)
    assert h.net.kinds() == ["soa", "ixfr"]  # answered with a full zone (RFC 1995 4)
    assert h.serial() == 6
    assert h.zone.lookup(WWW, RRType.A).answer[0].rdata == bytes([192, 0, 2, 81])


def test_failed_checks_retry_every_retry_then_expire_to_servfail(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.net.zones[M1] = records(5)
    h.zone.start()
    h.clock.advance(0)
    del h.net.zones[M1]  # the master goes away
    h.net.calls.clear()
    h.clock.advance(REFRESH)
    assert h.net.kinds() == ["soa"]
    times = []
    for _ in range(3):
        call = h.clock.getDelayedCalls()
        nxt = min(c.getTime() for c in call)  # type: ignore[misc]
        h.clock.advance(nxt - h.clock.seconds())
        times.append(h.clock.seconds())
    # Retries at RETRY; the expire timer (EXPIRE after the last good check) is also pending.
    assert times[:2] == [REFRESH + RETRY, REFRESH + 2 * RETRY]
    assert h.rcode() == RCode.NOERROR
    h.clock.advance(EXPIRE - h.clock.seconds() - 1)
    assert h.rcode() == RCode.NOERROR  # still within EXPIRE of the last successful check
    h.clock.advance(1)
    assert h.zone.expired
    assert h.rcode() == RCode.SERVFAIL
    assert list(h.zone) == []
    # The master comes back: the next retry serves the zone again.
    h.net.zones[M1] = records(5)
    h.clock.advance(RETRY)
    assert not h.zone.expired and h.rcode() == RCode.NOERROR


def test_expire_counts_from_the_last_successful_check(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.net.zones[M1] = records(5, refresh=20)
    h.zone.start()
    h.clock.advance(0)
    h.clock.advance(20)  # a successful check at t=20 restarts EXPIRE
    del h.net.zones[M1]
    h.clock.advance(EXPIRE - 1)  # t=79: 59 s after the last good check
    assert not h.zone.expired
    h.clock.advance(1)
    assert h.zone.expired


def test_serial_that_went_backwards_is_not_transferred(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.net.zones[M1] = records(100)
    h.zone.start()
    h.clock.advance(0)
    h.net.zones[M1] = records(99, last=99)
    h.net.calls.clear()
    h.clock.advance(REFRESH)
    assert h.net.kinds() == ["soa"]
    assert h.serial() == 100
    # It counts as a failed check: retried at RETRY, and the zone expires eventually.
    h.net.calls.clear()
    h.clock.advance(RETRY)
    assert h.net.kinds() == ["soa"]
    h.clock.advance(EXPIRE)
    assert h.zone.expired


@pytest.mark.parametrize(
    ("ours", "theirs", "transferred"),
    [
        (0xFFFFFFFF, 0, True),  # wrap-around
        (0xFFFFFFF0, 5, True),
        (0, 2**31, False),  # undefined distance: not transferred
        (10, 10 + 2**31 - 1, True),
        (10, 9, False),
    ],
)
def test_wrap_around_per_rfc1982(tmp_path: Path, ours: int, theirs: int, transferred: bool) -> None:
    h = Harness(tmp_path)
    h.net.zones[M1] = records(ours)
    h.zone.start()
    h.clock.advance(0)
    h.net.zones[M1] = records(theirs, last=7)
    h.clock.advance(REFRESH)
    assert h.serial() == (theirs if transferred else ours)


def test_masters_are_tried_in_order(tmp_path: Path) -> None:
    h = Harness(tmp_path, masters=(M1, M2))
    h.net.zones[M2] = records(3)
    h.zone.start()
    h.clock.advance(0)
    assert h.net.calls == [("soa", M1), ("soa", M2), ("axfr", M2)]
    assert h.serial() == 3


def test_ixfr_is_applied_and_trouble_falls_back_to_axfr(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.net.zones[M1] = records(1)
    h.zone.start()
    h.clock.advance(0)
    old = records(1)
    new = records(2, last=82)
    h.net.zones[M1] = new
    h.net.ixfr[M1] = TransferResult(
        "ixfr", new[0], differences=(Difference(old[0], (old[3],), new[0], (new[3],)),)
    )
    h.net.calls.clear()
    h.clock.advance(REFRESH)
    assert h.net.kinds() == ["soa", "ixfr"]
    assert set(h.zone) == set(new) and h.zone.last_transfer == "IXFR"
    # A difference that deletes what we do not have: AXFR instead.
    newer = records(3, last=83)
    h.net.zones[M1] = newer
    bogus = RR(WWW, RRType.A, CLASS_IN, 300, bytes([10, 0, 0, 1]))
    h.net.ixfr[M1] = TransferResult(
        "ixfr", newer[0], differences=(Difference(new[0], (bogus,), newer[0], (newer[3],)),)
    )
    h.net.calls.clear()
    h.clock.advance(REFRESH)
    assert h.net.kinds() == ["soa", "ixfr", "axfr"]
    assert set(h.zone) == set(newer) and h.zone.last_transfer == "AXFR"
    # A master that says NOTIMP to IXFR gets AXFR from then on.
    h.net.ixfr[M1] = XfrError("no", RCode.NOTIMP)
    h.net.zones[M1] = records(4)
    h.net.calls.clear()
    h.clock.advance(REFRESH)
    assert h.net.kinds() == ["soa", "ixfr", "axfr"]
    h.net.zones[M1] = records(5)
    h.net.calls.clear()
    h.clock.advance(REFRESH)
    assert h.net.kinds() == ["soa", "axfr"]
    assert h.serial() == 5


def test_single_soa_ixfr_reply_when_current_needs_no_axfr(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.net.zones[M1] = records(1)
    h.zone.start()
    h.clock.advance(0)
    h.net.zones[M1] = records(2)
    h.net.ixfr[M1] = TransferResult("current", records(2)[0])
    h.net.calls.clear()
    h.clock.advance(REFRESH)
    assert h.net.kinds() == ["soa", "ixfr"]
    assert h.serial() == 1  # nothing new came; the check still succeeded
    assert not h.zone.expired


def test_notify_from_a_master_checks_at_once_others_are_refused(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.net.zones[M1] = records(1)
    h.zone.start()
    h.clock.advance(0)
    h.net.zones[M1] = records(2, last=90)
    h.net.calls.clear()
    assert h.zone.notify("127.0.0.99") == RCode.REFUSED
    assert h.net.calls == []
    assert h.zone.notify(M1[0], records(2)[0]) == RCode.NOERROR
    assert h.net.kinds()[0] == "soa"
    assert h.serial() == 2
    # The next periodic check is REFRESH after this one.
    h.net.calls.clear()
    h.clock.advance(REFRESH - 1)
    assert h.net.calls == []


def test_allow_notify_replaces_the_masters_list(tmp_path: Path) -> None:
    h = Harness(tmp_path, allow_notify=(ipaddress.ip_network("127.0.9.0/24"),))
    assert h.zone.notify_allowed("127.0.9.7")
    assert not h.zone.notify_allowed(M1[0])


def test_saved_copy_is_served_at_restart_and_expires_by_its_age(tmp_path: Path) -> None:
    first = Harness(tmp_path)
    first.net.zones[M1] = records(9)
    first.zone.start()
    first.clock.advance(0)
    first.zone.stop()
    assert not first.clock.getDelayedCalls()
    mtime = first.file.stat().st_mtime
    second = Harness(tmp_path)  # masters down
    second.wall[0] = mtime + 20  # the copy was last confirmed 20 s ago
    second.zone.start()
    assert second.serial() == 9 and second.rcode() == RCode.NOERROR
    second.clock.advance(EXPIRE - 21)
    assert not second.zone.expired
    second.clock.advance(1)
    assert second.zone.expired
    third = Harness(tmp_path)
    third.wall[0] = mtime + EXPIRE + 1  # too old already
    third.zone.start()
    assert third.zone.expired and third.rcode() == RCode.SERVFAIL


def test_write_zone_file_round_trips(tmp_path: Path) -> None:
    zone = Zone(ORIGIN, records(77))
    path = tmp_path / "sub" / "z.zone"
    write_zone_file(path, zone)
    assert set(load_zone(str(path), ORIGIN)) == set(zone)


def notify_message(qname: bytes = ORIGIN) -> Message:
    return Message(
        id=4321,
        opcode=Opcode.NOTIFY,
        aa=True,
        question=(Question(qname, RRType.SOA, CLASS_IN),),
        answer=(records(2)[0],),
    )


def test_view_answers_notify_with_aa_and_bumps_generation(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.net.zones[M1] = records(1)
    view = View("outside", {ORIGIN: h.zone})
    h.zone.on_change = view.invalidate
    h.zone.start()
    h.clock.advance(0)
    before = view.generation
    h.net.zones[M1] = records(2)
    core = DNSServerCore(view, opcodes=(Opcode.QUERY, Opcode.NOTIFY))
    reply = core.handle(encode(notify_message()), (M1[0], 5353), "udp", ("127.0.0.10", 53))
    assert isinstance(reply, bytes)
    message = decode(reply)
    assert (message.opcode, message.rcode, message.aa, message.id) == (
        Opcode.NOTIFY,
        RCode.NOERROR,
        True,
        4321,
    )
    assert h.serial() == 2 and view.generation > before
    refused = decode(core.handle(encode(notify_message()), ("127.0.0.99", 53), "udp", ("", 0)))  # type: ignore[arg-type]
    assert refused.rcode == RCode.REFUSED
    unknown = decode(
        core.handle(
            encode(notify_message(names.from_text("other.test."))), (M1[0], 53), "udp", ("", 0)
        )  # type: ignore[arg-type]
    )
    assert unknown.rcode == RCode.NOTAUTH


def test_expired_zone_is_not_transferred_onwards(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.net.zones[M1] = records(1)
    any_net = ipaddress.ip_network("0.0.0.0/0")
    view = View("outside", {ORIGIN: h.zone}, allow_transfer={ORIGIN: (any_net,)})
    h.zone.start()
    h.clock.advance(0)
    axfr = Message(id=1, question=(Question(ORIGIN, RRType.AXFR, CLASS_IN),))
    reply = view(axfr, ("127.0.0.5", 1), "tcp", ("", 0))
    assert reply is not None and reply.rcode == RCode.NOERROR and len(reply.answer) == 5
    del h.net.zones[M1]
    h.clock.advance(EXPIRE)
    reply = view(axfr, ("127.0.0.5", 1), "tcp", ("", 0))
    assert reply is not None and reply.rcode == RCode.SERVFAIL


def test_dns_service_runs_secondary_zones_from_the_transfer_source(tmp_path: Path) -> None:
    clock = Clock()
    nets: dict[str, FakeTransferer] = {}

    def factory(source: str) -> FakeTransferer:
        nets[source] = FakeTransferer()
        nets[source].zones[M1] = records(4)
        return nets[source]

    zone_config = ZoneConfig(
        name="example.test",
        file=tmp_path / "sec" / "example.test.zone",
        type="secondary",
        masters=(M1,),
        also_notify=(("127.0.2.77", 53),),
    )
    settings = DNSConfig((ViewConfig("outside", (zone_config,), ()),))
    service = DNSService(
        settings,
        lambda p, o: load_zone(str(p), o),
        reactor=clock,
        sources={"outside": "127.0.0.10"},
        transferer=factory,
    )
    notified: list[tuple[bytes, int, Any]] = []

    class Notifier:
        def notify(self, origin: bytes, soa: RR, targets: Any) -> None:
            notified.append((origin, int.from_bytes(soa.rdata[-20:-16], "big"), targets))

        def stop(self) -> None:
            pass

    service.notifiers["outside"] = Notifier()  # type: ignore[assignment]
    service.startService()
    clock.advance(0)
    assert list(nets) == ["127.0.0.10"]
    assert notified == [(ORIGIN, 4, (("127.0.2.77", 53),))]
    view = service.view("outside")
    query = Message(id=2, question=(Question(WWW, RRType.A, CLASS_IN),))
    reply = view(query, ("127.0.0.5", 1), "udp", ("", 0))
    assert reply is not None and reply.rcode == RCode.NOERROR and reply.aa
    assert (tmp_path / "sec" / "example.test.zone").exists()
    # A reload with the same settings keeps the running zone; removing it stops it.
    running = service.secondaries[("outside", "example.test")][1]
    service._load_all(settings)
    assert service.secondaries[("outside", "example.test")][1] is running
    service._load_all(DNSConfig((ViewConfig("outside", (), ()),)))
    assert not service.secondaries and not clock.getDelayedCalls()
    service.stopService()


def test_config_reads_secondary_zones(tmp_path: Path) -> None:
    from tests.harness import demo_copy

    path = demo_copy(tmp_path)
    text = path.read_text().replace(
        'file = "zones/outside/example.test.zone"\nallow_transfer = ["127.0.2.0/24"]',
        'type = "secondary"\nmasters = ["127.0.2.53:5300", "127.0.2.54"]\n'
        'allow_transfer = ["127.0.2.0/24"]\nallow_notify = ["127.0.2.0/24"]',
    )
    path.write_text(text)
    config = config_module.load(path)
    outside = config.dns.view("outside")
    assert outside is not None
    (zone,) = outside.zones
    assert zone.type == "secondary"
    assert zone.masters == (("127.0.2.53", 5300), ("127.0.2.54", 53))
    assert zone.file == tmp_path / "state" / "secondary" / "outside" / "example.test.zone"
    assert zone.transfer_source is None
    assert zone.allow_notify == (ipaddress.ip_network("127.0.2.0/24"),)
    path.write_text(text.replace('masters = ["127.0.2.53:5300", "127.0.2.54"]\n', ""))
    problems = config_module.check(path)
    assert any("master" in str(p) for p in problems)
    path.write_text(text.replace('type = "secondary"', 'type = "stub"'))
    assert config_module.check(path)


def test_saved_file_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "z.zone"
    write_zone_file(path, Zone(ORIGIN, records(1)))
    inode = os.stat(path).st_ino
    write_zone_file(path, Zone(ORIGIN, records(2)))
    assert os.stat(path).st_ino != inode  # a new file renamed over the old one
    assert load_zone(str(path), ORIGIN).serial == 2


def test_view_find_zone_matches_whole_labels_only() -> None:
    example = Zone(ORIGIN, records(1))
    view = View("inside", {ORIGIN: example})
    assert view.find_zone(names.from_text("A.B.Example.TEST.")) is example
    assert view.find_zone(names.from_text("xexample.test.")) is None
    # One label "ab\x07example" followed by "test": its last bytes spell the origin mid-label.
    tricky = b"\x0aab\x07example\x04test\x00"
    assert tricky.endswith(ORIGIN)
    assert view.find_zone(tricky) is None
    test_origin = names.from_text("test.")
    test_soa = soa(1)._replace(name=test_origin)
    parent = Zone(test_origin, [test_soa])
    view.replace_zones({ORIGIN: example, test_origin: parent}, {})
    assert view.find_zone(tricky) is parent
    assert view.find_zone(names.from_text("www.example.test.")) is example
