"""``appliance policy test``: what the SMTP gate would do with one session, without a client.

Like ``exim -bh``: the configuration is loaded, the anti-spam gate, the relay
policy and the recipient tables are built from it exactly as the running
process builds them (the resolver too: the inside view's zones, then its
forwarders or root hints), and a session from ``--client`` is played through
:func:`appliance.mail.gate.explain`.  Each step is printed as ``step check
verdict reason``; greylisting is consulted without recording the triple.
Exit status 0 when every recipient would be accepted, 1 when anything is
refused (or the message would be discarded), 2 when the configuration
cannot be used.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any, TextIO

from twisted.internet.defer import Deferred, inlineCallbacks

Row = tuple[str, str, str, str]

__all__ = ["PolicyTester", "format_rows", "register", "run_policy_test"]


def _greylist_offline(settings: Any) -> tuple[Any, str | None]:
    """The gate settings with a greylist database the CLI can open (read it if it exists).

    A missing database (the process never ran) would be created by sqlite:
    use an empty in-memory one instead and say so.
    """
    grey = settings.greylist
    if not grey.enabled or not grey.path or Path(grey.path).exists():
        return settings, None
    note = f"greylist database {grey.path} does not exist yet: every triple is new"
    return dataclasses.replace(settings, greylist=dataclasses.replace(grey, path=None)), note


def _inside_view(config: Any) -> tuple[Any, list[str]]:
    """The inside view with its zones loaded (no serial state written, no NOTIFY sent).

    A zone that does not load (a secondary not transferred yet, a broken
    file) is left out and named in the notes: its names go to the resolver.
    """
    from appliance.dns import names
    from appliance.dns.view import View
    from appliance.dns.zone import load_zone

    view_config = config.dns.view("inside")
    view = View("inside", {}, udp_size=config.dns.edns_buffer_size)
    notes: list[str] = []
    if view_config is None:
        return view, notes
    zones: dict[bytes, Any] = {}
    transfer: dict[bytes, Any] = {}
    for zone_config in view_config.zones:
        try:
            zone = load_zone(str(zone_config.file), zone_config.name)
        except Exception as e:
            notes.append(f"inside zone {zone_config.name} not loaded ({e}): asked through DNS")
            continue
        key = names.from_text(zone_config.name.rstrip(".") + ".")
        zones[key] = zone
        transfer[key] = ()
    view.replace_zones(zones, transfer)
    return view, notes


class PolicyTester:
    """The objects a port-25 listener consults, built from a loaded Config for an offline session.

    ``resolver`` (a MailResolver) and ``directory`` may be given (tests);
    otherwise they are built from the configuration like the process does.
    """

    def __init__(
        self, config: Any, reactor: Any, resolver: Any = None, directory: Any = None
    ) -> None:
        from appliance.mail.service import _aliases, _recipients, _relay_policy

        self.config = config
        self.reactor = reactor
        self.notes: list[str] = []
        if resolver is None:
            from appliance.assembly import _inside_resolver
            from appliance.dns.resolver import MailResolverAdapter

            view, notes = _inside_view(config)
            self.notes.extend(notes)
            resolver = MailResolverAdapter(_inside_resolver(config, reactor), view)
        if directory is None:
            directory = self._directory(config, reactor)
        self.resolver = resolver
        self.relay = _relay_policy(config)
        self.recipients = _recipients(config, directory, _aliases(config))
        self.gate: Any = None
        if config.gate is not None:
            from appliance.mail.gate import Gate

            settings, note = _greylist_offline(config.gate)
            if note:
                self.notes.append(note)
            self.gate = Gate(
                settings,
                resolver,
                reactor,
                is_inside=lambda ip: self.relay.is_inside_client(ip, False),
                is_local_domain=self.relay.accepts_for,
            )
        else:
            from appliance.mail.gate import Gate, GateSettings
            from appliance.mail.gate.domains import DomainSettings
            from appliance.mail.gate.headers import HeaderSettings

            # No [gate]: the listeners run no checks; an empty gate drives the same session.
            self.notes.append("no [gate] section: no anti-spam checks on port 25")
            empty = GateSettings(
                domains=DomainSettings(check_sender=False, check_recipients=False, always_wrong=()),
                headers=HeaderSettings(require_from=False),
            )
            empty = dataclasses.replace(empty, spf=dataclasses.replace(empty.spf, enabled=False))
            self.gate = Gate(empty, resolver, reactor)

    @staticmethod
    def _directory(config: Any, reactor: Any) -> Any:
        if config.directory.backend == "ldap" and config.directory.ldap is not None:
            from appliance.directory.ldap import LDAPDirectory, settings_from_config

            return LDAPDirectory(
                settings_from_config(config.directory.ldap), reactor, reactor.getThreadPool()
            )
        from appliance.directory.filedb import FileDirectory

        return FileDirectory(str(config.directory.users), reactor)

    def close(self) -> None:
        """Release the greylist database."""
        if self.gate is not None:
            self.gate.close()

    def _before_rcpt(self, authenticated: bool) -> Any:
        from appliance.mail.gate.verdict import Action, Verdict, reject, tempfail

        @inlineCallbacks
        def decide(session: Any, recipient: str) -> Generator[Any, Any, tuple[list[Row], Any]]:
            rows: list[Row] = []
            trusted = authenticated or session.access is Action.RELAY
            refusal = self.relay.decide(session.client_ip, trusted, session.sender or "", recipient)
            domain = recipient.rpartition("@")[2].lower()
            if refusal is not None:
                verdict = reject(refusal, "relay", f"relaying to {domain} denied for this client")
                rows.append(("rcpt", "relay", verdict.describe(), verdict.reason))
                return rows, verdict
            if not self.relay.accepts_for(domain):
                why = "inside client" if not trusted else "trusted client"
                if trusted and session.access is Action.RELAY:
                    why = "access map RELAY"
                rows.append(("rcpt", "relay", "accept", f"relaying to {domain} permitted ({why})"))
                return rows, None
            kind = "local" if self.relay.is_local_domain(domain) else "relay (backup MX)"
            rows.append(("rcpt", "relay", "accept", f"{domain} is a {kind} domain"))
            answer = yield self.recipients.check_recipient(recipient)
            if answer is None:
                rows.append(("rcpt", "recipient", "accept", f"<{recipient}> exists"))
                return rows, None
            made: Verdict = (
                tempfail(answer, "recipient", answer.text)
                if answer.temporary
                else reject(answer, "recipient", answer.text)
            )
            rows.append(("rcpt", "recipient", made.describe(), made.reason))
            return rows, made

        return decide

    def test(
        self,
        client: str,
        helo: str,
        sender: str,
        recipients: list[str],
        listener: str = "outside",
        authenticated: bool = False,
        header_block: bytes | None = None,
    ) -> Deferred[list[Row]]:
        """The rows of :func:`explain` for this session, with relaying and recipient existence."""
        from appliance.mail.gate import explain

        d: Deferred[list[Row]] = explain(
            self.gate,
            client,
            helo,
            sender,
            recipients,
            listener=listener,
            authenticated=authenticated,
            before_rcpt=self._before_rcpt(authenticated),
            header_block=header_block,
        )
        return d


def accepted(rows: list[Row], recipients: list[str]) -> bool:
    """True when no step refused and every recipient got an accepting result."""
    results = [(step, verdict) for step, check, verdict, _ in rows if check == "result"]
    refused = ("reject", "tempfail")
    if any(verdict.startswith(refused) for _, verdict in results):
        return False
    rcpt_results = [v for step, v in results if step == "rcpt"]
    return len(rcpt_results) == len(recipients) and not any(v == "discard" for _, v in results)


def format_rows(rows: list[Row], out: TextIO) -> None:
    """One line per row, columns aligned: step, check, verdict, reason."""
    width_step = max((len(r[0]) for r in rows), default=4)
    width_check = max((len(r[1]) for r in rows), default=5)
    for step, check, verdict, reason in rows:
        print(f"{step:<{width_step}}  {check:<{width_check}}  {verdict}  ({reason})", file=out)


def run_policy_test(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """The ``policy test`` command: 0 accepted, 1 refused, 2 unusable configuration or input."""
    from twisted.internet import reactor as global_reactor
    from twisted.internet.task import react

    from appliance import config as config_module

    try:
        ipaddress.ip_address(args.client)
    except ValueError:
        print(f"--client {args.client!r} is not an IP address", file=sys.stderr)
        return 2
    header_block: bytes | None = None
    if args.headers:
        try:
            header_block = Path(args.headers).read_bytes().replace(b"\r\n", b"\n")
        except OSError as e:
            print(f"{args.headers}: {e}", file=sys.stderr)
            return 2
        header_block = header_block.replace(b"\n", b"\r\n")
    try:
        config = config_module.load(args.config)
    except config_module.ConfigError as e:
        print(f"{args.config}: {e}", file=sys.stderr)
        return 2
    status: list[int] = [2]

    @inlineCallbacks
    def main(reactor: Any) -> Generator[Any, Any, None]:
        try:
            tester = PolicyTester(config, reactor)
        except Exception as e:  # an unreadable access map, users file or zone
            print(f"{args.config}: cannot build the gate: {e}", file=sys.stderr)
            return
        try:
            for note in tester.notes:
                print(f"note: {note}", file=out)
            rows = yield tester.test(
                args.client,
                args.helo,
                args.sender,
                list(args.to),
                listener=args.listener,
                authenticated=args.authenticated,
                header_block=header_block,
            )
        finally:
            tester.close()
        format_rows(rows, out)
        ok = accepted(rows, list(args.to))
        discarded = any(check == "result" and verdict == "discard" for _, check, verdict, _ in rows)
        print("=> accepted" if ok else "=> discarded" if discarded else "=> refused", file=out)
        status[0] = 0 if ok else 1

    try:
        react(main, [])
    except SystemExit:
        pass
    del global_reactor
    return status[0]


def register(subparsers: Any) -> None:
    """Mount ``appliance policy test`` (listed in appliance.commands.REGISTRARS)."""
    import os

    from appliance import config as config_module

    policy: argparse.ArgumentParser = subparsers.add_parser(
        "policy", help="test the SMTP gate, relay rules and recipients from a chosen client"
    )
    actions = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    p = actions.add_parser(
        "test",
        help="explain what port 25 would answer to one session (like exim -bh)",
        description=(
            "Play one SMTP session from --client through the gate of the configuration "
            "(DNS lookups are real; greylisting is consulted, not recorded) and explain "
            "each step. Exit 0 when every recipient would be accepted, 1 otherwise."
        ),
    )
    p.add_argument("--client", required=True, metavar="IP", help="the client's address")
    p.add_argument("--helo", default="client.invalid", metavar="NAME", help="HELO/EHLO name")
    p.add_argument(
        "--from", dest="sender", default="", metavar="ADDRESS", help="envelope sender ('' is <>)"
    )
    p.add_argument(
        "--to", action="append", required=True, metavar="ADDRESS", help="a recipient (repeat)"
    )
    p.add_argument(
        "--listener",
        default="outside",
        choices=("outside", "inside"),
        help="which port-25 listener the client connects to (default: outside)",
    )
    p.add_argument("--authenticated", action="store_true", help="as a client that used SMTP AUTH")
    p.add_argument("--headers", metavar="FILE", help="a message whose header block is judged too")
    p.add_argument(
        "--config",
        default=os.environ.get("APPLIANCE_CONFIG", config_module.DEFAULT_PATH),
        help="configuration file (default: %(default)s, or $APPLIANCE_CONFIG)",
    )
    p.set_defaults(func=run_policy_test)
