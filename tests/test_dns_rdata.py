"""Per-type rdata: text -> wire (checked against dnspython), wire -> text, embedded names."""

from __future__ import annotations

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.dns import names, rdata, zonefile
from appliance.dns.rdata import RdataError, Token

ORIGIN = names.from_text("example.test.")


def toks(text: str) -> list[Token]:
    errors: list[zonefile.ZoneFileError] = []
    entries = list(zonefile.tokenize(text + "\n", "<t>", errors))
    assert not errors
    return entries[0].tokens if entries else []


def parse(rtype: str, text: str) -> bytes:
    t = rdata.type_from_text(rtype)
    assert t is not None
    return rdata.from_tokens(t, toks(text), ORIGIN)


def oracle(rtype: str, text: str) -> bytes:
    rd = dns.rdata.from_text(
        dns.rdataclass.IN,
        dns.rdatatype.from_text(rtype),
        text,
        dns.name.from_text("example.test."),
        relativize=False,
    )
    return rd.to_wire()


CASES = [
    ("A", "192.0.2.1", "192.0.2.1"),
    ("AAAA", "2001:db8::1", "2001:db8::1"),
    ("AAAA", "::ffff:192.0.2.1", "::ffff:192.0.2.1"),
    ("AAAA", "2001:0DB8:0:0:0:0:0:1", "2001:db8::1"),
    ("NS", "ns1", "ns1.example.test."),
    ("NS", "ns.other.", "ns.other."),
    ("CNAME", "@", "example.test."),
    ("DNAME", "new.example.", "new.example."),
    ("PTR", "Host.Example.Test.", "Host.Example.Test."),
    ("MX", "10 mail", "10 mail.example.test."),
    ("SOA", "ns hostmaster 1 3600 900 604800 300", None),
    ("TXT", '"hello world" two', '"hello world" "two"'),
    ("TXT", '"a\\"b" "\\\\" "\\255" ""', '"a\\"b" "\\\\" "\\255" ""'),
    ("SRV", "10 60 5060 sip", "10 60 5060 sip.example.test."),
    ("HINFO", '"PC-9801" NetBSD', '"PC-9801" "NetBSD"'),
    ("CAA", '0 issue "letsencrypt.org"', '0 issue "letsencrypt.org"'),
    ("CAA", "128 iodef mailto:x@example.test", '128 iodef "mailto:x@example.test"'),
    ("NAPTR", '100 10 "u" "E2U+sip" "!^.*$!sip:i@x!" .', '100 10 "u" "E2U+sip" "!^.*$!sip:i@x!" .'),
    ("SSHFP", "1 1 " + "ab" * 20, "1 1 " + "AB" * 20),
    ("TLSA", "3 1 1 " + "00ff" * 16, "3 1 1 " + "00FF" * 16),
    ("DS", "12345 8 2 " + "49FD46E6 " * 8, "12345 8 2 " + "49FD46E6" * 8),
    ("RP", "admin info", "admin.example.test. info.example.test."),
    ("DNSKEY", "257 3 8 AwEA AQ==", "257 3 8 AwEAAQ=="),
    ("URI", '10 1 "ftp://ftp1.example.com/public"', '10 1 "ftp://ftp1.example.com/public"'),
    ("AFSDB", "1 afs", "1 afs.example.test."),
]


@pytest.mark.parametrize(("rtype", "text", "printed"), CASES)
def test_text_to_wire_matches_dnspython_and_prints_back(
    rtype: str, text: str, printed: str | None
) -> None:
    wire = parse(rtype, text)
    assert wire == oracle(rtype, text)
    t = rdata.type_from_text(rtype)
    assert t is not None
    out = rdata.to_text(t, wire)
    if printed is not None:
        assert out == printed
    # What we print reads back to the same wire form.
    assert rdata.from_tokens(t, toks(out), b"\x00") == wire


def test_soa_timers_take_units_and_print_as_seconds() -> None:
    wire = parse("SOA", "ns hostmaster 2024010101 1h 15m 1w 5m")
    assert rdata.to_text(6, wire) == (
        "ns.example.test. hostmaster.example.test. 2024010101 3600 900 604800 300"
    )
    with pytest.raises(RdataError):
        parse("SOA", "ns hostmaster 1h 1 1 1 1")  # the serial is a plain number


@pytest.mark.parametrize(
    ("rtype", "text"),
    [
        ("A", "192.0.2.256"),
        ("A", "01.2.3.4"),
        ("A", "1.2.3"),
        ("A", "1.2.3.4 5"),
        ("AAAA", "1::2::3"),
        ("AAAA", "192.0.2.1"),
        ("MX", "65536 mail"),
        ("MX", "mail"),
        ("SRV", "1 2 three host"),
        ("TXT", '"' + "x" * 256 + '"'),
        ("CAA", '0 is-sue "x"'),
        ("HINFO", "only-one"),
        ("SOA", "ns hostmaster 1 2 3 4"),
        ("NS", "a..b"),
        ("TYPE65534", "plain text"),
        ("TYPE65534", "\\# 2 abcdef"),
        ("TYPE65534", "\\# 1 zz"),
        ("A", "\\# 3 0a0000"),
        ("MX", "\\# 3 000a05"),
        ("DS", "1 8 2 0123"),
        ("SSHFP", "1 1 0123"),
        ("DNSKEY", "257 3 8 !!!"),
        ("URI", "10 1 unquoted"),
    ],
)
def test_bad_rdata_is_rejected(rtype: str, text: str) -> None:
    with pytest.raises(RdataError):
        parse(rtype, text)


def test_generic_form_for_unknown_and_known_types() -> None:
    assert parse("TYPE65534", "\\# 3 abcdef") == b"\xab\xcd\xef"
    assert parse("TYPE65534", "\\# 0") == b""
    assert parse("TYPE65534", "\\# 4 ab cd ( ef 01 )") == b"\xab\xcd\xef\x01"
    assert parse("A", "\\# 4 C0000201") == bytes([192, 0, 2, 1])
    assert rdata.to_text(65534, b"\xab\xcd\xef") == "\\# 3 ABCDEF"
    assert rdata.to_text(65534, b"") == "\\# 0"
    # Malformed rdata of a known type prints in generic form rather than failing.
    assert rdata.to_text(1, b"\x01\x02") == "\\# 2 0102"


def test_type_and_class_mnemonics() -> None:
    assert rdata.type_from_text("mx") == 15
    assert rdata.type_from_text("TYPE15") == 15
    assert rdata.type_from_text("TYPE65535") == 65535
    assert rdata.type_from_text("BOGUS") is None
    with pytest.raises(RdataError):
        rdata.type_from_text("TYPE65536")
    assert rdata.type_to_text(65534) == "TYPE65534"
    assert rdata.class_from_text("in") == 1
    assert rdata.class_from_text("CLASS1") == 1
    assert rdata.class_from_text("CH") == 3
    assert rdata.class_to_text(1) == "IN"
    assert rdata.class_to_text(4000) == "CLASS4000"


def test_meta_types_are_not_data() -> None:
    for t in (41, 251, 252, 255):
        with pytest.raises(RdataError):
            rdata.from_tokens(t, toks("\\# 0"), ORIGIN)


def test_parse_ttl() -> None:
    assert rdata.parse_ttl("3600") == 3600
    assert rdata.parse_ttl("1h30m") == 5400
    assert rdata.parse_ttl("1W") == 604800
    assert rdata.parse_ttl("1w2d3h4m5s") == 604800 + 2 * 86400 + 3 * 3600 + 4 * 60 + 5
    assert rdata.parse_ttl("4294967295") == 0xFFFFFFFF
    for bad in ("", "1h30", "h", "1x", "-1", "4294967296", "1.5h"):
        with pytest.raises(RdataError):
            rdata.parse_ttl(bad)


def test_compressible_names_rfc3597_section4() -> None:
    ns = parse("NS", "ns1")
    assert rdata.compressible_names(2, ns) == [(0, len(ns))]
    mx = parse("MX", "10 mail")
    assert rdata.compressible_names(15, mx) == [(2, len(mx) - 2)]
    soa = parse("SOA", "ns hostmaster 1 2 3 4 5")
    mname = len(names.from_text("ns", ORIGIN))
    rname = len(names.from_text("hostmaster", ORIGIN))
    assert rdata.compressible_names(6, soa) == [(0, mname), (mname, rname)]
    # SRV and DNAME names are never compressed (RFC 2782, RFC 6672 2.5); nor unknown types.
    srv = parse("SRV", "1 2 3 sip")
    assert rdata.compressible_names(33, srv) == []
    assert rdata.name_offsets(33, srv) == [(6, len(srv) - 6)]
    assert rdata.compressible_names(39, parse("DNAME", "x.")) == []
    assert rdata.compressible_names(65534, b"\x00") == []


def test_canonical_rdata_folds_names_only_where_rfc4034_says() -> None:
    mx = parse("MX", "10 MAIL.Example.TEST.")
    assert rdata.canonical_rdata(15, mx) == parse("MX", "10 mail.example.test.")
    txt = parse("TXT", "ABC")
    assert rdata.canonical_rdata(16, txt) == txt


def test_from_wire_check() -> None:
    rdata.from_wire_check(15, parse("MX", "10 mail"))
    for rtype, bad in ((15, b"\x00\x0a\x04mail"), (16, b""), (16, b"\x05ab"), (6, b"\x00")):
        with pytest.raises(RdataError):
            rdata.from_wire_check(rtype, bad)


@given(st.lists(st.binary(max_size=255), min_size=1, max_size=4))
def test_txt_round_trip(strings: list[bytes]) -> None:
    wire = b"".join(bytes([len(s)]) + s for s in strings)
    text = rdata.to_text(16, wire)
    assert rdata.from_tokens(16, toks(text), ORIGIN) == wire
