"""The subcommand groups mounted under ``appliance`` besides check and reload.

Each entry registers its own subparsers; the code they drive lives with the
component it operates on (users with the directory, zones with DNS, ...).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

Registrar = Callable[[Any], None]

#: Where the Debian package keeps the users file (etc/appliance.toml names it).
DEFAULT_USERS = "/etc/appliance/users"


def _users(subparsers: Any) -> None:
    from appliance.directory.filedb import register_user_commands

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "user", help="manage the users file (add, passwd, del, list, show)"
    )
    register_user_commands(
        parser.add_subparsers(dest="user_command", metavar="ACTION", required=True),
        default_users_path=DEFAULT_USERS,
    )


def _dns(subparsers: Any) -> None:
    from appliance.dns.answer_cli import register

    register(subparsers)


def _checkzone(subparsers: Any) -> None:
    from appliance.dns.zonecheck import register

    register(subparsers)


def _policy(subparsers: Any) -> None:
    from appliance.policy_cli import register

    register(subparsers)


def _queue(subparsers: Any) -> None:
    from appliance.mail.queuetools import register

    register(subparsers)


REGISTRARS: list[Registrar] = [_users, _dns, _checkzone, _policy, _queue]
