"""POP3 interoperability with fetchmail over STLS, verifying the appliance's generated certificate.

The real ``twistd appliance`` serves a demo copy on free ports; a message is
delivered to bob through SMTP, then fetchmail (Debian's, as a LAN client would
run it) logs in with STLS, checks the certificate against the one the
appliance generated at start, retrieves and deletes the message.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import config as config_module
from tests.harness import ApplianceProcess
from tests.test_smtp_acceptance_support import INSIDE, INTERNET_CLIENT, configure, smtp, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("fetchmail") is None, reason="fetchmail (Debian package) not installed"
    ),
]


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ApplianceProcess, Path]]:
    tmp = tmp_path_factory.mktemp("fetchmail")
    path, _ = configure(tmp)
    process = ApplianceProcess(path, tmp / "appliance.log")
    process.start()
    try:
        yield process, tmp
    finally:
        process.stop()


def pop3_port(path: Path) -> int:
    config = config_module.load(path)
    (port,) = {lst.port for lst in config.listeners if lst.role == "pop3"}
    return port


def bob_count(tmp: Path) -> int:
    new = tmp / "state" / "mail" / "example.test" / "bob" / "new"
    cur = new.parent / "cur"
    return sum(len(list(d.iterdir())) for d in (new, cur) if d.exists())


def fetch(
    process: ApplianceProcess, tmp: Path, *extra: str
) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp / "fetched.mbox"
    certificate = tmp / "state" / "tls" / "certificate.pem"
    rc = tmp / "fetchmailrc"
    rc.write_text(
        f"poll {INSIDE} service {pop3_port(process.config)} protocol POP3 uidl\n"
        "  user 'bob@example.test' there with password 'demo-bob' is 'bob' here\n"
        "  sslproto 'TLS1.2+' sslcertck sslcommonname 'mail.example.test'\n"
        f"  sslcertfile '{certificate}'\n"
        f"  mda 'cat >> {out}'\n"
    )
    rc.chmod(0o600)
    env = {"HOME": str(tmp), "PATH": "/usr/bin:/bin", "FETCHMAILHOME": str(tmp)}
    result = subprocess.run(
        [
            "fetchmail",
            "--nodetach",
            "--fetchmailrc",
            str(rc),
            "--pidfile",
            str(tmp / "fm.pid"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    return result, out


def test_fetchmail_over_stls_with_certificate_check(
    appliance: tuple[ApplianceProcess, Path],
) -> None:
    process, tmp = appliance
    smtp_port = next(
        lst.port for lst in config_module.load(process.config).listeners if lst.role == "smtp"
    )
    with smtp("127.0.0.10", smtp_port, INTERNET_CLIENT) as client:
        client.sendmail(
            "someone@remote.test",
            ["bob@example.test"],
            "Subject: for fetchmail\r\n\r\n.dot\r\nbody\r\n",
        )
    wait_for(lambda: bob_count(tmp) == 1)

    result, out = fetch(process, tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    fetched = out.read_text()
    assert "Subject: for fetchmail" in fetched
    assert "\n.dot\n" in fetched
    # fetchmail deletes what it fetched (no "keep"): the deletion took effect at QUIT.
    assert bob_count(tmp) == 0

    # Nothing new: fetchmail exits 1 ("no mail").
    again, _ = fetch(process, tmp)
    assert again.returncode == 1, again.stdout + again.stderr


def test_fetchmail_refuses_a_certificate_it_cannot_verify(
    appliance: tuple[ApplianceProcess, Path],
) -> None:
    process, tmp = appliance
    result, _ = fetch(process, tmp, "--sslcommonname", "wrong.example.test")
    output = result.stdout + result.stderr
    assert result.returncode not in (0, 1), output
    assert "wrong.example.test" in output and "mismatch" in output.lower(), output
