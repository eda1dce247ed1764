"""Zone checks in the spirit of ``named-checkzone`` and RFC 1912 (D-8), and ``appliance checkzone``.

The zone is loaded by the server's own loader (so whatever it rejects is an
error here too) and then examined: MX/NS targets that are CNAMEs (RFC 2181
10.3), CNAMEs beside other data (RFC 1034 3.6.2), dangling CNAMEs, in-zone
MX/NS targets without addresses, delegations without their glue (RFC 1034
4.2.1), ``_`` in host names (RFC 952, RFC 1123 2.1), names that were surely
meant to be absolute (``sh.wide.ad.jp.wide.ad.jp.``), a serial that went
backwards (RFC 1982), and private or loopback addresses published to the
outside.  Checks that need the network (lame delegations, targets in other
zones) are not done.  Findings carry the file and line of the RRset's first
record when the loader kept them, else the owner name alone.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.dns import names, rdata, zonefile
from appliance.dns.notify import serial_lt
from appliance.dns.rr import CLASS_IN, RR, RCode, canonical
from appliance.dns.zone import Zone

__all__ = [
    "ERROR",
    "INFO",
    "WARNING",
    "Finding",
    "ZoneReport",
    "check_loaded_zone",
    "check_zone_file",
    "hidden_names",
    "register",
]

ERROR = "error"
WARNING = "warning"
INFO = "info"

_A, _NS, _CNAME, _SOA, _MX, _AAAA, _SRV = 1, 2, 5, 6, 15, 28, 33
#: Types allowed beside a CNAME (RFC 2181 10.1, RFC 4035 2.5: DNSSEC records).
_CNAME_COMPANIONS = frozenset({_CNAME, 46, 47, 25})
#: Address blocks that must not be published to the Internet, and why (RFC 6890 registry).
_NOT_PUBLIC: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.ip_network(net), kind)
    for net, kind in (
        ("10.0.0.0/8", "private (RFC 1918)"),
        ("172.16.0.0/12", "private (RFC 1918)"),
        ("192.168.0.0/16", "private (RFC 1918)"),
        ("100.64.0.0/10", "shared (RFC 6598)"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("192.0.2.0/24", "documentation (RFC 5737)"),
        ("198.51.100.0/24", "documentation (RFC 5737)"),
        ("203.0.113.0/24", "documentation (RFC 5737)"),
        ("0.0.0.0/8", "unspecified"),
        ("::1/128", "loopback"),
        ("::/128", "unspecified"),
        ("fc00::/7", "unique local (RFC 4193)"),
        ("fe80::/10", "link-local"),
        ("2001:db8::/32", "documentation (RFC 3849)"),
    )
)

#: Where records came from: (owner, type, rdata) per record, (owner, type) per RRset.
Lines = Mapping[Any, tuple[str, int]]


@dataclass(frozen=True)
class Finding:
    """One problem (or note) about a zone: where, which name, what."""

    severity: str
    file: str
    line: int
    name: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.name}: {self.message}" if self.name else f"{where}: {self.message}"


@dataclass
class ZoneReport:
    """The outcome of checking one zone file: the zone (None if it did not load) and the findings."""

    zone: Zone | None
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity != ERROR]


def _load(path: str, origin: bytes, check_names: str) -> tuple[zonefile.LoadedZone, Lines]:
    """Load as the server does, keeping where each record came from when the loader says.

    The loader's private ``_Loader`` is driven like ``zonefile.load`` does, so that each
    record's (file, line) can be noted as it is added, and each RRset's as a fallback; if
    that interface has changed, the plain ``zonefile.load`` is used and findings carry the
    owner name only.
    """
    loader_class: Any = getattr(zonefile, "_Loader", None)
    loader: Any = None
    if loader_class is not None:
        try:
            loader = loader_class(origin, CLASS_IN, check_names)
            original_add = loader.add
        except (TypeError, AttributeError):
            loader = None
    if loader is None:
        return zonefile.load(path, origin, CLASS_IN, check_names), {}
    lines: dict[tuple[bytes, ...] | tuple[bytes, int], tuple[str, int]] = {}

    def add(*args: Any, **kwargs: Any) -> Any:
        if len(args) >= 6:
            owner, rtype, _ttl, data, filename, line = args[:6]
            lines.setdefault((canonical(owner), rtype, data), (str(filename), int(line)))
        return original_add(*args, **kwargs)

    loader.add = add
    loader.load_file(path, origin, 0, path, 0)
    loaded: zonefile.LoadedZone = loader.finish(path)
    for key, rrset in getattr(loader, "rrsets", {}).items():
        lines.setdefault(key, (str(getattr(rrset, "file", path)), int(getattr(rrset, "line", 0))))
    return loaded, lines  # type: ignore[return-value]


def check_zone_file(
    path: str,
    origin: bytes | str,
    *,
    outside: bool = False,
    previous_serial: int | None = None,
    check_names: str = "fail",
) -> ZoneReport:
    """Load ``path`` as zone ``origin`` and check it; loader errors become error findings."""
    if isinstance(origin, str):
        origin = names.from_text(origin.rstrip(".") + ".") if origin.strip(".") else b"\x00"
    try:
        loaded, lines = _load(path, origin, check_names)
        zone = Zone(origin, loaded.records, loaded.warnings)
    except zonefile.ZoneFileError as e:
        return ZoneReport(
            None, [Finding(ERROR, err.file, err.line, "", err.reason) for err in e.errors]
        )
    except (OSError, ValueError) as e:
        return ZoneReport(None, [Finding(ERROR, path, 0, "", str(e))])
    report = ZoneReport(zone, [_loader_warning(w, path) for w in zone.warnings])
    report.findings.extend(
        check_loaded_zone(zone, lines, path, outside=outside, previous_serial=previous_serial)
    )
    return report


def _loader_warning(text: str, path: str) -> Finding:
    """A loader warning (``file:line: reason``) as a Finding."""
    file, sep, rest = text.partition(":")
    number, sep2, reason = rest.partition(":")
    if sep and sep2 and number.isdigit():
        return Finding(WARNING, file, int(number), "", reason.strip())
    return Finding(WARNING, path, 0, "", text)


class _Checker:
    def __init__(self, zone: Zone, lines: Lines, path: str, outside: bool) -> None:
        self.zone = zone
        self.apex = canonical(zone.origin)
        self.lines = lines
        self.path = path
        self.outside = outside
        self.findings: list[Finding] = []
        self.nodes: dict[bytes, dict[int, list[RR]]] = {}
        for rr in zone:
            self.nodes.setdefault(canonical(rr.name), {}).setdefault(rr.rtype, []).append(rr)
        self.cuts = {k for k, types in self.nodes.items() if _NS in types and k != self.apex}
        self._reported_relative: set[bytes] = set()

    def add(self, severity: str, rr: RR, message: str) -> None:
        key = canonical(rr.name)
        file, line = self.lines.get(
            (key, rr.rtype, rr.rdata), self.lines.get((key, rr.rtype), (self.path, 0))
        )
        self.findings.append(Finding(severity, file, line, names.to_text(rr.name), message))

    def cut_above(self, key: bytes, strict: bool = False) -> bytes | None:
        """The delegation at or above ``key`` (strictly above with ``strict``), within the zone."""
        rel = names.strip_suffix(key, self.apex)
        if not rel or not self.cuts:
            return None
        for off in reversed(names.label_offsets(rel + b"\x00")[:-1]):
            if strict and off == 0:
                continue
            if key[off:] in self.cuts:
                return key[off:]
        return None

    def run(self) -> list[Finding]:
        for key, types in self.nodes.items():
            occluded = self.cut_above(key, strict=True) is not None
            if _CNAME in types and set(types) - _CNAME_COMPANIONS:
                others = ", ".join(rdata.type_to_text(t) for t in sorted(set(types) - {_CNAME}))
                self.add(ERROR, types[_CNAME][0], f"CNAME and other data ({others})")
            for rrs in types.values():
                for rr in rrs:
                    self.relative(rr)
                    if occluded:
                        continue  # glue: checked with its delegation
                    self.record(rr, key)
        self.findings.sort(key=lambda f: (f.file, f.line))
        return self.findings

    def record(self, rr: RR, key: bytes) -> None:
        t = rr.rtype
        if t in (_A, _AAAA):
            if not names.is_hostname(rr.name, wildcard=True):
                self.add(
                    WARNING,
                    rr,
                    "not a valid host name (RFC 952, RFC 1123 2.1: letters, digits, '-')",
                )
            if self.outside:
                self.private(rr)
        elif t == _NS:
            self.target(rr, rr.rdata, "NS", delegation=key != self.apex)
        elif t == _MX:
            self.target(rr, rr.rdata[2:], "MX")
        elif t == _SRV:
            self.target(rr, rr.rdata[6:], "SRV")
        elif t == _CNAME:
            self.dangling(rr)

    def relative(self, rr: RR) -> None:
        """A name ending in the origin twice: ``MX 10 sh.wide.ad.jp`` written without its final dot."""
        candidates = [rr.name]
        try:
            candidates.extend(
                rr.rdata[o : o + n] for o, n in rdata.name_offsets(rr.rtype, rr.rdata)
            )
        except (IndexError, ValueError):
            pass
        for name in candidates:
            key = canonical(name)
            if key in self._reported_relative or not _doubled(key, self.apex):
                continue
            self._reported_relative.add(key)
            meant = names.to_text(name[: len(name) - len(self.apex)] + b"\x00")
            self.add(
                WARNING,
                rr,
                f"'{names.to_text(name)}' ends in the origin twice: "
                f"'{meant}' written without its final dot?",
            )

    def private(self, rr: RR) -> None:
        try:
            ip = ipaddress.ip_address(bytes(rr.rdata))
        except ValueError:
            return
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        kind = next((k for net, k in _NOT_PUBLIC if ip.version == net.version and ip in net), None)
        if kind is None:
            return
        self.add(WARNING, rr, f"{kind} address {ip} published in the outside view")

    def target(self, rr: RR, target: bytes, what: str, delegation: bool = False) -> None:
        text = names.to_text(target)
        if target != b"\x00" and not names.is_hostname(target):
            self.add(
                WARNING, rr, f"{what} '{text}' is not a valid host name (RFC 952, RFC 1123 2.1)"
            )
        tkey = canonical(target)
        if names.strip_suffix(tkey, self.apex) is None or tkey == b"\x00":
            return  # another zone's name: checking it needs the network
        cut = self.cut_above(tkey)
        if cut is not None:
            # Below a delegation: only glue can supply the address (RFC 1034 4.2.1).
            glue = self.nodes.get(tkey, {})
            if _A in glue or _AAAA in glue:
                return
            own = delegation and cut == canonical(rr.name)
            if own:
                self.add(ERROR, rr, f"{what} '{text}' has no glue (A or AAAA) below the delegation")
            else:
                self.add(
                    WARNING,
                    rr,
                    f"{what} '{text}' is below the delegation {names.to_text(cut)} and has no glue",
                )
            return
        severity = ERROR if what == "NS" else WARNING
        node = self.nodes.get(tkey)
        if node is not None and _CNAME in node:
            # RFC 2181 10.3 forbids it for NS and MX (BIND refuses the former, warns of the latter).
            self.add(
                ERROR if what != "SRV" else WARNING,
                rr,
                f"{what} '{text}' is a CNAME (illegal, RFC 2181 10.3)",
            )
            return
        if not self._has_address(target):
            self.add(severity, rr, f"{what} '{text}' has no address records (A or AAAA)")

    def _has_address(self, target: bytes) -> bool:
        for qtype in (_A, _AAAA):
            result = self.zone.lookup(target, qtype)
            if any(r.rtype == qtype for r in result.answer):
                return True
        return False

    def dangling(self, rr: RR) -> None:
        target = rr.rdata
        tkey = canonical(target)
        if names.strip_suffix(tkey, self.apex) is None:
            return  # another zone's name: checking it needs the network
        if self.cut_above(tkey) is not None:
            return  # delegated: the child zone decides
        result = self.zone.lookup(target, _A)
        if result.rcode == RCode.NXDOMAIN:
            self.add(
                WARNING, rr, f"CNAME '{names.to_text(target)}' points at a name that does not exist"
            )


def _doubled(key: bytes, apex: bytes) -> bool:
    """True if ``key`` is some ``X`` + origin + origin, or ends with origin + a 2+ label tail of it."""
    if apex == b"\x00":
        return False
    rel = names.strip_suffix(key, apex)
    if not rel:
        return False
    apex_labels = names.labels(apex)
    rel_labels = names.labels(rel + b"\x00")
    # The relative part ends with the whole origin, or with at least its last two labels.
    for k in range(len(apex_labels), min(2, len(apex_labels)) - 1, -1):
        if len(rel_labels) >= k and rel_labels[-k:] == apex_labels[-k:]:
            return True
    return False


def check_loaded_zone(
    zone: Zone,
    lines: Lines | None = None,
    path: str = "",
    *,
    outside: bool = False,
    previous_serial: int | None = None,
) -> list[Finding]:
    """The D-8 findings for a zone that loaded; ``previous_serial`` is the last one served."""
    findings = _Checker(zone, lines or {}, path, outside).run()
    if previous_serial is not None and serial_lt(zone.serial, previous_serial):
        file, line = (lines or {}).get((canonical(zone.origin), _SOA), (path, 0))
        findings.append(
            Finding(
                WARNING,
                file,
                line,
                names.to_text(zone.origin),
                f"serial {zone.serial} is lower than the served {previous_serial} (RFC 1982): "
                "secondaries will not transfer the zone",
            )
        )
    return findings


def _data_names(zone: Zone) -> set[bytes]:
    """Canonical owner names holding authoritative data (glue and delegation-only nodes excluded)."""
    out: set[bytes] = set()
    apex = canonical(zone.origin)
    cuts = {canonical(rr.name) for rr in zone if rr.rtype == _NS and canonical(rr.name) != apex}
    for rr in zone:
        key = canonical(rr.name)
        rel = names.strip_suffix(key, apex)
        if rel and any(key[off:] in cuts for off in names.label_offsets(rel + b"\x00")[:-1] if off):
            continue
        out.add(key)
    return out


def hidden_names(inside: Iterable[Zone], outside: Iterable[Zone]) -> list[str]:
    """What the split hides: names (and whole zones) served inside that the outside view lacks."""
    outside_by_origin = {canonical(z.origin): z for z in outside}
    notes: list[str] = []
    for zone in inside:
        origin = canonical(zone.origin)
        other = outside_by_origin.get(origin)
        if other is None:
            notes.append(f"zone {names.to_text(zone.origin)} is served in the inside view only")
            continue
        for key in sorted(
            _data_names(zone) - _data_names(other), key=lambda k: names.labels(k)[::-1]
        ):
            notes.append(f"{names.to_text(key)} exists in the inside view only (hidden outside)")
    return notes


# --------------------------------------------------------------------------- appliance checkzone


def cmd_checkzone(args: argparse.Namespace) -> int:
    """Check one zone file like ``named-checkzone ZONE FILE``: exit 1 on errors, 0 otherwise."""
    report = check_zone_file(
        args.file,
        args.zone,
        outside=args.outside,
        previous_serial=args.previous_serial,
        check_names=args.check_names,
    )
    zname = args.zone.rstrip(".") or "."
    for finding in report.findings:
        print(f"{finding.severity}: {finding}")
    if report.zone is None:
        print(f"zone {zname}/IN: not loaded due to errors.")
        return 1
    if report.errors:
        print(
            f"zone {zname}/IN: loaded serial {report.zone.serial}, "
            f"but with {len(report.errors)} error(s)"
        )
        return 1
    print(f"zone {zname}/IN: loaded serial {report.zone.serial}")
    print("OK")
    return 0


def register(subparsers: Any) -> None:
    """Mount ``appliance checkzone`` (listed in appliance.commands.REGISTRARS)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "checkzone",
        help="check a zone file like named-checkzone (and RFC 1912)",
        description="Load FILE as zone ZONE with the server's loader and report every problem.",
    )
    p.add_argument("--outside", action="store_true", help="warn about private addresses")
    p.add_argument(
        "--previous-serial",
        type=int,
        metavar="N",
        help="the serial served now: warn if FILE's serial is lower (RFC 1982)",
    )
    p.add_argument(
        "--check-names",
        choices=("fail", "warn", "ignore"),
        default="fail",
        help="BIND check-names mode (default %(default)s, as for a primary zone)",
    )
    p.add_argument("zone", metavar="ZONE")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_checkzone)


def main_checkzone(argv: list[str] | None = None) -> int:
    """Entry point for running this module directly (``python -m appliance.dns.zonecheck``)."""
    parser = argparse.ArgumentParser(prog="checkzone")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["checkzone", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args))
