"""Interop with BIND 9 (D-6, primary side): a BIND secondary of the demo's outside zone.

The real ``twistd appliance`` process serves the demo configuration (ports
moved so this can run beside test_demo); ``named`` is its secondary,
listening on 127.0.0.1 (named only listens on interface addresses) and
transferring from 127.0.2.53 (inside ``allow_transfer``).  BIND transfers the zone and serves the same RR sets; when the
zone file's serial is raised and the appliance gets SIGHUP, its NOTIFY makes
BIND fetch the new serial within 5 seconds; an AXFR from an address outside
``allow_transfer`` is REFUSED.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.harness import ApplianceProcess, free_port
from tests.test_dns_bind_support import (
    Named,
    Setup,
    bind_available,
    demo_on_free_ports,
    soa_serial,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(bind_available() is not None, reason=str(bind_available())),
]

OUTSIDE = "127.0.0.10"
BIND = "127.0.0.1"
BIND_SOURCE = "127.0.2.53"
LISTED = "127.0.2.5"  # inside allow_transfer = ["127.0.2.0/24"]
UNLISTED = "127.0.3.5"
ZONE = "example.test."
SERIAL = 2026112201


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("bind-interop")
    config, ports = demo_on_free_ports(tmp, OUTSIDE)
    bind_port = free_port(BIND)
    text = config.read_text().replace(
        'allow_transfer = ["127.0.2.0/24"]',
        f'allow_transfer = ["127.0.2.0/24"]\nalso_notify = ["{BIND}:{bind_port}"]',
    )
    config.write_text(text)
    appliance = ApplianceProcess(config, tmp / "appliance.log")
    named = Named(
        tmp / "named",
        BIND,
        bind_port,
        source=BIND_SOURCE,
        body=f"""
zone "example.test" {{
    type secondary;
    primaries {{ {OUTSIDE} port {ports["dns"]}; }};
    file "example.test.secondary";
    allow-notify {{ 127.0.0.0/8; }};
}};
""",
    )
    appliance.start()
    try:
        named.start()
        try:
            yield Setup(
                appliance, named, ports["dns"], config.parent / "zones/outside/example.test.zone"
            )
        finally:
            named.stop()
    finally:
        assert appliance.stop() == 0, appliance.read_log()


def wait_for_serial(server: str, port: int, serial: int, timeout: float) -> float:
    """Seconds until ``server`` answers ``serial`` for the zone; fails after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if soa_serial(server, port, ZONE, LISTED) == serial:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{server}:{port} did not reach serial {serial} within {timeout}s")


RRKey = tuple[str, int, int, int, str]


def axfr(server: str, port: int, source: str) -> set[RRKey]:
    records: set[RRKey] = set()
    for message in dns.query.xfr(server, ZONE, port=port, source=source, timeout=5, lifetime=10):
        for rrset in message.answer:
            for rdata in rrset:
                records.add(
                    (
                        rrset.name.to_text().lower(),
                        rrset.ttl,
                        rrset.rdclass,
                        rrset.rdtype,
                        rdata.to_text().lower(),
                    )
                )
    return records


def test_bind_secondary_serves_the_same_zone(setup: Setup) -> None:
    wait_for_serial(BIND, setup.named.port, SERIAL, 20)
    ours = axfr(OUTSIDE, setup.port, LISTED)
    theirs = axfr(BIND, setup.named.port, LISTED)
    assert ours == theirs
    assert {r[3] for r in ours} >= {dns.rdatatype.SOA, dns.rdatatype.NS, dns.rdatatype.MX}
    for name, rdtype in (
        ("example.test", "MX"),
        ("www.example.test", "A"),
        ("nx.example.test", "A"),
    ):
        a = dns.query.udp(dns.message.make_query(name, rdtype), OUTSIDE, port=setup.port, timeout=5)
        b = dns.query.udp(
            dns.message.make_query(name, rdtype), BIND, port=setup.named.port, timeout=5
        )
        assert a.rcode() == b.rcode() and a.answer == b.answer and a.authority == b.authority


def test_axfr_from_an_unlisted_address_is_refused(setup: Setup) -> None:
    query = dns.message.make_query(ZONE, "AXFR")
    reply = dns.query.tcp(query, OUTSIDE, port=setup.port, source=UNLISTED, timeout=5)
    assert reply.rcode() == dns.rcode.REFUSED and not reply.answer
    assert f"zone transfer of {ZONE} to {UNLISTED} refused" in setup.appliance.read_log()


def test_notify_after_reload_brings_the_new_serial_within_5_seconds(setup: Setup) -> None:
    wait_for_serial(BIND, setup.named.port, SERIAL, 20)
    new = SERIAL + 1
    text = setup.zone_file.read_text()
    text = text.replace(f"{SERIAL} ; serial", f"{new} ; serial")
    text += "new     IN A    127.0.0.10\n"
    setup.zone_file.write_text(text)
    mark = len(setup.appliance.read_log())
    setup.appliance.signal(signal.SIGHUP)
    setup.appliance.wait_for_log("configuration reloaded", after=mark)
    elapsed = wait_for_serial(BIND, setup.named.port, new, 5)
    assert elapsed < 5
    log = setup.appliance.read_log()[mark:]
    assert re.search(
        rf"NOTIFY {re.escape(ZONE)} serial {new} sent to {BIND}:{setup.named.port}", log
    ), log
    setup.appliance.wait_for_log(f"NOTIFY {ZONE} acknowledged by {BIND}", 5, after=mark)
    assert "notify from " in setup.named.read_log()
    reply = dns.query.udp(
        dns.message.make_query("new.example.test", "A"), BIND, port=setup.named.port, timeout=5
    )
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer[0][0].address == "127.0.0.10"
    assert axfr(OUTSIDE, setup.port, LISTED) == axfr(BIND, setup.named.port, LISTED)
