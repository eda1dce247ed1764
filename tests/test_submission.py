"""Sender ownership and header completion for submitted mail (appliance.mail.submission, RFC 6409)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock

from appliance import config
from appliance.assembly import build_service
from appliance.directory.base import User
from appliance.directory.ldap import LDAPDirectory, LDAPSettings, settings_from_config
from appliance.directory.throttle import LockedOutGate, doubling_delays
from appliance.mail.auth import (
    Credentials,
    LoginExchange,
    PlainExchange,
    SASLError,
    decode_response,
    new_exchange,
    parse_plain,
)
from appliance.mail.smtp import SMTPServerFactory
from appliance.mail.submission import HeaderCompleter, SenderPolicy
from appliance.pop3.server import POP3ServerFactory
from appliance.service import ListenerService

ALICE = User("alice@example.test", "example.test/alice", ("alice@example.test", "al@other.test"))
NOW = 1_795_000_000.0  # 2026-11-18 11:06:40 UTC


# ---------------------------------------------------------------- SenderPolicy


@pytest.mark.parametrize(
    ("sender", "allowed"),
    [
        ("alice@example.test", True),
        ("Alice@EXAMPLE.test", True),
        ("al@other.test", True),
        ("alice+x@example.test", True),
        ("alice-a+b@example.test", True),
        ("al+x@other.test", True),
        ("", True),
        ("bob@example.test", False),
        ("alice@other.test", False),
        ("+alice@example.test", False),
        ("alice", False),
        ("alic+e@example.test", False),
    ],
)
def test_sender_ownership(sender: str, allowed: bool) -> None:
    policy = SenderPolicy(extension_separators="+-")
    refusal = policy.check(ALICE, sender)
    assert (refusal is None) is allowed
    if refusal is not None:
        assert (refusal.code, refusal.enhanced) == (553, "5.7.1")


def test_without_separators_extensions_are_not_owned() -> None:
    assert SenderPolicy().check(ALICE, "alice+x@example.test") is not None


def test_allow_any_sender() -> None:
    assert SenderPolicy(allow_any_sender=True).check(ALICE, "bob@example.test") is None


# ---------------------------------------------------------------- HeaderCompleter


def complete(message: bytes, chunk: int | None = None, queue_id: str = "Q1") -> bytes:
    completer = HeaderCompleter("mail.example.test", NOW, queue_id)
    if chunk is None:
        return completer.feed(message) + completer.finish()
    out = b""
    for index in range(0, len(message), chunk):
        out += completer.feed(message[index : index + chunk])
    return out + completer.finish()


ADDED = (
    b"Message-ID: <20261118110640.Q1@mail.example.test>\r\n"
    b"Date: Wed, 18 Nov 2026 11:06:40 +0000\r\n"
)


def test_missing_fields_go_at_the_end_of_the_header_block() -> None:
    message = b"From: a@b\r\nSubject: x\r\n  folded\r\n\r\nbody\r\nDate: not a header\r\n"
    assert complete(message) == (
        b"From: a@b\r\nSubject: x\r\n  folded\r\n" + ADDED + b"\r\nbody\r\nDate: not a header\r\n"
    )


def test_present_fields_are_not_added_again() -> None:
    message = b"MESSAGE-ID: <x@y>\r\ndate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n"
    assert complete(message) == message
    only_date = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n"
    assert complete(only_date) == (
        b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Message-ID: <20261118110640.Q1@mail.example.test>\r\n\r\n"
    )


def test_message_without_headers_or_body() -> None:
    assert complete(b"\r\nbody\r\n") == ADDED + b"\r\nbody\r\n"
    assert complete(b"") == ADDED
    assert complete(b"Subject: only headers\r\n") == b"Subject: only headers\r\n" + ADDED


def test_a_body_line_where_headers_should_be_gets_a_separator() -> None:
    assert complete(b"Hello there\r\nbye\r\n") == ADDED + b"\r\nHello there\r\nbye\r\n"
    assert complete(b"Subject: s\r\nno colon here\r\n") == (
        b"Subject: s\r\n" + ADDED + b"\r\nno colon here\r\n"
    )
    assert complete(b" leading space\r\n") == ADDED + b"\r\n leading space\r\n"
    assert complete(b"Bad Name: x\r\n\r\n") == ADDED + b"\r\nBad Name: x\r\n\r\n"


def test_an_endless_header_block_is_passed_through_unchanged() -> None:
    completer = HeaderCompleter("h.test", NOW, "Q1", max_header=100)
    first = completer.feed(b"X-A: " + b"a" * 50 + b"\r\n")
    assert first == b""
    second = completer.feed(b"X-B: " + b"b" * 50 + b"\r\n")
    assert second == b"X-A: " + b"a" * 50 + b"\r\nX-B: " + b"b" * 50 + b"\r\n"
    assert completer.feed(b"\r\nbody\r\n") == b"\r\nbody\r\n"
    assert completer.finish() == b""


def test_the_body_streams_once_headers_are_done() -> None:
    completer = HeaderCompleter("h.test", NOW, "Q1")
    assert completer.feed(b"Subject: x\r\n") == b""
    assert completer.feed(b"\r\nbody").startswith(b"Subject: x\r\nMessage-ID: ")
    assert completer.feed(b" more\r\n") == b" more\r\n"
    assert completer.finish() == b""
    assert completer.added == ("Message-ID", "Date")


_LINES = st.lists(
    st.sampled_from(
        [b"Subject: s", b"  fold", b"Date: d", b"Message-ID: <m>", b"", b"body", b"X-Y:z", b"."]
    ),
    max_size=12,
)


@given(_LINES, st.integers(1, 7))
def test_chunking_never_changes_the_result(lines: list[bytes], chunk: int) -> None:
    message = b"".join(line + b"\r\n" for line in lines)
    whole = complete(message)
    assert complete(message, chunk) == whole
    # Nothing of the original is lost or reordered; at most one blank line was inserted.
    stripped = whole
    for added in ADDED.split(b"\r\n")[:2]:
        stripped = stripped.replace(added + b"\r\n", b"", 1)
    got, original = stripped.split(b"\r\n"), message.split(b"\r\n")
    assert got == original or any(
        got[i] == b"" and got[:i] + got[i + 1 :] == original for i in range(len(got))
    )
    # The header block of the result has both fields.
    head = whole.split(b"\r\n\r\n", 1)[0] if not whole.startswith(b"\r\n") else b""
    names = {line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")}
    assert {b"message-id", b"date"} <= names


# ---------------------------------------------------------------- SASL parsing


def test_plain_parsing() -> None:
    assert parse_plain(b"\0alice\0pw") == Credentials("alice", "pw", "")
    assert parse_plain(b"admin\0alice\0p\xc3\xa4ss") == Credentials("alice", "päss", "admin")
    for bad in (b"alice\0pw", b"\0\0pw", b"\0alice\0", b"\0a\0b\0c", b"\0\xff\0pw", b"\0a\r\0pw"):
        with pytest.raises(SASLError):
            parse_plain(bad)
    with pytest.raises(SASLError):
        parse_plain(b"\0" + b"a" * 256 + b"\0pw")


def test_base64_decoding_is_strict() -> None:
    assert decode_response(b"YWJj") == b"abc"
    assert decode_response(b"") == b""
    for bad in (b"YWJ", b"YW Jj", b"YWJj\x00", b"====", b"*"):
        with pytest.raises(SASLError):
            decode_response(bad)


def test_exchanges() -> None:
    plain = new_exchange("plain")
    assert isinstance(plain, PlainExchange)
    assert plain.step(None) == b""
    assert plain.step(b"\0a\0b") == Credentials("a", "b")
    login = new_exchange("LOGIN")
    assert isinstance(login, LoginExchange)
    assert login.step(None) == b"Username:"
    assert login.step(b"alice") == b"Password:"
    assert login.step(b"secret") == Credentials("alice", "secret")
    empty = LoginExchange()
    with pytest.raises(SASLError):
        empty.step(b"")
    assert new_exchange("CRAM-MD5") is None


# ---------------------------------------------------------------- configuration and wiring

CONFIG = """
[appliance]
hostname = "gw.example.test"
state_dir = "state"

[interfaces.outside]
addresses = ["127.0.0.10"]

[interfaces.inside]
addresses = ["127.0.0.20"]
networks = ["127.0.1.0/24"]

[listeners]
smtp = { sides = ["outside"], port = 10025 }
submission = { sides = ["inside"], port = 10587 }
smtps = { sides = ["inside"], port = 10465 }
pop3 = { sides = ["inside"], port = 10110 }

[tls]
self_signed = true

[mail]
local_domains = ["example.test"]
extension_separators = "+"

[directory]
users = "users"
"""


def write_config(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "users").write_text("alice@example.test:*\n")
    path = tmp_path / "appliance.toml"
    path.write_text(CONFIG + extra)
    return path


def test_defaults(tmp_path: Path) -> None:
    c = config.load(write_config(tmp_path))
    assert c.submission == config.SubmissionConfig(False, False, True)
    assert c.login_throttle == config.LoginThrottleConfig(8.0, 10, 900.0, 900.0)
    assert c.pop3.pop_before_smtp == 0
    assert c.directory.backend == "file" and c.directory.ldap is None


def test_settings_are_read(tmp_path: Path) -> None:
    extra = """
[pop3]
pop_before_smtp = "10m"

[submission]
auth_on_port_25 = true
allow_any_sender = true
add_missing_headers = false

[login_throttle]
max_delay = 4
max_failures = 5
window = "1h"
cooldown = "30m"
"""
    c = config.load(write_config(tmp_path, extra))
    assert c.pop3.pop_before_smtp == 600
    assert c.submission == config.SubmissionConfig(True, True, False)
    assert c.login_throttle == config.LoginThrottleConfig(4.0, 5, 3600.0, 1800.0)


def test_ldap_backend_settings(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    text = (
        write_config(tmp_path)
        .read_text()
        .replace(
            '[directory]\nusers = "users"\n',
            """[directory]
backend = "ldap"

[directory.ldap]
servers = ["ldap://10.0.0.1", "ldaps://10.0.0.2:636"]
base_dn = "ou=people,dc=example,dc=test"
bind_dn = "cn=mailer,dc=example,dc=test"
bind_password = "s3cret"
user_filter = "(&(objectClass=inetOrgPerson)(mail={address}))"
address_attributes = ["mail"]
mailbox_attribute = "mailMessageStore"
starttls = true
ca_file = "ca.pem"
timeout = 3
canary = "Canary@example.test"
""",
        )
    )
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    c = config.load(path)
    ldap = c.directory.ldap
    assert ldap is not None
    settings = settings_from_config(ldap)
    assert settings == LDAPSettings(
        servers=("ldap://10.0.0.1", "ldaps://10.0.0.2:636"),
        base_dn="ou=people,dc=example,dc=test",
        bind_dn="cn=mailer,dc=example,dc=test",
        bind_password="s3cret",
        user_filter="(&(objectClass=inetOrgPerson)(mail={address}))",
        address_attributes=("mail",),
        mailbox_attribute="mailMessageStore",
        starttls=True,
        ca_file=str(tmp_path / "ca.pem"),
        timeout=3.0,
        canary="canary@example.test",
    )


def test_ldap_mistakes_are_named(tmp_path: Path) -> None:
    text = (
        write_config(tmp_path)
        .read_text()
        .replace(
            '[directory]\nusers = "users"\n',
            """[directory]
backend = "ldap"

[directory.ldap]
servers = ["http://10.0.0.1"]
user_filter = "(mail={user})"
login_filter = "(uid=x)"
timeout = 0
colour = "blue"
""",
        )
    )
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    keys = sorted(p.key for p in config.check(path))
    assert keys == [
        "directory.ldap.base_dn",
        "directory.ldap.colour",
        "directory.ldap.login_filter",
        "directory.ldap.servers[0]",
        "directory.ldap.timeout",
        "directory.ldap.user_filter",
    ]


def test_wiring(tmp_path: Path) -> None:
    extra = '\n[pop3]\npop_before_smtp = "5m"\n'
    c = config.load(write_config(tmp_path, extra))
    reactor = MemoryReactorClock()
    root = build_service(c, reactor)
    components: Any = root.components  # type: ignore[attr-defined]
    for child in root:
        # Implicit-TLS listeners need the loaded certificate (Twisted 22 asks at once): skip.
        if isinstance(child, ListenerService) and not (child.name or "").startswith("smtps"):
            child._listen()
    factories = {port: factory for port, factory, _, _ in reactor.tcpServers}
    smtp, submission, gate = (factories[p] for p in (10025, 10587, 10110))
    assert isinstance(gate, LockedOutGate) and gate.throttle is components.login_throttle
    pop3 = gate.wrapped
    [smtps] = [f for f in components.mail.factories if f.implicit_tls]
    assert isinstance(smtp, SMTPServerFactory) and smtp.authenticator is None
    for factory in (submission, smtps):
        assert factory.authenticator is components.directory.directory
        assert factory.require_auth
        assert factory.throttle is components.login_throttle
        assert factory.sender_policy is not None
        assert factory.sender_policy.extension_separators == "+"
    assert smtps.implicit_tls
    assert isinstance(pop3, POP3ServerFactory)
    assert pop3.on_login == components.pop_before_smtp.on_login
    assert pop3.on_auth_failure == components.login_throttle.on_auth_failure
    assert pop3.failure_delay == components.login_throttle.failure_delay
    assert components.login_throttle.delays == (0, 1, 2, 4, 8)
    # A POP3 login makes the address inside for the relay policy of port 25.
    assert not smtp.relay.is_inside_client("192.0.2.1")
    components.pop_before_smtp.on_login("192.0.2.1")
    assert smtp.relay.is_inside_client("192.0.2.1")
    reactor.advance(300)
    assert not smtp.relay.is_inside_client("192.0.2.1")


def test_wiring_auth_on_port_25_and_ldap(tmp_path: Path) -> None:
    extra = "\n[submission]\nauth_on_port_25 = true\n"
    text = CONFIG.replace(
        '[directory]\nusers = "users"\n',
        '[directory]\nbackend = "ldap"\n[directory.ldap]\n'
        'servers = ["ldap://127.0.2.9"]\nbase_dn = "dc=example,dc=test"\n',
    )
    path = tmp_path / "appliance.toml"
    path.write_text(text + extra)
    c = config.load(path)
    root = build_service(c, MemoryReactorClock())
    components: Any = root.components  # type: ignore[attr-defined]
    assert isinstance(components.directory.directory, LDAPDirectory)
    for factory in components.mail.factories:
        assert factory.authenticator is components.directory.directory


def test_doubling_delays() -> None:
    assert doubling_delays(8) == (0, 1, 2, 4, 8)
    assert doubling_delays(5) == (0, 1, 2, 4, 5)
    assert doubling_delays(0.5) == (0, 0.5)
    assert doubling_delays(0) == (0,)
