"""The DNS service: loads each view's zones at start and on reload, and owns the View objects.

A zone that fails to load at reload keeps its previous data and the error is
logged (D-7); the new zone table replaces the old one in a single assignment,
so a query sees either the old or the new table, never a mixture.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from twisted.application.service import Service
from twisted.logger import Logger

from appliance.config import SIDES, Config, DNSConfig, ViewConfig
from appliance.dns.view import Network, ServedZone, View

log = Logger(namespace="appliance.dns")

ZoneLoader = Callable[[Path, str], ServedZone]


def _origin_key(name: str) -> bytes:
    from appliance.dns import names

    return names.from_text(name.rstrip(".") + ".")


class DNSService(Service):
    """Holds one View per configured side; listeners are given ``view(side)`` as responder."""

    name = "dns"

    def __init__(self, settings: DNSConfig, load_zone: ZoneLoader) -> None:
        self.settings = settings
        self._load_zone = load_zone
        self.views: dict[str, View] = {}
        self._loaded: dict[tuple[str, str], tuple[Path, ServedZone]] = {}
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

    def _load_view(self, view: View, view_config: ViewConfig) -> None:
        zones: dict[bytes, ServedZone] = {}
        transfer: dict[bytes, tuple[Network, ...]] = {}
        for zone_config in view_config.zones:
            key = (view_config.side, zone_config.name)
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
                self._loaded[key] = (zone_config.file, zone)
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

    def view(self, side: str) -> View:
        return self.views[side]
