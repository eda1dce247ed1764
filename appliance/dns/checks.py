"""Zone checks for ``appliance check``: every configured zone must load and pass the D-8 checks.

Findings name file and line (see appliance.dns.zonecheck).  A serial lower
than the one the running server last served (its state file, when present)
is reported, and so is what the split horizon hides: the names served in the
inside view that the outside view does not have.
"""

from __future__ import annotations

from appliance.config import Config
from appliance.dns.service import SERIAL_STATE_FILE, read_serials, serial_key
from appliance.dns.zone import Zone
from appliance.dns.zonecheck import ERROR, INFO, check_zone_file, hidden_names


def check_zones(config: Config) -> tuple[list[str], list[str]]:
    """(errors, warnings) for every zone of every view, prefixed with the view's side."""
    errors: list[str] = []
    warnings: list[str] = []
    served = read_serials(config.state_dir / SERIAL_STATE_FILE)
    loaded: dict[str, list[Zone]] = {}
    for view in config.dns.views:
        for zone_config in view.zones:
            where = f"dns/{view.side} zone {zone_config.name}"
            if (
                getattr(zone_config, "type", "primary") == "secondary"
                and not zone_config.file.exists()
            ):
                warnings.append(f"(info) {where}: no transferred copy yet ({zone_config.file})")
                continue
            report = check_zone_file(
                str(zone_config.file),
                zone_config.name,
                outside=view.side == "outside",
                previous_serial=served.get(serial_key(view.side, zone_config.name)),
            )
            for finding in report.findings:
                text = f"{where}: {finding}"
                if finding.severity == ERROR:
                    errors.append(text)
                elif finding.severity == INFO:
                    warnings.append(f"(info) {text}")
                else:
                    warnings.append(text)
            if report.zone is not None:
                loaded.setdefault(view.side, []).append(report.zone)
    if "inside" in loaded:
        warnings.extend(
            f"(info) dns split: {note}"
            for note in hidden_names(loaded["inside"], loaded.get("outside", []))
        )
    return errors, warnings
