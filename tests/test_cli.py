"""The ``appliance`` command: check reports every problem with file, key and reason; help lists it all."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    appliance = Path(sys.executable).parent / "appliance"
    return subprocess.run([str(appliance), *args], capture_output=True, text=True, timeout=60)


def test_check_demo_passes() -> None:
    result = run("check", "--config", str(ROOT / "etc" / "demo" / "appliance.toml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


def test_check_reports_five_mistakes_and_fails(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "etc" / "demo", tmp_path / "demo")
    path = tmp_path / "demo" / "appliance.toml"
    text = path.read_text()
    text = text.replace(
        'hostname = "mail.example.test"', 'hostname = "mail.example.test"\ncolor = "red"'
    )
    text = text.replace('networks = ["127.0.1.0/24"]', 'networks = ["127.0.1.0/99"]')
    text = text.replace(
        'pop3 = { sides = ["inside"], port = 10110 }', 'pop3 = { sides = ["inside"], port = "110" }'
    )
    text = text.replace('aliases = "aliases"', 'aliases = "missing-aliases"')
    text = text.replace("allow_plaintext_inside = true", "allow_plaintext_inside = 1")
    path.write_text(text)
    result = run("check", "--config", str(path))
    assert result.returncode == 1
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert len(errors) == 5, result.stdout
    keys = [
        "appliance.color",
        "interfaces.inside.networks[0]",
        "listeners.pop3.port",
        "mail.aliases",
        "pop3.allow_plaintext_inside",
    ]
    for key in keys:
        assert any(line.startswith(f"error: {path}: {key}: ") for line in errors), (key, errors)


def test_check_reports_zone_errors_with_file_and_line(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "etc" / "demo", tmp_path / "demo")
    zone = tmp_path / "demo" / "zones" / "outside" / "example.test.zone"
    zone.write_text(zone.read_text() + "broken IN A 999.1.1.1\n")
    result = run("check", "--config", str(tmp_path / "demo" / "appliance.toml"))
    assert result.returncode == 1
    line_number = len(zone.read_text().splitlines())
    assert f"{zone}:{line_number}:" in result.stdout


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["--help"])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    for command in ("check", "reload", "user"):
        assert command in out


def test_user_commands_edit_the_file(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("")
    add = subprocess.run(
        [
            str(Path(sys.executable).parent / "appliance"),
            "user",
            "add",
            "--users",
            str(users),
            "--password-stdin",
            "carol@example.test",
        ],
        input="secret\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert add.returncode == 0, add.stderr
    listed = run("user", "list", "--users", str(users))
    assert "carol@example.test" in listed.stdout
    (line,) = [line for line in users.read_text().splitlines() if line.startswith("carol@")]
    assert line.split(":")[1].startswith("$scrypt$") and ":secret" not in line
    assert run("user", "del", "--users", str(users), "carol@example.test").returncode == 0
    assert "carol" not in run("user", "list", "--users", str(users)).stdout


def test_reload_without_a_running_process_fails_cleanly(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "etc" / "demo", tmp_path / "demo")
    path = tmp_path / "demo" / "appliance.toml"
    path.write_text(
        path.read_text().replace('state_dir = "../../var/demo"', f'state_dir = "{tmp_path}/state"')
    )
    result = run("reload", "--config", str(path))
    assert result.returncode == 1
    assert "appliance.pid" in result.stderr
