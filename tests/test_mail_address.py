"""Tests for appliance.mail.address: the strict RFC 5321 4.1.2 path parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.mail.address import (
    AddressError,
    domain_of,
    parse_domain,
    parse_mail_from,
    parse_rcpt_to,
)


@pytest.mark.parametrize(
    ("argument", "address", "local", "domain"),
    [
        ("FROM:<alice@example.test>", "alice@example.test", "alice", "example.test"),
        ("from:<Alice@Example.TEST>", "Alice@example.test", "Alice", "example.test"),
        ("FROM: <alice@example.test>", "alice@example.test", "alice", "example.test"),
        ("FROM:<>", "", "", ""),
        ("FROM:<a.b+c@x-y.example>", "a.b+c@x-y.example", "a.b+c", "x-y.example"),
        ('FROM:<"john doe"@example.test>', '"john doe"@example.test', '"john doe"', "example.test"),
        ('FROM:<"a>b"@example.test>', '"a>b"@example.test', '"a>b"', "example.test"),
        ('FROM:<"a\\"b"@example.test>', '"a\\"b"@example.test', '"a\\"b"', "example.test"),
        ('FROM:<"x@y"@example.test>', '"x@y"@example.test', '"x@y"', "example.test"),
        ("FROM:<u@[192.0.2.1]>", "u@[192.0.2.1]", "u", "[192.0.2.1]"),
        ("FROM:<u@[IPv6:2001:DB8::1]>", "u@[IPv6:2001:db8::1]", "u", "[IPv6:2001:db8::1]"),
        ("FROM:<u@[ipv6:2001:db8:0:0:0:0:0:1]>", "u@[IPv6:2001:db8::1]", "u", "[IPv6:2001:db8::1]"),
        (
            "FROM:<@a.example,@b.example:user@host.example>",
            "user@host.example",
            "user",
            "host.example",
        ),
        ("FROM:<@relay.example:user@host.example>", "user@host.example", "user", "host.example"),
        ("FROM:<user%other@example.test>", "user%other@example.test", "user%other", "example.test"),
        ("FROM:<host!user@example.test>", "host!user@example.test", "host!user", "example.test"),
    ],
)
def test_mail_from_accepts(argument: str, address: str, local: str, domain: str) -> None:
    path = parse_mail_from(argument)
    assert (path.address, path.local_part, path.domain) == (address, local, domain)
    assert path.parameters == {}


@pytest.mark.parametrize(
    ("argument", "code", "enhanced"),
    [
        ("FROM alice@example.test", 501, "5.5.4"),
        ("TO:<alice@example.test>", 501, "5.5.4"),
        ("FROM:alice@example.test", 501, "5.1.7"),
        ("FROM:<alice@example.test", 501, "5.1.7"),
        ("FROM:<alice>", 501, "5.1.7"),
        ("FROM:<@example.test>", 501, "5.1.7"),
        ("FROM:<alice@>", 501, "5.1.7"),
        ("FROM:<alice@example..test>", 501, "5.1.7"),
        ("FROM:<alice@-example.test>", 501, "5.1.7"),
        ("FROM:<alice@example-.test>", 501, "5.1.7"),
        ("FROM:<alice@example.test.>", 501, "5.1.7"),
        ("FROM:<alice@exa_mple.test>", 501, "5.1.7"),
        ("FROM:<a..b@example.test>", 501, "5.1.7"),
        ("FROM:<.a@example.test>", 501, "5.1.7"),
        ("FROM:<a b@example.test>", 501, "5.1.7"),
        ('FROM:<"unterminated@example.test>', 501, "5.1.7"),
        ("FROM:<u@[300.1.1.1]>", 501, "5.1.7"),
        ("FROM:<u@[1.2.3]>", 501, "5.1.7"),
        ("FROM:<u@[IPv6:zz::1]>", 501, "5.1.7"),
        ("FROM:<u@[tag:content]>", 501, "5.1.7"),
        ("FROM:<u@[1.2.3.4>", 501, "5.1.7"),
        ("FROM:<@a.example:>", 501, "5.1.7"),
        ("FROM:<@a.example,b.example:u@h.example>", 501, "5.1.7"),
        ("FROM:<@a_b:u@h.example>", 501, "5.1.7"),
        ("FROM:<@a.example u@h.example>", 501, "5.1.7"),
        ("FROM:<" + "a" * 65 + "@example.test>", 501, "5.1.7"),
        ("FROM:<a@" + ("b" * 60 + ".") * 5 + "example>", 501, "5.1.7"),
        ("FROM:<" + "a" * 60 + "@" + ("b" * 60 + ".") * 3 + "example.test>", 501, "5.1.7"),
        ("FROM:<alice@example.test>SIZE=1", 501, "5.5.4"),
        ("FROM:<alüce@example.test>", 553, "5.6.7"),
        ("FROM:<al\x01ce@example.test>", 501, "5.1.7"),
    ],
)
def test_mail_from_refuses(argument: str, code: int, enhanced: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_mail_from(argument)
    assert (info.value.reply.code, info.value.reply.enhanced) == (code, enhanced)


def test_mail_parameters() -> None:
    path = parse_mail_from("FROM:<a@example.test> SIZE=1000 body=8bitmime", max_size=2000)
    assert path.parameters == {"SIZE": "1000", "BODY": "8BITMIME"}
    assert parse_mail_from("FROM:<> BODY=7BIT").parameters == {"BODY": "7BIT"}
    assert parse_mail_from("FROM:<a@example.test>  SIZE=5 ").parameters == {"SIZE": "5"}


@pytest.mark.parametrize(
    ("argument", "code", "enhanced"),
    [
        ("FROM:<a@example.test> SIZE=2001", 552, "5.3.4"),
        ("FROM:<a@example.test> SIZE=", 501, "5.5.4"),
        ("FROM:<a@example.test> SIZE=abc", 501, "5.5.4"),
        ("FROM:<a@example.test> SIZE=-1", 501, "5.5.4"),
        ("FROM:<a@example.test> SIZE=1 SIZE=2", 501, "5.5.4"),
        ("FROM:<a@example.test> BODY=BINARYMIME", 555, "5.5.4"),
        ("FROM:<a@example.test> SMTPUTF8", 555, "5.5.4"),
        ("FROM:<a@example.test> RET=FULL", 555, "5.5.4"),
        ("FROM:<a@example.test> =x", 501, "5.5.4"),
        ("FROM:<a@example.test> A=b=c", 501, "5.5.4"),
    ],
)
def test_mail_parameters_refused(argument: str, code: int, enhanced: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_mail_from(argument, max_size=2000)
    assert (info.value.reply.code, info.value.reply.enhanced) == (code, enhanced)


def test_rcpt_to() -> None:
    path = parse_rcpt_to("TO:<Bob@Example.Test>")
    assert (path.address, path.domain) == ("Bob@example.test", "example.test")
    assert parse_rcpt_to("to:<@x.example:bob@example.test>").address == "bob@example.test"
    postmaster = parse_rcpt_to("TO:<PostMaster>")
    assert (postmaster.address, postmaster.domain) == ("postmaster", "")


@pytest.mark.parametrize(
    ("argument", "code", "enhanced"),
    [
        ("TO:<>", 501, "5.1.3"),
        ("TO:bob@example.test", 501, "5.1.3"),
        ("FROM:<bob@example.test>", 501, "5.5.4"),
        ("TO:<bob>", 501, "5.1.3"),
        ("TO:<bob@example.test> NOTIFY=NEVER", 555, "5.5.4"),
        ("TO:<böb@example.test>", 553, "5.6.7"),
    ],
)
def test_rcpt_to_refused(argument: str, code: int, enhanced: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_rcpt_to(argument)
    assert (info.value.reply.code, info.value.reply.enhanced) == (code, enhanced)


def test_parse_domain_and_domain_of() -> None:
    assert parse_domain("Mail.Example.TEST") == "mail.example.test"
    assert parse_domain("[127.0.0.1]") == "[127.0.0.1]"
    with pytest.raises(ValueError):
        parse_domain("bad domain")
    assert domain_of('"a@b"@example.test') == "example.test"
    assert domain_of("postmaster") == ""


@given(st.text(max_size=80))
def test_parser_never_raises_anything_but_address_error(text: str) -> None:
    for argument in ("FROM:" + text, "TO:" + text, text):
        for parse in (parse_mail_from, parse_rcpt_to):
            try:
                path = parse(argument)
            except AddressError as error:
                assert error.reply.code in (501, 552, 553, 555)
            else:
                assert path.address == "" or "@" in path.address or path.address == "postmaster"


@given(
    st.from_regex(r"[a-z0-9!#$%&'*+/=?^_`{|}~-]{1,20}(\.[a-z0-9-]{1,10}){0,2}", fullmatch=True),
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z0-9]{1,10}){1,3}", fullmatch=True),
)
def test_valid_addresses_round_trip(local: str, domain: str) -> None:
    path = parse_rcpt_to(f"TO:<{local}@{domain.upper()}>")
    assert path.address == f"{local}@{domain}"
