"""Precomputed answers: a cache hit is byte-identical to what the full path would have sent."""

from __future__ import annotations

import ipaddress
import random

import dns.flags
import dns.message
import dns.rdatatype

from appliance.dns import names
from appliance.dns.answercache import question_key
from appliance.dns.listener import DNSServerCore
from appliance.dns.view import View
from appliance.dns.zone import Zone
from appliance.dns.zonefile import load_text

ZONE = """
$ORIGIN example.test.
$TTL 300
@ IN SOA ns hostmaster 1 3600 900 604800 60
  IN NS ns
  IN MX 10 mail
ns IN A 192.0.2.1
mail IN A 192.0.2.2
www IN CNAME mail
*.wild IN TXT "wild"
big IN TXT "{}"
""".format('" "'.join(["x" * 200] * 10))

ORIGIN = names.from_text("example.test.")
CLIENT = ("127.0.2.1", 5353)
LOCAL = ("127.0.0.10", 53)


def view(**kwargs: object) -> View:
    return View("outside", {ORIGIN: Zone(ORIGIN, load_text(ZONE, ORIGIN).records)}, **kwargs)  # type: ignore[arg-type]


class Uncached:
    """The same view without cache_token, so the core takes the full path every time."""

    def __init__(self, inner: View) -> None:
        self.inner = inner

    def __call__(self, *args: object) -> object:
        return self.inner(*args)  # type: ignore[arg-type]


def queries(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(400):
        name = rng.choice(
            [
                "example.test",
                "www.example.test",
                "MAIL.example.TEST",
                "a.wild.example.test",
                "nope.example.test",
                "big.example.test",
                "example.org",
            ]
        )
        name = "".join(c.upper() if rng.random() < 0.5 else c for c in name)
        rdtype = rng.choice(["A", "MX", "TXT", "ANY", "NS", "SOA", "AAAA", "TYPE65"])
        q = dns.message.make_query(
            name, rdtype, use_edns=rng.choice([False, 0]), payload=rng.choice([512, 1232, 4096])
        )
        q.id = rng.randrange(65536)
        if rng.random() < 0.3:
            q.flags &= ~dns.flags.RD
        if rng.random() < 0.2:
            q.flags |= dns.flags.CD
        out.append(q.to_wire())
    return out


def test_hits_equal_the_full_path_for_every_query() -> None:
    v = view(minimal_any=True)
    cached = DNSServerCore(v)
    plain = DNSServerCore(Uncached(v))
    assert cached.cache is not None and plain.cache is None
    for transport in ("udp", "tcp"):
        for data in queries(1) + queries(1):
            assert cached.handle(data, CLIENT, transport, LOCAL) == plain.handle(
                data, CLIENT, transport, LOCAL
            )
    assert cached.cache.hits > 400


def test_question_case_and_id_follow_the_query() -> None:
    core = DNSServerCore(view())
    first = dns.message.make_query("mail.example.test", "A")
    second = dns.message.make_query("MaIl.ExAmPlE.tEsT", "A")
    second.id = (first.id + 1) % 65536
    core.handle(first.to_wire(), CLIENT, "udp", LOCAL)
    reply = dns.message.from_wire(core.handle(second.to_wire(), CLIENT, "udp", LOCAL))  # type: ignore[arg-type]
    assert core.cache is not None and core.cache.hits == 1
    assert reply.id == second.id
    assert str(reply.question[0].name) == "MaIl.ExAmPlE.tEsT."
    assert str(reply.answer[0].name) == "MaIl.ExAmPlE.tEsT."


def test_reload_and_acl_changes_are_seen() -> None:
    v = view()
    core = DNSServerCore(v)
    query = dns.message.make_query("mail.example.test", "A").to_wire()
    assert dns.message.from_wire(core.handle(query, CLIENT, "udp", LOCAL)).answer  # type: ignore[arg-type]
    v.replace_zones({}, {})
    refused = dns.message.from_wire(core.handle(query, CLIENT, "udp", LOCAL))  # type: ignore[arg-type]
    assert refused.rcode() == 5
    v.replace_zones({ORIGIN: Zone(ORIGIN, load_text(ZONE, ORIGIN).records)}, {})
    v.allow_query = (ipaddress.ip_network("127.0.1.0/24"),)
    assert dns.message.from_wire(core.handle(query, CLIENT, "udp", LOCAL)).rcode() == 5  # type: ignore[arg-type]
    inside = dns.message.from_wire(core.handle(query, ("127.0.1.9", 1), "udp", LOCAL))  # type: ignore[arg-type]
    assert inside.rcode() == 0 and inside.answer


def test_only_plain_queries_are_keyed() -> None:
    q = dns.message.make_query("example.test", "A")
    data = q.to_wire()
    assert question_key(data, "udp") is not None
    assert (
        question_key(data + b"junk", "udp") is None
    )  # trailing bytes without an additional record
    assert question_key(data[:2] + bytes([data[2] | 0x80]) + data[3:], "udp") is None  # QR set
    assert (
        question_key(data[:2] + bytes([data[2] | 0x20]) + data[3:], "udp") is None
    )  # opcode UPDATE
    assert question_key(data[:12] + b"\xc0\x0c" + data[-4:], "udp") is None  # compressed name
    upper = dns.message.make_query("EXAMPLE.TEST", dns.rdatatype.from_text("TYPE65")).to_wire()
    lower = dns.message.make_query("example.test", dns.rdatatype.from_text("TYPE97")).to_wire()
    assert question_key(upper, "udp")[0] != question_key(lower, "udp")[0]  # type: ignore[index]
