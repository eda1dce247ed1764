"""D-8 zone checks: each problem found with its file and line, errors vs warnings, `appliance check`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from appliance import config as config_module
from appliance.cli import main
from appliance.dns.checks import check_zones
from appliance.dns.notify import serial_gt, serial_lt
from appliance.dns.service import SERIAL_STATE_FILE
from appliance.dns.zone import load_zone
from appliance.dns.zonecheck import ERROR, WARNING, Finding, check_zone_file, hidden_names

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "zones"
DATA = ROOT / "tests" / "data" / "dnscheck"

HEAD = """\
$TTL 3600
@ IN SOA ns hostmaster 5 3600 900 1209600 300
  IN NS ns
ns IN A 192.0.2.53
"""


def write(tmp_path: Path, body: str, name: str = "example.test.zone") -> Path:
    path = tmp_path / name
    path.write_text(HEAD + body)
    return path


def only(findings: list[Finding], severity: str, text: str) -> Finding:
    matching = [f for f in findings if f.severity == severity and text in f.message]
    assert len(matching) == 1, findings
    return matching[0]


def test_clean_zone_has_no_findings(tmp_path: Path) -> None:
    report = check_zone_file(str(write(tmp_path, "www IN A 198.18.0.1\n")), "example.test")
    assert report.zone is not None
    assert report.findings == []


def test_mx_pointing_at_a_cname_is_an_error_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "@ IN MX 10 alias\nalias IN CNAME ns\n")
    finding = only(check_zone_file(str(path), "example.test").findings, ERROR, "is a CNAME")
    assert (finding.file, finding.line, finding.name) == (str(path), 5, "example.test.")
    assert "MX 'alias.example.test.'" in finding.message and "RFC 2181 10.3" in finding.message


def test_delegation_ns_pointing_at_a_cname(tmp_path: Path) -> None:
    path = write(tmp_path, "sub IN NS alias\nalias IN CNAME ns\n")
    finding = only(check_zone_file(str(path), "example.test").findings, ERROR, "is a CNAME")
    assert finding.line == 5 and finding.message.startswith("NS 'alias.example.test.'")


def test_cname_beside_other_data_is_refused_by_the_loader(tmp_path: Path) -> None:
    path = write(tmp_path, 'www IN CNAME ns\nwww IN TXT "x"\n')
    report = check_zone_file(str(path), "example.test")
    assert report.zone is None
    assert only(report.findings, ERROR, "CNAME and other data").line == 6


def test_dangling_cname(tmp_path: Path) -> None:
    path = write(tmp_path, "old IN CNAME gone\nfine IN CNAME ns\nout IN CNAME elsewhere.org.\n")
    finding = only(check_zone_file(str(path), "example.test").findings, WARNING, "does not exist")
    assert finding.line == 5 and "'gone.example.test.'" in finding.message


def test_wildcard_keeps_a_cname_target_alive(tmp_path: Path) -> None:
    path = write(tmp_path, "old IN CNAME x.dyn\n*.dyn IN A 198.18.0.9\n")
    assert check_zone_file(str(path), "example.test").findings == []


def test_mx_target_in_zone_without_address(tmp_path: Path) -> None:
    path = write(tmp_path, '@ IN MX 10 mail\nmail IN TXT "no address"\n')
    findings = check_zone_file(str(path), "example.test").findings
    finding = only(findings, WARNING, "has no address records")
    assert finding.line == 5 and not [f for f in findings if f.severity == ERROR]


def test_delegation_without_glue_is_an_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "sub IN NS ns.sub\nsub IN NS ns.elsewhere.org.\nok IN NS ns.ok\nns.ok IN A 198.18.0.2\n",
    )
    finding = only(check_zone_file(str(path), "example.test").findings, ERROR, "no glue")
    assert finding.line == 5 and finding.name == "sub.example.test."


def test_underscore_in_host_names(tmp_path: Path) -> None:
    path = write(tmp_path, "my_host IN A 198.18.0.3\n@ IN MX 20 bad_mx.example.org.\n")
    strict = check_zone_file(str(path), "example.test")
    assert strict.zone is None  # check-names fail (BIND's default for a primary) refuses it
    relaxed = check_zone_file(str(path), "example.test", check_names="ignore")
    host = only(relaxed.findings, WARNING, "not a valid host name (RFC 952, RFC 1123 2.1: ")
    assert host.name == "my_host.example.test." and host.line == 5
    mx = only(relaxed.findings, WARNING, "MX 'bad_mx.example.org.' is not a valid host name")
    assert mx.line == 6


def test_relative_name_meant_absolute_from_the_corpus() -> None:
    path = CORPUS / "relative-mistake.zone"
    findings = check_zone_file(str(path), "wide.ad.jp").findings
    finding = only(findings, WARNING, "ends in the origin twice")
    assert finding.line == 9
    assert (
        "'sh.wide.ad.jp.wide.ad.jp.'" in finding.message and "'sh.wide.ad.jp.'" in finding.message
    )


def test_relative_mistake_in_an_owner_name(tmp_path: Path) -> None:
    path = write(tmp_path, "www.example.test IN A 198.18.0.4\n")
    finding = only(check_zone_file(str(path), "example.test").findings, WARNING, "origin twice")
    assert finding.name == "www.example.test.example.test."


def test_private_and_loopback_addresses_outside_only(tmp_path: Path) -> None:
    body = (
        "a IN A 10.1.2.3\nb IN A 192.168.1.1\nc IN A 127.0.0.1\nd IN AAAA fd00::1\n"
        "e IN A 100.64.0.1\nf IN A 198.18.0.5\ng IN AAAA 2001:4860::1\n"
    )
    path = write(tmp_path, body)
    outside = check_zone_file(str(path), "example.test", outside=True).findings
    flagged = {
        f.name.split(".")[0] for f in outside if "published in the outside view" in f.message
    }
    assert flagged == {"a", "b", "c", "d", "e", "ns"}  # ns is at 192.0.2.53: documentation
    assert all(f.severity == WARNING for f in outside)
    assert check_zone_file(str(path), "example.test").findings == []


def test_serial_backwards_uses_rfc1982(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    lower = check_zone_file(str(path), "example.test", previous_serial=6).findings
    assert only(lower, WARNING, "lower than the served 6").line == 2
    assert check_zone_file(str(path), "example.test", previous_serial=5).findings == []
    # 4294967295 -> 5 is an increase once the serial wraps (RFC 1982 3.1).
    assert check_zone_file(str(path), "example.test", previous_serial=4294967295).findings == []
    assert serial_gt(5, 4294967295) and serial_lt(4294967295, 5)
    assert not serial_gt(5, 5) and not serial_lt(5, 5)
    assert not serial_gt(0, 1 << 31) and not serial_lt(0, 1 << 31)  # undefined pair


def test_loader_errors_and_warnings_carry_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "www IN A 999.1.1.1\n")
    report = check_zone_file(str(path), "example.test")
    assert report.zone is None
    assert report.errors[0].file == str(path) and report.errors[0].line == 5
    missing = check_zone_file(str(tmp_path / "nope.zone"), "example.test")
    assert missing.zone is None and missing.errors


def test_hidden_names() -> None:
    demo = ROOT / "etc" / "demo" / "zones"
    inside = [
        load_zone(str(demo / "inside" / "example.test.zone"), "example.test"),
        load_zone(str(demo / "inside" / "1.0.127.in-addr.arpa.zone"), "1.0.127.in-addr.arpa"),
    ]
    outside = [load_zone(str(demo / "outside" / "example.test.zone"), "example.test")]
    notes = hidden_names(inside, outside)
    assert "files.example.test. exists in the inside view only (hidden outside)" in notes
    assert "zone 1.0.127.in-addr.arpa. is served in the inside view only" in notes
    assert not any(n.startswith(("www.", "mail.", "ns.")) for n in notes)
    assert len(notes) == 7


def test_checkzone_command_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write(tmp_path, "@ IN MX 10 alias\nalias IN CNAME ns\n", "bad.zone")
    assert main(["checkzone", "example.test", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"error: {bad}:5: example.test.: MX" in out
    assert out.endswith("zone example.test/IN: loaded serial 5, but with 1 error(s)\n")
    warned = write(tmp_path, '@ IN MX 10 mail\nmail IN TXT "x"\n', "warned.zone")
    assert main(["checkzone", "example.test.", str(warned)]) == 0
    out = capsys.readouterr().out
    assert f"warning: {warned}:5:" in out and out.endswith("loaded serial 5\nOK\n")


def test_checkzone_on_the_shared_data(capsys: pytest.CaptureFixture[str]) -> None:
    """tests/data/dnscheck: one zone with every D-8 problem at once."""
    args = ["checkzone", "--outside", "--check-names", "warn", "d8.test"]
    assert main([*args, str(DATA / "d8.test.zone")]) == 1
    out = capsys.readouterr().out
    expected = (DATA / "d8.test.expected").read_text().splitlines()
    got = [line.replace(str(DATA) + "/", "") for line in out.splitlines()]
    assert got == expected


def _demo(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "etc" / "demo", tmp_path / "demo")
    path = tmp_path / "demo" / "appliance.toml"
    text = path.read_text().replace('"../../var/demo"', f'"{tmp_path / "state"}"')
    path.write_text(text)
    return path


def test_appliance_check_compares_with_the_served_serials(tmp_path: Path) -> None:
    path = _demo(tmp_path)
    config = config_module.load(path)
    errors, warnings = check_zones(config)
    assert errors == []
    assert not any("lower than the served" in w for w in warnings)
    assert any("files.example.test. exists in the inside view only" in w for w in warnings)
    assert any("loopback address 127.0.0.10 published in the outside view" in w for w in warnings)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / SERIAL_STATE_FILE).write_text(
        json.dumps({"outside/example.test.": 2026112299, "inside/example.test.": 1})
    )
    errors, warnings = check_zones(config)
    backwards = [w for w in warnings if "lower than the served" in w]
    assert len(backwards) == 1 and backwards[0].startswith("dns/outside zone example.test: ")
    assert "example.test.zone:4:" in backwards[0]


def test_appliance_check_reports_mx_cname_as_an_error(tmp_path: Path) -> None:
    path = _demo(tmp_path)
    zone = tmp_path / "demo" / "zones" / "outside" / "example.test.zone"
    zone.write_text(zone.read_text().replace("mail    IN A    127.0.0.10", "mail IN CNAME www"))
    errors, _ = check_zones(config_module.load(path))
    assert len(errors) == 1 and "is a CNAME" in errors[0] and f"{zone}:11:" in errors[0]


def test_each_finding_names_the_line_of_its_own_record(tmp_path: Path) -> None:
    path = write(tmp_path, "@ IN MX 10 ns\n  IN MX 20 alias\n  IN MX 30 ns\nalias IN CNAME ns\n")
    finding = only(check_zone_file(str(path), "example.test").findings, ERROR, "is a CNAME")
    assert finding.line == 6
