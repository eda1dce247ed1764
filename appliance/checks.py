"""``appliance check``: the configuration and every file it names, all problems at once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from appliance import config as config_module
from appliance.config import Config

#: Further checks run on a valid configuration: each returns (errors, warnings).
Check = Callable[[Config], tuple[list[str], list[str]]]


def _registered() -> list[Check]:
    from appliance.dns.checks import check_zones

    return [check_zones]


CHECKS: list[Check] = []


def check_all(path: Path) -> tuple[list[str], list[str]]:
    """Errors and warnings for the configuration at ``path`` and the data it names."""
    problems = config_module.check(path)
    if problems:
        return [str(p) for p in problems], []
    config = config_module.load(path)
    errors: list[str] = []
    warnings: list[str] = []
    for check in [*_registered(), *CHECKS]:
        e, w = check(config)
        errors.extend(e)
        warnings.extend(w)
    return errors, warnings
