"""The configuration file: the demo and the example are valid, every mistake is named precisely."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest

from appliance import config

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "etc" / "demo" / "appliance.toml"

MINIMAL = """
[appliance]
hostname = "gw.example.test"
state_dir = "state"

[interfaces.outside]
addresses = ["127.0.0.10"]

[interfaces.inside]
addresses = ["127.0.0.20"]
networks = ["127.0.1.0/24"]

[listeners]
smtp = { sides = ["outside", "inside"], port = 10025 }

[tls]
self_signed = true

[directory]
users = "users"
"""


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "users").touch()
    path = tmp_path / "appliance.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_demo_is_valid_and_follows_the_topology() -> None:
    c = config.load(DEMO)
    assert c.outside.addresses == ("127.0.0.10",)
    assert c.inside.addresses == ("127.0.0.20",)
    assert c.inside.networks == (ipaddress.ip_network("127.0.1.0/24"),)
    described = {lst.describe() for lst in c.listeners}
    for side, address in (("outside", "127.0.0.10"), ("inside", "127.0.0.20")):
        for transport in ("udp", "tcp"):
            assert f"dns/{side} {transport} {address}:10053" in described
        assert f"smtp/{side} tcp {address}:10025" in described
        assert f"submission/{side} tcp {address}:10587" in described
        assert f"smtps/{side} tcp {address}:10465" in described
        assert f"pop3s/{side} tcp {address}:10995" in described
    assert "pop3/inside tcp 127.0.0.20:10110" in described
    assert not any(lst.describe().startswith("pop3/outside") for lst in c.listeners)
    for listener in c.listeners:
        assert ipaddress.ip_address(listener.address).is_loopback


def test_relative_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    c = config.load(write(tmp_path, MINIMAL))
    assert c.state_dir == tmp_path / "state"
    assert c.directory.users == tmp_path / "users"
    assert c.mail.spool == tmp_path / "state" / "spool"
    assert c.tls.names == ("gw.example.test",)


def test_five_mistakes_give_five_messages_with_file_key_and_reason(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'hostname = "gw.example.test"', 'hostname = "gw.example.test"\ncolour = "blue"'
    )
    text = text.replace('networks = ["127.0.1.0/24"]', 'networks = ["127.0.1.0/33"]')
    text = text.replace("port = 10025", "port = 70000")
    text = text.replace('users = "users"', 'users = "no-such-file"')
    text += '\n[mail]\nmax_recipients = "many"\n'
    path = write(tmp_path, text)
    problems = config.check(path)
    assert sorted(p.key for p in problems) == sorted(
        [
            "appliance.colour",
            "interfaces.inside.networks[0]",
            "listeners.smtp.port",
            "mail.max_recipients",
            "directory.users",
        ]
    )
    assert len(problems) == 5
    for p in problems:
        assert p.file == str(path)
        assert str(p).startswith(f"{path}: {p.key}: ")
        assert p.reason
    reasons = {p.key: p.reason for p in problems}
    assert reasons["appliance.colour"] == "unknown setting"
    assert "CIDR" in reasons["interfaces.inside.networks[0]"]
    assert "between 1 and 65535" in reasons["listeners.smtp.port"]
    assert "integer" in reasons["mail.max_recipients"]
    assert "does not exist" in reasons["directory.users"]
    with pytest.raises(config.ConfigError) as raised:
        config.load(path)
    assert len(raised.value.problems) == 5


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[broken\n")
    (problem,) = config.check(path)
    assert "not valid TOML" in problem.reason
    assert "line" in problem.reason


def test_missing_file(tmp_path: Path) -> None:
    (problem,) = config.check(tmp_path / "absent.toml")
    assert "cannot read" in problem.reason


def test_unknown_role_bad_side_and_port_clash(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        'smtp = { sides = ["outside", "inside"], port = 10025 }',
        'smtp = { sides = ["outside", "middle"], port = 10025 }\n'
        'submission = { sides = ["outside"], port = 10025 }\n'
        'gopher = { sides = ["outside"], port = 70 }',
    )
    keys = {p.key: p.reason for p in config.check(write(tmp_path, text))}
    assert "middle" in keys["listeners.smtp.sides[1]"]
    assert "already used by smtp/outside" in keys["listeners.submission.port"]
    assert "unknown listener role" in keys["listeners.gopher"]


def test_wrong_types_and_required_keys(tmp_path: Path) -> None:
    text = """
    [appliance]
    state_dir = 5
    [interfaces]
    outside = { addresses = "127.0.0.10" }
    [listeners]
    """
    keys = {p.key: p.reason for p in config.check(write(tmp_path, text))}
    assert keys["appliance.hostname"] == "is required"
    assert "string" in keys["appliance.state_dir"]
    assert "list" in keys["interfaces.outside.addresses"]
    assert keys["interfaces.inside"] == "is required"


def test_booleans_are_not_integers(tmp_path: Path) -> None:
    text = MINIMAL + "\n[mail]\nmax_recipients = true\n"
    (problem,) = config.check(write(tmp_path, text))
    assert problem.key == "mail.max_recipients"


def test_tls_files_required_without_self_signed(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        "self_signed = true", 'self_signed = false\ncertificate = "c.pem"\nkey = "k.pem"'
    )
    keys = {p.key for p in config.check(write(tmp_path, text))}
    assert keys == {"tls.certificate", "tls.key"}


def test_local_and_relay_domains_are_separate(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + '\n[mail]\nlocal_domains = ["example.test"]\nrelay_domains = ["Example.TEST", "bad_domain!"]\n'
    )
    keys = {p.key: p.reason for p in config.check(write(tmp_path, text))}
    assert "also a local domain" in keys["mail.relay_domains"]
    assert "not a valid" in keys["mail.relay_domains[1]"]


def test_dns_views(tmp_path: Path) -> None:
    (tmp_path / "z.zone").touch()
    text = MINIMAL + textwrap.dedent(
        """
        [dns.outside]
        [[dns.outside.zones]]
        name = "Example.Test."
        file = "z.zone"
        allow_transfer = ["127.0.2.0/24"]
        also_notify = ["127.0.2.53", "127.0.2.54:10053", "[::1]:5353"]
        [dns.inside]
        """
    )
    c = config.load(write(tmp_path, text))
    outside = c.dns.view("outside")
    assert outside is not None
    (zone,) = outside.zones
    assert zone.name == "example.test"
    assert zone.also_notify == (("127.0.2.53", 53), ("127.0.2.54", 10053), ("::1", 5353))
    assert outside.allow_query == ()
    inside = c.dns.view("inside")
    assert inside is not None and ipaddress.ip_network("127.0.1.0/24") in inside.allow_query


def test_delivery_settings(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent(
        """
        [delivery]
        smart_host = "[127.0.2.25]:2525"
        lifetime = "3d"
        relay_lifetime = 864000
        retry_intervals = ["30s", "10m", "2h"]
        [delivery.static_routes]
        "partner.test" = "[127.0.2.30]"
        ".corp.test" = "gw.corp.test:2525"
        """
    )
    c = config.load(write(tmp_path, text))
    assert c.delivery.smart_host == "[127.0.2.25]:2525"
    assert c.delivery.lifetime == 3 * 86400
    assert c.delivery.relay_lifetime == 864000
    assert c.delivery.retry_intervals == (30, 600, 7200)
    assert c.delivery.static_routes == {"partner.test": "[127.0.2.30]", ".corp.test": "gw.corp.test:2525"}


def test_delivery_mistakes(tmp_path: Path) -> None:
    text = MINIMAL + textwrap.dedent(
        """
        [delivery]
        lifetime = "five days"
        retry_intervals = ["10m", "-1m"]
        self_is_best_mx = "panic"
        [delivery.static_routes]
        "partner.test" = "[not an address"
        """
    )
    keys = {p.key: p.reason for p in config.check(write(tmp_path, text))}
    assert set(keys) == {
        "delivery.lifetime",
        "delivery.retry_intervals[1]",
        "delivery.self_is_best_mx",
        "delivery.static_routes.partner.test",
    }
    assert "duration" in keys["delivery.lifetime"]
