"""Secondary zones (D-6): kept up to date from masters by SOA refresh, AXFR/IXFR and NOTIFY.

A `SecondaryZone` sits in its view's zone table for the whole life of the
process and answers with the data of the last good transfer; a transfer
swaps the whole `Zone` in one assignment, so a query sees the old or the new
version, never a mixture.  The timers are those of RFC 1034 4.3.5 and RFC
1035 3.3.13, read from the zone's own SOA: a check at REFRESH, RETRY after a
failed check, and after EXPIRE without a successful check the zone answers
SERVFAIL (as BIND does) until a master answers again.  Serials compare in
RFC 1982 arithmetic: only a newer serial is transferred; one that went
backwards (or is 2^31 away, undefined) counts as a failed check.  NOTIFY
from a master (RFC 1996 3.7, 4.7) starts a check at once.

The transferred zone is written to ``file`` as a master file (atomically:
temporary file, fsync, rename) and read back at start, before the first
check, so a restart serves the zone even when the masters are down; the
file's modification time records the last successful check, so the EXPIRE
clock carries over a restart (BIND does the same).
"""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.dns import names, rdata
from appliance.dns.notify import serial_gt, soa_serial
from appliance.dns.rr import RR, LookupResult, RCode, RRType, canonical
from appliance.dns.xfr import Difference, TransferResult, XfrError, check_records
from appliance.dns.zone import Zone, load_zone

__all__ = ["SecondaryZone", "apply_differences", "soa_timers", "write_zone_file"]

log = Logger(namespace="appliance.dns.secondary")

Master = tuple[str, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Seconds between checks while the zone was never loaded (no SOA to read RETRY from).
INITIAL_RETRY = 10.0
_SERVFAIL = LookupResult(RCode.SERVFAIL, False)


class Transferer(Protocol):
    """What a secondary zone needs from the network (appliance.dns.xfr.XfrClient provides it)."""

    def query_soa(self, master: Master, origin: bytes) -> defer.Deferred[RR]: ...

    def transfer(
        self, master: Master, origin: bytes, current: RR | None = None, *, ixfr: bool = True
    ) -> defer.Deferred[TransferResult]: ...


def soa_timers(soa: RR) -> tuple[int, int, int]:
    """(REFRESH, RETRY, EXPIRE) of an SOA record (RFC 1035 3.3.13)."""
    data = soa.rdata
    return (
        int.from_bytes(data[-16:-12], "big"),
        int.from_bytes(data[-12:-8], "big"),
        int.from_bytes(data[-8:-4], "big"),
    )


def _key(rr: RR) -> tuple[bytes, int, int, bytes]:
    """What identifies a record in an IXFR deletion: owner, type, class, rdata (not the TTL)."""
    return (canonical(rr.name), rr.rtype, rr.rclass, rdata.canonical_rdata(rr.rtype, rr.rdata))


def apply_differences(zone: Zone, differences: tuple[Difference, ...]) -> list[RR]:
    """The records of ``zone`` after the IXFR sequences (RFC 1995 4); XfrError if they do not fit."""
    current = {_key(rr): rr for rr in zone if rr.rtype != RRType.SOA}
    serial = zone.serial
    soa = zone.soa
    for diff in differences:
        if soa_serial(diff.old) != serial:
            raise XfrError(
                f"IXFR sequence starts at serial {soa_serial(diff.old)}, ours is {serial}"
            )
        for rr in diff.deleted:
            if rr.rtype == RRType.SOA:
                continue
            if current.pop(_key(rr), None) is None:
                raise XfrError(f"IXFR deletes a record we do not have: {names.to_text(rr.name)}")
        for rr in diff.added:
            if rr.rtype == RRType.SOA:
                continue
            current[_key(rr)] = rr
        soa = diff.new
        serial = soa_serial(soa)
    return [soa, *current.values()]


def write_zone_file(path: Path, zone: Zone) -> None:
    """Save ``zone`` as a master file, atomically: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    lines = [f"; secondary copy of {names.to_text(zone.origin)} serial {zone.serial}\n"]
    for rr in zone:
        lines.append(
            f"{names.to_text(rr.name)} {rr.ttl} IN {rdata.type_to_text(rr.rtype)} "
            f"{rdata.to_text(rr.rtype, rr.rdata)}\n"
        )
    try:
        with open(temporary, "w", encoding="ascii", errors="backslashreplace") as out:
            out.writelines(lines)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    try:
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError:
        pass


class SecondaryZone:
    """One secondary zone of one view; provides what the View needs of a zone (ServedZone).

    ``masters`` are tried in order; ``allow_notify`` (empty: the masters'
    addresses) says who may send NOTIFY; ``on_change`` is called after the
    served data changed (a transfer, expiry) so the view can drop cached
    answers; ``on_transfer`` after a new version came in (to NOTIFY our own
    secondaries, RFC 1996 4.9).  ``clock`` drives the timers and ``wall`` (seconds since the
    epoch) relates the saved file's age to them.
    """

    def __init__(
        self,
        origin: bytes,
        masters: tuple[Master, ...],
        transferer: Transferer,
        clock: Any,
        *,
        file: Path | None = None,
        allow_notify: tuple[Network, ...] = (),
        on_change: Callable[[], None] | None = None,
        on_transfer: Callable[[Zone], None] | None = None,
        label: str = "dns",
        wall: Callable[[], float] = time.time,
        min_interval: float = 1.0,
    ) -> None:
        self.origin = origin
        self.apex = canonical(origin)
        self.masters = tuple(masters)
        self.transferer = transferer
        self.clock = clock
        self.file = file
        self.allow_notify = tuple(allow_notify)
        self.on_change = on_change
        self.on_transfer = on_transfer
        self.label = label
        self.wall = wall
        self.min_interval = min_interval
        self.zone: Zone | None = None
        self.expired = False
        #: Masters that refused IXFR or sent one we could not use: AXFR from them until restart.
        self.no_ixfr: set[Master] = set()
        #: How the data now served came: "IXFR", "AXFR" or "file".
        self.last_transfer = ""
        self._refresh_call: Any = None
        self._expire_call: Any = None
        self._checking = False
        self._again = False
        self._running = False
        self._text = names.to_text(origin)

    # -- what the view uses --

    @property
    def serving(self) -> bool:
        """True while the zone has data and has not expired."""
        return self.zone is not None and not self.expired

    @property
    def soa(self) -> RR:
        if self.zone is None:
            raise LookupError(f"secondary zone {self._text} has no data")
        return self.zone.soa

    @property
    def serial(self) -> int | None:
        return self.zone.serial if self.zone is not None else None

    def lookup(self, qname: bytes, qtype: int) -> LookupResult:
        """The zone's answer, or SERVFAIL while it has no data or has expired (as BIND)."""
        zone = self.zone
        if zone is None or self.expired:
            return _SERVFAIL
        return zone.lookup(qname, qtype)

    def __iter__(self) -> Iterator[RR]:
        zone = self.zone
        return iter(()) if zone is None or self.expired else iter(zone)

    def notify_allowed(self, client: str) -> bool:
        """Whether ``client`` may send NOTIFY for this zone: a master, or in allow_notify."""
        try:
            ip = ipaddress.ip_address(client.split("%", 1)[0])
        except ValueError:
            return False
        if self.allow_notify:
            return any(ip in net for net in self.allow_notify)
        return any(_same_ip(ip, host) for host, _ in self.masters)

    def notify(self, client: str, soa: RR | None = None) -> int:
        """Handle a NOTIFY (RFC 1996 3.7, 4.7): rcode to answer; an accepted one starts a check."""
        if not self.notify_allowed(client):
            log.info(
                "{label}: NOTIFY for {zone} from {client} refused (not a master, not in allow_notify)",
                label=self.label,
                zone=self._text,
                client=client,
            )
            return RCode.REFUSED
        hint = f" (serial {soa_serial(soa)})" if soa is not None else ""
        log.info(
            "{label}: NOTIFY for {zone} from {client}{hint}",
            label=self.label,
            zone=self._text,
            client=client,
            hint=hint,
        )
        if self._running:
            self.refresh()
        return RCode.NOERROR

    # -- life cycle --

    def start(self) -> None:
        """Load the saved copy, if any, then check the masters at once."""
        self._running = True
        self._load_file()
        self._schedule_refresh(0)

    def stop(self) -> None:
        """Cancel the timers; a check in progress finishes without scheduling more."""
        self._running = False
        for call in (self._refresh_call, self._expire_call):
            if call is not None and call.active():
                call.cancel()
        self._refresh_call = None
        self._expire_call = None

    def _load_file(self) -> None:
        path = self.file
        if path is None or not path.exists():
            return
        try:
            zone = load_zone(str(path), self.origin, check_names="ignore")
            age = max(0.0, self.wall() - path.stat().st_mtime)
        except Exception as exc:
            log.warn(
                "{label}: saved copy of {zone} in {file} not loaded: {error}",
                label=self.label,
                zone=self._text,
                file=str(path),
                error=exc,
            )
            return
        expire = soa_timers(zone.soa)[2]
        self.last_transfer = "file"
        self._install(zone)
        log.info(
            "{label}: zone {zone} serial {serial} loaded from {file}",
            label=self.label,
            zone=self._text,
            serial=zone.serial,
            file=str(path),
        )
        if age >= expire:
            self._expire()
        else:
            self._arm_expire(expire - age)

    # -- timers --

    def _schedule_refresh(self, delay: float) -> None:
        if not self._running:
            return
        if self._refresh_call is not None and self._refresh_call.active():
            self._refresh_call.cancel()
        self._refresh_call = self.clock.callLater(delay, self._refresh_due)

    def _refresh_due(self) -> None:
        self._refresh_call = None
        self.refresh()

    def _arm_expire(self, delay: float) -> None:
        if self._expire_call is not None and self._expire_call.active():
            self._expire_call.cancel()
        self._expire_call = self.clock.callLater(max(0.0, delay), self._expire)

    def _expire(self) -> None:
        self._expire_call = None
        if self.expired:
            return
        self.expired = True
        log.error(
            "{label}: zone {zone} expired: no master answered for EXPIRE seconds; answering SERVFAIL",
            label=self.label,
            zone=self._text,
        )
        self._changed()

    def _intervals(self) -> tuple[float, float, float]:
        if self.zone is None:
            return (INITIAL_RETRY, INITIAL_RETRY, float("inf"))
        refresh, retry, expire = soa_timers(self.zone.soa)
        floor = self.min_interval
        return (max(floor, refresh), max(floor, retry), float(expire))

    # -- the check --

    def refresh(self) -> None:
        """Check the masters now (a NOTIFY, or REFRESH/RETRY time); one check runs at a time."""
        if not self._running:
            return
        if self._checking:
            self._again = True
            return
        if self._refresh_call is not None and self._refresh_call.active():
            self._refresh_call.cancel()
        self._refresh_call = None
        self._checking = True
        self._again = False
        d = defer.ensureDeferred(self._check())
        d.addErrback(self._check_crashed)
        d.addCallback(self._check_done)

    def _check_crashed(self, failure: Failure) -> bool:
        log.failure("{label}: refresh of {zone} failed", failure, label=self.label, zone=self._text)
        return False

    def _check_done(self, ok: bool) -> None:
        self._checking = False
        if not self._running:
            return
        refresh, retry, _ = self._intervals()
        if self._again:
            self._schedule_refresh(0)
        else:
            self._schedule_refresh(refresh if ok else retry)

    async def _check(self) -> bool:
        """Ask each master in turn until one gives a usable answer; True if one did."""
        for master in self.masters:
            try:
                if await self._check_master(master):
                    return True
            except Exception as exc:
                log.warn(
                    "{label}: refresh of {zone} from {master}: {error}",
                    label=self.label,
                    zone=self._text,
                    master=_fmt(master),
                    error=exc,
                )
        return False

    async def _check_master(self, master: Master) -> bool:
        soa = await self.transferer.query_soa(master, self.origin)
        theirs = soa_serial(soa)
        zone = self.zone
        if zone is not None:
            ours = zone.serial
            if theirs == ours:
                self._checked()
                return True
            if not serial_gt(theirs, ours):
                log.warn(
                    "{label}: {zone}: master {master} has serial {theirs}, older than ours ({ours}); "
                    "not transferred",
                    label=self.label,
                    zone=self._text,
                    master=_fmt(master),
                    theirs=theirs,
                    ours=ours,
                )
                return False
        new = await self._transfer(master, zone)
        if not self._running:
            return False  # stopped (a reload replaced this zone) while the transfer ran
        if new is None:
            self._checked()
            return True
        if zone is not None and self.zone is zone and not serial_gt(new.serial, zone.serial):
            raise XfrError(f"transfer brought serial {new.serial}, not newer than {zone.serial}")
        self._install(new)
        self._save(new)
        self._checked()
        if self.on_transfer is not None:
            try:
                self.on_transfer(new)
            except Exception:
                log.failure(
                    "{label}: after the transfer of {zone}", label=self.label, zone=self._text
                )
        log.info(
            "{label}: zone {zone} transferred by {kind} from {master}: serial {serial}, {count} records",
            label=self.label,
            zone=self._text,
            kind=self.last_transfer,
            master=_fmt(master),
            serial=new.serial,
            count=len(new),
        )
        return True

    async def _transfer(self, master: Master, zone: Zone | None) -> Zone | None:
        """The new zone from ``master`` (IXFR when possible, else AXFR); None if already current."""
        current = zone.soa if zone is not None else None
        if zone is not None and master not in self.no_ixfr:
            try:
                result = await self.transferer.transfer(master, self.origin, current, ixfr=True)
                if result.kind == "current":
                    return None
                built = self._build(result, zone)
                self.last_transfer = "IXFR" if result.kind == "ixfr" else "AXFR"
                return built
            except Exception as exc:
                log.info(
                    "{label}: IXFR of {zone} from {master} not usable ({error}); trying AXFR",
                    label=self.label,
                    zone=self._text,
                    master=_fmt(master),
                    error=exc,
                )
                if isinstance(exc, XfrError) and exc.rcode in (RCode.NOTIMP, RCode.FORMERR):
                    self.no_ixfr.add(master)
        result = await self.transferer.transfer(master, self.origin, None, ixfr=False)
        built = self._build(result, zone)
        self.last_transfer = "AXFR"
        return built

    def _build(self, result: TransferResult, zone: Zone | None) -> Zone:
        """Check the transferred data and make the new Zone (XfrError if unusable)."""
        if result.kind == "ixfr":
            if zone is None:
                raise XfrError("IXFR reply without a zone to apply it to")
            records = apply_differences(zone, result.differences)
            if soa_serial(records[0]) != soa_serial(result.soa):
                raise XfrError("IXFR sequences do not end at the master's serial")
        elif result.kind == "axfr":
            records = list(result.records)
        else:
            raise XfrError(f"unexpected transfer result {result.kind}")
        check_records(self.origin, records)
        if sum(1 for rr in records if rr.rtype == RRType.SOA) != 1:
            raise XfrError("the transferred zone must have exactly one SOA")
        if canonical(records[0].name) != self.apex or records[0].rtype != RRType.SOA:
            raise XfrError("the transferred zone does not start with its SOA")
        try:
            return Zone(self.origin, records)
        except ValueError as exc:
            raise XfrError(str(exc)) from None

    def _install(self, zone: Zone) -> None:
        self.zone = zone
        self._changed()

    def _checked(self) -> None:
        """A master answered: the zone is fresh again and EXPIRE starts over."""
        if self.zone is None:
            return
        was_expired = self.expired
        self.expired = False
        self._arm_expire(self._intervals()[2])
        if self.file is not None and self.file.exists():
            try:
                os.utime(self.file)
            except OSError:
                pass
        if was_expired:
            log.info("{label}: zone {zone} is served again", label=self.label, zone=self._text)
            self._changed()

    def _save(self, zone: Zone) -> None:
        if self.file is None:
            return
        try:
            write_zone_file(self.file, zone)
        except OSError as exc:
            log.error(
                "{label}: zone {zone} not saved to {file}: {error}",
                label=self.label,
                zone=self._text,
                file=str(self.file),
                error=exc,
            )

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.failure(
                    "{label}: change callback for {zone} failed", label=self.label, zone=self._text
                )


def _same_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, host: str) -> bool:
    try:
        return ip == ipaddress.ip_address(host)
    except ValueError:
        return False


def _fmt(master: Master) -> str:
    host, port = master
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
