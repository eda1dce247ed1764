"""The ``appliance`` command: what operators do by hand (check, reload, users, zones, queue).

Each subcommand is a small function taking the parsed arguments and
returning the exit status; it prints problems as ``file: key: reason`` so
that an operator can go straight to the line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from appliance import __version__
from appliance import config as config_module

Command = Callable[[argparse.Namespace], int]


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        default=os.environ.get("APPLIANCE_CONFIG", config_module.DEFAULT_PATH),
        help="configuration file (default: %(default)s, or $APPLIANCE_CONFIG)",
    )


def cmd_check(args: argparse.Namespace) -> int:
    """Validate the configuration and everything it names; exit 1 on any error."""
    from appliance.checks import check_all

    errors, warnings = check_all(Path(args.config))
    for warning in warnings:
        print(f"warning: {warning}")
    for error in errors:
        print(f"error: {error}")
    if errors:
        print(f"{args.config}: {len(errors)} error(s), {len(warnings)} warning(s)", file=sys.stderr)
        return 1
    print(f"{args.config}: ok ({len(warnings)} warning(s))")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running process to reload (SIGHUP to the pid in state_dir/appliance.pid)."""
    try:
        config = config_module.load(args.config)
    except config_module.ConfigError as e:
        for problem in e.problems:
            print(f"error: {problem}")
        print("not reloading: the configuration has errors", file=sys.stderr)
        return 1
    pidfile = config.state_dir / "appliance.pid"
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as e:
        print(f"{pidfile}: cannot signal the running appliance: {e}", file=sys.stderr)
        return 1
    print(f"reload requested (pid {pid})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="Operate the gateway appliance (the server itself runs as `twistd appliance`).",
    )
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("check", help="validate the configuration, zones, aliases and users")
    _add_config(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("reload", help="make the running appliance reload its configuration")
    _add_config(p)
    p.set_defaults(func=cmd_reload)

    for register in _extensions():
        register(sub)
    return parser


def _extensions() -> list[Callable[[argparse._SubParsersAction], None]]:  # type: ignore[type-arg]
    """Subcommand groups that live next to the code they operate on."""
    from appliance.commands import REGISTRARS

    return list(REGISTRARS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Command = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
