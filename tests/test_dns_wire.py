"""Tests for appliance.dns.wire: decoding untrusted packets, compression, EDNS, truncation.

dnspython is the independent oracle: packets it builds must decode to the same
records, and packets we build must parse in it to the same message.
"""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from appliance.dns import wire
from appliance.dns.rr import RR, LookupResult, RCode
from appliance.dns.wire import Edns, Message, Question, WireError, decode, encode


def n(text: str) -> bytes:
    """Wire form of a presentation name, case kept."""
    return dns.name.from_text(text).to_wire()


def header(
    ident: int = 0x1234,
    flags: int = 0x0100,
    qd: int = 0,
    an: int = 0,
    ns: int = 0,
    ar: int = 0,
) -> bytes:
    return struct.pack("!HHHHHH", ident, flags, qd, an, ns, ar)


def rr_bytes(owner: bytes, rtype: int, rdata: bytes, rclass: int = 1, ttl: int = 300) -> bytes:
    return owner + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def generic(rdata: bytes) -> str:
    return rf"\# {len(rdata)} {rdata.hex()}"


QNAME = n("WwW.Example.COM.")
QUESTION = QNAME + struct.pack("!HH", 1, 1)

# Records covering every rdata layout with names, in every decompression class.
ZONE_TEXT = [
    (
        "Example.COM.",
        "SOA",
        "ns1.example.com. hostmaster.Example.com. 2026112201 7200 3600 1209600 300",
    ),
    ("example.com.", "NS", "ns1.example.com."),
    ("example.com.", "NS", "NS2.Example.com."),
    ("example.com.", "MX", "10 mail.example.com."),
    ("www.example.com.", "A", "192.0.2.1"),
    ("www.example.com.", "AAAA", "2001:db8::1"),
    ("alias.example.com.", "CNAME", "www.example.com."),
    ("1.2.0.192.in-addr.arpa.", "PTR", "www.example.com."),
    ("example.com.", "TXT", '"v=spf1 -all" "second string"'),
    ("_sip._tcp.example.com.", "SRV", "10 20 5060 sip.example.com."),
    (
        "example.com.",
        "NAPTR",
        '100 10 "U" "E2U+sip" "!^.*$!sip:info@example.com!" sip.example.com.',
    ),
    ("example.com.", "RP", "admin.example.com. info.example.com."),
    ("example.com.", "AFSDB", "1 afs.example.com."),
    ("example.com.", "RT", "10 relay.example.com."),
    ("example.com.", "PX", "10 map822.example.com. mapx400.example.com."),
    ("old.example.com.", "DNAME", "new.example.com."),
    ("example.com.", "CAA", '0 issue "ca.example.net"'),
    ("example.com.", "HINFO", '"PC" "Linux"'),
    # dnspython has no classes for these, so they travel uncompressed in its packets.
    ("example.com.", "MINFO", generic(n("rm.example.com.") + n("em.example.com."))),
    ("example.com.", "MB", generic(n("mb.example.com."))),
    ("example.com.", "MG", generic(n("mg.example.com."))),
    ("example.com.", "MR", generic(n("mr.example.com."))),
    ("example.com.", "TYPE65534", r"\# 4 0a0b0c0d"),
]


def dnspython_rrsets() -> list[dns.rrset.RRset]:
    return [
        dns.rrset.from_text(owner, 300, "IN", rtype, rdata) for owner, rtype, rdata in ZONE_TEXT
    ]


def our_rrs(rrsets: list[dns.rrset.RRset]) -> tuple[RR, ...]:
    """The same records in our model: uncompressed wire bytes, case kept."""
    out = []
    for rrset in rrsets:
        for rd in rrset:
            out.append(
                RR(
                    rrset.name.to_wire(),
                    int(rrset.rdtype),
                    int(rrset.rdclass),
                    rrset.ttl,
                    rd.to_wire(),
                )
            )
    return tuple(out)


def flat(section: list[dns.rrset.RRset]) -> list[tuple[dns.name.Name, int, dns.rdata.Rdata]]:
    return [(rs.name, rs.ttl, rd) for rs in section for rd in rs]


# Types dnspython has no class for: it cannot read them once we compress them (RFC 3597 4 allows it).
OBSOLETE = {"MINFO", "MB", "MG", "MR"}


def assert_rr_matches(ours: RR, owner: dns.name.Name, rd: dns.rdata.Rdata, ttl: int) -> None:
    assert dns.name.from_wire(ours.name, 0)[0] == owner
    assert ours.rtype == rd.rdtype
    assert ours.rclass == rd.rdclass
    assert ours.ttl == ttl
    # Our rdata must be uncompressed: dnspython must read it without the message around it.
    parsed = dns.rdata.from_wire(rd.rdclass, rd.rdtype, ours.rdata, 0, len(ours.rdata))
    assert parsed == rd


# --------------------------------------------------------------------------- decode


def test_decode_query_from_dnspython() -> None:
    q = dns.message.make_query("WwW.Example.COM", "MX", use_edns=0, payload=4096, want_dnssec=True)
    q.flags |= dns.flags.CD
    m = decode(q.to_wire())
    assert m.id == q.id
    assert (m.qr, m.opcode, m.aa, m.tc, m.rd, m.ra, m.cd) == (
        False,
        0,
        False,
        False,
        True,
        False,
        True,
    )
    assert m.question == (Question(QNAME, 15, 1),)
    assert m.edns == Edns(udp_size=4096, version=0, do=True, options=b"")
    assert m.additional == ()


def test_decode_edns_options_and_extended_rcode() -> None:
    r = dns.message.make_response(
        dns.message.make_query("example.com", "A", use_edns=0), our_payload=1400
    )
    r.use_edns(0, 0, 1400, options=[dns.edns.GenericOption(10, b"\x01" * 8)])
    r.set_rcode(dns.rcode.BADVERS)
    m = decode(r.to_wire())
    assert m.rcode == RCode.BADVERS
    assert m.edns is not None
    assert m.edns.udp_size == 1400
    assert m.edns.options == struct.pack("!HH", 10, 8) + b"\x01" * 8


def test_decode_response_with_every_layout_expands_compressed_names() -> None:
    q = dns.message.make_query("example.com", "ANY")
    r = dns.message.make_response(q)
    rrsets = dnspython_rrsets()
    r.answer = rrsets
    data = r.to_wire()
    # dnspython compresses: the packet is shorter than the sum of uncompressed names.
    assert len(data) < 12 + sum(len(rr.name) + 10 + len(rr.rdata) for rr in our_rrs(rrsets))
    m = decode(data)
    flat = [(rs.name, rd) for rs in rrsets for rd in rs]
    assert len(m.answer) == len(flat)
    for ours, (owner, rd) in zip(m.answer, flat, strict=True):
        assert_rr_matches(ours, owner, rd, 300)


def test_decode_expands_pointers_in_rdata_of_receive_only_types() -> None:
    """SRV/DNAME/RP rdata compressed by a (non-conforming) sender is still expanded."""
    target = n("sip.example.com.")
    msg = header(flags=0x8000, qd=1, an=3) + n("example.com.") + struct.pack("!HH", 255, 1)
    # Owner of every record: pointer to the question name at offset 12.
    srv = rr_bytes(b"\xc0\x0c", 33, struct.pack("!HHH", 1, 2, 3) + b"\x03sip\xc0\x0c")
    dname = rr_bytes(b"\xc0\x0c", 39, b"\x03new\xc0\x0c")
    rp = rr_bytes(b"\xc0\x0c", 17, b"\x05admin\xc0\x0c\x04info\xc0\x0c")
    minfo = rr_bytes(b"\xc0\x0c", 14, b"\x02rm\xc0\x0c\x02em\xc0\x0c")
    msg = msg[:6] + b"\x00\x04" + msg[8:]
    m = decode(msg + srv + dname + rp + minfo)
    assert m.answer[3].rdata == n("rm.example.com.") + n("em.example.com.")
    assert m.answer[0].rdata == struct.pack("!HHH", 1, 2, 3) + target
    assert m.answer[1].rdata == n("new.example.com.")
    assert m.answer[2].rdata == n("admin.example.com.") + n("info.example.com.")
    assert all(rr.name == n("example.com.") for rr in m.answer)


def test_decode_keeps_case_through_pointers() -> None:
    msg = header(qd=2) + QUESTION + b"\x04MaIl\xc0\x10" + struct.pack("!HH", 1, 1)
    m = decode(msg)
    assert m.question[1].name == n("MaIl.Example.COM.")


def test_decode_keeps_unknown_rdata_verbatim() -> None:
    # Type 46 (RRSIG) must not be decompressed: pointer-looking bytes stay as they are.
    rdata = b"\xc0\x0c\x01\x02"
    m = decode(header(qd=1, an=1, flags=0x8000) + QUESTION + rr_bytes(b"\xc0\x0c", 46, rdata))
    assert m.answer[0].rdata == rdata


def test_decode_edns_version_kept_for_badvers() -> None:
    opt = b"\x00" + struct.pack("!HHIH", 41, 1232, 0x00010000, 0)
    m = decode(header(qd=1, ar=1) + QUESTION + opt)
    assert m.edns == Edns(1232, 1, False, b"")


MALFORMED = {
    "empty": b"",
    "short header": header()[:11],
    "qdcount past end": header(qd=2) + QUESTION,
    "truncated question fixed part": header(qd=1) + QNAME + b"\x00\x01",
    "truncated label": header(qd=1) + b"\x05abc",
    "name without root": header(qd=1) + b"\x03abc",
    "label type 0x40": header(qd=1) + b"\x41" + b"a" * 5 + b"\x00" + b"\x00\x01\x00\x01",
    "label type 0x80": header(qd=1) + b"\x81" + b"a" + b"\x00" + b"\x00\x01\x00\x01",
    "name over 255": header(qd=1)
    + b"\x3f"
    + b"a" * 63
    + (b"\x3f" + b"b" * 63) * 3
    + b"\x00\x00\x01\x00\x01",
    "pointer to itself": header(qd=1) + b"\xc0\x0c\x00\x01\x00\x01",
    # Otherwise valid: the first question's name points at the second's, further on.
    "forward pointer": header(qd=2) + b"\xc0\x12\x00\x01\x00\x01" + b"\x01a\x00\x00\x01\x00\x01",
    "pointer into own labels": header(qd=1) + b"\x01a\xc0\x0c\x00\x01\x00\x01",
    "pointer past end": header(qd=1) + b"\xff\xff\x00\x01\x00\x01",
    "truncated pointer": header(qd=1) + b"\xc0",
    "two-pointer loop": header(qd=2)
    + b"\x00\x00\x01\x00\x01"
    + b"\xc0\x16\x00\x01\x00\x01"
    + b"\xc0\x11",
    "ancount past end": header(qd=1, an=1) + QUESTION,
    "truncated rr header": header(qd=1, an=1) + QUESTION + b"\xc0\x0c\x00\x01\x00\x01\x00",
    "rdlength overrun": header(qd=1, an=1)
    + QUESTION
    + b"\xc0\x0c"
    + struct.pack("!HHIH", 1, 1, 0, 8)
    + b"\x01\x02\x03\x04",
    "trailing garbage": header(qd=1) + QUESTION + b"\x00",
    "counts too low": header(qd=1) + QUESTION + rr_bytes(b"\xc0\x0c", 1, b"\x01\x02\x03\x04"),
    "A rdlength 5": header(qd=1, an=1)
    + QUESTION
    + rr_bytes(b"\xc0\x0c", 1, b"\x01\x02\x03\x04\x05"),
    "AAAA rdlength 4": header(qd=1, an=1)
    + QUESTION
    + rr_bytes(b"\xc0\x0c", 28, b"\x01\x02\x03\x04"),
    "NS name past rdlength": header(qd=1, an=1)
    + QUESTION
    + b"\xc0\x0c"
    + struct.pack("!HHIH", 2, 1, 0, 2)
    + b"\x03ns1\x00",
    "NS trailing rdata": header(qd=1, an=1) + QUESTION + rr_bytes(b"\xc0\x0c", 2, b"\xc0\x0c\x00"),
    "SOA missing numbers": header(qd=1, an=1)
    + QUESTION
    + rr_bytes(b"\xc0\x0c", 6, b"\xc0\x0c\xc0\x0c" + b"\x00" * 19),
    "MX without name": header(qd=1, an=1) + QUESTION + rr_bytes(b"\xc0\x0c", 15, b"\x00\x0a"),
    "NAPTR string overrun": header(qd=1, an=1)
    + QUESTION
    + rr_bytes(b"\xc0\x0c", 35, b"\x00" * 4 + b"\x09U"),
    "bad pointer in rdata": header(qd=1, an=1) + QUESTION + rr_bytes(b"\xc0\x0c", 5, b"\xc0\xff"),
    "OPT in answer": header(qd=1, an=1) + QUESTION + rr_bytes(b"\x00", 41, b"", rclass=1232, ttl=0),
    "two OPT": header(qd=1, ar=2) + QUESTION + rr_bytes(b"\x00", 41, b"", 1232, 0) * 2,
    "OPT not at root": header(qd=1, ar=1) + QUESTION + rr_bytes(b"\xc0\x0c", 41, b"", 1232, 0),
    "OPT option overrun": header(qd=1, ar=1)
    + QUESTION
    + rr_bytes(b"\x00", 41, b"\x00\x0a\x00\x09abcd", 1232, 0),
    "OPT option header cut": header(qd=1, ar=1)
    + QUESTION
    + rr_bytes(b"\x00", 41, b"\x00\x0a\x00", 1232, 0),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_decode_rejects_malformed(name: str) -> None:
    data = MALFORMED[name]
    with pytest.raises(WireError) as info:
        decode(data)
    err = info.value
    assert err.rcode == RCode.FORMERR
    if len(data) >= 12:
        assert err.id == 0x1234
        assert err.opcode == 0
        assert err.rd is True
    else:
        assert err.id is None
    # dnspython agrees these are not valid messages (except where it is more lenient).
    lenient = {
        "A rdlength 5",
        "AAAA rdlength 4",
        "counts too low",
        "trailing garbage",
        "OPT in answer",
        "pointer into own labels",
    }
    if name not in lenient:
        with pytest.raises(Exception):  # noqa: B017 - any dnspython parse error
            dns.message.from_wire(data)


def test_malformed_error_carries_parsed_question() -> None:
    data = MALFORMED["rdlength overrun"]
    with pytest.raises(WireError) as info:
        decode(data)
    assert info.value.question == (Question(QNAME, 1, 1),)


def test_opcode_and_flags_in_error() -> None:
    data = header(flags=(5 << 11) | 0x0010) + b"\x00"
    with pytest.raises(WireError) as info:
        decode(data)
    assert (info.value.opcode, info.value.rd, info.value.cd, info.value.qr) == (
        5,
        False,
        True,
        False,
    )


def test_pointer_hop_limit() -> None:
    """A chain of pointers to pointers is cut off even though each hop goes backwards."""
    parts = [b"\x00" + struct.pack("!HH", 1, 1)]
    offsets = [12]
    for _ in range(200):
        offsets.append(12 + sum(len(p) for p in parts))
        parts.append(struct.pack("!H", 0xC000 | offsets[-2]) + struct.pack("!HH", 1, 1))
    ok = header(qd=100) + b"".join(parts[:100])
    assert len(decode(ok).question) == 100
    with pytest.raises(WireError, match="too many"):
        decode(header(qd=201) + b"".join(parts))


def test_longest_legal_name() -> None:
    name = (b"\x3f" + b"a" * 63) * 3 + b"\x3d" + b"b" * 61 + b"\x00"
    assert len(name) == 255
    m = decode(header(qd=1) + name + b"\x00\x01\x00\x01")
    assert m.question[0].name == name
    assert encode(m) == header(qd=1) + name + b"\x00\x01\x00\x01"


# --------------------------------------------------------------------------- encode


def test_encode_round_trips_through_dnspython() -> None:
    rrsets = [
        rs for rs, (_, t, _) in zip(dnspython_rrsets(), ZONE_TEXT, strict=True) if t not in OBSOLETE
    ]
    q = dns.message.make_query("WwW.Example.COM", "ANY", use_edns=0, want_dnssec=True)
    query = decode(q.to_wire())
    result = LookupResult(
        rcode=RCode.NOERROR,
        authoritative=True,
        answer=our_rrs(rrsets[4:]),
        authority=our_rrs(rrsets[:3]),
        additional=our_rrs(rrsets[3:4]),
    )
    reply = wire.make_response(query, result, udp_size=1400)
    data = encode(reply)
    parsed = dns.message.from_wire(data)
    assert parsed.id == q.id
    assert (
        parsed.flags & dns.flags.QR and parsed.flags & dns.flags.AA and parsed.flags & dns.flags.RD
    )
    assert parsed.edns == 0 and parsed.payload == 1400 and parsed.ednsflags & dns.flags.DO
    assert parsed.question[0].name.to_wire() == QNAME  # case echoed exactly
    assert flat(parsed.answer) == flat(rrsets[4:])
    assert flat(parsed.authority) == flat(rrsets[:3])
    assert flat(parsed.additional) == flat(rrsets[3:4])
    # And back through our decoder, record by record.
    again = decode(data)
    for ours, (owner, rd) in zip(
        again.answer, [(rs.name, rd) for rs in rrsets[4:] for rd in rs], strict=True
    ):
        assert_rr_matches(ours, owner, rd, 300)


def test_encode_compresses_owner_and_rfc3597_rdata_names() -> None:
    rrsets = dnspython_rrsets()[:4]  # SOA, NS, NS, MX
    rrs = our_rrs(rrsets)
    msg = Message(id=1, qr=True, question=(Question(n("example.com."), 255, 1),), answer=rrs)
    data = encode(msg)
    uncompressed = (
        12 + len(n("example.com.")) + 4 + sum(len(r.name) + 10 + len(r.rdata) for r in rrs)
    )
    assert len(data) < uncompressed - 60
    # Every owner is a bare pointer to the question name.
    assert data.count(b"\xc0\x0c") >= 4
    assert flat(dns.message.from_wire(data).answer) == flat(rrsets)


def test_encode_compresses_obsolete_rfc1035_types() -> None:
    rrs = our_rrs(
        [rs for rs, (_, t, _) in zip(dnspython_rrsets(), ZONE_TEXT, strict=True) if t in OBSOLETE]
    )
    msg = Message(question=(Question(n("example.com."), 255, 1),), answer=rrs)
    data = encode(msg)
    assert len(data) < 12 + 17 + sum(len(r.name) + 10 + len(r.rdata) for r in rrs) - 60
    assert decode(data).answer == rrs


def test_encode_does_not_compress_other_types() -> None:
    """SRV, DNAME, NAPTR... rdata names go out uncompressed (RFC 3597 4, RFC 6672 2.5)."""
    owner = n("example.com.")
    srv_rdata = struct.pack("!HHH", 1, 2, 3) + owner
    dname_rdata = owner
    msg = Message(
        question=(Question(owner, 33, 1),),
        answer=(RR(owner, 33, 1, 60, srv_rdata), RR(owner, 39, 1, 60, dname_rdata)),
    )
    data = encode(msg)
    assert srv_rdata in data
    assert data.endswith(struct.pack("!H", len(owner)) + owner)


def test_encode_question_case_exact_and_answers_compress_case_insensitively() -> None:
    owner = n("www.example.com.")
    msg = Message(
        question=(Question(QNAME, 1, 1),), answer=(RR(owner, 1, 1, 60, b"\x01\x02\x03\x04"),)
    )
    data = encode(msg)
    assert data[12 : 12 + len(QNAME)] == QNAME
    assert data[12 + len(QNAME) + 4 :].startswith(b"\xc0\x0c")


def test_encode_partial_suffix_compression() -> None:
    a = n("a.Example.com.")
    b = n("b.example.COM.")
    msg = Message(question=(Question(a, 1, 1),), answer=(RR(b, 1, 1, 0, b"\x00" * 4),))
    data = encode(msg)
    rr_at = 12 + len(a) + 4
    assert data[rr_at : rr_at + 4] == b"\x01b\xc0\x0e"
    assert decode(data).answer[0].name == n("b.Example.com.")


def test_encode_root_and_empty_sections() -> None:
    msg = Message(
        id=7,
        question=(Question(b"\x00", 2, 1),),
        answer=(RR(b"\x00", 2, 1, 1, n("a.root-servers.net.")),),
    )
    data = encode(msg)
    parsed = dns.message.from_wire(data)
    assert parsed.question[0].name == dns.name.root
    assert str(parsed.answer[0][0]) == "a.root-servers.net."


def test_encode_no_pointers_beyond_16k() -> None:
    """Names past offset 0x3FFF are never pointer targets (twisted.names gets this wrong)."""
    rrs = tuple(
        RR(n(f"host{i}.example.com."), 16, 1, 60, b"\xff" + b"x" * 255) for i in range(120)
    ) + tuple(
        RR(n(f"host{i}.example.com."), 1, 1, 60, bytes([10, 0, i // 256, i % 256]))
        for i in range(120)
    )
    msg = Message(id=9, qr=True, question=(Question(n("example.com."), 252, 1),), answer=rrs)
    data = encode(msg)
    assert len(data) > 0x4000 + 2000
    parsed = dns.message.from_wire(data)
    assert sum(len(rs) for rs in parsed.answer) == 240
    assert decode(data).answer == tuple(RR(r.name, r.rtype, r.rclass, r.ttl, r.rdata) for r in rrs)


def test_encode_malformed_rdata_of_compressible_type_goes_out_raw() -> None:
    owner = n("example.com.")
    bad = b"\x03ns1"  # no root label
    msg = Message(question=(Question(owner, 2, 1),), answer=(RR(owner, 2, 1, 60, bad),))
    data = encode(msg)
    assert data.endswith(struct.pack("!H", 4) + bad)


@pytest.mark.parametrize(
    "bad",
    [
        Message(question=(Question(b"\x03abc", 1, 1),)),
        Message(question=(Question(b"\x41" + b"a" * 65 + b"\x00", 1, 1),)),
        Message(question=(Question(b"\x00\x00", 1, 1),)),
        Message(question=(Question((b"\x3f" + b"a" * 63) * 4 + b"\x00", 1, 1),)),
        Message(answer=(RR(b"\x00", 1, 1, -1, b""),)),
        Message(answer=(RR(b"\x00", 70000, 1, 1, b""),)),
        Message(answer=(RR(b"\x00", 16, 1, 1, b"x" * 70000),)),
        Message(rcode=RCode.BADVERS),
        Message(id=70000),
    ],
)
def test_encode_rejects_unencodable(bad: Message) -> None:
    with pytest.raises(ValueError):
        encode(bad)


# --------------------------------------------------------------------------- truncation and EDNS


def big_response(n_answer: int, n_additional_sets: int, edns: Edns | None) -> Message:
    qname = n("Big.Example.com.")
    answer = tuple(RR(qname, 1, 1, 60, bytes([192, 0, 2, i])) for i in range(n_answer))
    additional = tuple(
        RR(n(f"extra{j}.example.com."), 28, 1, 60, bytes(15) + bytes([k]))
        for j in range(n_additional_sets)
        for k in range(3)
    )
    return Message(
        id=42,
        qr=True,
        aa=True,
        rd=True,
        question=(Question(qname, 1, 1),),
        answer=answer,
        additional=additional,
        edns=edns,
    )


def test_truncation_drops_whole_additional_rrsets_first() -> None:
    msg = big_response(10, 20, None)
    full = encode(msg)
    assert len(full) > 512
    data = encode(msg, 512)
    assert len(data) <= 512
    parsed = dns.message.from_wire(data)
    assert not parsed.flags & dns.flags.TC
    assert len(parsed.answer[0]) == 10
    assert parsed.additional and all(len(rs) == 3 for rs in parsed.additional)
    assert len(parsed.additional) < 20
    m = decode(data)
    assert len(m.additional) % 3 == 0
    assert m.answer == msg.answer


def test_truncation_skips_a_big_rrset_but_keeps_later_small_ones() -> None:
    msg = big_response(1, 0, None)
    huge = tuple(RR(n("huge.example.com."), 16, 1, 60, b"\xff" + b"y" * 255) for _ in range(3))
    small = (RR(n("small.example.com."), 1, 1, 60, b"\x01\x02\x03\x04"),)
    msg = msg._replace(additional=huge + small)
    m = decode(encode(msg, 512))
    assert [(rr.name.lower(), rr.rdata) for rr in m.additional] == [(small[0].name, small[0].rdata)]
    assert not m.tc


def test_truncation_sets_tc_when_answer_does_not_fit() -> None:
    edns = Edns(udp_size=1232, do=True)
    msg = big_response(100, 5, edns)
    data = encode(msg, 512)
    assert len(data) <= 512
    m = decode(data)
    assert m.tc and m.aa and m.rd and m.qr
    assert m.question == msg.question
    assert m.answer == m.authority == m.additional == ()
    assert m.edns == edns
    parsed = dns.message.from_wire(data)
    assert parsed.flags & dns.flags.TC and parsed.payload == 1232


def test_truncation_authority_counts() -> None:
    msg = big_response(1, 0, None)
    auth = tuple(RR(n("example.com."), 16, 1, 60, b"\xff" + b"z" * 255) for _ in range(3))
    data = encode(msg._replace(authority=auth), 600)
    assert decode(data).tc


def test_tiny_limit_still_sends_header_and_question() -> None:
    msg = big_response(3, 3, Edns())
    data = encode(msg, 20)
    m = decode(data)
    assert m.tc and m.question == msg.question and m.edns == Edns()


def test_fits_exactly() -> None:
    msg = big_response(5, 2, Edns())
    size = len(encode(msg))
    assert not decode(encode(msg, size)).tc
    assert len(decode(encode(msg, size)).additional) == 6
    assert len(decode(encode(msg, size - 1)).additional) == 3


def test_extended_rcode_and_opt_encoding() -> None:
    msg = Message(id=3, qr=True, rcode=RCode.BADVERS, edns=Edns(udp_size=1232, version=0, do=False))
    data = encode(msg)
    assert data[-11:] == b"\x00" + struct.pack("!HHIH", 41, 1232, 1 << 24, 0)
    assert data[3] & 0xF == 0
    assert decode(data).rcode == RCode.BADVERS
    assert dns.message.from_wire(data).rcode() == dns.rcode.BADVERS


def test_opt_options_round_trip() -> None:
    opts = struct.pack("!HH", 10, 8) + b"cookie!!"
    msg = Message(question=(Question(QNAME, 1, 1),), edns=Edns(4096, 0, True, opts))
    assert decode(encode(msg)) == msg
    parsed = dns.message.from_wire(encode(msg))
    assert parsed.options[0].otype == 10


# --------------------------------------------------------------------------- responses


def test_make_response_copies_query_fields() -> None:
    q = dns.message.make_query("WwW.Example.COM", "A", use_edns=0, payload=4096, want_dnssec=True)
    q.flags |= dns.flags.CD
    query = decode(q.to_wire())
    answer = (RR(n("www.example.com."), 1, 1, 60, b"\x01\x02\x03\x04"),)
    soa = (RR(n("example.com."), 6, 1, 60, n("ns.example.com.") * 2 + bytes(20)),)
    result = LookupResult(RCode.NOERROR, True, answer=answer, authority=soa)
    reply = wire.make_response(query, result, ra=True, udp_size=1400)
    assert reply.id == query.id and reply.qr and reply.aa and reply.rd and reply.ra and reply.cd
    assert reply.opcode == 0 and reply.rcode == 0 and not reply.tc
    assert reply.question == query.question
    assert reply.answer == answer and reply.authority == soa and reply.additional == ()
    assert reply.edns == Edns(1400, 0, True, b"")
    parsed = dns.message.from_wire(encode(reply))
    assert q.is_response(parsed)


def test_make_response_without_edns_and_nxdomain_not_authoritative() -> None:
    query = decode(dns.message.make_query("x.example.com", "A").to_wire())
    reply = wire.make_response(query, LookupResult(RCode.NXDOMAIN, False))
    assert reply.edns is None and reply.rcode == RCode.NXDOMAIN and not reply.aa and not reply.ra
    assert dns.message.from_wire(encode(reply)).rcode() == dns.rcode.NXDOMAIN


def test_error_response_badvers_always_has_opt() -> None:
    query = Message(id=5, question=(Question(QNAME, 1, 1),))
    reply = wire.error_response(query, RCode.BADVERS)
    assert reply.edns is not None and reply.qr and reply.question == query.question
    assert decode(encode(reply)).rcode == RCode.BADVERS
    assert wire.error_response(query, RCode.REFUSED).edns is None


def test_decode_empty_rdata_in_class_any_and_none() -> None:
    """UPDATE-style deletions (RFC 2136 2.5) parse, so the reply can be NOTIMP rather than FORMERR."""
    data = header(flags=5 << 11, qd=1, ns=2) + n("example.com.") + struct.pack("!HH", 6, 1)
    data += rr_bytes(n("www.example.com."), 2, b"", rclass=255, ttl=0)
    data += rr_bytes(n("www.example.com."), 15, b"", rclass=254, ttl=0)
    m = decode(data)
    assert [rr.rdata for rr in m.authority] == [b"", b""]
    with pytest.raises(WireError):
        decode(header(qd=1, an=1) + QUESTION + rr_bytes(b"\xc0\x0c", 2, b""))


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = dns.message.make_query("example.com", "A").to_wire()
    for form in (bytearray(data), memoryview(data)):
        m = decode(form)  # type: ignore[arg-type]
        assert type(m.question[0].name) is bytes


def test_encode_stream_splits_between_records() -> None:
    msg = big_response(250, 0, Edns())
    msg = msg._replace(authority=(RR(n("example.com."), 2, 1, 60, n("ns.example.com.")),))
    chunks = wire.encode_stream(msg, 600)
    assert len(chunks) > 5
    assert all(len(c) <= 600 for c in chunks)
    decoded = [decode(c) for c in chunks]
    assert not any(m.tc for m in decoded)
    assert all(m.question == msg.question and m.edns == Edns() and m.id == 42 for m in decoded)
    assert tuple(rr for m in decoded for rr in m.answer) == msg.answer
    (ns,) = (rr for m in decoded for rr in m.authority)
    assert (ns.name.lower(), ns.rdata.lower()) == (msg.authority[0].name, msg.authority[0].rdata)
    assert wire.encode_stream(msg._replace(answer=msg.answer[:2])) == [
        encode(msg._replace(answer=msg.answer[:2]))
    ]


def test_encode_stream_rejects_a_record_bigger_than_a_message() -> None:
    msg = Message(answer=(RR(b"\x00", 16, 1, 0, b"\xff" + b"x" * 255),))
    with pytest.raises(ValueError):
        wire.encode_stream(msg, 200)


def referral(extra: tuple[RR, ...] = ()) -> Message:
    """A referral to child.example.com with two in-domain servers and one elsewhere."""
    child = n("child.example.com.")
    ns = tuple(
        RR(child, 2, 1, 60, n(t))
        for t in ("ns1.child.example.com.", "NS2.Child.example.com.", "ns.other.net.")
    )
    glue = (
        RR(n("ns1.child.example.com."), 1, 1, 60, b"\xc0\x00\x02\x01"),
        RR(n("ns1.child.example.com."), 28, 1, 60, bytes(15) + b"\x01"),
        RR(n("ns2.child.example.com."), 1, 1, 60, b"\xc0\x00\x02\x02"),
        RR(n("ns.other.net."), 1, 1, 60, b"\xc0\x00\x02\x03"),
    )
    return Message(
        id=1,
        qr=True,
        question=(Question(n("www.child.example.com."), 1, 1),),
        authority=ns,
        additional=extra + glue,
    )


def test_referral_keeps_in_domain_glue_before_other_additional_data() -> None:
    filler = (RR(n("x.example.com."), 16, 1, 60, b"\xff" + b"f" * 255),)
    msg = referral(filler)
    # Room for the filler alone, which comes first, but not for the filler and the glue.
    limit = len(encode(msg._replace(additional=filler))) + 10
    m = decode(encode(msg, limit))
    assert not m.tc
    kept = {(rr.name.lower(), rr.rtype) for rr in m.additional}
    assert {
        (n("ns1.child.example.com."), 1),
        (n("ns1.child.example.com."), 28),
        (n("ns2.child.example.com."), 1),
    } <= kept
    assert not any(rr.rtype == 16 for rr in m.additional)


def test_referral_without_room_for_in_domain_glue_sets_tc() -> None:
    msg = referral()
    full = len(encode(msg))
    # Room for everything but the last in-domain glue RRset.
    m = decode(encode(msg, full - 16 - 16))
    assert m.tc and m.authority == () and m.additional == ()


def test_out_of_domain_glue_may_be_dropped_without_tc() -> None:
    msg = referral()
    full = len(encode(msg))
    m = decode(encode(msg, full - 1))
    assert not m.tc
    assert n("ns.other.net.") not in {rr.name.lower() for rr in m.additional}
    assert len(m.additional) == 3


def test_authoritative_answers_never_tc_for_glue() -> None:
    msg = referral()._replace(aa=True)
    full = len(encode(msg))
    m = decode(encode(msg, full - 40))
    assert not m.tc and m.authority
