"""Fuzzing the DNS wire path: decode and the UDP protocol must survive any packet.

Over 50,000 packets made by mutating real dnspython queries and responses
(bit flips, truncation, count changes, pointer and label injection, splices)
plus random bytes go to `decode` and to the UDP protocol.  Nothing may
escape, nothing may be logged as a failure, and every reply must be a
well-formed response to the packet's id that fits the UDP limit.  Hypothesis
adds property tests: any bytes decode or raise WireError, and any message
built from valid parts survives encode -> decode and parses in dnspython.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rrset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.logger import Logger

from appliance.dns import listener, wire
from appliance.dns.rr import RR, LookupResult, RCode
from appliance.dns.wire import Edns, Message, Question, WireError, decode, encode

PACKETS = 50_000
SEED = 20261122


def seeds() -> list[bytes]:
    """Real packets to mutate: queries of many shapes and compressed responses."""
    out: list[bytes] = []
    names = [
        "www.example.com",
        "A.B.C.D.E.F.example.org",
        "xn--bcher-kva.example",
        "_sip._tcp.example.com",
        ".",
    ]
    for i, name in enumerate(names):
        for rdtype in ["A", "AAAA", "MX", "ANY", "SRV", "TXT", "NS", "SOA"]:
            q = dns.message.make_query(name, rdtype)
            q.id = i * 100 + len(out)
            out.append(q.to_wire())
            q = dns.message.make_query(
                name,
                rdtype,
                use_edns=0,
                payload=1232,
                want_dnssec=bool(i % 2),
                options=[dns.edns.GenericOption(10, b"\x01\x02\x03\x04\x05\x06\x07\x08")],
            )
            out.append(q.to_wire())
    q = dns.message.make_query("example.com", "ANY", use_edns=0)
    r = dns.message.make_response(q)
    r.answer = [
        dns.rrset.from_text(
            "example.com.", 60, "IN", "SOA", "ns1.example.com. h.example.com. 1 2 3 4 5"
        ),
        dns.rrset.from_text("example.com.", 60, "IN", "NS", "ns1.example.com.", "ns2.example.com."),
        dns.rrset.from_text("example.com.", 60, "IN", "MX", "10 mail.example.com."),
        dns.rrset.from_text("_s._tcp.example.com.", 60, "IN", "SRV", "1 2 3 t.example.com."),
        dns.rrset.from_text("www.example.com.", 60, "IN", "CNAME", "web.example.com."),
        dns.rrset.from_text("example.com.", 60, "IN", "TXT", '"hello" "world"'),
    ]
    r.additional = [dns.rrset.from_text("ns1.example.com.", 60, "IN", "A", "192.0.2.1")]
    response = r.to_wire()
    out.append(response)
    # The same response with QR cleared, so that mutated forms reach the responder.
    out.append(response[:2] + bytes([response[2] & 0x7F]) + response[3:])
    return out


def mutate(rnd: random.Random, packet: bytes, pool: list[bytes]) -> bytes:
    data = bytearray(packet)
    for _ in range(rnd.choice((1, 1, 1, 2, 3))):
        kind = rnd.randrange(9)
        if kind == 0 and data:  # bit flips
            for _ in range(rnd.randrange(1, 9)):
                i = rnd.randrange(len(data))
                data[i] ^= 1 << rnd.randrange(8)
        elif kind == 1 and data:  # truncation
            del data[rnd.randrange(len(data)) :]
        elif kind == 2 and len(data) >= 12:  # count changes
            field = 4 + 2 * rnd.randrange(4)
            value = rnd.choice((0, 1, 2, 3, rnd.randrange(256), 0xFFFF))
            data[field : field + 2] = struct.pack("!H", value)
        elif kind == 3 and len(data) > 12:  # pointer injection: backwards, forwards, self, past end
            at = rnd.randrange(12, len(data))
            target = rnd.choice((rnd.randrange(len(data) + 20), at, 12, at + 2, 0x3FFF))
            data[at : at + 2] = struct.pack("!H", 0xC000 | (target & 0x3FFF))
        elif kind == 4 and len(data) > 12:  # reserved label types and odd lengths
            at = rnd.randrange(12, len(data))
            data[at] = rnd.choice((0x40, 0x80, 0x3F, 0xFF, 0, rnd.randrange(256)))
        elif kind == 5:  # appended garbage
            data += bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(1, 16)))
        elif kind == 6 and data:  # random byte overwrite run
            at = rnd.randrange(len(data))
            for i in range(at, min(len(data), at + rnd.randrange(1, 6))):
                data[i] = rnd.getrandbits(8)
        elif kind == 7:  # splice with another packet
            other = rnd.choice(pool)
            data = bytearray(
                data[: rnd.randrange(len(data) + 1)] + other[rnd.randrange(len(other)) :]
            )
        elif kind == 8 and len(data) >= 4:  # flags: QR, opcode, EDNS version, Z
            data[2] = rnd.getrandbits(8)
            data[3] = rnd.getrandbits(8) & 0xF0 | (data[3] & 0x0F)
            opt = data.rfind(b"\x00\x00\x29")
            if opt > 0 and opt + 6 < len(data):
                data[opt + 6] = rnd.choice((0, 1, 255))
    return bytes(data)


def packets(count: int, seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    pool = seeds()
    out = list(pool)
    while len(out) < count:
        if rnd.random() < 0.05:
            out.append(bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(64))))
        else:
            out.append(mutate(rnd, rnd.choice(pool), pool))
    return out


def canonical(m: Message) -> Any:
    """A message with every byte string case-folded: compression may re-case names."""

    def rr(r: RR) -> RR:
        return RR(r.name.lower(), r.rtype, r.rclass, r.ttl, r.rdata.lower())

    return m._replace(
        question=tuple(Question(q.name.lower(), q.qtype, q.qclass) for q in m.question),
        answer=tuple(map(rr, m.answer)),
        authority=tuple(map(rr, m.authority)),
        additional=tuple(map(rr, m.additional)),
    )


class Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def getHost(self) -> IPv4Address:
        return IPv4Address("UDP", "127.0.0.1", 53)


def echo_responder(query: Message, *args: Any) -> Message:
    """Answers with records derived from the (possibly mangled) query, including its sections."""
    q = query.question[0]
    answer = (RR(q.name, 1, 1, 60, b"\x7f\x00\x00\x01"), *query.answer[:3])
    return wire.make_response(
        query,
        LookupResult(
            RCode.NOERROR,
            True,
            answer=answer,
            authority=query.authority[:3],
            additional=query.additional[:3],
        ),
    )


ZONE_ANSWER = (
    RR(b"\x03ns1\x07example\x03com\x00", 2, 1, 60, b"\x03ns2\x07example\x03com\x00"),
    RR(b"\x07example\x03com\x00", 15, 1, 60, b"\x00\x0a\x04mail\x07example\x03com\x00"),
)


def zone_responder(query: Message, *args: Any) -> Message:
    """Answers with fixed, valid records (plus one owned by the mangled qname)."""
    q = query.question[0]
    answer = (RR(q.name, 1, 1, 60, b"\x7f\x00\x00\x01"), *ZONE_ANSWER)
    return wire.make_response(query, LookupResult(RCode.NOERROR, True, answer=answer))


def test_fuzz_decode_and_udp_protocol() -> None:
    events: list[dict[str, Any]] = []
    log = Logger(namespace="fuzz", observer=events.append)
    echo = listener.make_udp_protocol(echo_responder, log=log)
    zone = listener.make_udp_protocol(zone_responder, log=log)
    transport = Transport()
    echo.makeConnection(transport)  # type: ignore[arg-type]
    zone.makeConnection(transport)  # type: ignore[arg-type]
    counts = {"decoded": 0, "rejected": 0, "answered": 0, "silent": 0, "dnspython": 0}
    corpus = packets(PACKETS, SEED)
    assert len(corpus) >= 50_000
    for index, data in enumerate(corpus):
        try:
            m = decode(data)
        except WireError as exc:
            counts["rejected"] += 1
            assert exc.rcode == RCode.FORMERR
            assert exc.id is None or exc.id == struct.unpack_from("!H", data)[0]
        else:
            counts["decoded"] += 1
            again = decode(encode(m))
            assert canonical(again) == canonical(m)
        before = len(transport.sent)
        proto = zone if index % 2 else echo
        proto.datagramReceived(data, ("192.0.2.9", 5353))
        if len(transport.sent) == before:
            counts["silent"] += 1
            continue
        counts["answered"] += 1
        assert len(transport.sent) == before + 1
        reply, addr = transport.sent[-1]
        assert addr == ("192.0.2.9", 5353)
        r = decode(reply)
        assert r.qr and r.id == struct.unpack_from("!H", data)[0]
        assert len(reply) <= 1232
        # Echoed records may hold rdata dnspython judges by type (we keep it opaque, RFC 3597);
        # dnspython reads opcode UPDATE by RFC 2136 rules a NOTIMP echo need not meet.
        if proto is zone and r.opcode != 5 and index % 7 == 1:
            counts["dnspython"] += 1
            parsed = dns.message.from_wire(reply)
            assert parsed.id == r.id and parsed.rcode() == r.rcode
    assert [e for e in events if "log_failure" in e] == []
    # The corpus exercises every path.
    assert min(counts.values()) > 1000, counts


@settings(
    max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(st.binary(max_size=300))
def test_decode_any_bytes(data: bytes) -> None:
    try:
        m = decode(data)
    except WireError:
        return
    assert canonical(decode(encode(m))) == canonical(m)


labels = st.binary(min_size=1, max_size=12).map(lambda b: bytes([len(b)]) + b)
names = st.lists(
    st.sampled_from([b"\x03www", b"\x07Example", b"\x03COM", b"\x04mail", b"\x01a"]) | labels,
    max_size=6,
).map(lambda parts: b"".join(parts) + b"\x00")


def rdata_for(draw: Any, rtype: int) -> bytes:
    if rtype == 1:
        return draw(st.binary(min_size=4, max_size=4))
    if rtype == 28:
        return draw(st.binary(min_size=16, max_size=16))
    if rtype in (2, 5, 12, 39):
        return draw(names)
    if rtype == 15:
        return draw(st.binary(min_size=2, max_size=2)) + draw(names)
    if rtype == 6:
        return draw(names) + draw(names) + draw(st.binary(min_size=20, max_size=20))
    if rtype == 33:
        return draw(st.binary(min_size=6, max_size=6)) + draw(names)
    if rtype == 16:
        strings = draw(st.lists(st.binary(max_size=20), min_size=1, max_size=3))
        return b"".join(bytes([len(x)]) + x for x in strings)
    return draw(st.binary(max_size=40))


@st.composite
def records(draw: Any) -> RR:
    rtype = draw(st.sampled_from([1, 2, 5, 6, 12, 15, 16, 28, 33, 39, 65280, 65281]))
    return RR(draw(names), rtype, 1, draw(st.integers(0, 2**32 - 1)), rdata_for(draw, rtype))


@st.composite
def messages(draw: Any) -> Message:
    edns = draw(
        st.none()
        | st.builds(Edns, st.integers(512, 65535), st.just(0), st.booleans(), st.just(b""))
    )
    return Message(
        id=draw(st.integers(0, 0xFFFF)),
        qr=draw(st.booleans()),
        aa=draw(st.booleans()),
        rd=draw(st.booleans()),
        ra=draw(st.booleans()),
        cd=draw(st.booleans()),
        rcode=draw(st.integers(0, 0xFFF if edns else 0xF)),
        question=tuple(
            draw(
                st.lists(st.builds(Question, names, st.integers(0, 0xFFFF), st.just(1)), max_size=2)
            )
        ),
        answer=tuple(draw(st.lists(records(), max_size=6))),
        authority=tuple(draw(st.lists(records(), max_size=3))),
        additional=tuple(draw(st.lists(records(), max_size=4))),
        edns=edns,
    )


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(messages(), st.sampled_from([None, 512, 700, 1232]))
def test_encode_decode_round_trip(msg: Message, limit: int | None) -> None:
    data = encode(msg, limit)
    if limit is not None:
        assert len(data) <= max(
            limit, len(encode(msg._replace(answer=(), authority=(), additional=())))
        )
    back = decode(data)
    parsed = dns.message.from_wire(data)
    assert parsed.id == msg.id
    if back.tc and not msg.tc:
        assert back.answer == back.authority == back.additional == ()
    else:
        assert canonical(back._replace(additional=())) == canonical(msg._replace(additional=()))
        # Additional RRsets may be dropped whole, never partly, never reordered.
        rest = list(canonical(back).additional)
        for group in wire._rrsets(canonical(msg).additional):
            if rest[: len(group)] == list(group):
                del rest[: len(group)]
        assert rest == []
        if limit is None:
            assert canonical(back) == canonical(msg)
    assert back.edns == msg.edns and back.rcode == msg.rcode
