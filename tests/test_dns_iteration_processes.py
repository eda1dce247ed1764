"""The inside resolver iterating through a small Internet of separate server processes.

Three more ``twistd appliance`` processes play the Internet on 127.0.2.0/24,
each serving one level from its outside view: the root (127.0.2.1), the
``test.`` TLD (127.0.2.2) and the domains (127.0.2.3, 127.0.2.4).  The
appliance under test has no forwarders: its inside view iterates from root
hints naming 127.0.2.1.  Referrals with glue, a glue-less delegation and a
CNAME chain that crosses zones all resolve; NXDOMAIN comes back from the
cache (its SOA TTL counted down) until the SOA minimum has passed; outside
clients are refused recursion on both addresses.  Port 53 is needed because
the delegations carry no ports, so the test runs as root only.
"""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from appliance import config as config_module
from tests.harness import ApplianceProcess
from tests.test_smtp_acceptance_support import configure

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="the servers of the small Internet listen on port 53"
    ),
]

ROOT_ZONE = """
$TTL 3600
.            IN SOA a.root.test. hostmaster.root.test. 1 3600 900 604800 3600
.            IN NS  a.root.test.
test.        IN NS  ns.test.
ns.test.     IN A   127.0.2.2
a.root.test. IN A   127.0.2.1
"""

TLD_ZONE = """
$ORIGIN test.
$TTL 3600
@            IN SOA ns.test. hostmaster.test. 1 3600 900 604800 3600
             IN NS  ns
ns           IN A   127.0.2.2
remote       IN NS  ns.remote
ns.remote    IN A   127.0.2.3
; glue-less: other.test's server lives inside remote.test, found by a second lookup
other        IN NS  ns.remote.test.
far          IN NS  ns.far
ns.far       IN A   127.0.2.4
"""

REMOTE_ZONE = """
$ORIGIN remote.test.
$TTL 300
@            IN SOA ns hostmaster 1 3600 900 604800 4
             IN NS  ns
ns           IN A   127.0.2.3
www          IN A   127.0.2.80
alias        IN CNAME www.far.test.
"""

OTHER_ZONE = """
$ORIGIN other.test.
$TTL 300
@            IN SOA ns.remote.test. hostmaster.remote.test. 1 3600 900 604800 60
             IN NS  ns.remote.test.
mail         IN A   127.0.2.81
"""

FAR_ZONE = """
$ORIGIN far.test.
$TTL 300
@            IN SOA ns hostmaster 1 3600 900 604800 60
             IN NS  ns
ns           IN A   127.0.2.4
www          IN A   127.0.2.82
"""


def server_config(tmp: Path, name: str, address: str, zones: dict[str, str]) -> Path:
    """An appliance that is only an authoritative DNS server on ``address``:53."""
    base = tmp / name
    base.mkdir()
    (base / "users").write_text("")
    blocks = []
    for origin, text in zones.items():
        file = base / f"{origin.strip('.') or 'root'}.zone"
        file.write_text(textwrap.dedent(text))
        blocks.append(f'[[dns.outside.zones]]\nname = "{origin}"\nfile = "{file.name}"\n')
    path = base / "appliance.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [appliance]
            hostname = "{name}.test"
            state_dir = "state"
            [interfaces.outside]
            addresses = ["{address}"]
            [interfaces.inside]
            addresses = ["127.0.3.{address.rsplit(".", 1)[1]}"]
            [listeners]
            dns = {{ sides = ["outside"], port = 53 }}
            [dns.outside]
            """
        )
        + "\n".join(blocks)
    )
    return path


@pytest.fixture(scope="module")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    tmp = tmp_path_factory.mktemp("internet")
    servers = [
        server_config(tmp, "root", "127.0.2.1", {".": ROOT_ZONE}),
        server_config(tmp, "tld", "127.0.2.2", {"test": TLD_ZONE}),
        server_config(
            tmp, "remote", "127.0.2.3", {"remote.test": REMOTE_ZONE, "other.test": OTHER_ZONE}
        ),
        server_config(tmp, "far", "127.0.2.4", {"far.test": FAR_ZONE}),
    ]
    hints = tmp / "root.hints"
    hints.write_text(".  3600000  NS  A.ROOT.TEST.\nA.ROOT.TEST.  3600000  A  127.0.2.1\n")
    appliance_config, _ = configure(tmp)
    text = appliance_config.read_text()
    text = text.replace(
        'forwarders = ["127.0.2.53:10053"]\nforward_only = true\n', f'root_hints = "{hints}"\n'
    )
    assert "root_hints" in text
    appliance_config.write_text(text)
    processes = [ApplianceProcess(path, path.parent / "log") for path in servers]
    processes.append(ApplianceProcess(appliance_config, tmp / "appliance.log"))
    try:
        for process in processes:
            process.start()
        inside = config_module.load(appliance_config).dns
        port = next(
            lst.port for lst in config_module.load(appliance_config).listeners if lst.role == "dns"
        )
        assert inside.view("inside") is not None
        yield appliance_config.read_text(), port
    finally:
        for process in processes:
            process.stop()


def ask(server: str, port: int, name: str, rdtype: str, source: str) -> dns.message.Message:
    return dns.query.udp(
        dns.message.make_query(name, rdtype), server, port=port, source=source, timeout=15
    )


def test_referrals_glue_and_glueless_delegations(internet: tuple[str, int]) -> None:
    _, port = internet
    reply = ask("127.0.0.20", port, "www.remote.test", "A", "127.0.1.5")
    assert reply.rcode() == dns.rcode.NOERROR and reply.flags & 0x80  # RA
    assert [r.address for r in reply.answer[0]] == ["127.0.2.80"]
    glueless = ask("127.0.0.20", port, "mail.other.test", "A", "127.0.1.5")
    assert [r.address for r in glueless.answer[0]] == ["127.0.2.81"]


def test_cname_chain_across_zones(internet: tuple[str, int]) -> None:
    _, port = internet
    reply = ask("127.0.0.20", port, "alias.remote.test", "A", "127.0.1.5")
    types = [(str(rrset.name), rrset.rdtype) for rrset in reply.answer]
    assert ("alias.remote.test.", dns.rdatatype.CNAME) in types
    assert ("www.far.test.", dns.rdatatype.A) in types


def test_nxdomain_is_cached_for_the_soa_minimum(internet: tuple[str, int]) -> None:
    _, port = internet
    first = ask("127.0.0.20", port, "nothing.remote.test", "A", "127.0.1.5")
    assert first.rcode() == dns.rcode.NXDOMAIN
    assert first.authority[0].ttl <= 4
    time.sleep(1.2)
    cached = ask("127.0.0.20", port, "nothing.remote.test", "A", "127.0.1.5")
    assert cached.rcode() == dns.rcode.NXDOMAIN
    assert cached.authority[0].ttl < first.authority[0].ttl
    time.sleep(4)
    fresh = ask("127.0.0.20", port, "nothing.remote.test", "A", "127.0.1.5")
    assert fresh.rcode() == dns.rcode.NXDOMAIN
    assert fresh.authority[0].ttl == 4  # asked again: the full SOA minimum


def test_recursion_only_for_inside_clients(internet: tuple[str, int]) -> None:
    _, port = internet
    for server in ("127.0.0.10", "127.0.0.20"):
        refused = ask(server, port, "www.remote.test", "A", "127.0.2.9")
        assert refused.rcode() == dns.rcode.REFUSED and not refused.answer
    # The inside view's own zones still answer authoritatively for inside clients.
    own = ask("127.0.0.20", port, "files.example.test", "A", "127.0.1.5")
    assert own.flags & 0x400 and own.answer  # AA
