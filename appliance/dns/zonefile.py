"""The master-file parser: BIND zone-file syntax (RFC 1035 5, RFC 2308 4) -> resource records.

It reproduces what BIND 9.18's loader (``named-compilezone``) keeps and what it
rejects: ``$ORIGIN``, ``$TTL``, ``$INCLUDE`` (path relative to the including
file), ``$GENERATE`` (the common forms), ``@``, blank owners, parentheses,
comments, quoted strings, optional class and TTL in either order, TTL units,
BIND's TTL defaulting (``$TTL``; else the previous record's TTL; else the SOA
MINIMUM for the SOA; else an error), BIND's RRset-TTL merging, check-names
(``fail`` mode), out-of-zone data (ignored with a warning), and the zone checks
that make BIND refuse a zone (CNAME beside other data, singleton types, SOA
placement, apex SOA and NS, apex NS targets).  Errors are collected and
raised together as one ``ZoneFileError``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from appliance.dns import names, rdata
from appliance.dns.names import NameSyntaxError
from appliance.dns.rdata import RdataError, Token
from appliance.dns.rr import CLASS_IN, RR, canonical

__all__ = ["LoadedZone", "ZoneFileError", "load", "load_text", "tokenize"]

MAX_TTL = 0x7FFFFFFF
MAX_INCLUDE_DEPTH = 16
MAX_GENERATE = 65536  # records per $GENERATE line: a typo must not exhaust memory

# Types that may share a name with a CNAME (RFC 2181 10.1, RFC 4035 2.5).
_CNAME_OK = frozenset({24, 25, 30, 46, 47})
_SINGLETONS = frozenset({5, 6, 39})
# Types whose owner must be a host name under check-names (A, WKS, MX, AAAA, A6).
_HOST_OWNERS = frozenset({1, 11, 15, 28, 38})
_REVERSE = (
    names.from_text("in-addr.arpa."),
    names.from_text("ip6.arpa."),
    names.from_text("ip6.int."),
)


class ZoneFileError(Exception):
    """A zone file that cannot be loaded: where, why, and every other error found."""

    def __init__(self, file: str, line: int, reason: str) -> None:
        super().__init__(f"{file}:{line}: {reason}")
        self.file = file
        self.line = line
        self.reason = reason
        self.errors: list[ZoneFileError] = [self]


@dataclass
class Entry:
    """One logical line of a zone file: its tokens, first line number, and blank-owner flag."""

    tokens: list[Token]
    line: int
    blank_owner: bool


# One alternative per token kind; every character of the text falls in exactly one match.
# Only space, tab, CR and LF separate tokens (latin-1 NBSP and the like are data).
_TOKEN_RE = re.compile(
    r"(?P<nl>\n)"
    r"|(?P<ws>[ \t\r]+)"
    r"|(?P<comment>;[^\n]*)"
    r"|(?P<paren>[()])"
    r'|"(?P<q>(?:[^"\\\n]|\\[\s\S]|\\\Z)*)(?P<qend>")?'
    r'|(?P<word>(?:[^ \t\r\n"();\\]|\\[\s\S]|\\\Z)+)'
)


def tokenize(text: str, filename: str, errors: list[ZoneFileError]) -> Iterator[Entry]:
    """Split zone-file text into logical lines (RFC 1035 5.1).

    Parentheses join lines and split tokens, ``;`` starts a comment, a quote
    starts a new (quoted) token, and backslash escapes are kept in the token
    text for the field parsers.  Syntax errors are appended to ``errors``.
    """
    line = 1
    depth = 0
    tokens: list[Token] = []
    entry_line = 1
    blank_owner = False
    at_line_start = True
    for m in _TOKEN_RE.finditer(text):
        kind = m.lastgroup
        if at_line_start and depth == 0:
            at_line_start = False
            entry_line = line
            blank_owner = kind == "ws" and m.group()[0] in " \t"
        if kind == "nl":
            line += 1
            if depth == 0:
                if tokens:
                    yield Entry(tokens, entry_line, blank_owner)
                    tokens = []
                at_line_start = True
        elif kind == "word":
            word = m.group()
            tokens.append(Token(word, False))
            if "\n" in word:
                line += word.count("\n")
        elif kind == "qend":
            body = m.group("q")
            tokens.append(Token(body, True))
            if "\n" in body:
                line += body.count("\n")
        elif kind == "q":
            errors.append(ZoneFileError(filename, line, "unbalanced quotes"))
            line += m.group("q").count("\n")
        elif kind == "paren":
            if m.group() == "(":
                depth += 1
            elif depth == 0:
                errors.append(ZoneFileError(filename, line, "unbalanced parentheses"))
            else:
                depth -= 1
    if depth:
        errors.append(
            ZoneFileError(filename, line, "unexpected end of file (unbalanced parentheses)")
        )
    elif tokens:
        yield Entry(tokens, entry_line, blank_owner)


@dataclass
class _RRSet:
    owner: bytes
    rtype: int
    ttl: int
    rdatas: list[bytes] = field(default_factory=list)
    keys: set[bytes] = field(default_factory=set)
    line: int = 0
    file: str = ""


@dataclass
class LoadedZone:
    """What a successful load produced: the records (one TTL per RRset) and BIND-style warnings.

    ``lines`` maps (canonical owner, type) to the (file, line) of the RRset's
    first record, for checks that report where a finding comes from.
    """

    origin: bytes
    records: list[RR]
    warnings: list[str]
    lines: dict[tuple[bytes, int], tuple[str, int]] = field(default_factory=dict)


class _Loader:
    def __init__(self, origin: bytes, rclass: int, check_names: str) -> None:
        self.zone = origin
        self.check_names_mode = check_names
        self.rclass = rclass
        self.errors: list[ZoneFileError] = []
        self.warnings: list[str] = []
        self.rrsets: dict[tuple[bytes, int], _RRSet] = {}
        self.node_types: dict[bytes, set[int]] = {}
        self.order: list[tuple[bytes, int]] = []
        self.default_ttl: int | None = None
        self.ttl: int | None = None
        self.warned_1035 = False
        # BIND's loader groups records into runs ("batches") per owner; see switch_batch.
        self.batch_owner: bytes | None = None
        self.batch_ttls: dict[int, int] = {}
        self.batch_ns: set[bytes] = set()
        self.glue_owner: bytes | None = None
        self.glue_ttls: dict[int, int] = {}
        self.all_names: set[bytes] | None = None
        self.last_in_zone = b""

    # -- diagnostics --
    def error(self, file: str, line: int, reason: str) -> None:
        self.errors.append(ZoneFileError(file, line, reason))

    def warn(self, file: str, line: int, reason: str) -> None:
        self.warnings.append(f"{file}:{line}: {reason}")

    # -- files and directives --
    def load_file(
        self,
        path: str,
        origin: bytes,
        depth: int,
        inc_file: str,
        inc_line: int,
        owner: bytes | None = None,
    ) -> None:
        try:
            with open(path, "rb") as f:
                text = f.read().decode("latin-1")
        except OSError as e:
            self.error(inc_file, inc_line, f"{path}: {e.strerror or e}")
            return
        self.parse_text(text, path, origin, depth, owner)

    def parse_text(
        self, text: str, filename: str, origin: bytes, depth: int, owner: bytes | None = None
    ) -> None:
        """Parse one file; an included file starts with the includer's current owner (as BIND)."""
        cur_origin = origin
        prev_owner = owner
        self.reset_batch()
        for entry in tokenize(text, filename, self.errors):
            toks = entry.tokens
            first = toks[0]
            try:
                if not entry.blank_owner and not first.quoted and first.text.startswith("$"):
                    directive = first.text.upper()
                    args = toks[1:]
                    if directive == "$ORIGIN":
                        if len(args) != 1:
                            raise ZoneFileError(filename, entry.line, "$ORIGIN takes one name")
                        cur_origin = names.from_text(args[0].text, cur_origin)
                    elif directive == "$TTL":
                        if len(args) != 1:
                            raise ZoneFileError(filename, entry.line, "$TTL takes one TTL")
                        ttl = rdata.parse_ttl(args[0].text)
                        if ttl > MAX_TTL:
                            self.warn(
                                filename, entry.line, f"$TTL {ttl} > MAXTTL, setting $TTL to 0"
                            )
                            ttl = 0
                        self.default_ttl = ttl
                        self.ttl = ttl
                    elif directive == "$INCLUDE":
                        if not 1 <= len(args) <= 2:
                            raise ZoneFileError(
                                filename, entry.line, "$INCLUDE takes a file and an optional origin"
                            )
                        if depth >= MAX_INCLUDE_DEPTH:
                            raise ZoneFileError(filename, entry.line, "$INCLUDE nested too deeply")
                        inc_origin = cur_origin
                        if len(args) == 2:
                            inc_origin = names.from_text(args[1].text, cur_origin)
                        inc_path = rdata.unescape(args[0].text).decode("latin-1")
                        if not os.path.isabs(inc_path):
                            inc_path = os.path.join(os.path.dirname(filename), inc_path)
                        self.load_file(
                            inc_path, inc_origin, depth + 1, filename, entry.line, prev_owner
                        )
                        self.reset_batch()
                    elif directive == "$GENERATE":
                        self.generate(args, filename, entry.line, cur_origin)
                    else:
                        raise ZoneFileError(filename, entry.line, f"unknown directive {first.text}")
                    continue
                if entry.blank_owner:
                    if prev_owner is None:
                        raise ZoneFileError(filename, entry.line, "no current owner name")
                    owner = prev_owner
                    rest = toks
                else:
                    owner = names.from_text(first.text, cur_origin)
                    rest = toks[1:]
                prev_owner = owner
                self.record(owner, rest, filename, entry.line, cur_origin)
            except ZoneFileError as e:
                self.errors.append(e)
            except (NameSyntaxError, RdataError) as e:
                self.error(filename, entry.line, str(e))
        self.reset_batch()

    def generate(self, args: list[Token], filename: str, line: int, origin: bytes) -> None:
        """BIND's ``$GENERATE range lhs [ttl] [class] type rhs`` with ``$``/``${o,w,b}`` substitution."""
        if len(args) < 4:
            raise ZoneFileError(filename, line, "$GENERATE: too few fields")
        rng = args[0].text
        step = 1
        if "/" in rng:
            rng, step_text = rng.split("/", 1)
            step = _gen_int(step_text, filename, line)
        if "-" not in rng:
            raise ZoneFileError(filename, line, "$GENERATE: bad range")
        lo_text, hi_text = rng.split("-", 1)
        lo = _gen_int(lo_text, filename, line)
        hi = _gen_int(hi_text, filename, line)
        if hi < lo or step < 1:
            raise ZoneFileError(filename, line, "$GENERATE: bad range")
        if (hi - lo) // step >= MAX_GENERATE:
            raise ZoneFileError(filename, line, f"$GENERATE: more than {MAX_GENERATE} records")
        lhs = args[1].text
        middle = args[2:-1]
        rhs = args[-1].text
        for v in range(lo, hi + 1, step):
            owner = names.from_text(_gen_subst(lhs, v, filename, line), origin)
            # BIND substitutes into the rdata text and reads it again, quotes and all.
            errors: list[ZoneFileError] = []
            entries = list(tokenize(_gen_subst(rhs, v, filename, line) + "\n", filename, errors))
            if errors:
                raise ZoneFileError(filename, line, f"$GENERATE: {errors[0].reason}")
            rest = entries[0].tokens if entries else []
            self.record(owner, [*middle, *rest], filename, line, origin)

    # -- records --
    def record(
        self, owner: bytes, toks: list[Token], filename: str, line: int, origin: bytes
    ) -> None:
        self.switch_batch(owner)
        ttl: int | None = None
        rclass: int | None = None
        i = 0
        while i < len(toks) and i < 2:
            t = toks[i]
            if t.quoted:
                break
            if rclass is None:
                c = rdata.class_from_text(t.text)
                if c is not None:
                    rclass = c
                    i += 1
                    continue
            if ttl is None and t.text[:1].isdigit():
                ttl = _ttl_or_none(t.text)
                if ttl is not None:
                    i += 1
                    continue
            break
        if i >= len(toks):
            raise ZoneFileError(filename, line, "missing record type")
        rtype = rdata.type_from_text(toks[i].text) if not toks[i].quoted else None
        if rtype is None:
            raise ZoneFileError(filename, line, f"unknown RR type '{toks[i].text}'")
        if rclass is not None and rclass != self.rclass:
            raise ZoneFileError(
                filename,
                line,
                f"class '{rdata.class_to_text(rclass)}' != zone class '{rdata.class_to_text(self.rclass)}'",
            )
        data = rdata.from_tokens(rtype, toks[i + 1 :], origin)

        # TTL: explicit; else $TTL; else the previous record's; else SOA MINIMUM (BIND master.c).
        if ttl is not None:
            if ttl > MAX_TTL:
                self.warn(filename, line, f"TTL {ttl} > MAXTTL, setting TTL to 0")
                ttl = 0
            self.ttl = ttl
        elif self.default_ttl is not None:
            ttl = self.default_ttl
            self.ttl = ttl
        elif self.ttl is not None:
            ttl = self.ttl
            if not self.warned_1035:
                self.warned_1035 = True
                self.warn(filename, line, "using RFC1035 TTL semantics")
        elif rtype == 6:
            ttl = int.from_bytes(data[-4:], "big")
            if ttl > MAX_TTL:
                ttl = 0
            self.warn(filename, line, "no TTL specified; using SOA MINTTL instead")
            self.default_ttl = ttl
            self.ttl = ttl
        else:
            raise ZoneFileError(filename, line, "no TTL specified; zone rejected")

        self.check_names(owner, rtype, data, filename, line)
        if owner != self.last_in_zone and not names.is_subdomain(owner, self.zone):
            self.warn(filename, line, f"ignoring out-of-zone data ({names.to_text(owner)})")
            return
        if rtype == 6 and canonical(owner) != canonical(self.zone):
            raise ZoneFileError(
                filename, line, f"SOA record not at top of zone ({names.to_text(owner)})"
            )
        if rtype == 2 and names.is_wildcard(owner):
            raise ZoneFileError(
                filename, line, f"{names.to_text(owner)[:-1]}: invalid NS owner name (wildcard)"
            )
        self.last_in_zone = owner
        if b"\x01*" in owner and b"*" in names.labels(owner)[1:]:
            self.warn(
                filename,
                line,
                f"warning: ownername '{names.to_text(owner)}' contains an non-terminal wildcard",
            )
        self.add(owner, rtype, ttl, data, filename, line)

    def check_names(self, owner: bytes, rtype: int, data: bytes, filename: str, line: int) -> None:
        """BIND ``check-names primary fail``: host names where RFC 952/1123 want them."""
        if self.rclass != CLASS_IN or self.check_names_mode == "ignore":
            return
        if rtype in _HOST_OWNERS and not names.is_hostname(owner, wildcard=True):
            self.names_problem(
                filename, line, f"{names.to_text(owner)[:-1]}: bad owner name (check-names)"
            )
        offs = rdata.name_offsets(rtype, data)
        bad = False
        if rtype in (2, 15, 33, 36, 18, 21):
            off, n = offs[-1]
            bad = not names.is_hostname(data[off : off + n])
        elif rtype == 6:
            (o1, n1), (o2, n2) = offs
            bad = not names.is_hostname(data[o1 : o1 + n1]) or not names.is_mailbox(
                data[o2 : o2 + n2]
            )
        elif rtype == 12 and any(names.is_subdomain(owner, r) for r in _REVERSE):
            off, n = offs[0]
            bad = not names.is_hostname(data[off : off + n])
        elif rtype in (14, 17):
            off, n = offs[0]
            bad = not names.is_mailbox(data[off : off + n])
        if bad:
            self.names_problem(filename, line, "bad name (check-names)")

    def reset_batch(self) -> None:
        self.batch_owner = None
        self.batch_ttls = {}
        self.batch_ns = set()
        self.glue_owner = None
        self.glue_ttls = {}

    def switch_batch(self, owner: bytes) -> None:
        """The TTL table of the run this record joins, following BIND's master.c.

        A run lasts while the owner is spelt the same; records for a name that
        the current run's NS records point at (glue) form a side run that does
        not end the current one.
        """
        if self.glue_owner is not None and owner != self.glue_owner:
            self.glue_owner = None
            self.glue_ttls = {}
        if self.glue_owner is None and owner != self.batch_owner:
            if canonical(owner) in self.batch_ns:
                self.glue_owner = owner
            else:
                self.batch_owner = owner
                self.batch_ttls = {}
                self.batch_ns = set()

    def names_problem(self, filename: str, line: int, reason: str) -> None:
        if self.check_names_mode == "fail":
            raise ZoneFileError(filename, line, reason)
        self.warn(filename, line, reason)

    def add(
        self, owner: bytes, rtype: int, ttl: int, data: bytes, filename: str, line: int
    ) -> None:
        cowner = canonical(owner)
        types = self.node_types.setdefault(cowner, set())
        if rtype not in types and types:
            if (rtype == 5 and types - _CNAME_OK) or (5 in types and rtype not in _CNAME_OK):
                raise ZoneFileError(
                    filename, line, f"{names.to_text(owner)[:-1]}: CNAME and other data"
                )
        key = rdata.canonical_rdata(rtype, data)
        rrset = self.rrsets.get((cowner, rtype))
        if rrset is not None and rtype in _SINGLETONS and key not in rrset.keys:
            raise ZoneFileError(
                filename, line, f"{names.to_text(owner)[:-1]}: multiple RRs of singleton type"
            )
        # Within a run of records for one owner the first TTL wins (with a warning); a later run
        # replaces the RRset's TTL, as BIND's loader and database do.
        batch = self.glue_ttls if self.glue_owner is not None else self.batch_ttls
        prior = batch.get(rtype)
        if prior is None:
            batch[rtype] = ttl
            if rrset is not None:
                rrset.ttl = ttl
        elif prior != ttl:
            self.warn(filename, line, f"TTL set to prior TTL ({prior})")
            ttl = prior
            self.ttl = prior
        if rrset is None:
            rrset = _RRSet(owner, rtype, ttl, line=line, file=filename)
            self.rrsets[(cowner, rtype)] = rrset
            self.order.append((cowner, rtype))
            types.add(rtype)
        if key not in rrset.keys:
            rrset.keys.add(key)
            rrset.rdatas.append(data)
        if rtype == 2 and self.glue_owner is None:
            self.batch_ns.add(canonical(data))

    # -- whole-zone checks --
    def finish(self, filename: str) -> LoadedZone:
        if not self.errors:
            self.zone_checks(filename)
        if self.errors:
            err = self.errors[0]
            err.errors = list(self.errors)
            raise err
        owners: dict[bytes, bytes] = {}
        records = []
        for key in self.order:
            rrset = self.rrsets[key]
            owner = owners.setdefault(key[0], rrset.owner)
            for d in rrset.rdatas:
                records.append(RR(owner, rrset.rtype, self.rclass, rrset.ttl, d))
        lines = {key: (rrset.file, rrset.line) for key, rrset in self.rrsets.items()}
        return LoadedZone(self.zone, records, self.warnings, lines)

    def zone_checks(self, filename: str) -> None:
        apex = canonical(self.zone)
        zname = names.to_text(self.zone)
        soa = self.rrsets.get((apex, 6))
        if soa is None:
            self.error(filename, 0, f"zone {zname}: has no SOA record")
            return
        ns = self.rrsets.get((apex, 2))
        if ns is None:
            self.error(filename, 0, f"zone {zname}: has no NS records")
            return
        for target in ns.rdatas:
            problem = self.check_ns_target(target)
            if problem:
                self.error(
                    ns.file, ns.line, f"zone {zname}: NS '{names.to_text(target)[:-1]}' {problem}"
                )

    def check_ns_target(self, target: bytes) -> str | None:
        """Why an apex NS target is unusable (BIND ``zone_check_ns``), or None if it is fine."""
        rel = names.strip_suffix(target, self.zone)
        if rel is None:
            return None
        ctarget = canonical(target)
        apex_types = self.node_types.get(canonical(self.zone), set())
        if rel and 39 in apex_types:
            return f"is below a DNAME '{names.to_text(self.zone)[:-1]}' (illegal)"
        offs = names.label_offsets(rel + b"\x00")[:-1]
        # Walk from just below the apex down to the target: a cut or a DNAME above it decides.
        for off in reversed(offs):
            name = ctarget[off:]
            types = self.node_types.get(name)
            if not types:
                continue
            if 2 in types:
                return None
            if off != 0 and 39 in types:
                dname = self.rrsets[(name, 39)].owner
                return f"is below a DNAME '{names.to_text(dname)[:-1]}' (illegal)"
        types = self.node_types.get(ctarget)
        if types is None and not self.exists(ctarget):
            # No such name: a wildcard at the closest encloser may still supply addresses.
            encloser = names.parent(ctarget)
            while encloser != b"\x00" and not self.exists(encloser):
                encloser = names.parent(encloser)
            types = self.node_types.get(names.wildcard_for(encloser))
        if types:
            if 5 in types:
                return "is a CNAME (illegal)"
            if 1 in types or 28 in types:
                return None
        return "has no address records (A or AAAA)"

    def exists(self, cname: bytes) -> bool:
        """True if ``cname`` holds data or is an empty non-terminal (RFC 4592 2.2.2)."""
        if self.all_names is None:
            self.all_names = set()
            for key in self.node_types:
                while key != b"\x00" and key not in self.all_names:
                    self.all_names.add(key)
                    key = names.parent(key)
        return cname in self.all_names


def _ttl_or_none(text: str) -> int | None:
    try:
        return rdata.parse_ttl(text)
    except RdataError:
        return None


def _gen_int(text: str, filename: str, line: int) -> int:
    if not text.isdigit() or not text.isascii():
        raise ZoneFileError(filename, line, f"$GENERATE: bad number {text!r}")
    return int(text)


def _gen_subst(template: str, value: int, filename: str, line: int) -> str:
    out: list[str] = []
    i = 0
    n = len(template)
    while i < n:
        c = template[i]
        if c == "\\" and i + 1 < n:
            out.append(template[i : i + 2])
            i += 2
            continue
        if c != "$":
            out.append(c)
            i += 1
            continue
        if i + 1 < n and template[i + 1] == "$":
            out.append("$")
            i += 2
            continue
        if i + 1 < n and template[i + 1] == "{":
            end = template.find("}", i)
            if end < 0:
                raise ZoneFileError(filename, line, "$GENERATE: unterminated ${")
            parts = template[i + 2 : end].split(",")
            try:
                offset = int(parts[0]) if parts[0] else 0
                width = int(parts[1]) if len(parts) > 1 and parts[1] else 0
            except ValueError as e:
                raise ZoneFileError(filename, line, "$GENERATE: bad modifier") from e
            base = parts[2] if len(parts) > 2 else "d"
            v = value + offset
            if base not in ("d", "o", "x", "X"):
                raise ZoneFileError(filename, line, "$GENERATE: unsupported base")
            out.append(format(v, f"0{width}{base}"))
            i = end + 1
            continue
        out.append(str(value))
        i += 1
    return "".join(out)


def load(path: str, origin: bytes, rclass: int = CLASS_IN, check_names: str = "fail") -> LoadedZone:
    """Load the zone file at ``path`` for zone ``origin`` (wire name) the way BIND would.

    ``check_names`` is BIND's check-names mode for the zone: "fail" (BIND's
    default for primary zones), "warn" or "ignore".  Raises ZoneFileError
    (with ``.errors`` listing every error found) if BIND would refuse the file.
    """
    loader = _Loader(origin, rclass, check_names)
    loader.load_file(path, origin, 0, path, 0)
    return loader.finish(path)


def load_text(
    text: str,
    origin: bytes,
    filename: str = "<text>",
    rclass: int = CLASS_IN,
    check_names: str = "fail",
) -> LoadedZone:
    """Like ``load`` for zone-file text in memory (``$INCLUDE`` resolves against the cwd)."""
    loader = _Loader(origin, rclass, check_names)
    loader.parse_text(text, filename, origin, 0)
    return loader.finish(filename)
