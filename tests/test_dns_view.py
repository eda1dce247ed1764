"""The view: ACLs, REFUSED outside its zones, zone transfers only to allowed clients, minimal ANY."""

from __future__ import annotations

import ipaddress

from appliance.dns import names
from appliance.dns.rr import RCode, RRType
from appliance.dns.view import View
from appliance.dns.wire import Edns, Message, Question
from appliance.dns.zone import Zone
from appliance.dns.zonefile import load_text

ZONE = """
$ORIGIN example.test.
$TTL 300
@ IN SOA ns hostmaster 1 3600 900 604800 60
  IN NS ns
  IN MX 10 mail
  IN TXT "hello"
ns IN A 192.0.2.1
mail IN A 192.0.2.2
"""

ORIGIN = names.from_text("example.test.")
NETS = (ipaddress.ip_network("127.0.1.0/24"),)


def make_view(**kwargs: object) -> View:
    zone = Zone(ORIGIN, load_text(ZONE, ORIGIN).records)
    return View("outside", {ORIGIN: zone}, **kwargs)  # type: ignore[arg-type]


def ask(view: View, name: str, qtype: int, client: str = "127.0.2.1", transport: str = "udp", qclass: int = 1) -> Message:
    query = Message(id=7, rd=True, question=(Question(names.from_text(name), qtype, qclass),), edns=Edns())
    reply = view(query, (client, 5353), transport, ("127.0.0.10", 53))
    assert reply is not None
    assert reply.id == 7 and reply.qr
    return reply


def test_answers_inside_its_zone_case_preserved() -> None:
    reply = ask(make_view(), "MAIL.Example.TEST.", RRType.A)
    assert reply.rcode == RCode.NOERROR and reply.aa and not reply.ra
    assert reply.question[0].name == names.from_text("MAIL.Example.TEST.")
    assert [rr.rdata for rr in reply.answer] == [bytes([192, 0, 2, 2])]


def test_refuses_names_outside_its_zones_and_never_recurses() -> None:
    reply = ask(make_view(), "example.org.", RRType.A)
    assert reply.rcode == RCode.REFUSED and not reply.ra and not reply.answer


def test_allow_query() -> None:
    view = make_view(allow_query=NETS)
    assert ask(view, "example.test.", RRType.SOA, client="127.0.2.1").rcode == RCode.REFUSED
    assert ask(view, "example.test.", RRType.SOA, client="127.0.1.9").rcode == RCode.NOERROR


def test_other_classes_refused() -> None:
    assert ask(make_view(), "example.test.", RRType.SOA, qclass=3).rcode == RCode.REFUSED


def test_minimal_any_on_the_outside() -> None:
    full = ask(make_view(), "example.test.", RRType.ANY)
    assert len({rr.rtype for rr in full.answer}) >= 4
    minimal = ask(make_view(minimal_any=True), "example.test.", RRType.ANY)
    assert len({rr.rtype for rr in minimal.answer}) == 1


def test_transfer_only_over_tcp_to_allowed_clients() -> None:
    view = make_view(allow_transfer={ORIGIN: NETS})
    assert ask(view, "example.test.", RRType.AXFR, client="127.0.1.9", transport="udp").rcode == RCode.FORMERR
    assert ask(view, "example.test.", RRType.AXFR, client="127.0.2.1", transport="tcp").rcode == RCode.REFUSED
    reply = ask(view, "example.test.", RRType.AXFR, client="127.0.1.9", transport="tcp")
    assert reply.rcode == RCode.NOERROR
    types = [rr.rtype for rr in reply.answer]
    assert types[0] == types[-1] == RRType.SOA
    assert types.count(RRType.SOA) == 2
    assert len(reply.answer) == 7


def test_no_transfer_without_allow_transfer() -> None:
    reply = ask(make_view(), "example.test.", RRType.AXFR, client="127.0.1.9", transport="tcp")
    assert reply.rcode == RCode.REFUSED


def test_replace_zones_is_atomic() -> None:
    view = make_view()
    old = view.zones
    view.replace_zones({}, {})
    assert ask(view, "example.test.", RRType.SOA).rcode == RCode.REFUSED
    assert old is not view.zones
