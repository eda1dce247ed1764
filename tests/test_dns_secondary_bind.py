"""Interop with BIND 9 (D-6, secondary side): the appliance as BIND's secondary.

``named`` is the primary on 127.0.0.1 (a free port) for two zones; the real
``twistd appliance`` process (demo configuration, ports moved) has both as
secondary zones of its outside view, masters = BIND.  It transfers them and
serves the same RR sets; when the zone file's serial goes up and BIND
reloads, BIND's NOTIFY (from 127.0.0.1 to the appliance's outside address)
brings the new serial within 5 seconds, by IXFR (``ixfr-from-differences``);
a NOTIFY from elsewhere is REFUSED; once BIND is stopped, the zone with
tiny SOA timers (refresh 2, retry 1, expire 5) answers SERVFAIL.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.opcode
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
CLIENT = "127.0.2.5"
ZONE = "example.test."
SHORT = "short.test."
SERIAL = 2026112201

ZONE_TEXT = """$ORIGIN example.test.
$TTL 3600
@       IN SOA  ns.example.test. hostmaster.example.test. ( {serial} 3600 900 1209600 300 )
        IN NS   ns
        IN MX   10 mail
        IN TXT  "v=spf1 mx -all"
ns      IN A    127.0.0.10
mail    IN A    127.0.0.10
        IN AAAA 2001:db8::25
www     IN A    127.0.0.10
ftp     IN CNAME www
_sip._tcp IN SRV 10 5 5060 www
*.wild  IN A    192.0.2.7
sub     IN NS   ns.sub
ns.sub  IN A    192.0.2.53
"""

SHORT_TEXT = """$ORIGIN short.test.
$TTL 60
@       IN SOA  ns.short.test. hostmaster.short.test. ( 7 2 1 5 60 )
        IN NS   ns
ns      IN A    127.0.0.10
host    IN A    192.0.2.1
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("secondary-bind")
    config, ports = demo_on_free_ports(tmp, OUTSIDE)
    bind_port = free_port(BIND)
    text = config.read_text().replace(
        'file = "zones/outside/example.test.zone"\nallow_transfer = ["127.0.2.0/24"]',
        f'type = "secondary"\nmasters = ["{BIND}:{bind_port}"]\n'
        'allow_transfer = ["127.0.2.0/24"]\n'
        f'[[dns.outside.zones]]\nname = "short.test"\ntype = "secondary"\n'
        f'masters = ["{BIND}:{bind_port}"]\n',
    )
    config.write_text(text)
    named_dir = tmp / "named"
    named_dir.mkdir()
    zone_file = named_dir / "example.test.zone"
    zone_file.write_text(ZONE_TEXT.format(serial=SERIAL))
    (named_dir / "short.test.zone").write_text(SHORT_TEXT)
    named = Named(
        named_dir,
        BIND,
        bind_port,
        body=f"""
zone "example.test" {{
    type primary;
    file "example.test.zone";
    notify explicit;
    also-notify {{ {OUTSIDE} port {ports["dns"]}; }};
    ixfr-from-differences yes;
}};
zone "short.test" {{
    type primary;
    file "short.test.zone";
}};
""",
    )
    named.start()
    try:
        appliance = ApplianceProcess(config, tmp / "appliance.log")
        appliance.start()
        try:
            yield Setup(appliance, named, ports["dns"], zone_file)
        finally:
            assert appliance.stop() == 0, appliance.read_log()
    finally:
        named.stop()


def wait_for_serial(port: int, zone: str, serial: int, timeout: float) -> float:
    """Seconds until the appliance answers ``serial`` for ``zone``; fails after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if soa_serial(OUTSIDE, port, zone, CLIENT) == serial:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"appliance did not reach serial {serial} of {zone} within {timeout}s")


RRKey = tuple[str, int, int, int, str]


def axfr(server: str, port: int, zone: str = ZONE) -> set[RRKey]:
    records: set[RRKey] = set()
    for message in dns.query.xfr(server, zone, port=port, source=CLIENT, timeout=5, lifetime=10):
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


def same_answers(setup: Setup, name: str, rdtype: str) -> None:
    ours = dns.query.udp(
        dns.message.make_query(name, rdtype), OUTSIDE, port=setup.port, source=CLIENT, timeout=5
    )
    theirs = dns.query.udp(
        dns.message.make_query(name, rdtype), BIND, port=setup.named.port, source=CLIENT, timeout=5
    )
    assert ours.rcode() == theirs.rcode(), (name, rdtype)
    assert set(map(str, ours.answer)) == set(map(str, theirs.answer)), (name, rdtype)
    assert set(map(str, ours.authority)) == set(map(str, theirs.authority)), (name, rdtype)


def test_transferred_zone_serves_the_same_data_as_bind(setup: Setup) -> None:
    wait_for_serial(setup.port, ZONE, SERIAL, 20)
    assert axfr(OUTSIDE, setup.port) == axfr(BIND, setup.named.port)
    for name, rdtype in (
        ("example.test", "MX"),
        ("example.test", "TXT"),
        ("mail.example.test", "AAAA"),
        ("ftp.example.test", "A"),
        ("_sip._tcp.example.test", "SRV"),
        ("x.wild.example.test", "A"),
        ("nx.example.test", "A"),
        ("www.example.test", "MX"),
    ):
        same_answers(setup, name, rdtype)
    saved = setup.appliance.config.parent.parent / "state" / "secondary" / "outside"
    assert (saved / "example.test.zone").exists()


def test_notify_from_elsewhere_is_refused(setup: Setup) -> None:
    wait_for_serial(setup.port, ZONE, SERIAL, 20)
    notify = dns.message.make_query(ZONE, "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    notify.flags |= dns.flags.AA
    reply = dns.query.udp(notify, OUTSIDE, port=setup.port, source="127.0.0.99", timeout=5)
    assert reply.rcode() == dns.rcode.REFUSED
    reply = dns.query.udp(notify, OUTSIDE, port=setup.port, source=BIND, timeout=5)
    assert reply.rcode() == dns.rcode.NOERROR and reply.opcode() == dns.opcode.NOTIFY
    assert reply.flags & dns.flags.AA


def test_bind_notify_brings_the_new_serial_within_5_seconds(setup: Setup) -> None:
    wait_for_serial(setup.port, ZONE, SERIAL, 20)
    new = SERIAL + 1
    text = ZONE_TEXT.format(serial=new).replace("www     IN A    127.0.0.10\n", "")
    setup.zone_file.write_text(text + "new     IN A    192.0.2.99\n")
    mark = len(setup.appliance.read_log())
    assert setup.named.process is not None
    setup.named.process.send_signal(signal.SIGHUP)
    elapsed = wait_for_serial(setup.port, ZONE, new, 5)
    assert elapsed < 5
    log = setup.appliance.read_log()[mark:]
    assert f"NOTIFY for {ZONE} from {BIND}" in log, log
    assert "IXFR started" in setup.named.read_log()
    assert f"zone {ZONE} transferred by IXFR" in log, log  # the differences were applied
    assert axfr(OUTSIDE, setup.port) == axfr(BIND, setup.named.port)
    same_answers(setup, "new.example.test", "A")
    same_answers(setup, "www.example.test", "A")


def test_zone_expires_to_servfail_once_bind_is_gone(setup: Setup) -> None:
    wait_for_serial(setup.port, SHORT, 7, 20)
    query = dns.message.make_query("host.short.test", "A")
    reply = dns.query.udp(query, OUTSIDE, port=setup.port, source=CLIENT, timeout=5)
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer
    setup.named.stop()
    stopped = time.monotonic()
    while True:
        reply = dns.query.udp(query, OUTSIDE, port=setup.port, source=CLIENT, timeout=5)
        if reply.rcode() == dns.rcode.SERVFAIL:
            break
        assert reply.rcode() == dns.rcode.NOERROR
        assert time.monotonic() - stopped < 15, "zone did not expire"
        time.sleep(0.2)
    assert not reply.answer
    assert "zone short.test. expired" in setup.appliance.read_log()


def test_restart_with_bind_gone_serves_the_saved_copy(setup: Setup) -> None:
    serial = soa_serial(OUTSIDE, setup.port, ZONE, CLIENT)
    assert serial is not None
    setup.named.stop()
    assert setup.appliance.stop() == 0
    mark = len(setup.appliance.read_log())
    setup.appliance.start()  # returns at once: the old run's "appliance started" is in the log
    setup.appliance.wait_for_log("appliance started", 30, after=mark)
    log = setup.appliance.read_log()[mark:]
    assert f"zone {ZONE} serial {serial} loaded from" in log, log
    assert soa_serial(OUTSIDE, setup.port, ZONE, CLIENT) == serial
    same = dns.query.udp(
        dns.message.make_query("ns.example.test", "A"),
        OUTSIDE,
        port=setup.port,
        source=CLIENT,
        timeout=5,
    )
    assert same.rcode() == dns.rcode.NOERROR and same.answer[0][0].address == "127.0.0.10"
    # short.test's EXPIRE (5 s) counts from its last confirmation before the restart.
    query = dns.message.make_query("host.short.test", "A")
    restarted = time.monotonic()
    while True:
        reply = dns.query.udp(query, OUTSIDE, port=setup.port, source=CLIENT, timeout=5)
        if reply.rcode() == dns.rcode.SERVFAIL:
            break
        assert time.monotonic() - restarted < 6, "the saved copy outlived its EXPIRE"
        time.sleep(0.2)
