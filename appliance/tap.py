"""What ``twistd appliance`` runs: command-line options and ``makeService``."""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from appliance import config as config_module


class Options(usage.Options):
    """Options of ``twistd appliance``."""

    optParameters = [
        ["config", "c", config_module.DEFAULT_PATH, "Path of the configuration file (TOML)."],
    ]


def makeService(options: Options, reactor: object = None) -> IService:
    """Load and validate the configuration, then build the service tree.

    A configuration with problems stops twistd before anything binds, with
    every problem printed (file, key, reason).
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    from appliance.assembly import build_service

    try:
        config = config_module.load(options["config"])
    except config_module.ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        raise SystemExit(1) from e
    return build_service(config, reactor)  # type: ignore[return-value]
