"""``appliance dns answer``: what the server would answer from some zone files, without a server.

The question goes through the very code a listener runs: a `View` holding the
zones, wrapped in `DNSServerCore`, which encodes the reply to wire form; the
bytes are then decoded again and printed in the layout of dnspython's
``Message.to_text()`` (the layout of Ferret's expected responses) minus the
``id`` line, so what is printed is what a client would have received.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from appliance.dns import names, rdata, wire, zonefile
from appliance.dns.listener import DNSServerCore
from appliance.dns.rr import CLASS_IN, RR, Opcode, RCode
from appliance.dns.view import View
from appliance.dns.wire import Edns, Message, Question
from appliance.dns.zone import Zone, load_zone

__all__ = ["AnswerError", "Answerer", "format_message", "guess_origin", "register"]

_FILE_SUFFIXES = (".zone", ".db", ".txt", ".hosts")
#: dnspython's order of header flags in ``to_text``.
_FLAG_ORDER = ("qr", "aa", "tc", "rd", "ra", "ad", "cd")


class AnswerError(Exception):
    """A zone file or a question that cannot be used; the message says which and why."""


def guess_origin(path: str) -> bytes:
    """The zone's origin: the owner of the file's SOA record, else the file name (``example.test.zone``).

    The SOA owner is read with the same tokenizer the loader uses; ``@`` or a
    relative owner is resolved against ``$ORIGIN`` or, failing that, the name
    derived from the file name.
    """
    base = Path(path).name
    for suffix in _FILE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    fallback: bytes | None = None
    try:
        fallback = names.from_text(base.rstrip(".") + ".") if base else None
    except names.NameSyntaxError:
        fallback = None
    try:
        text = Path(path).read_bytes().decode("latin-1")
    except OSError as e:
        raise AnswerError(f"{path}: {e.strerror or e}") from e
    origin = fallback
    errors: list[zonefile.ZoneFileError] = []
    for entry in zonefile.tokenize(text, path, errors):
        toks = [t.text for t in entry.tokens]
        first = entry.tokens[0]
        if not entry.blank_owner and not first.quoted and first.text.upper() == "$ORIGIN":
            if len(toks) == 2:
                try:
                    origin = names.from_text(toks[1], origin)
                except names.NameSyntaxError:
                    pass
            continue
        # The SOA mnemonic is within the first four fields: owner, TTL and class come before it.
        head = [t.upper() for t in toks[:4]]
        if "SOA" in head and not entry.blank_owner:
            try:
                return names.from_text(toks[0], origin)
            except names.NameSyntaxError:
                break
    if fallback is None:
        raise AnswerError(f"{path}: cannot tell the zone's origin; give --origin")
    return fallback


def _origin_arg(text: str) -> bytes:
    try:
        return names.from_text(text.rstrip(".") + ".") if text not in (".", "") else b"\x00"
    except names.NameSyntaxError as e:
        raise AnswerError(f"bad origin {text!r}: {e}") from e


class Answerer:
    """Zones loaded into a View behind a DNSServerCore: ask it questions, get decoded replies."""

    def __init__(
        self,
        zones: Iterable[Zone],
        *,
        minimal_any: bool = False,
        udp_size: int = wire.DEFAULT_UDP_SIZE,
    ) -> None:
        self.view = View(
            "cli", {z.origin: z for z in zones}, minimal_any=minimal_any, udp_size=udp_size
        )
        self.core = DNSServerCore(self.view, udp_size=udp_size)
        self._next_id = 0

    @classmethod
    def from_files(
        cls,
        files: Sequence[str],
        origins: Sequence[str] = (),
        check_names: str = "fail",
        **kwargs: Any,
    ) -> Answerer:
        """Load each file (its origin from ``origins`` in order, else guessed); raise AnswerError.

        ``check_names`` is BIND's mode ("fail", as the server loads primary zones, "warn", "ignore").
        """
        zones = []
        for index, path in enumerate(files):
            origin = _origin_arg(origins[index]) if index < len(origins) else guess_origin(path)
            try:
                zones.append(load_zone(path, origin, check_names=check_names))
            except zonefile.ZoneFileError as e:
                raise AnswerError("\n".join(str(err) for err in e.errors)) from e
            except (OSError, ValueError) as e:
                raise AnswerError(f"{path}: {e}") from e
        return cls(zones, **kwargs)

    def ask(
        self,
        qname: str,
        qtype: str,
        *,
        transport: str = "tcp",
        edns: int | None = None,
        do: bool = False,
    ) -> Message:
        """The reply the server would send to one question (``transport`` "udp" or "tcp")."""
        try:
            name = names.from_text(qname if qname.endswith(".") else qname + ".")
        except names.NameSyntaxError as e:
            raise AnswerError(f"bad name {qname!r}: {e}") from e
        try:
            rtype = rdata.type_from_text(qtype)
        except rdata.RdataError as e:
            raise AnswerError(str(e)) from e
        if rtype is None:
            raise AnswerError(f"unknown type {qtype!r}")
        self._next_id = (self._next_id + 1) & 0xFFFF
        query = Message(
            id=self._next_id,
            opcode=Opcode.QUERY,
            question=(Question(name, rtype, CLASS_IN),),
            edns=Edns(udp_size=edns, do=do) if edns is not None else None,
        )
        reply = self.core.handle(wire.encode(query), ("127.0.0.1", 53000), transport, ("", 53))
        if isinstance(reply, list):
            # A zone transfer: the messages of the stream, merged into one for printing.
            parts = [wire.decode(p) for p in reply]
            first = parts[0]
            return first._replace(answer=tuple(rr for p in parts for rr in p.answer))
        if not isinstance(reply, bytes):
            raise AnswerError("the server would not answer")
        return wire.decode(reply)


def _rr_line(rr: RR) -> str:
    return (
        f"{names.to_text(rr.name)} {rr.ttl} {rdata.class_to_text(rr.rclass)} "
        f"{rdata.type_to_text(rr.rtype)} {rdata.to_text(rr.rtype, rr.rdata)}"
    )


#: Rcode mnemonics the RCode enum lacks (RFC 2136 2.2), as dnspython prints them.
_MORE_RCODES = {6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 10: "NOTZONE"}


def _rcode_text(rcode: int) -> str:
    try:
        return RCode(rcode).name
    except ValueError:
        return _MORE_RCODES.get(rcode, str(rcode))


def _opcode_text(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return str(opcode)


def format_message(message: Message) -> str:
    """The reply in Ferret's expected-response layout (dnspython's ``to_text`` without ``id``)."""
    lines = [
        f"opcode {_opcode_text(message.opcode)}",
        f"rcode {_rcode_text(message.rcode)}",
        "flags " + " ".join(f.upper() for f in _FLAG_ORDER if getattr(message, f)),
    ]
    if message.edns is not None:
        lines.append(f"edns {message.edns.version}")
        if message.edns.do:
            lines.append("eflags DO")
        lines.append(f"payload {message.edns.udp_size}")
    lines.append(";QUESTION")
    lines.extend(
        f"{names.to_text(q.name)} {rdata.class_to_text(q.qclass)} {rdata.type_to_text(q.qtype)}"
        for q in message.question
    )
    for title, section in (
        ("ANSWER", message.answer),
        ("AUTHORITY", message.authority),
        ("ADDITIONAL", message.additional),
    ):
        lines.append(f";{title}")
        lines.extend(_rr_line(rr) for rr in section)
    return "\n".join(lines)


def _questions(stream: TextIO) -> Iterable[tuple[int, str, str | None]]:
    """``(line number, QNAME, QTYPE)`` per question line; QTYPE None marks a malformed line."""
    for number, line in enumerate(stream, 1):
        fields = line.split()
        if not fields or fields[0].startswith(("#", ";")):
            continue
        if len(fields) != 2:
            yield number, line.strip(), None
            continue
        yield number, fields[0], fields[1]


def cmd_answer(args: argparse.Namespace) -> int:
    """Print the server's reply for one question, or for each ``QNAME QTYPE`` line of stdin."""
    rest: list[str] = args.args
    questions: list[tuple[int, str, str | None]] | None
    if rest and rest[-1] == "-":
        files, questions = rest[:-1], None
    elif len(rest) >= 3:
        files, questions = rest[:-2], [(0, rest[-2], rest[-1])]
    else:
        print("usage: appliance dns answer ZONEFILE... (QNAME QTYPE | -)", file=sys.stderr)
        return 2
    if not files:
        print("error: no zone file given", file=sys.stderr)
        return 2
    try:
        answerer = Answerer.from_files(
            files,
            args.origin or (),
            check_names=args.check_names,
            minimal_any=args.minimal_any,
            udp_size=args.server_bufsize,
        )
    except AnswerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    transport = "tcp" if args.tcp else "udp"
    status = 0
    first = True
    for number, qname, qtype in questions if questions is not None else _questions(sys.stdin):
        if qtype is None:
            print(
                f"error: <stdin>:{number}: expected 'QNAME QTYPE', got {qname!r}", file=sys.stderr
            )
            status = 1
            continue
        try:
            reply = answerer.ask(qname, qtype, transport=transport, edns=args.edns, do=args.dnssec)
        except AnswerError as e:
            where = f"<stdin>:{number}: " if number else ""
            print(f"error: {where}{e}", file=sys.stderr)
            status = 1
            continue
        if not first:
            print()
        first = False
        print(format_message(reply))
    return status


def register(subparsers: Any) -> None:
    """Mount ``appliance dns answer`` (the registrar listed in appliance.commands.REGISTRARS)."""
    dns_parser: argparse.ArgumentParser = subparsers.add_parser(
        "dns", help="DNS tools (answer: what the server would reply from zone files)"
    )
    actions = dns_parser.add_subparsers(dest="dns_command", metavar="ACTION", required=True)
    p = actions.add_parser(
        "answer",
        help="the reply the server would send, computed by the server's own code",
        description=(
            "Load ZONEFILE(s) and print the reply to QNAME QTYPE, or to each 'QNAME QTYPE' "
            "line of standard input when the last argument is '-'."
        ),
    )
    p.add_argument(
        "--origin",
        action="append",
        metavar="NAME",
        help="origin of the zone file(s), in order (default: the SOA owner, or the file name)",
    )
    p.add_argument(
        "--udp",
        dest="tcp",
        action="store_false",
        help="answer as over UDP: 512 bytes, or the --edns size, then TC (default: TCP)",
    )
    p.add_argument("--edns", type=int, metavar="SIZE", help="send EDNS with this UDP size")
    p.add_argument("--dnssec", action="store_true", help="set the DO bit (with --edns)")
    p.add_argument(
        "--minimal-any",
        action="store_true",
        help="answer ANY with one RRset, as the outside view does (RFC 8482)",
    )
    p.add_argument(
        "--check-names",
        choices=("fail", "warn", "ignore"),
        default="fail",
        help="BIND check-names mode for loading (default %(default)s, as the server does)",
    )
    p.add_argument(
        "--server-bufsize",
        type=int,
        default=wire.DEFAULT_UDP_SIZE,
        metavar="SIZE",
        help="our EDNS buffer size (dns.edns_buffer_size; default %(default)s)",
    )
    p.add_argument("args", nargs="+", metavar="ZONEFILE... QNAME QTYPE | -")
    p.set_defaults(func=cmd_answer)
