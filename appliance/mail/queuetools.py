"""The operator's queue and routing tools (O-2): mailq, flush, delete, hold, release, route.

The running process serves them on its control socket (appliance.control):
:func:`queue_handlers` builds the handlers around the live spool, queue
runner and remote delivery, so ``flush`` retries through the real runner and
``route`` asks the same router and resolver a delivery would use, recording
every DNS answer on the way.  The ``appliance`` subcommands (:func:`register`)
are thin clients; ``mailq`` alone falls back to reading the spool directly
when the process is not running (envelope.json is replaced atomically, so a
read never sees half a state).

Holding a message is one extra file in its queue directory (an on-disk
addition to appliance.mail.queue's format, backwards compatible: older code
ignores it)::

    <root>/queue/<qid>/held     present: the runner does not attempt the message

Creating or removing the marker is atomic, and it moves with the directory
when the message is removed, so no lock is needed.  The spool keeps the
marker (``Spool.set_held``) and, once it has recovered the queue at start,
knows every hold from memory: the runner asks for each message it processes.  A held message still
ages: its lifetime is counted from arrival, and it bounces when released
after its lifetime has passed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger

from appliance.control import CommandError, ControlClient, Handler, socket_path
from appliance.mail.interfaces import Reply
from appliance.mail.queue import FINAL, QueuedMessage, Spool, UnknownMessage
from appliance.mail.routing import LOCAL, normalise_domain

if TYPE_CHECKING:
    from appliance.mail.local import LocalRecipients
    from appliance.mail.outbound import RemoteDelivery
    from appliance.mail.runner import QueueRunner


log = Logger(namespace="appliance.mail.queuetools")


# -- describing the queue -----------------------------------------------------------------


def _reply_json(reply: Reply | None) -> dict[str, Any] | None:
    if reply is None:
        return None
    return {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text}


def describe_message(spool: Spool, message: QueuedMessage, now: float) -> dict[str, Any]:
    """One mailq entry: id, age, size, sender, hold flag and every recipient's state."""
    return {
        "queue_id": message.queue_id,
        "age": max(0.0, now - message.envelope.received_at),
        "received_at": message.envelope.received_at,
        "size": message.size,
        "sender": message.envelope.sender,
        "held": spool.is_held(message.queue_id),
        "recipients": [
            {
                "address": r.address,
                "status": r.status,
                "attempts": r.attempts,
                "next_attempt": r.next_attempt,
                "last_reply": _reply_json(r.last_reply),
                "original": r.original,
            }
            for r in message.recipients
        ],
    }


def list_queue(spool: Spool, now: float) -> list[dict[str, Any]]:
    """Every readable message, oldest first (one vanishing while listed is skipped)."""
    out = []
    for queue_id in spool.messages():
        try:
            message = spool.load(queue_id)
        except (UnknownMessage, ValueError, OSError):
            continue
        out.append(describe_message(spool, message, now))
    return out


# -- route explanation --------------------------------------------------------------------


class RecordingResolver:
    """Wraps the mail resolver and keeps each question with its answer (for ``route``)."""

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver
        self.answers: list[dict[str, Any]] = []

    def _record(self, kind: str, name: str, d: Any) -> Any:
        entry: dict[str, Any] = {"query": kind, "name": name}
        self.answers.append(entry)

        def ok(result: Any) -> Any:
            entry["answer"] = [list(x) if isinstance(x, tuple) else x for x in result]
            return result

        def failed(f: Any) -> Any:
            entry["error"] = type(f.value).__name__
            return f

        return defer.maybeDeferred(lambda: d).addCallbacks(ok, failed)

    def mx(self, domain: str) -> Any:
        return self._record("MX", domain, defer.maybeDeferred(self.resolver.mx, domain))

    def addresses(self, host: str) -> Any:
        return self._record("A/AAAA", host, defer.maybeDeferred(self.resolver.addresses, host))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.resolver, name)


async def explain_remote(remote: RemoteDelivery, address: str) -> dict[str, Any]:
    """How a remote delivery to ``address`` would go now: route, DNS answers, addresses in order."""
    from appliance.mail import mx

    domain = address.rpartition("@")[2] if "@" in address else ""
    route = remote.router.route(domain)
    out: dict[str, Any] = {
        "route": {
            "kind": route.kind,
            "host": route.host,
            "port": route.port,
            "mx_lookup": route.mx_lookup,
        }
    }
    if route.kind == LOCAL:
        out["result"] = {"local": True}
        return out
    recording = RecordingResolver(remote.resolver)
    settings = remote.settings
    found = await mx.destinations(
        route,
        recording,
        settings.own_names,
        settings.own_addresses,
        random.Random(),
        max_addresses=settings.max_addresses,
    )
    out["dns"] = recording.answers
    lower = _own_mx(recording.answers, settings.own_names, settings.own_addresses)
    if lower is not None:
        out["lower_mx"] = {"host": lower[1], "preference": lower[0]}
    if isinstance(found, mx.Destinations):
        out["result"] = {
            "destinations": [
                {"host": d.host, "preference": d.preference, "address": d.address, "port": d.port}
                for d in found.hosts
            ]
        }
    elif isinstance(found, mx.SelfIsBestMX):
        out["result"] = {"self_is_best_mx": found.domain, "policy": settings.self_is_best_mx}
        out["result"].update(_reply_json(found.reply) or {})
    else:
        kind = "permanent" if isinstance(found, mx.PermanentFailure) else "temporary"
        out["result"] = {kind: _reply_json(found.reply)}
    if settings.fallback is not None:
        fb = settings.fallback
        out["fallback"] = {"host": fb.host, "port": fb.port, "mx_lookup": fb.mx_lookup}
    return out


def _own_mx(
    answers: Sequence[Mapping[str, Any]], own_names: Sequence[str], own_addresses: Sequence[str]
) -> tuple[int, str] | None:
    """(preference, host) of the best MX record naming this box, from the recorded answers."""
    names = {normalise_domain(n) for n in own_names}
    addresses = set(own_addresses)
    resolved = {a["name"]: set(a.get("answer", ())) for a in answers if a["query"] == "A/AAAA"}
    mine = [
        (int(preference), str(host))
        for a in answers
        if a["query"] == "MX"
        for preference, host in a.get("answer", ())
        if host and (normalise_domain(host) in names or resolved.get(host, set()) & addresses)
    ]
    return min(mine) if mine else None


async def explain(
    recipients: LocalRecipients, remote: RemoteDelivery | None, address: str, depth: int = 0
) -> dict[str, Any]:
    """Local (alias expansion, mailboxes) or remote (route, MX, addresses) for one address."""
    from appliance.directory.base import DirectoryUnavailable
    from appliance.mail.local import MailboxTarget, RemoteTarget, UnknownRecipient

    address = address.strip().strip("<>")
    if "@" not in address or not address.rpartition("@")[2]:
        raise CommandError(f"{address!r} is not an address with a domain")
    out: dict[str, Any] = {"address": address}
    if recipients.is_local(address):
        out["kind"] = "local"
        try:
            targets = await recipients.resolve(address)
        except UnknownRecipient as e:
            out["unknown"] = _reply_json(e.reply)
            return out
        except DirectoryUnavailable as e:
            raise CommandError(f"the directory is unavailable: {e}") from None
        out["mailboxes"] = [
            {"mailbox": t.mailbox, "address": t.address}
            for t in targets
            if isinstance(t, MailboxTarget)
        ]
        forwards = [t.address for t in targets if isinstance(t, RemoteTarget)]
        if forwards:
            out["forwards"] = (
                [await explain(recipients, remote, a, depth + 1) for a in forwards]
                if depth < 3
                else forwards
            )
        return out
    out["kind"] = "remote"
    if remote is None:
        out["result"] = {"queued": "no resolver: remote mail stays queued"}
        return out
    out.update(await explain_remote(remote, address))
    return out


# -- the server side ------------------------------------------------------------------


def _queue_id(request: Mapping[str, Any]) -> str:
    queue_id = request.get("queue_id")
    if not isinstance(queue_id, str) or not Spool.valid_queue_id(queue_id.upper()):
        raise CommandError(f"not a queue id: {queue_id!r}")
    return queue_id.upper()


def _open_domains(message: QueuedMessage) -> set[str]:
    return {
        normalise_domain(r.address.rpartition("@")[2])
        for r in message.recipients
        if r.status not in FINAL
    }


def queue_handlers(
    spool: Spool,
    runner: QueueRunner,
    recipients: Callable[[], LocalRecipients],
    remote: Callable[[], RemoteDelivery | None],
) -> dict[str, Handler]:
    """The control-socket commands over the live spool, runner and delivery objects.

    ``recipients`` and ``remote`` are called per request, so a reload's new
    tables are used at once.
    """

    def mailq(request: Mapping[str, Any]) -> Any:
        return list_queue(spool, runner.clock.seconds())

    def flush(request: Mapping[str, Any]) -> Any:
        target = request.get("target")
        if target is None or target == "":
            chosen = spool.messages()
        elif isinstance(target, str) and Spool.valid_queue_id(target.upper()):
            if not spool.has(target.upper()):
                raise CommandError(f"{target.upper()}: no such message")
            chosen = [target.upper()]
        elif isinstance(target, str):
            domain = normalise_domain(target.lstrip("@"))
            chosen = []
            for queue_id in spool.messages():
                try:
                    message = spool.load(queue_id)
                except (UnknownMessage, ValueError, OSError):
                    continue
                if domain in _open_domains(message):
                    chosen.append(queue_id)
        else:
            raise CommandError("flush target must be a queue id or a domain")
        held = [q for q in chosen if spool.is_held(q)]
        on_hold = set(held)
        flushed = [q for q in chosen if q not in on_hold]
        for queue_id in flushed:
            runner.force(queue_id)
        log.info(
            "operator flush: {n} message(s) ({target})", n=len(flushed), target=target or "all"
        )
        return {"flushed": flushed, "held": held}

    def delete(request: Mapping[str, Any]) -> Any:
        queue_id = _queue_id(request)
        d = spool.remove(queue_id, force=True)

        def done(_: object) -> Any:
            runner.forget(queue_id)
            log.info("{qid}: deleted by the operator", qid=queue_id)
            return {"deleted": queue_id}

        def missing(f: Any) -> Any:
            f.trap(UnknownMessage)
            raise CommandError(f"{queue_id}: no such message")

        return d.addCallbacks(done, missing)

    def hold(request: Mapping[str, Any]) -> Any:
        queue_id = _queue_id(request)
        try:
            spool.set_held(queue_id, True)
        except UnknownMessage:
            raise CommandError(f"{queue_id}: no such message") from None
        log.info("{qid}: put on hold by the operator", qid=queue_id)
        return {"held": queue_id}

    def release(request: Mapping[str, Any]) -> Any:
        queue_id = _queue_id(request)
        try:
            spool.set_held(queue_id, False)
        except UnknownMessage:
            raise CommandError(f"{queue_id}: no such message") from None
        log.info("{qid}: released by the operator", qid=queue_id)
        runner.force(queue_id)
        return {"released": queue_id}

    def route(request: Mapping[str, Any]) -> Any:
        address = request.get("address")
        if not isinstance(address, str):
            raise CommandError("route needs an address")
        return defer.ensureDeferred(explain(recipients(), remote(), address))

    return {
        "mailq": mailq,
        "flush": flush,
        "delete": delete,
        "hold": hold,
        "release": release,
        "route": route,
    }


# -- the command-line side ---------------------------------------------------------------


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def format_mailq(entries: Sequence[Mapping[str, Any]], now: float) -> str:
    """``mailq`` as text: one line per message, one indented line per recipient."""
    if not entries:
        return "Mail queue is empty\n"
    lines = []
    for e in entries:
        flag = " (held)" if e.get("held") else ""
        lines.append(f"{e['queue_id']}{flag}  {e['size']:>8}  {_age(e['age']):>4}  <{e['sender']}>")
        for r in e["recipients"]:
            text = f"    <{r['address']}> {r['status']}"
            if r["attempts"]:
                text += f", {r['attempts']} attempt(s)"
            if r["status"] in ("pending", "deferred") and r["next_attempt"] > now:
                text += f", next in {_age(r['next_attempt'] - now)}"
            reply = r.get("last_reply")
            if reply:
                text += f": {reply['code']} {reply['enhanced']} {reply['text']}"
            lines.append(text)
    lines.append(f"-- {len(entries)} message(s)")
    return "\n".join(lines) + "\n"


def format_route(info: Mapping[str, Any], indent: str = "") -> str:
    """``route`` as text: the decision, then the DNS answers, then the addresses in order."""
    lines = [f"{indent}{info['address']}: {info['kind']}"]
    if info["kind"] == "local":
        if "unknown" in info:
            u = info["unknown"]
            lines.append(f"{indent}  unknown recipient: {u['code']} {u['enhanced']} {u['text']}")
        for box in info.get("mailboxes", []):
            lines.append(f"{indent}  mailbox {box['mailbox']} (as {box['address']})")
        for forward in info.get("forwards", []):
            if isinstance(forward, str):
                lines.append(f"{indent}  forwarded to {forward}")
            else:
                lines.append(f"{indent}  forwarded to:")
                lines.append(format_route(forward, indent + "    ").rstrip("\n"))
        return "\n".join(lines) + "\n"
    route = info.get("route")
    if route:
        how = "MX lookup of" if route["mx_lookup"] else "directly to"
        lines.append(
            f"{indent}  route: {route['kind']}, {how} {route['host']} port {route['port']}"
        )
    for answer in info.get("dns", []):
        if "error" in answer:
            result = f"failed ({answer['error']})"
        else:
            items = answer.get("answer", [])
            result = ", ".join(
                " ".join(str(x) or "." for x in i) if isinstance(i, list) else str(i) for i in items
            )
            result = result or "(no records)"
        lines.append(f"{indent}  dns: {answer['query']} {answer['name']} -> {result}")
    if "lower_mx" in info:
        own = info["lower_mx"]
        lines.append(
            f"{indent}  this host is MX {own['preference']} ({own['host']}): MX hosts with "
            f"preference {own['preference']} or more are skipped (lower-MX rule)"
        )
    result = info.get("result", {})
    if "destinations" in result:
        for n, d in enumerate(result["destinations"], 1):
            lines.append(
                f"{indent}  {n}. {d['host']} (preference {d['preference']}) "
                f"{d['address']} port {d['port']}"
            )
    for key in ("permanent", "temporary"):
        if key in result:
            r = result[key]
            lines.append(f"{indent}  {key} failure: {r['code']} {r['enhanced']} {r['text']}")
    if "self_is_best_mx" in result:
        lines.append(
            f"{indent}  this host is the best MX for {result['self_is_best_mx']} "
            f"(policy: {result['policy']})"
        )
    if "queued" in result:
        lines.append(f"{indent}  {result['queued']}")
    if "fallback" in info:
        fb = info["fallback"]
        lines.append(f"{indent}  then fallback relay {fb['host']} port {fb['port']}")
    return "\n".join(lines) + "\n"


def _socket(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    from appliance import config as config_module

    config = config_module.load(args.config)
    return socket_path(config.state_dir)


def _call(args: argparse.Namespace, command: str, **arguments: Any) -> Any:
    with ControlClient(_socket(args)) as client:
        return client.call(command, **arguments)


def _run(args: argparse.Namespace, command: str, **arguments: Any) -> tuple[int, Any]:
    try:
        return 0, _call(args, command, **arguments)
    except CommandError as e:
        print(f"appliance {command}: {e}", file=sys.stderr)
        return 1, None
    except OSError as e:
        print(f"appliance {command}: cannot reach the running appliance: {e}", file=sys.stderr)
        return 1, None
    except Exception as e:  # the configuration: ConfigError
        problems = getattr(e, "problems", None)
        for problem in problems or [str(e)]:
            print(f"error: {problem}", file=sys.stderr)
        return 1, None


def cmd_mailq(args: argparse.Namespace) -> int:
    """List the queue, from the running process or, when it is down, from the spool."""
    now = time.time()
    try:
        entries = _call(args, "mailq")
    except OSError:
        from appliance import config as config_module

        try:
            config = config_module.load(args.config)
        except config_module.ConfigError as e:
            for problem in e.problems:
                print(f"error: {problem}", file=sys.stderr)
            return 1
        spool = Spool(config.mail.spool, _WallClock())  # type: ignore[arg-type]
        entries = list_queue(spool, now)
    except CommandError as e:
        print(f"appliance mailq: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(entries, indent=1))
    else:
        sys.stdout.write(format_mailq(entries, now))
    return 0


class _WallClock:
    """The clock a Spool wants, for reading it from the command line."""

    @staticmethod
    def seconds() -> float:
        return time.time()


def cmd_flush(args: argparse.Namespace) -> int:
    """Retry now: everything, one message or the messages for one domain (``sendmail -q``)."""
    code, result = _run(args, "flush", target=args.target)
    if code == 0:
        print(f"flushed {len(result['flushed'])} message(s)")
        for queue_id in result["held"]:
            print(f"{queue_id}: on hold, not flushed")
    return code


def cmd_queue(args: argparse.Namespace) -> int:
    """delete / hold / release one message."""
    code, result = _run(args, args.queue_command, queue_id=args.queue_id)
    if code == 0:
        print(" ".join(f"{k} {v}" for k, v in result.items()))
    return code


def cmd_route(args: argparse.Namespace) -> int:
    """Explain how the running appliance would deliver to an address (``sendmail -bv``)."""
    code, result = _run(args, "route", address=args.address)
    if code == 0:
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            sys.stdout.write(format_route(result))
    return code


def _common(parser: argparse.ArgumentParser) -> None:
    from appliance import config as config_module

    parser.add_argument(
        "--config",
        "-c",
        default=os.environ.get("APPLIANCE_CONFIG", config_module.DEFAULT_PATH),
        help="configuration file (default: %(default)s, or $APPLIANCE_CONFIG)",
    )
    parser.add_argument("--socket", help="control socket (default: state_dir/control.sock)")


def register(subparsers: Any) -> None:
    """Mount mailq, flush, queue and route under ``appliance``."""
    p = subparsers.add_parser("mailq", help="list the mail queue")
    _common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_mailq)

    p = subparsers.add_parser("flush", help="retry queued mail now (all, a queue id or a domain)")
    _common(p)
    p.add_argument("target", nargs="?", help="queue id or recipient domain")
    p.set_defaults(func=cmd_flush)

    p = subparsers.add_parser("queue", help="delete, hold or release one queued message")
    _common(p)
    p.add_argument("queue_command", choices=("delete", "hold", "release"), metavar="ACTION")
    p.add_argument("queue_id")
    p.set_defaults(func=cmd_queue)

    p = subparsers.add_parser("route", help="explain how an address would be delivered")
    _common(p)
    p.add_argument("address")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_route)
