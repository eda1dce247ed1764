"""The subcommand groups mounted under ``appliance`` besides check and reload.

Each entry registers its own subparsers; the code they drive lives with the
component it operates on (users with the directory, zones with DNS, ...).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

REGISTRARS: list[Registrar] = []
