"""The Debian package: build it, lint it, install it, run the installed service on loopback, purge it.

This is the only test of what an operator gets from ``apt-get install``:
the system Python and Debian's Twisted 22.4, the twistd dropin cache rebuilt
by python3-twisted's trigger, the ``appliance`` user and its directories, and
a server started by the installed ``twistd3`` (Debian's name for twistd).
It needs root and dpkg-buildpackage, and leaves the package purged.
"""

from __future__ import annotations

import fcntl
import os
import poplib
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.package]

SOURCE = Path(__file__).resolve().parent.parent
PLUGIN = Path("/usr/lib/python3/dist-packages/twisted/plugins/appliance_plugin.py")
DROPIN_CACHE = PLUGIN.parent / "dropin.cache"
TWISTD = "/usr/bin/twistd3"
#: The log observer the Debian unit names (debian/appliance.service).
UNIT_LOGGER = ["--logger=appliance.logs.observer"]
OUTSIDE, INSIDE = "127.0.0.10", "127.0.0.20"
#: The listener roles the test configures, with the first port tried for each.
TESTED = {"dns": 12053, "smtp": 12025, "smtps": 12465, "pop3": 12110}
#: The server's certificate is self-signed: these checks are about the handshake working.
UNVERIFIED = ssl.create_default_context()
UNVERIFIED.check_hostname = False
UNVERIFIED.verify_mode = ssl.CERT_NONE
#: Only system tools, never the virtualenv's or pyenv's Python.
ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}

needs_root_and_dpkg = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("dpkg-buildpackage", path=ENV["PATH"]) is None,
    reason="needs root and dpkg-buildpackage",
)


def run(
    *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a system command with the clean environment; its output is kept for messages."""
    return subprocess.run(
        args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, check=False
    )


def ok(*args: str, cwd: Path | None = None, timeout: float = 120) -> str:
    """Run a command that must succeed; return its standard output."""
    result = run(*args, cwd=cwd, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result.stdout


def copy_source(destination: Path) -> None:
    """Copy the files git would consider part of the tree (tracked or untracked, not ignored)."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=SOURCE,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listing.split("\0")):
        source = SOURCE / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def apt_get(*args: str) -> str:
    """apt-get that waits for the dpkg lock (other work on the machine may hold it)."""
    return ok("apt-get", "-o", "DPkg::Lock::Timeout=120", "-y", *args, timeout=170)


def installed() -> bool:
    result = run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "appliance")
    return result.returncode == 0 and result.stdout.startswith("ii")


def purge() -> None:
    """Purge the package if dpkg knows it at all (installed or only its conffiles left)."""
    if run("dpkg-query", "-W", "appliance").returncode == 0:
        apt_get("purge", "appliance")


def cache_names_plugin() -> bool:
    """Whether Twisted's dropin cache of the system plugins mentions ours."""
    try:
        return b"appliance_plugin" in DROPIN_CACHE.read_bytes()
    except FileNotFoundError:
        return False


def free_port(start: int) -> int:
    """The first port from ``start`` free for TCP and UDP on both loopback test addresses."""
    for port in range(start, start + 200):
        sockets = []
        try:
            for address in (OUTSIDE, INSIDE):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    s = socket.socket(socket.AF_INET, kind)
                    sockets.append(s)
                    s.bind((address, port))
            return port
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise AssertionError(f"no free port in {start}..{start + 199}")


ZONE_TEMPLATE = """\
$ORIGIN example.test.
$TTL 3600
@       IN SOA  ns.example.test. hostmaster.example.test. 2026112201 3600 900 1209600 300
        IN NS   ns
        IN MX   10 mail
ns      IN A    {address}
mail    IN A    {address}
"""

CONFIG_TEMPLATE = """\
[appliance]
hostname = "mail.example.test"
state_dir = "/var/lib/appliance"

[interfaces.outside]
addresses = ["{outside}"]

[interfaces.inside]
addresses = ["{inside}"]
networks = ["127.0.1.0/24"]

[listeners]
dns = {{ sides = ["outside", "inside"], port = {dns_port} }}
smtp = {{ sides = ["outside", "inside"], port = {smtp_port} }}
smtps = {{ sides = ["outside"], port = {smtps_port} }}
pop3 = {{ sides = ["inside"], port = {pop3_port} }}

[tls]
self_signed = true
names = ["mail.example.test"]

[dns.outside]
[[dns.outside.zones]]
name = "example.test"
file = "outside.zone"

[dns.inside]
allow_query = ["127.0.0.0/8"]
[[dns.inside.zones]]
name = "example.test"
file = "inside.zone"

[mail]
local_domains = ["example.test"]
spool = "/var/spool/appliance"

[directory]
users = "users"
"""


@pytest.fixture
def machine_lock() -> Iterator[None]:
    """Serialise runs: two of them (say, one per virtualenv) would share one dpkg database."""
    with open("/run/lock/appliance-debian-package-test.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A scratch directory the ``appliance`` user can read (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="appliance-deb-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def build(workdir: Path) -> Path:
    """Build the binary package from a copy of the tree; return the .changes file."""
    src = workdir / "src"
    src.mkdir()
    copy_source(src)
    ok("dpkg-buildpackage", "-us", "-uc", "-b", cwd=src, timeout=150)
    (changes,) = workdir.glob("appliance_*.changes")
    return changes


def check_lintian(changes: Path) -> None:
    result = run("lintian", "--pedantic", str(changes), timeout=120)
    print(f"lintian --pedantic:\n{result.stdout}{result.stderr}")
    errors = [line for line in result.stdout.splitlines() if line.startswith("E:")]
    assert not errors, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def check_installed_files() -> None:
    files = ok("dpkg", "-L", "appliance").splitlines()
    assert str(PLUGIN) in files
    assert not any(f.endswith("twisted/plugins/__init__.py") for f in files), files
    assert not any(f.endswith("twisted/__init__.py") for f in files), files
    assert not any("/tests" in f or "dropin.cache" in f for f in files), files
    conffiles = Path("/var/lib/dpkg/info/appliance.conffiles").read_text().split()
    for name in ("appliance.toml", "users", "aliases", "zones/outside/example.com.zone"):
        assert f"/etc/appliance/{name}" in conffiles
    # python3-twisted's trigger (debian/appliance.triggers) rebuilt the cache with our plugin.
    assert cache_names_plugin()
    assert "appliance" in ok(TWISTD, "--help").split()

    owner = ok("stat", "-c", "%U:%G %a", "/var/lib/appliance", "/var/spool/appliance").split("\n")
    assert owner[:2] == ["appliance:appliance 750"] * 2, owner
    assert ok("stat", "-c", "%U:%G %a", "/etc/appliance/users").strip() == "root:appliance 640"
    # The shipped production example validates as shipped (ExecStartPre runs this).
    ok("runuser", "-u", "appliance", "--", "/usr/bin/appliance", "check")
    if shutil.which("systemd-analyze", path=ENV["PATH"]):
        ok("systemd-analyze", "verify", "/lib/systemd/system/appliance.service")
    # The server below starts with the unit's own log observer.
    unit = Path("/lib/systemd/system/appliance.service").read_text()
    assert UNIT_LOGGER[0] in unit.split("ExecStart=/usr/bin/twistd3", 1)[1].split("\n", 1)[0]


def write_test_config(workdir: Path, ports: dict[str, int]) -> Path:
    (workdir / "outside.zone").write_text(ZONE_TEMPLATE.format(address=OUTSIDE))
    (workdir / "inside.zone").write_text(ZONE_TEMPLATE.format(address=INSIDE))
    (workdir / "users").write_text("")
    config = workdir / "test.toml"
    config.write_text(
        CONFIG_TEMPLATE.format(
            outside=OUTSIDE, inside=INSIDE, **{f"{role}_port": port for role, port in ports.items()}
        )
    )
    return config


def wait_for_tcp(process: subprocess.Popen[bytes], log: Path, address: str, port: int) -> None:
    """Poll until ``address:port`` accepts, failing with the server log if it dies or stalls."""
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"twistd exited {process.returncode}:\n{log.read_text()[-6000:]}")
        try:
            socket.create_connection((address, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"{address}:{port} never listened:\n{log.read_text()[-6000:]}")


def query_a(address: str, port: int, name: str) -> list[str]:
    import dns.flags
    import dns.message
    import dns.query
    import dns.rcode
    import dns.rdatatype

    response = dns.query.udp(dns.message.make_query(name, "A"), address, port=port, timeout=5)
    assert response.rcode() == dns.rcode.NOERROR, response
    assert response.flags & dns.flags.AA, response
    return sorted(
        rr.address for rrset in response.answer for rr in rrset if rr.rdtype == dns.rdatatype.A
    )


def check_smtp(address: str, port: int) -> None:
    with smtplib.SMTP(address, port, timeout=10) as client:
        code, _ = client.ehlo("client.example.test")
        assert code == 250
        assert client.has_extn("starttls"), client.esmtp_features
        code, _ = client.starttls(context=UNVERIFIED)
        assert code == 220
        code, _ = client.ehlo("client.example.test")
        assert code == 250


def wired_roles() -> set[str]:
    """The listener roles the source tree (hence the package) builds; all of them if unknown."""
    try:
        from appliance.assembly import LISTENER_BUILDERS
    except ImportError:
        return set(TESTED)
    return set(LISTENER_BUILDERS)


def check_running_service(workdir: Path) -> None:
    """Start the installed twistd as the ``appliance`` user; DNS (and SMTP once wired) must answer."""
    pytest.importorskip("dns.message")
    roles = wired_roles()
    assert "dns" in roles
    ports = {role: free_port(base) for role, base in TESTED.items()}
    dns_port, smtp_port = ports["dns"], ports["smtp"]
    config = write_test_config(workdir, ports)
    log = workdir / "twistd.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", *UNIT_LOGGER, "appliance", "--config", str(config)],
            cwd="/",
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            user="appliance",
            group="appliance",
            extra_groups=[],
        )
    try:
        wait_for_tcp(process, log, OUTSIDE, dns_port)
        # Split horizon through the installed package: each side answers from its own zone.
        assert query_a(OUTSIDE, dns_port, "mail.example.test.") == [OUTSIDE]
        assert query_a(INSIDE, dns_port, "mail.example.test.") == [INSIDE]
        if "smtp" in roles:
            wait_for_tcp(process, log, OUTSIDE, smtp_port)
            banner = socket.create_connection((OUTSIDE, smtp_port), timeout=10)
            try:
                assert banner.makefile("rb").readline().startswith(b"220 "), log.read_text()
            finally:
                banner.close()
            check_smtp(OUTSIDE, smtp_port)
        if "smtps" in roles:
            wait_for_tcp(process, log, OUTSIDE, ports["smtps"])
            with smtplib.SMTP_SSL(OUTSIDE, ports["smtps"], timeout=10, context=UNVERIFIED) as c:
                assert c.ehlo("client.example.test")[0] == 250
        if "pop3" in roles:
            wait_for_tcp(process, log, INSIDE, ports["pop3"])
            pop = poplib.POP3(INSIDE, ports["pop3"], timeout=10)
            try:
                assert pop.getwelcome().startswith(b"+OK"), pop.getwelcome()
            finally:
                pop.quit()
        # The self-signed pair was generated in the package's state directory.
        assert Path("/var/lib/appliance/tls/certificate.pem").exists()
    finally:
        process.terminate()
        try:
            returncode = process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
    # twistd re-raises the signal that stopped it once the reactor has shut down cleanly.
    assert returncode in (0, -signal.SIGTERM), log.read_text()[-6000:]
    assert "Server Shut Down." in log.read_text(), log.read_text()[-6000:]
    print(f"installed service answered for: {', '.join(sorted(roles & set(TESTED)))}")


def check_purge_keeps_mail() -> None:
    """Purge removes the queue and generated state but not mail already delivered."""
    message = Path("/var/lib/appliance/mail/example.test/alice/new/1.test")
    message.parent.mkdir(parents=True)
    message.write_bytes(b"Subject: kept\r\n\r\nbody\r\n")
    apt_get("purge", "appliance")
    try:
        assert message.read_bytes() == b"Subject: kept\r\n\r\nbody\r\n"
        assert sorted(p.name for p in Path("/var/lib/appliance").iterdir()) == ["mail"]
        assert not Path("/var/spool/appliance").exists()
    finally:
        shutil.rmtree("/var/lib/appliance")


@needs_root_and_dpkg
def test_build_lint_install_run_purge(machine_lock: None, workdir: Path) -> None:
    """The whole life of the package, in order (one test: the steps share one machine state)."""
    purge()
    assert not cache_names_plugin()
    changes = build(workdir)
    check_lintian(changes)
    try:
        (deb,) = workdir.glob("appliance_*_all.deb")
        apt_get("install", str(deb))
        assert installed()
        check_installed_files()
        check_running_service(workdir)
        check_purge_keeps_mail()
        # Reinstalled over the kept user and purged with no mail: nothing is left.
        apt_get("install", str(deb))
    finally:
        purge()
    assert not installed()
    assert not PLUGIN.exists()
    assert not Path("/var/lib/appliance").exists()
    assert not Path("/var/spool/appliance").exists()
    assert not Path("/etc/appliance").exists()
    # The removal fired the trigger again: the cache no longer names the plugin.
    assert not cache_names_plugin()
