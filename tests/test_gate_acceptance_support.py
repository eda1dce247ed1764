"""Helpers for the gate's acceptance tests and bench/smtp_gate: BIND with the test DNS, gate configs.

BIND (``named``) listens on 127.0.0.1 only and serves the block lists, the
sender domains and their SPF records; it forwards everything else to a
closed loopback port (so nothing ever leaves the machine) and a few zones to
a loopback socket that never answers (a DNS server that times out).  The
appliance's ``[dns.inside]`` forwarders point at it, ``forward_only``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query

from tests.test_smtp_acceptance_support import configure

NAMED = shutil.which("named") or ("/usr/sbin/named" if Path("/usr/sbin/named").exists() else None)
ADDRESS = "127.0.0.1"  # named listens only on interface addresses

SOA = "@ SOA ns.{z}. hostmaster.{z}. 1 3600 600 86400 60\n@ NS ns.{z}.\nns A 127.0.0.1\n"

#: Clients on the "Internet" (127.0.2.0/24) with a role in the test data.
LISTED = "127.0.2.2"  # in bl.test (reject)
ERROR_CODE = "127.0.2.3"  # bl.test answers 127.255.255.254 for it
TAG_LISTED = "127.0.2.4"  # in tagbl.test (tag)
ACCESS_REJECT = "127.0.2.50"
ACCESS_ERROR = "127.0.2.51"
ACCESS_OK = "127.0.2.52"  # also in bl.test: OK skips the DNSBL
ACCESS_RELAY = "127.0.2.53"

ZONES = {
    "bl.test": """
2.2.0.127   A   127.0.0.2
2.2.0.127   TXT "Listed for spam, see http://bl.test/127.0.2.2"
52.2.0.127  A   127.0.0.2
52.2.0.127  TXT "Listed too"
3.2.0.127   A   127.255.255.254
""",
    "tagbl.test": """
4.2.0.127   A   127.0.0.3
4.2.0.127   TXT "Suspicious, tag only"
""",
    "remote.test": """
@       MX  10 mx
@       TXT "v=spf1 ip4:127.0.2.0/24 -all"
mx      A   127.0.2.200
discard MX  10 mx
""",
    "spfpass.test": """
@   MX  10 mx
@   TXT "v=spf1 ip4:127.0.2.0/24 -all"
mx  A   127.0.2.201
""",
    "spffail.test": """
@   MX  10 mx
@   TXT "v=spf1 ip4:192.0.2.1 -all"
mx  A   192.0.2.1
""",
    "grey.test": """
@   MX  10 mx
@   TXT "v=spf1 ip4:127.0.2.0/24 -all"
mx  A   127.0.2.202
""",
    "spfslow.test": """
@   MX  10 mx
@   TXT "v=spf1 include:spf.slow.test -all"
mx  A   127.0.2.203
""",
}
#: Zones forwarded to a socket that never answers.
SLOW_ZONES = ("slowbl.test", "slow.test")
#: Zones forwarded to a port where nothing listens (a DNS server that is down).
DOWN_ZONES = ("downbl.test",)


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 nobody uses right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((ADDRESS, 0))
        return int(s.getsockname()[1])


class Named:
    """A private ``named`` on 127.0.0.1:port serving ZONES; :meth:`stop` kills it."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_udp_port()
        # Held open and never read: queries to it time out.
        self.blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.blackhole.bind((ADDRESS, 0))
        self.closed_port = free_udp_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Write the zones and named.conf, start named and wait until it answers."""
        if NAMED is None:
            raise RuntimeError("named (bind9) is not installed")
        work = self.work
        work.mkdir(parents=True, exist_ok=True)
        (work / "root.hint").write_text(
            ". 3600000 NS a.root.test.\na.root.test. 3600000 A 127.0.0.1\n"
        )
        zones = f'zone "." {{ type hint; file "{work / "root.hint"}"; }};\n'
        for origin, body in ZONES.items():
            (work / f"{origin}.zone").write_text("$TTL 300\n" + SOA.format(z=origin) + body)
            zones += f'zone "{origin}" {{ type primary; file "{work / (origin + ".zone")}"; }};\n'
        blackhole = self.blackhole.getsockname()[1]
        for origin in SLOW_ZONES:
            zones += (
                f'zone "{origin}" {{ type forward; forward only; '
                f"forwarders {{ {ADDRESS} port {blackhole}; }}; }};\n"
            )
        for origin in DOWN_ZONES:
            zones += (
                f'zone "{origin}" {{ type forward; forward only; '
                f"forwarders {{ {ADDRESS} port {self.closed_port}; }}; }};\n"
            )
        (work / "named.conf").write_text(
            f"""options {{
  directory "{work}";
  listen-on port {self.port} {{ {ADDRESS}; }};
  listen-on-v6 {{ none; }};
  recursion yes;
  allow-recursion {{ 127.0.0.0/8; }};
  allow-query {{ 127.0.0.0/8; }};
  forwarders {{ {ADDRESS} port {self.closed_port}; }};
  forward only;
  notify no;
  dnssec-validation no;
  check-names primary ignore;
  pid-file "{work}/named.pid";
}};
controls {{ }};
{zones}"""
        )
        self.process = subprocess.Popen(
            [NAMED, "-g", "-n", "1", "-c", str(work / "named.conf")],
            stdout=(work / "named.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                reply = dns.query.udp(
                    dns.message.make_query("spfpass.test.", "MX"),
                    ADDRESS,
                    port=self.port,
                    timeout=0.5,
                )
                if reply.answer:
                    return
            except (dns.exception.Timeout, OSError):
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"named did not start:\n{(work / 'named.log').read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop named (and close the black hole)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self.blackhole.close()


ACCESS_MAP = f"""\
# The access map of the acceptance tests.
{ACCESS_REJECT}  REJECT
{ACCESS_ERROR}  ERROR:554 5.7.1 You are not welcome here
{ACCESS_OK}  OK
{ACCESS_RELAY}  RELAY
From:spammer@remote.test  REJECT
From:discard.remote.test  DISCARD
From:tempfail@remote.test  ERROR:451 4.7.1 Come back later
To:hostmaster@example.test  ERROR:550 5.7.1 This mailbox takes no mail from outside
"""

#: Every check on, healthy DNS (process A of the acceptance tests).
GATE_ALL = """
[gate]
authserv_id = "mail.example.test"

[gate.greet]
per_listener = {{ outside = {greet} }}

[gate.dnsbl]
timeout = 1
[[gate.dnsbl.zones]]
zone = "bl.test"
action = "reject"
[[gate.dnsbl.zones]]
zone = "tagbl.test"
action = "tag"

[gate.domains]
timeout = 1
always_wrong = ["localhost", "localhost.localdomain", "localdomain", "invalid", "typo.test"]

[gate.access]
path = "access"

[gate.headers]
[[gate.headers.rules]]
name = "Subject"
pattern = "viagra"
text = "Spam subject"
[[gate.headers.rules]]
name = "Subject"
pattern = "lottery"
action = "tag"
text = "lottery words"

[gate.greylist]
enabled = true
delay = {grey_delay}
auto_allow_after = 0
allow_senders = [{grey_allow}]

[gate.spf]
timeout = 1
total_timeout = 2
"""

#: Neighbours that fail (process B): lists down, timing out, answering error codes.
GATE_BROKEN = """
[gate]
authserv_id = "mail.example.test"

[gate.dnsbl]
timeout = 1
[[gate.dnsbl.zones]]
zone = "bl.test"
[[gate.dnsbl.zones]]
zone = "downbl.test"
[[gate.dnsbl.zones]]
zone = "slowbl.test"

[gate.domains]
timeout = 1

[gate.spf]
timeout = 1
total_timeout = 2
temperror_action = "accept"
"""


def gate_config(
    tmp: Path,
    gate: str,
    forwarder: str,
    access: str | None = ACCESS_MAP,
) -> tuple[Path, int]:
    """A demo copy on free ports whose inside resolver forwards to ``forwarder`` only, with ``gate``.

    Returns the config path and the SMTP port.
    """
    config, port = configure(tmp)
    text = config.read_text()
    text = text.replace('forwarders = ["127.0.2.53:10053"]', f'forwarders = ["{forwarder}"]')
    assert forwarder in text
    config.write_text(text + "\n" + gate)
    if access is not None:
        (config.parent / "access").write_text(access)
    return config, port
