"""Domain names: presentation <-> wire, limits, and the helpers on wire names."""

from __future__ import annotations

import dns.name
import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.dns import names
from appliance.dns.names import NameSyntaxError

ORIGIN = names.from_text("example.test.")


def test_absolute_and_root() -> None:
    assert names.from_text("www.example.test.") == b"\x03www\x07example\x04test\x00"
    assert names.from_text(".") == b"\x00"
    assert names.to_text(b"\x00") == "."


def test_relative_and_at() -> None:
    assert names.from_text("www", ORIGIN) == b"\x03www" + ORIGIN
    assert names.from_text("a.b", ORIGIN) == b"\x01a\x01b" + ORIGIN
    assert names.from_text("@", ORIGIN) == ORIGIN
    with pytest.raises(NameSyntaxError):
        names.from_text("www")
    with pytest.raises(NameSyntaxError):
        names.from_text("@")


def test_case_is_preserved() -> None:
    assert names.from_text("WwW.Example.TEST.") == b"\x03WwW\x07Example\x04TEST\x00"


def test_escapes() -> None:
    assert names.from_text("a\\.b.test.") == b"\x03a.b\x04test\x00"
    assert names.from_text("\\065bc.test.") == b"\x03Abc\x04test\x00"
    assert names.from_text("\\000.test.") == b"\x01\x00\x04test\x00"
    assert names.from_text("a\\\\b.test.") == b"\x03a\\b\x04test\x00"
    for bad in ("\\25.test.", "\\256.test.", "a\\", "\\2x5.test."):
        with pytest.raises(NameSyntaxError):
            names.from_text(bad)


def test_to_text_escapes_like_bind() -> None:
    assert names.to_text(b"\x03a.b\x04test\x00") == "a\\.b.test."
    assert names.to_text(b"\x03a b\x00") == "a\\032b."
    assert names.to_text(b'\x06a;"()@\x00') == 'a\\;\\"\\(\\)\\@.'
    assert names.to_text(b"\x02\xff$\x00") == "\\255\\$."


def test_to_text_relative_to_origin() -> None:
    assert names.to_text(b"\x03www" + ORIGIN, ORIGIN) == "www"
    assert names.to_text(ORIGIN, ORIGIN) == "@"
    assert names.to_text(b"\x03www\x07EXAMPLE\x04test\x00", ORIGIN) == "www"
    assert names.to_text(b"\x05other\x00", ORIGIN) == "other."


def test_empty_labels_rejected() -> None:
    for bad in ("a..b.", ".a.", "..", ""):
        with pytest.raises(NameSyntaxError):
            names.from_text(bad, ORIGIN)


def test_label_and_name_limits() -> None:
    label63 = "a" * 63
    assert names.from_text(label63 + ".")[0] == 63
    with pytest.raises(NameSyntaxError, match="label longer than 63"):
        names.from_text("a" * 64 + ".")
    # 4 labels of 63 = 4*64 + 1 = 257 octets: too long; 3*64 + 61+1 + 1 = 255 is the limit.
    with pytest.raises(NameSyntaxError, match="longer than 255"):
        names.from_text(".".join([label63] * 4) + ".")
    ok = ".".join([label63] * 3 + ["b" * 61]) + "."
    assert len(names.from_text(ok)) == 255
    with pytest.raises(NameSyntaxError, match="longer than 255"):
        names.from_text("bb", names.from_text(ok[2:]))


def test_subdomain_parent_and_counts() -> None:
    www = names.from_text("WWW.example.test.")
    assert names.is_subdomain(www, ORIGIN)
    assert names.is_subdomain(ORIGIN, ORIGIN)
    assert names.is_subdomain(www, b"\x00")
    assert not names.is_subdomain(ORIGIN, www)
    # A suffix match that is not on a label boundary is not a subdomain.
    assert not names.is_subdomain(names.from_text("xexample.test."), ORIGIN)
    assert not names.is_subdomain(names.from_text("a.xample.test."), names.from_text("ample.test."))
    assert names.strip_suffix(www, ORIGIN) == b"\x03WWW"
    assert names.parent(www) == ORIGIN
    assert names.label_count(www) == 3
    assert names.label_count(b"\x00") == 0
    with pytest.raises(NameSyntaxError):
        names.parent(b"\x00")


def test_wildcards() -> None:
    wild = names.wildcard_for(ORIGIN)
    assert names.to_text(wild) == "*.example.test."
    assert names.is_wildcard(wild)
    assert not names.is_wildcard(names.from_text("a.*.example.test."))
    assert not names.is_wildcard(names.from_text("\\*x.example.test."))


def test_hostname_rules() -> None:
    assert names.is_hostname(names.from_text("a-b.c0.test."))
    assert names.is_hostname(names.from_text("0.0.127.in-addr.arpa."))
    assert not names.is_hostname(names.from_text("a_b.test."))
    assert not names.is_hostname(names.from_text("-a.test."))
    assert not names.is_hostname(names.from_text("a-.test."))
    assert not names.is_hostname(names.from_text("*.test."))
    assert names.is_hostname(names.from_text("*.test."), wildcard=True)
    assert not names.is_hostname(names.from_text("a.*.test."), wildcard=True)
    assert names.is_mailbox(names.from_text("first_last.test."))


def test_validate_wire_and_wire_length() -> None:
    names.validate_wire(ORIGIN)
    for bad in (b"", b"\x03ab", b"\x00\x00", b"\xc0\x0c"):
        with pytest.raises(NameSyntaxError):
            names.validate_wire(bad)
    buf = b"xx" + ORIGIN + b"yy"
    assert names.wire_length(buf, 2) == len(ORIGIN)
    with pytest.raises(NameSyntaxError):
        names.wire_length(b"\x05ab", 0)


_label = st.binary(min_size=1, max_size=63)


@given(st.lists(_label, min_size=0, max_size=4))
def test_round_trip_any_octets(labels: list[bytes]) -> None:
    if sum(len(lab) + 1 for lab in labels) + 1 > 255:
        return
    wire = names.from_labels(labels)
    text = names.to_text(wire)
    assert names.from_text(text) == wire
    # dnspython agrees on the wire form of our presentation text.
    assert dns.name.from_text(text).to_wire() == wire
