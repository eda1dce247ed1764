"""Static routes, smart host and MX choice per recipient domain (MISSION M-6)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.mail.routing import (
    LITERAL,
    LOCAL,
    MX,
    SMART_HOST,
    STATIC,
    Route,
    RouteError,
    Router,
    group_by_route,
    parse_address_literal,
    parse_target,
)

OWN_NAMES = ("mail.example.test", "example-gw.test")
OWN_ADDRESSES = ("127.0.0.10", "::1")


def router(routes: dict[str, str] | None = None, smart: str | None = None) -> Router:
    return Router(routes or {}, smart, OWN_NAMES, OWN_ADDRESSES)


def test_default_is_mx_of_the_domain() -> None:
    assert router().route("Remote.Test.") == Route(MX, "remote.test", 25, True)


def test_static_route_forms() -> None:
    r = router(
        {
            "a.test": "[relay.a.test]",
            "b.test": "[192.0.2.7]:2525",
            "c.test": "other.test",
            "d.test": "other.test:587",
            "e.test": "[IPv6:2001:db8::1]:26",
            "f.test": "[2001:DB8::2]",
            "g.test": "198.51.100.1",
            "h.test": "198.51.100.1:10025",
        }
    )
    assert r.route("a.test") == Route(STATIC, "relay.a.test", 25, False)
    assert r.route("b.test") == Route(STATIC, "192.0.2.7", 2525, False)
    assert r.route("c.test") == Route(STATIC, "other.test", 25, True)
    assert r.route("d.test") == Route(STATIC, "other.test", 587, True)
    assert r.route("e.test") == Route(STATIC, "2001:db8::1", 26, False)
    assert r.route("f.test") == Route(STATIC, "2001:db8::2", 25, False)
    assert r.route("g.test") == Route(STATIC, "198.51.100.1", 25, False)
    assert r.route("h.test") == Route(STATIC, "198.51.100.1", 10025, False)
    assert r.route("b.test").is_address and not r.route("a.test").is_address


def test_leading_dot_matches_subdomains_only_and_exact_beats_suffix() -> None:
    r = router(
        {
            ".corp.test": "[hub.corp.test]",
            ".eu.corp.test": "[eu-hub.corp.test]",
            "special.eu.corp.test": "[special.corp.test]",
        }
    )
    assert r.route("x.corp.test").host == "hub.corp.test"
    assert r.route("a.b.corp.test").host == "hub.corp.test"
    assert r.route("paris.eu.corp.test").host == "eu-hub.corp.test"
    assert r.route("special.eu.corp.test").host == "special.corp.test"
    # the suffix entry does not match the parent itself, nor a look-alike
    assert r.route("corp.test") == Route(MX, "corp.test", 25, True)
    assert r.route("evilcorp.test") == Route(MX, "evilcorp.test", 25, True)
    assert r.route("X.CORP.TEST").host == "hub.corp.test"


def test_smart_host_and_empty_target_exception() -> None:
    r = router({"direct.test": "", ".lan.test": "[10.0.0.5]"}, smart="[relay.isp.test]:587")
    assert r.route("anywhere.test") == Route(SMART_HOST, "relay.isp.test", 587, False)
    assert r.route("direct.test") == Route(MX, "direct.test", 25, True)
    assert r.route("pc.lan.test") == Route(STATIC, "10.0.0.5", 25, False)
    bare = router(smart="relay.isp.test")
    assert bare.route("x.test") == Route(SMART_HOST, "relay.isp.test", 25, True)


def test_own_names_and_literals() -> None:
    r = router()
    assert r.route("MAIL.example.test").kind == LOCAL
    assert r.route("[127.0.0.10]").kind == LOCAL
    assert r.route("[IPv6:0:0::1]").kind == LOCAL
    assert r.route("[192.0.2.9]") == Route(LITERAL, "192.0.2.9", 25, False)
    assert r.route("[IPv6:2001:db8::9]") == Route(LITERAL, "2001:db8::9", 25, False)
    assert router(smart="[relay.test]").route("[192.0.2.9]").kind == SMART_HOST
    # malformed literals are just names that will fail in DNS, never a crash
    assert r.route("[999.1.1.1]").kind == MX
    assert r.route("[2001:db8::1]").kind == MX  # IPv6 literals need the IPv6: tag


def test_address_literal_parser() -> None:
    assert parse_address_literal("[192.0.2.1]") == "192.0.2.1"
    assert parse_address_literal("[ipv6:2001:DB8::1]") == "2001:db8::1"
    assert parse_address_literal("[IPv6:192.0.2.1]") is None
    assert parse_address_literal("192.0.2.1") is None
    assert parse_address_literal("[example.test]") is None


@pytest.mark.parametrize(
    "target",
    [
        "[relay",
        "[relay]x",
        "[relay]:0",
        "relay:99999",
        "relay:abc",
        "2001:db8::1",
        "bad host",
        "a..b",
        "[]",
        "x" * 64 + ".test",
        "relay:",
    ],
)
def test_bad_targets_raise_at_construction(target: str) -> None:
    with pytest.raises(RouteError):
        router({"x.test": target})
    with pytest.raises(RouteError):
        router(smart=target)


def test_bad_route_keys() -> None:
    with pytest.raises(RouteError):
        router({".": "[relay.test]"})
    with pytest.raises(RouteError):
        router({" ": "[relay.test]"})


def test_parse_target_empty_means_mx() -> None:
    assert parse_target("  ", "x") is None


@given(st.text(max_size=40))
def test_route_never_raises(domain: str) -> None:
    r = router({".corp.test": "[hub.corp.test]"}, smart=None)
    result = r.route(domain)
    assert result.kind in (MX, STATIC, LITERAL, LOCAL)


def test_group_by_route() -> None:
    r = router({".corp.test": "[hub.corp.test]", "a.test": "[hub.corp.test]"})
    groups = group_by_route(
        r,
        [
            "x@a.test",
            "y@eu.corp.test",
            "z@remote.test",
            "w@REMOTE.test",
            "x@a.test",
            "q@mail.example.test",
        ],
    )
    assert groups == {
        Route(STATIC, "hub.corp.test", 25, False): ["x@a.test", "y@eu.corp.test"],
        Route(MX, "remote.test", 25, True): ["z@remote.test", "w@REMOTE.test"],
        Route(LOCAL, "mail.example.test", 25, False): ["q@mail.example.test"],
    }
