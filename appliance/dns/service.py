"""The DNS service: loads each view's zones at start and on reload, and owns the View objects.

A zone that fails to load at reload keeps its previous data and the error is
logged (D-7); the new zone table replaces the old one in a single assignment,
so a query sees either the old or the new table, never a mixture.  After each
load the zone's serial is compared with the one served before (RFC 1982): a
higher serial, or the first load, sends NOTIFY to the zone's ``also_notify``
secondaries (RFC 1996, D-6); a lower one is logged.  The serials served are
kept in a small state file so that ``appliance check`` can spot a serial that
went backwards before a reload.

Secondary zones (``type = "secondary"``) are `SecondaryZone` objects that
stay in their view's table across reloads (unless their settings change) and
keep themselves current from their masters (appliance.dns.secondary).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from appliance.config import SIDES, Config, DNSConfig, ViewConfig, ZoneConfig
from appliance.dns.notify import NotifySender, serial_gt, serial_lt, soa_serial
from appliance.dns.secondary import SecondaryZone, Transferer
from appliance.dns.view import Network, ServedZone, View

log = Logger(namespace="appliance.dns")

ZoneLoader = Callable[[Path, str], ServedZone]
#: Makes the transfer client of one source address (see appliance.dns.xfr.XfrClient).
TransfererFactory = Callable[[str], Transferer]

#: Where, under the state directory, the serial each zone was last served with is kept.
SERIAL_STATE_FILE = "dns-serials.json"


def serial_key(side: str, zone: str) -> str:
    """The key of a zone in the serial state file: ``side/zone.`` (lower case, absolute)."""
    return f"{side}/{zone.rstrip('.').lower()}."


def read_serials(path: Path) -> dict[str, int]:
    """The serial state file's contents; empty if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): int(v) for k, v in data.items() if isinstance(v, int)}


def _origin_key(name: str) -> bytes:
    from appliance.dns import names

    return names.from_text(name.rstrip(".") + ".")


class DNSService(Service):
    """Holds one View per configured side; listeners are given ``view(side)`` as responder."""

    name = "dns"

    def __init__(
        self,
        settings: DNSConfig,
        load_zone: ZoneLoader,
        *,
        reactor: Any = None,
        sources: Mapping[str, str] | None = None,
        serial_state: Path | None = None,
        notify_timeout: float | None = None,
        transferer: TransfererFactory | None = None,
    ) -> None:
        """``sources`` maps a side to the address NOTIFY is sent from (the side's own address,
        so secondaries recognise their primary), and secondary zones transfer from by default;
        ``serial_state`` is the serial state file (normally ``state_dir / SERIAL_STATE_FILE``);
        ``reactor`` defaults to the global one; ``transferer`` makes the SOA/AXFR/IXFR client
        for a source address (default: appliance.dns.xfr.XfrClient)."""
        self.settings = settings
        self._load_zone = load_zone
        self._reactor = reactor
        self._sources = dict(sources or {})
        self._serial_state = serial_state
        self._notify_timeout = notify_timeout
        self.notifiers: dict[str, NotifySender] = {}
        self._transferer_factory = transferer
        self._transferers: dict[str, Transferer] = {}
        #: Secondary zones by (side, zone name), with the configuration they were made from.
        self.secondaries: dict[tuple[str, str], tuple[ZoneConfig, SecondaryZone]] = {}
        self.views: dict[str, View] = {}
        self._loaded: dict[tuple[str, str], tuple[Path, ServedZone]] = {}
        self._served: dict[str, int] = read_serials(serial_state) if serial_state else {}
        # Both sides get a view: one without zones simply refuses every question.
        for side in SIDES:
            view_config = settings.view(side)
            self.views[side] = View(
                side,
                {},
                allow_query=view_config.allow_query if view_config else (),
                udp_size=settings.edns_buffer_size,
                minimal_any=side == "outside",
            )

    def startService(self) -> None:
        Service.startService(self)
        self._load_all(self.settings)

    def stopService(self) -> None:
        for sender in self.notifiers.values():
            sender.stop()
        for _, secondary in self.secondaries.values():
            secondary.stop()
        return Service.stopService(self)  # type: ignore[no-any-return]

    def notifier(self, side: str) -> NotifySender:
        """The NOTIFY sender of one side, sending from that side's address."""
        sender = self.notifiers.get(side)
        if sender is None:
            reactor = self._reactor
            if reactor is None:
                from twisted.internet import reactor  # type: ignore[no-redef]
            kwargs: dict[str, Any] = {}
            if self._notify_timeout is not None:
                kwargs["timeout"] = self._notify_timeout
            sender = NotifySender(
                reactor, source=self._sources.get(side, ""), label=f"dns/{side}", **kwargs
            )
            self.notifiers[side] = sender
        return sender

    def reconfigure(self, config: Config) -> None:
        for view_config in config.dns.views:
            view = self.views.get(view_config.side)
            if view is not None:
                view.allow_query = view_config.allow_query
        self.settings = config.dns
        self._load_all(config.dns)

    def _load_all(self, settings: DNSConfig) -> None:
        for view_config in settings.views:
            view = self.views.get(view_config.side)
            if view is None:
                log.warn("dns: view {side} added by reload needs a restart", side=view_config.side)
                continue
            self._load_view(view, view_config)
        wanted = {
            (v.side, z.name) for v in settings.views for z in v.zones if z.type == "secondary"
        }
        for key in [k for k in self.secondaries if k not in wanted]:
            self.secondaries.pop(key)[1].stop()
        self._save_serials()

    def _load_view(self, view: View, view_config: ViewConfig) -> None:
        zones: dict[bytes, ServedZone] = {}
        transfer: dict[bytes, tuple[Network, ...]] = {}
        changed: list[tuple[ZoneConfig, ServedZone]] = []
        for zone_config in view_config.zones:
            key = (view_config.side, zone_config.name)
            if zone_config.type == "secondary":
                origin = _origin_key(zone_config.name)
                zones[origin] = self._secondary(view, zone_config)
                transfer[origin] = zone_config.allow_transfer
                continue
            try:
                zone = self._load_zone(zone_config.file, zone_config.name)
            except Exception as e:
                previous = self._loaded.get(key)
                log.error(
                    "dns/{side}: zone {zone} not loaded from {file}: {error}{kept}",
                    side=view_config.side,
                    zone=zone_config.name,
                    file=str(zone_config.file),
                    error=e,
                    kept="; keeping the previous data" if previous else "",
                )
                if previous is None:
                    continue
                zone = previous[1]
            else:
                previous = self._loaded.get(key)
                self._loaded[key] = (zone_config.file, zone)
                if self._serial_changed(view_config.side, zone_config, zone, previous):
                    changed.append((zone_config, zone))
                log.info(
                    "dns/{side}: zone {zone} loaded from {file}",
                    side=view_config.side,
                    zone=zone_config.name,
                    file=str(zone_config.file),
                )
            origin = _origin_key(zone_config.name)
            zones[origin] = zone
            transfer[origin] = zone_config.allow_transfer
        view.replace_zones(zones, transfer)
        # Only now that the new data is served may the secondaries come and fetch it.
        for zone_config, zone in changed:
            self._notify(view_config.side, zone_config, zone)

    def _transferer(self, source: str) -> Transferer:
        client = self._transferers.get(source)
        if client is None:
            if self._transferer_factory is not None:
                client = self._transferer_factory(source)
            else:
                from appliance.dns.xfr import XfrClient

                reactor = self._reactor
                if reactor is None:
                    from twisted.internet import reactor  # type: ignore[no-redef]
                client = XfrClient(reactor, reactor, source)
            self._transferers[source] = client
        return client

    def _secondary(self, view: View, zone_config: ZoneConfig) -> SecondaryZone:
        """The running SecondaryZone for this zone: kept across reloads unless its settings changed."""
        key = (view.side, zone_config.name)
        found = self.secondaries.get(key)
        if found is not None and found[0] == zone_config:
            return found[1]
        if found is not None:
            found[1].stop()
        source = zone_config.transfer_source or self._sources.get(view.side) or "127.0.0.1"
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        secondary = SecondaryZone(
            _origin_key(zone_config.name),
            zone_config.masters,
            self._transferer(source),
            reactor,
            file=zone_config.file,
            allow_notify=zone_config.allow_notify,
            on_change=view.invalidate,
            # A new version goes on to our own secondaries, as BIND's also-notify does.
            on_transfer=lambda zone: self._notify(view.side, zone_config, zone),
            label=f"dns/{view.side}",
        )
        self.secondaries[key] = (zone_config, secondary)
        secondary.start()
        return secondary

    def _serial_changed(
        self,
        side: str,
        zone_config: ZoneConfig,
        zone: ServedZone,
        previous: tuple[Path, ServedZone] | None,
    ) -> bool:
        """Compare with the serial served before (RFC 1982); True if secondaries need a NOTIFY."""
        serial = soa_serial(zone.soa)
        state_key = serial_key(side, zone_config.name)
        if previous is not None:
            old: int | None = soa_serial(previous[1].soa)
        else:
            old = self._served.get(state_key)
        self._served[state_key] = serial
        if old is not None and serial_lt(serial, old):
            log.warn(
                "dns/{side}: zone {zone} serial went backwards ({old} -> {new}): "
                "secondaries will keep the old data",
                side=side,
                zone=zone_config.name,
                old=old,
                new=serial,
            )
            return False
        if previous is None:
            return True  # first load: tell the secondaries, as RFC 1996 4 and BIND do
        if old is not None and serial == old:
            if set(previous[1]) != set(zone):
                log.warn(
                    "dns/{side}: zone {zone} changed but its serial {serial} did not: "
                    "secondaries will not transfer it",
                    side=side,
                    zone=zone_config.name,
                    serial=serial,
                )
            return False
        return old is None or serial_gt(serial, old)

    def _notify(self, side: str, zone_config: ZoneConfig, zone: ServedZone) -> None:
        if not zone_config.also_notify:
            return
        try:
            self.notifier(side).notify(zone.origin, zone.soa, zone_config.also_notify)
        except Exception:
            log.failure("dns/{side}: NOTIFY for {zone} failed", side=side, zone=zone_config.name)

    def _save_serials(self) -> None:
        path = self._serial_state
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(path.name + ".tmp")
            temporary.write_text(json.dumps(self._served, indent=1, sort_keys=True) + "\n")
            os.replace(temporary, path)
        except OSError as e:
            log.warn("dns: serial state {path} not saved: {error}", path=str(path), error=e)

    def view(self, side: str) -> View:
        return self.views[side]
