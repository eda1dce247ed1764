"""Differential tests: Zone.lookup against a live BIND 9.18 ``named`` on loopback.

Covers what the Ferret corpus does not: additional-section rules (wildcard
targets, glue versus authoritative data), ANY, DS at a cut, CNAME into a
delegation, empty-non-terminal wildcards, CNAME loops and chain limits, the
Ferret cases where we follow BIND 9.18 rather than the Ferret answers, and a
few hundred queries against random zones.  Skipped when ``named`` (Debian
``bind9``) is not installed.  Queries go with RD=0 (so BIND does not apply
``minimal-responses no-auth-recursive``), EDNS 4096, over TCP so that BIND's
1232-octet UDP limit truncates nothing.  named gets ``notify no`` and no
recursion, so nothing leaves loopback.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import pytest

from appliance.dns import names, rdata, zonefile
from appliance.dns.rr import RR, canonical
from appliance.dns.zone import Zone, ZoneSet, load_zone
from tests import test_dns_zone_ferret as ferret
from tests.harness import free_port

pytestmark = pytest.mark.integration

NAMED = shutil.which("named") or ("/usr/sbin/named" if Path("/usr/sbin/named").exists() else None)
ZONES = Path(__file__).parent / "data" / "zones"

EXTRA = """$TTL 3600
@ SOA ns hm 7 3600 900 604800 300
  NS ns
  NS ns.sub
  MX 10 mx.w
ns A 192.0.2.1
sub NS ns.sub
sub NS ns.sib
ns.sub A 192.0.2.7
sib NS ns.sib
ns.sib A 192.0.2.8
alias CNAME www.sub
*.w A 192.0.2.50
srv SRV 1 1 1 x.w
mx2 MX 5 alias
mx3 MX 5 ns.sub
a.*.e TXT "x"
c2w CNAME foo.w
dn DNAME w
c2dn CNAME q.dn
deep.a.b.c TXT "deep"
mixed CNAME MiXeD.w
*.any MX 1 ns
*.any TXT "wild"
n2 NS ns.n2
n2 NS ns.w
ns.n2 AAAA 2001:db8::7
self CNAME self
loop1 CNAME loop2
loop2 CNAME loop1
c0 CNAME c1
c1 CNAME c2
c2 CNAME c3
c3 CNAME c4
c4 CNAME c5
c5 CNAME c6
c6 CNAME c7
c7 CNAME c8
c8 CNAME c9
c9 CNAME c10
c10 CNAME c11
c12 CNAME c13
c13 CNAME c14
c14 CNAME c15
c15 CNAME c16
c16 CNAME c17
c17 CNAME c18
c18 CNAME c19
c19 CNAME c20
c20 CNAME c21
c21 CNAME c22
c22 CNAME c23
c23 CNAME c24
c24 CNAME c25
c25 CNAME c26
c26 CNAME c27
c27 CNAME c28
c28 CNAME c29
c29 CNAME c30
c11 A 192.0.2.11
"""

SERVED = [
    ("example.test", "dname-delegation.zone"),
    ("wide.ad.jp", "wide-ad-jp.zone"),
    ("x.co.jp", "wildcards.zone"),
    ("types.test", "types.zone"),
    ("2.0.192.in-addr.arpa", "rfc2317-parent.zone"),
]

QUERIES = """
ns1.example.test. A
example.test. MX
example.test. NS
example.test. ANY
www.example.test. A
www.example.test. CNAME
www.example.test. MX
deep.ent.example.test. A
nope.example.test. A
nope.example.test. SOA
mail.example.test. SOA
x.old.example.test. SOA
a.old.example.test. A
x.old.example.test. A
old.example.test. A
old.example.test. DNAME
x.old.example.test. CNAME
host.child.example.test. A
child.example.test. NS
child.example.test. DS
ns.child.example.test. A
_xmpp._tcp.example.test. SRV
foo.wild.example.test. A
Foo.WILD.example.test. TXT
wild.example.test. A
wide.ad.jp. MX
wide.ad.jp. NS
www.wide.ad.jp. A
endo.wide.ad.jp. MX
x.v6.wide.ad.jp. A
v6.wide.ad.jp. NS
localhost.wide.ad.jp. A
archie.wide.ad.jp. A
foo.x.co.jp. MX
ns.x.co.jp. MX
a.b.x.co.jp. MX
x.sub.x.co.jp. TXT
host.sub.x.co.jp. TXT
q.cname.x.co.jp. A
b.odd.x.co.jp. TXT
types.test. CAA
_sip._tcp.types.test. SRV
alias.types.test. A
x.old.types.test. A
child.types.test. DS
5.2.0.192.in-addr.arpa. PTR
130.2.0.192.in-addr.arpa. PTR
200.2.0.192.in-addr.arpa. PTR
extra.test. MX
extra.test. NS
extra.test. AAAA
extra.test. TYPE65534
alias.extra.test. A
mx2.extra.test. MX
mx3.extra.test. MX
srv.extra.test. SRV
x.sub.extra.test. A
x.sib.extra.test. A
ns.sub.extra.test. A
zz.e.extra.test. TXT
e.extra.test. A
c2w.extra.test. A
c2dn.extra.test. A
x.dn.extra.test. A
dn.extra.test. ANY
q.dn.extra.test. ANY
x.c2dn.extra.test. ANY
a.b.c.extra.test. TXT
b.c.extra.test. ANY
z.c.extra.test. A
MIXED.EXTRA.TEST. A
q.any.extra.test. ANY
q.any.extra.test. MX
sub.extra.test. ANY
n2.extra.test. NS
x.n2.extra.test. AAAA
*.w.extra.test. A
w.extra.test. A
self.extra.test. A
self.extra.test. CNAME
loop1.extra.test. MX
c0.extra.test. A
c1.extra.test. A
c12.extra.test. A
c20.extra.test. TXT
"""




_LABELS = ["a", "b", "c", "*", "w", "x", "ns", "sub", "d"]
_RANDOM_TYPES = ["A", "AAAA", "CNAME", "DNAME", "NS", "MX", "TXT", "SRV"]
_QUERY_TYPES = ["A", "AAAA", "CNAME", "DNAME", "NS", "MX", "TXT", "SRV", "ANY", "SOA", "DS"]
RANDOM_ZONES = 30


def _random_zone(rnd: random.Random) -> str:
    """A small zone full of CNAMEs, DNAMEs, wildcards, cuts and empty non-terminals."""

    def name() -> str:
        return ".".join(rnd.choice(_LABELS) for _ in range(rnd.randint(1, 3)))

    def target() -> str:
        return "out.example." if rnd.random() < 0.15 else name()

    lines = ["$TTL 300", "@ SOA ns hm 1 3600 900 604800 60", "  NS ns", "ns A 192.0.2.53"]
    for _ in range(rnd.randint(3, 12)):
        owner = name()
        if "*" in owner[1:]:
            owner = owner[0] + owner[1:].replace("*", "y")
        rtype = rnd.choice(_RANDOM_TYPES)
        if rtype == "NS" and owner.startswith("*"):
            rtype = "A"
        value = {
            "A": f"192.0.2.{rnd.randint(1, 9)}",
            "AAAA": f"2001:db8::{rnd.randint(1, 9)}",
            "MX": f"{rnd.randint(1, 20)} {target()}",
            "SRV": f"1 1 1 {target()}",
            "TXT": '"t"',
        }.get(rtype) or target()
        lines.append(f"{owner} {rtype} {value}")
    return "\n".join(lines) + "\n"


def _random_zones(work: Path) -> dict[str, Path]:
    """RANDOM_ZONES zone files that both loaders accept, by origin."""
    rnd = random.Random(20261122)
    out = {}
    for i in range(RANDOM_ZONES * 2):
        origin = f"r{i}.test."
        path = work / f"r{i}.zone"
        path.write_text(_random_zone(rnd))
        try:
            zonefile.load(str(path), names.from_text(origin), check_names="ignore")
        except zonefile.ZoneFileError:
            continue
        out[origin] = path
        if len(out) == RANDOM_ZONES:
            break
    return out


def _ferret_exception_views() -> str:
    """One view per Ferret exception case, chosen by the client address 127.0.1.N."""
    if not Path(ferret.VALID).is_dir():
        return ""
    out = []
    for n, case in enumerate(sorted(ferret.EXCEPTIONS, key=int), start=1):
        path = Path(ferret.VALID) / "ZoneFiles" / f"{case}.txt"
        origin = path.read_text().split()[0]
        out.append(
            f'view "f{case}" {{ match-clients {{ 127.0.1.{n}; }}; recursion no;\n'
            f'  zone "{origin}" {{ type primary; file "{path}"; check-names ignore; }}; }};\n'
        )
    return "".join(out)


@pytest.fixture(scope="module")
def named_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("named")


@pytest.fixture(scope="module")
def named(named_work: Path) -> Iterator[int]:
    if NAMED is None:
        pytest.skip("named (bind9) not installed")
    work = named_work
    (work / "extra.zone").write_text(EXTRA)
    port = free_port()
    zones = "".join(
        f'zone "{origin}" {{ type primary; file "{ZONES / f}"; }};\n' for origin, f in SERVED
    )
    zones += f'zone "extra.test" {{ type primary; file "{work / "extra.zone"}"; }};\n'
    zones += "".join(
        f'zone "{origin}" {{ type primary; file "{path}"; check-names ignore; }};\n'
        for origin, path in _random_zones(work).items()
    )
    zones = _ferret_exception_views() + f'view "main" {{ match-clients {{ any; }};\n{zones}}};\n'
    (work / "named.conf").write_text(
        f"""options {{
  directory "{work}";
  listen-on port {port} {{ 127.0.0.1; }};
  listen-on-v6 {{ none; }};
  recursion no;
  notify no;
  dnssec-validation no;
  pid-file "{work}/named.pid";
}};
{zones}"""
    )
    proc = subprocess.Popen(
        [NAMED, "-g", "-n", "1", "-c", str(work / "named.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                # The tests ask over TCP, so wait until named answers there.
                dns.query.tcp(
                    dns.message.make_query("extra.test.", "SOA"),
                    "127.0.0.1",
                    port=port,
                    timeout=0.5,
                )
                break
            except (dns.exception.Timeout, OSError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.skip("named did not start")
                time.sleep(0.05)  # poll interval while named loads its zones
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _ours() -> ZoneSet:
    zs = ZoneSet(load_zone(str(ZONES / f), origin, check_names="warn") for origin, f in SERVED)
    return zs


Key = tuple[bytes, int, int, bytes]


def _keys(rrs: tuple[RR, ...]) -> set[Key]:
    return {
        (canonical(r.name), r.rtype, r.ttl, rdata.canonical_rdata(r.rtype, r.rdata)) for r in rrs
    }


def _bind_keys(section: list[dns.rrset.RRset]) -> set[Key]:
    out = set()
    for rrset in section:
        t = int(rrset.rdtype)
        for rd in rrset:
            out.add(
                (
                    canonical(rrset.name.to_wire()),
                    t,
                    rrset.ttl,
                    rdata.canonical_rdata(t, rd.to_wire()),
                )
            )
    return out


def test_lookup_matches_live_named(named: int, tmp_path: Path) -> None:
    zs = _ours()
    extra = tmp_path / "extra.zone"
    extra.write_text(EXTRA)
    zs.add(load_zone(str(extra), "extra.test"))
    mismatches = []
    for line in QUERIES.strip().splitlines():
        qname, qtype = line.split()
        query = dns.message.make_query(qname, qtype, use_edns=0, payload=4096)
        query.flags &= ~dns.flags.RD
        reply = dns.query.tcp(query, "127.0.0.1", port=named, timeout=5)
        wq = names.from_text(qname)
        t = rdata.type_from_text(qtype)
        assert t is not None
        zone = zs.find(wq)
        assert zone is not None
        ours = zone.lookup(wq, t)
        got = (
            ours.rcode,
            ours.authoritative,
            _keys(ours.answer),
            _keys(ours.authority),
            _keys(ours.additional),
        )
        want = (
            reply.rcode(),
            bool(reply.flags & dns.flags.AA),
            _bind_keys(reply.answer),
            _bind_keys(reply.authority),
            _bind_keys(reply.additional),
        )
        if got != want:
            mismatches.append(line)
        # The qname's spelling is echoed in the owner of direct answers.
        for rr in ours.answer:
            if canonical(rr.name) == canonical(wq):
                assert rr.name == wq
    assert not mismatches


def _compare_live(port: int, zone_lookup: object, qname: bytes, qtype: int, source: str) -> bool:
    query = dns.message.make_query(names.to_text(qname), qtype, use_edns=0, payload=4096)
    query.flags &= ~dns.flags.RD
    # TCP: BIND truncates UDP answers at 1232 octets, and long chains exceed that.
    reply = dns.query.tcp(query, "127.0.0.1", port=port, timeout=5, source=source)
    ours = zone_lookup(qname, qtype)  # type: ignore[operator]
    got = (
        ours.rcode,
        ours.authoritative,
        _keys(ours.answer),
        _keys(ours.authority),
        _keys(ours.additional),
    )
    want = (
        reply.rcode(),
        bool(reply.flags & dns.flags.AA),
        _bind_keys(reply.answer),
        _bind_keys(reply.authority),
        _bind_keys(reply.additional),
    )
    return got == want


@pytest.mark.skipif(not Path(ferret.VALID).is_dir(), reason="Ferret data not present")
def test_ferret_exceptions_match_live_named(named: int) -> None:
    """Where we differ from the Ferret BIND answers, we agree with BIND 9.18 itself."""
    mismatches = []
    for n, case in enumerate(sorted(ferret.EXCEPTIONS, key=int), start=1):
        zone, queries = ferret.load_case(case)
        for qname, qtype, _expected in queries:
            if not _compare_live(named, zone.lookup, qname, qtype, f"127.0.1.{n}"):
                mismatches.append(case)
    assert not mismatches


def test_random_zones_match_live_named(named: int, named_work: Path) -> None:
    """Random zones (CNAME/DNAME chains, wildcards, cuts) answer as BIND 9.18 answers them."""
    rnd = random.Random(7)
    mismatches = []
    zones = _random_zones(named_work)
    assert len(zones) == RANDOM_ZONES
    for origin, path in zones.items():
        loaded = zonefile.load(str(path), names.from_text(origin), check_names="ignore")
        zone = Zone(names.from_text(origin), loaded.records)
        for _ in range(12):
            labels = ".".join(rnd.choice(_LABELS) for _ in range(rnd.randint(0, 3)))
            qname = names.from_text(f"{labels}.{origin}" if labels else origin)
            qtype = rdata.type_from_text(rnd.choice(_QUERY_TYPES))
            assert qtype is not None
            if not _compare_live(named, zone.lookup, qname, qtype, "127.0.0.1"):
                mismatches.append((names.to_text(qname), qtype, path.name))
    assert not mismatches
