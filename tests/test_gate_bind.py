"""The gate against a real DNS server: BIND ``named`` on loopback serves a block list and SPF zones.

The MailResolver here is a small blocking one on dnspython (answers come
back as already-fired Deferreds), enough to show that the gate reads real
DNS answers the way the RFCs mean them: RFC 5782 lists with TXT reasons and
error codes, SPF records with includes, redirects and macros, NXDOMAIN
versus SERVFAIL/REFUSED.  Skipped when ``named`` is not installed.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest
from twisted.internet.defer import Deferred, fail, succeed

from appliance.dns.lookup import NoSuchDomain, TemporaryFailure
from appliance.mail.gate import (
    Action,
    DNSBLSettings,
    DNSBLZone,
    Gate,
    GateSettings,
    GreetPauseSettings,
    explain,
)
from appliance.mail.gate.spf import SPFEvaluator, SPFResult
from tests.harness import free_port
from tests.test_gate_support import LogCapture, new_clock, result_of

pytestmark = pytest.mark.integration

NAMED = shutil.which("named") or ("/usr/sbin/named" if Path("/usr/sbin/named").exists() else None)
ADDRESS = "127.0.0.1"  # named only listens on interface addresses

SOA = "@ SOA ns.{z}. hostmaster.{z}. 1 3600 600 86400 60\n@ NS ns.{z}.\nns A 127.0.0.1\n"

ZONES = {
    "bl.test": """
2.0.0.127     A   127.0.0.2
2.0.0.127     TXT "RFC 5782 test entry"
66.113.0.203  A   127.0.0.4
66.113.0.203  TXT "Listed for spam, see http://bl.test/66"
77.113.0.203  A   127.255.255.254
b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2 A 127.0.0.3
""",
    "spf.test": """
@             MX  10 mx
@             TXT "v=spf1 mx include:_inc.%{d} redirect=_red.%{d}"
mx            A   198.51.100.25
_inc          TXT "v=spf1 ip4:198.51.100.64/26 ip6:2001:db8:64::/48 -all"
_red          TXT "v=spf1 exists:%{ir}._allow.%{d2} ~all"
7.100.51.198._allow.spf.test. A 127.0.0.2
soft          TXT "v=spf1 ?ip4:198.51.100.1 ~all"
broken        TXT "v=spf1 ip4:198.51.100.1 bogus:x"
two           TXT "v=spf1 -all"
two           TXT "v=spf1 +all"
split         TXT "v=spf1 ip4:198.51.100.9" " -all"
split         A   192.0.2.9
nodata        A   192.0.2.1
""",
}




@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    if NAMED is None:
        pytest.skip("named (bind9) not installed")
    work = tmp_path_factory.mktemp("gate-named")
    port = free_port(ADDRESS)
    zones = ""
    for origin, body in ZONES.items():
        (work / f"{origin}.zone").write_text("$TTL 60\n" + SOA.format(z=origin) + body)
        zones += f'zone "{origin}" {{ type primary; file "{work / (origin + ".zone")}"; }};\n'
    # A zone whose file does not load: named answers SERVFAIL for it.
    (work / "broken.zone").write_text("this is not a zone file\n")
    zones += f'zone "dead.test" {{ type primary; file "{work / "broken.zone"}"; }};\n'
    (work / "named.conf").write_text(
        f"""options {{
  directory "{work}";
  listen-on port {port} {{ {ADDRESS}; }};
  listen-on-v6 {{ none; }};
  recursion no;
  notify no;
  dnssec-validation no;
  check-names primary ignore;
  pid-file "{work}/named.pid";
}};
controls {{ }};
{zones}"""
    )
    proc = subprocess.Popen(
        [NAMED, "-g", "-n", "1", "-c", str(work / "named.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                reply = dns.query.udp(
                    dns.message.make_query("spf.test.", "SOA"), ADDRESS, port=port, timeout=0.5
                )
                if reply.answer:
                    break
            except (dns.exception.Timeout, OSError):
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.skip("named did not start")
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class DnspythonResolver:
    """A blocking MailResolver on dnspython for this test: NXDOMAIN vs anything else (R-1)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def _query(self, name: str, rdtype: str) -> list[Any]:
        query = dns.message.make_query(name.rstrip(".") + ".", rdtype)
        try:
            reply = dns.query.udp(query, ADDRESS, port=self.port, timeout=2)
            if reply.flags & dns.flags.TC:
                reply = dns.query.tcp(query, ADDRESS, port=self.port, timeout=2)
        except (dns.exception.DNSException, OSError) as error:
            raise TemporaryFailure(str(error)) from None
        rcode = reply.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            raise NoSuchDomain(name)
        if rcode != dns.rcode.NOERROR:
            raise TemporaryFailure(dns.rcode.to_text(rcode))
        wanted = dns.rdatatype.from_text(rdtype)
        return [rd for rrset in reply.answer if rrset.rdtype == wanted for rd in rrset]

    def _call(self, fn: Any, *args: Any) -> Deferred[Any]:
        try:
            return succeed(fn(*args))
        except Exception as error:
            return fail(error)

    def mx(self, domain: str) -> Deferred[list[tuple[int, str]]]:
        return self._call(
            lambda: [
                (rd.preference, rd.exchange.to_text().rstrip(".").lower())
                for rd in self._query(domain, "MX")
            ]
        )

    def addresses(self, host: str) -> Deferred[list[str]]:
        return self._call(
            lambda: (
                [rd.address for rd in self._query(host, "A")]
                + [rd.address for rd in self._query(host, "AAAA")]
            )
        )

    def txt(self, name: str) -> Deferred[list[bytes]]:
        return self._call(lambda: [b"".join(rd.strings) for rd in self._query(name, "TXT")])

    def ptr(self, address: str) -> Deferred[list[str]]:
        return self._call(
            lambda: [
                rd.target.to_text().rstrip(".")
                for rd in self._query(dns.reversename.from_address(address).to_text(), "PTR")
            ]
        )


def gate_for(port: int, **kw: Any) -> Gate:
    settings = GateSettings(
        authserv_id="mx.ours.test",
        greet=GreetPauseSettings(per_listener={"outside": 3.0}),
        dnsbl=DNSBLSettings(
            zones=(
                DNSBLZone("bl.test", ("127.0.0.2-127.0.0.11",)),
                DNSBLZone("unserved.test"),
                DNSBLZone("dead.test", action="tag"),
            )
        ),
        **kw,
    )
    return Gate(settings, DnspythonResolver(port), new_clock())


def test_dnsbl_against_named(named: int) -> None:
    gate = gate_for(named)
    with LogCapture() as logs:
        verdict = result_of(gate.connect(gate.session("127.0.0.2", "outside")))
        assert verdict.action is Action.REJECT and verdict.reply.code == 554
        assert "RFC 5782 test entry" in verdict.reply.text
        verdict = result_of(gate.connect(gate.session("203.0.113.66", "outside")))
        assert "Listed for spam, see http://bl.test/66" in verdict.reply.text
        verdict = result_of(gate.connect(gate.session("2001:db8:1:2:3:4:567:89ab", "outside")))
        assert verdict.action is Action.REJECT
        # Error code, REFUSED (unserved zone) and SERVFAIL (dead zone): not listed, logged.
        verdict = result_of(gate.connect(gate.session("203.0.113.77", "outside")))
        assert verdict.action is Action.ACCEPT
    errors = logs.errors()
    assert any("127.255.255.254" in e for e in errors)
    assert any("unserved.test" in e and "REFUSED" in e for e in errors)
    assert any("dead.test" in e and "SERVFAIL" in e for e in errors)


@pytest.mark.parametrize(
    ("ip", "sender", "expected"),
    [
        ("198.51.100.25", "a@spf.test", SPFResult.PASS),  # mx
        ("198.51.100.70", "a@spf.test", SPFResult.PASS),  # include ip4
        ("2001:db8:64::1", "a@spf.test", SPFResult.PASS),  # include ip6
        ("198.51.100.7", "a@spf.test", SPFResult.PASS),  # redirect, exists with %{ir}
        ("198.51.100.8", "a@spf.test", SPFResult.SOFTFAIL),  # redirect ~all
        ("198.51.100.1", "a@soft.spf.test", SPFResult.NEUTRAL),
        ("198.51.100.2", "a@soft.spf.test", SPFResult.SOFTFAIL),
        ("198.51.100.1", "a@broken.spf.test", SPFResult.PERMERROR),
        ("198.51.100.1", "a@two.spf.test", SPFResult.PERMERROR),
        ("198.51.100.9", "a@split.spf.test", SPFResult.PASS),  # strings joined
        ("198.51.100.10", "a@split.spf.test", SPFResult.FAIL),
        ("198.51.100.1", "a@nodata.spf.test", SPFResult.NONE),
        ("198.51.100.1", "a@nxdomain.spf.test", SPFResult.NONE),
        ("198.51.100.1", "a@x.dead.test", SPFResult.TEMPERROR),
        ("198.51.100.1", "a@unserved.test", SPFResult.TEMPERROR),
    ],
)
def test_spf_against_named(named: int, ip: str, sender: str, expected: SPFResult) -> None:
    evaluator = SPFEvaluator(DnspythonResolver(named), new_clock())
    outcome = result_of(evaluator.check_host(ip, sender.rpartition("@")[2], sender))
    assert outcome.result is expected, outcome


def test_whole_session_and_explain_against_named(named: int) -> None:
    gate = gate_for(named)
    session = gate.session("198.51.100.70", "outside")
    assert result_of(gate.connect(session)).action is Action.ACCEPT
    result_of(gate.helo(session, "mx.spf.test"))
    assert result_of(gate.mail(session, "a@spf.test")).action is Action.ACCEPT
    nx = result_of(gate.mail(session, "a@nxdomain.spf.test"))
    assert nx.action is Action.REJECT and nx.reply.code == 553
    servfail = result_of(gate.mail(session, "a@x.dead.test"))
    assert servfail.action is Action.TEMPFAIL and servfail.reply.code == 451
    result_of(gate.mail(session, "a@spf.test"))
    verdict = result_of(gate.rcpt(session, "b@ours.test"))
    assert verdict.action is Action.TAG and "spf=pass" in verdict.headers[0]
    rows = result_of(explain(gate, "198.51.100.200", "h.example", "a@spf.test", ["b@ours.test"]))
    spf = next(row for row in rows if row[1] == "spf")
    assert spf[2] == "tag" and spf[3].startswith("softfail for _red.spf.test"), rows
    rows = result_of(
        explain(gate, "198.51.100.200", "h.example", "a@split.spf.test", ["b@ours.test"])
    )
    spf = next(row for row in rows if row[1] == "spf")
    assert spf[2].startswith("reject 550 5.7.23"), rows
