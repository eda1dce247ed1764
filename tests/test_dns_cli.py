"""``appliance dns answer``: the server's own lookup+encode path, printed in Ferret's layout."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset
import pytest

from appliance.cli import main
from appliance.dns import names, rdata
from appliance.dns.answer_cli import Answerer, AnswerError, format_message, guess_origin
from appliance.dns.rr import RR
from appliance.dns.zone import rr_text

ROOT = Path(__file__).resolve().parent.parent
INSIDE = ROOT / "etc" / "demo" / "zones" / "inside" / "example.test.zone"
OUTSIDE = ROOT / "etc" / "demo" / "zones" / "outside" / "example.test.zone"
REVERSE = ROOT / "etc" / "demo" / "zones" / "inside" / "1.0.127.in-addr.arpa.zone"
FERRET = Path(os.environ.get("FERRET_DIR", "/work/shared/ferret")) / "ValidZoneFileTests"

#: Least share of Ferret's BIND responses (first 700 cases) the CLI must reproduce exactly.
#: The lookup itself is zone.py's (its own Ferret test holds the exact list of differences);
#: this guards the CLI's path (origin guess, View, encode, decode, print) around it.
FERRET_MIN_AGREEMENT = 0.95

INTRANET = """\
opcode QUERY
rcode NOERROR
flags QR AA
;QUESTION
intranet.example.test. IN A
;ANSWER
intranet.example.test. 3600 IN CNAME files.example.test.
files.example.test. 3600 IN A 127.0.1.10
;AUTHORITY
example.test. 3600 IN NS ns.example.test.
;ADDITIONAL
ns.example.test. 3600 IN A 127.0.0.20
"""


def test_one_question_in_ferret_layout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dns", "answer", str(INSIDE), "intranet.example.test", "A"]) == 0
    assert capsys.readouterr().out == INTRANET


def test_questions_from_stdin_one_response_each(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        sys, "stdin", io.StringIO("www.example.test A\n\n; comment\nnope.example.test MX\n")
    )
    assert main(["dns", "answer", str(OUTSIDE), "-"]) == 0
    out = capsys.readouterr().out
    first, second = out.split("\n\n")
    assert "rcode NOERROR" in first and "www.example.test. 3600 IN A 127.0.0.10" in first
    assert second.startswith("opcode QUERY\nrcode NXDOMAIN\nflags QR AA\n")
    assert (
        "example.test. 300 IN SOA ns.example.test. hostmaster.example.test. "
        "2026112201 3600 900 1209600 300" in second
    )


def test_several_zone_files_and_explicit_origin(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["dns", "answer", "--origin", "example.test", "--origin", "1.0.127.in-addr.arpa."]
    assert main([*args, str(INSIDE), str(REVERSE), "10.1.0.127.in-addr.arpa", "PTR"]) == 0
    out = capsys.readouterr().out
    assert ";ANSWER\n10.1.0.127.in-addr.arpa. 3600 IN PTR" in out
    assert "flags QR AA" in out


def test_output_parses_back_with_dnspython() -> None:
    answerer = Answerer.from_files([str(INSIDE)])
    reply = answerer.ask("example.test", "MX", transport="udp", edns=1232, do=True)
    text = format_message(reply)
    assert "edns 0\neflags DO\npayload 1232\n" in text
    parsed = dns.message.from_text("id 1\n" + text)
    assert parsed.rcode() == dns.rcode.NOERROR
    assert [str(r) for r in parsed.answer] == ["example.test. 3600 IN MX 10 mail.example.test."]
    assert {str(r) for r in parsed.additional} == {
        "mail.example.test. 3600 IN A 127.0.0.20",
        "ns.example.test. 3600 IN A 127.0.0.20",
    }


def test_udp_without_edns_truncates_like_the_server(tmp_path: Path) -> None:
    zone = tmp_path / "big.test.zone"
    lines = ["$TTL 300", "@ SOA ns hostmaster 1 3600 900 86400 300", "@ NS ns", "ns A 192.0.2.1"]
    lines += [f'many TXT "{"x" * 200} {i}"' for i in range(10)]
    zone.write_text("\n".join(lines) + "\n")
    answerer = Answerer.from_files([str(zone)])
    over_udp = answerer.ask("many.big.test", "TXT", transport="udp")
    assert over_udp.tc and not over_udp.answer
    over_tcp = answerer.ask("many.big.test", "TXT")
    assert not over_tcp.tc and len(over_tcp.answer) == 10
    assert "flags QR AA TC" in format_message(over_udp)


def test_outside_minimal_any(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dns", "answer", "--minimal-any", str(OUTSIDE), "example.test", "ANY"]) == 0
    answer = capsys.readouterr().out.split(";ANSWER\n")[1].split(";AUTHORITY")[0]
    assert len({line.split()[3] for line in answer.splitlines()}) == 1


def test_origin_from_soa_owner_then_file_name(tmp_path: Path) -> None:
    absolute = tmp_path / "whatever.txt"
    absolute.write_text("sub.example.org. 60 IN SOA ns.x. h.x. 1 2 3 4 5\n")
    assert guess_origin(str(absolute)) == names.from_text("sub.example.org.")
    relative = tmp_path / "example.net.zone"
    relative.write_text("$TTL 60\n@ IN SOA ns h 1 2 3 4 5\n")
    assert guess_origin(str(relative)) == names.from_text("example.net.")
    with_origin = tmp_path / "zone.db"
    with_origin.write_text("$ORIGIN example.com.\nwww 60 IN SOA ns h 1 2 3 4 5\n")
    assert guess_origin(str(with_origin)) == names.from_text("www.example.com.")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.zone", "a.test", "A"], "missing.zone"),
        ([str(INSIDE), "example.test", "NOSUCHTYPE"], "unknown type"),
        ([str(INSIDE), "bad..name", "A"], "bad name"),
    ],
)
def test_bad_input_is_reported(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dns", "answer", *args]) == 1
    assert message in capsys.readouterr().err


def test_broken_zone_file_gives_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    zone = tmp_path / "broken.test.zone"
    zone.write_text("$TTL 60\n@ SOA ns h 1 2 3 4 5\n@ NS ns\nns A 999.1.1.1\n")
    assert main(["dns", "answer", str(zone), "ns.broken.test", "A"]) == 1
    assert f"{zone}:4:" in capsys.readouterr().err


def test_stdin_bad_line_continues(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("just-one-field\nwww.example.test A\n"))
    assert main(["dns", "answer", str(OUTSIDE), "-"]) == 1
    captured = capsys.readouterr()
    assert "<stdin>:1:" in captured.err
    assert "www.example.test. 3600 IN A 127.0.0.10" in captured.out


def test_refused_outside_the_zones() -> None:
    answerer = Answerer.from_files([str(OUTSIDE)])
    reply = answerer.ask("example.org", "A")
    assert reply.rcode == dns.rcode.REFUSED and not reply.aa


def test_axfr_shown_as_one_message() -> None:
    reply = Answerer.from_files([str(OUTSIDE)]).ask("example.test", "AXFR")
    # The CLI's view has no allow_transfer list: a transfer is refused, as the server would.
    assert reply.rcode == dns.rcode.REFUSED


def _ferret_cases(limit: int) -> list[str]:
    if not FERRET.is_dir():
        pytest.skip("Ferret data set not present")
    numbers = sorted(int(p.stem) for p in (FERRET / "ZoneFiles").glob("*.txt"))
    return [str(n) for n in numbers if n < limit]


def _rrsets(section: list[dns.rrset.RRset]) -> list[list[str]]:
    return sorted(sorted(r.to_text().splitlines()) for r in section)


def _printed_sections(text: str) -> dict[str, set[str]]:
    sections: dict[str, set[str]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith(";"):
            current = line[1:]
            sections[current] = set()
        elif current:
            sections[current].add(line.lower())
    return sections


def _section_lines(rrs: tuple[RR, ...] | list[RR]) -> set[str]:
    return {rr_text(rr).lower() for rr in rrs}


def test_ferret_sample_through_the_cli() -> None:
    """Ferret's zones and questions: the CLI prints exactly Zone.lookup's result, and that
    agrees with BIND's recorded responses (origin guessed from each file)."""
    agree = compared = 0
    for number in _ferret_cases(700):
        path = FERRET / "ZoneFiles" / f"{number}.txt"
        answerer = Answerer.from_files([str(path)], check_names="ignore")
        (zone,) = answerer.view.zones.values()
        for case in json.loads((FERRET / "ExpectedResponses" / f"{number}.json").read_text()):
            query = case["Query"]
            reply = answerer.ask(query["Name"], query["Type"])
            text = format_message(reply)
            got = dns.message.from_text("id 1\n" + text)
            # 1. The same code path: what was printed is the lookup's result, encoded.
            qname = names.from_text(query["Name"])
            qtype = rdata.type_from_text(query["Type"])
            assert qtype is not None
            result = zone.lookup(qname, qtype)
            assert reply.rcode == result.rcode and reply.aa == result.authoritative, number
            printed = _printed_sections(text)
            for section, expected in (
                ("ANSWER", result.answer),
                ("AUTHORITY", result.authority),
                ("ADDITIONAL", result.additional),
            ):
                assert printed[section] == _section_lines(expected), (number, section)
            # 2. Agreement with BIND's recorded answer.
            groups = [g for g in case["Expected Response"] if "bind" in g["Server/s"]]
            if not groups:
                continue
            want = dns.message.from_text("\n".join(groups[0]["Response"]))
            compared += 1
            agree += (
                want.rcode() == got.rcode()
                and (want.flags & 0x0600) == (got.flags & 0x0600)
                and all(
                    _rrsets(getattr(want, s)) == _rrsets(getattr(got, s))
                    for s in ("answer", "authority", "additional")
                )
            )
    assert compared > 300
    assert agree / compared >= FERRET_MIN_AGREEMENT, (agree, compared)


def test_console_script_mounts_dns_and_checkzone() -> None:
    appliance = Path(sys.executable).parent / "appliance"
    result = subprocess.run(
        [str(appliance), "dns", "answer", str(OUTSIDE), "mail.example.test", "A"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "mail.example.test. 3600 IN A 127.0.0.10" in result.stdout
    result = subprocess.run(
        [str(appliance), "checkzone", "example.test", str(INSIDE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.endswith("zone example.test/IN: loaded serial 2026112201\nOK\n")


def test_answer_error_is_an_exception_type() -> None:
    with pytest.raises(AnswerError):
        Answerer.from_files([str(INSIDE)]).ask("example.test", "TYPE99999")


def test_ds_at_a_cut_is_answered_from_the_parent_zone() -> None:
    """With parent and child both served, DS comes from the parent side (RFC 4035 3.1.4.1)."""
    parent = ROOT / "tests" / "data" / "zones" / "ad-jp-delegation.zone"
    child = ROOT / "tests" / "data" / "zones" / "wide-ad-jp.zone"
    answerer = Answerer.from_files([str(parent), str(child)], ["ad.jp", "wide.ad.jp"])
    ds = answerer.ask("wide.ad.jp", "DS")
    assert ds.rcode == dns.rcode.NOERROR and ds.aa and not ds.answer
    assert [names.to_text(rr.name) for rr in ds.authority] == ["ad.jp."]
    soa = answerer.ask("wide.ad.jp", "SOA")
    assert [names.to_text(rr.name) for rr in soa.answer] == ["wide.ad.jp."]
