"""Zone checks for ``appliance check``: every configured zone must load; findings name file and line."""

from __future__ import annotations

from appliance.config import Config
from appliance.dns.zone import load_zone
from appliance.dns.zonefile import ZoneFileError


def check_zones(config: Config) -> tuple[list[str], list[str]]:
    """(errors, warnings) for every zone of every view, prefixed with the view's side."""
    errors: list[str] = []
    warnings: list[str] = []
    for view in config.dns.views:
        for zone_config in view.zones:
            where = f"dns/{view.side} zone {zone_config.name}"
            try:
                zone = load_zone(str(zone_config.file), zone_config.name)
            except ZoneFileError as e:
                errors.extend(f"{where}: {error}" for error in e.errors)
                continue
            except (OSError, ValueError) as e:
                errors.append(f"{where}: {zone_config.file}: {e}")
                continue
            warnings.extend(f"{where}: {w}" for w in zone.warnings)
    return errors, warnings
