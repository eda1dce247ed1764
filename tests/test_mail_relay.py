"""Tests for appliance.mail.relay: one test per row of shared/relay-matrix.md, and the edges."""

from __future__ import annotations

import ipaddress

import pytest

from appliance.mail.relay import RELAY_DENIED, RelayPolicy

INSIDE_CLIENT = "127.0.1.5"
OUTSIDE_CLIENT = "127.0.2.7"
INSIDE_SENDER = "alice@example.test"
OUTSIDE_SENDER = "someone@remote.test"
INSIDE_RECIPIENT = "bob@example.test"
OUTSIDE_RECIPIENT = "friend@elsewhere.test"


def make_policy() -> RelayPolicy:
    return RelayPolicy(
        inside_networks=["127.0.1.0/24", ipaddress.ip_network("fd00::/8")],
        local_domains=["example.test", ".sub.example.test"],
        relay_domains=["backup.test"],
        own_names=["mail.example.test", "[127.0.0.10]"],
    )


# (client, sender, recipient, accepted): the eight rows of relay-matrix.md, in order.
MATRIX = [
    (INSIDE_CLIENT, INSIDE_SENDER, OUTSIDE_RECIPIENT, True),
    (INSIDE_CLIENT, OUTSIDE_SENDER, OUTSIDE_RECIPIENT, True),
    (INSIDE_CLIENT, INSIDE_SENDER, INSIDE_RECIPIENT, True),
    (INSIDE_CLIENT, OUTSIDE_SENDER, INSIDE_RECIPIENT, True),
    (OUTSIDE_CLIENT, INSIDE_SENDER, OUTSIDE_RECIPIENT, False),
    (OUTSIDE_CLIENT, OUTSIDE_SENDER, OUTSIDE_RECIPIENT, False),
    (OUTSIDE_CLIENT, INSIDE_SENDER, INSIDE_RECIPIENT, True),
    (OUTSIDE_CLIENT, OUTSIDE_SENDER, INSIDE_RECIPIENT, True),
]
ROW_IDS = [
    "inside-client_inside-sender_outside-rcpt",
    "inside-client_outside-sender_outside-rcpt",
    "inside-client_inside-sender_inside-rcpt",
    "inside-client_outside-sender_inside-rcpt",
    "outside-client_inside-sender_outside-rcpt_REFUSE",
    "outside-client_outside-sender_outside-rcpt_REFUSE",
    "outside-client_inside-sender_inside-rcpt",
    "outside-client_outside-sender_inside-rcpt",
]


@pytest.mark.parametrize(("client", "sender", "recipient", "accepted"), MATRIX, ids=ROW_IDS)
def test_matrix_row(client: str, sender: str, recipient: str, accepted: bool) -> None:
    decision = make_policy().decide(client, False, sender, recipient)
    if accepted:
        assert decision is None
    else:
        assert decision == RELAY_DENIED
        assert (decision.code, decision.enhanced) == (550, "5.7.1")


@pytest.mark.parametrize("sender", ["", INSIDE_SENDER, OUTSIDE_SENDER])
def test_null_sender_follows_the_same_rules(sender: str) -> None:
    policy = make_policy()
    assert policy.decide(OUTSIDE_CLIENT, False, sender, OUTSIDE_RECIPIENT) == RELAY_DENIED
    assert policy.decide(OUTSIDE_CLIENT, False, sender, INSIDE_RECIPIENT) is None
    assert policy.decide(INSIDE_CLIENT, False, sender, OUTSIDE_RECIPIENT) is None


def test_authenticated_client_is_inside() -> None:
    policy = make_policy()
    assert policy.decide(OUTSIDE_CLIENT, True, INSIDE_SENDER, OUTSIDE_RECIPIENT) is None
    assert policy.decide(OUTSIDE_CLIENT, True, OUTSIDE_SENDER, OUTSIDE_RECIPIENT) is None


def test_pop_before_smtp_predicate_makes_a_client_inside() -> None:
    policy = make_policy()
    opened: set[str] = set()
    policy.add_inside_predicate(opened.__contains__)
    assert policy.decide(OUTSIDE_CLIENT, False, "", OUTSIDE_RECIPIENT) == RELAY_DENIED
    opened.add(OUTSIDE_CLIENT)
    assert policy.decide(OUTSIDE_CLIENT, False, "", OUTSIDE_RECIPIENT) is None
    assert policy.decide("127.0.2.8", False, "", OUTSIDE_RECIPIENT) == RELAY_DENIED


def test_predicates_given_to_the_constructor() -> None:
    policy = RelayPolicy(
        [], ["example.test"], [], [], inside_predicates=[lambda ip: ip == "1.2.3.4"]
    )
    assert policy.decide("1.2.3.4", False, "", OUTSIDE_RECIPIENT) is None
    assert policy.decide("1.2.3.5", False, "", OUTSIDE_RECIPIENT) == RELAY_DENIED


def test_relay_domain_is_inside_for_recipients_only() -> None:
    policy = make_policy()
    # Backup-MX domain: accepted from anyone as a recipient ...
    assert policy.decide(OUTSIDE_CLIENT, False, OUTSIDE_SENDER, "x@backup.test") is None
    # ... but a sender in it does not make an outside client inside.
    assert policy.decide(OUTSIDE_CLIENT, False, "x@backup.test", OUTSIDE_RECIPIENT) == RELAY_DENIED
    assert policy.is_relay_domain("backup.test")
    assert not policy.is_local_domain("backup.test")
    assert policy.accepts_for("backup.test")


def test_own_names_are_local() -> None:
    policy = make_policy()
    assert policy.is_local_domain("MAIL.example.test")
    assert policy.is_local_domain("[127.0.0.10]")
    assert policy.decide(OUTSIDE_CLIENT, False, "", "postmaster@mail.example.test") is None
    assert policy.decide(OUTSIDE_CLIENT, False, "", "u@[127.0.0.10]") is None
    assert policy.decide(OUTSIDE_CLIENT, False, "", "u@[127.0.0.11]") == RELAY_DENIED


def test_domains_match_exactly_unless_configured_with_a_leading_dot() -> None:
    policy = make_policy()
    assert policy.is_local_domain("EXAMPLE.test")
    assert policy.is_local_domain("example.test.")
    assert not policy.is_local_domain("evil-example.test")
    assert not policy.is_local_domain("a.example.test")
    assert not policy.is_local_domain("example.test.evil")
    assert not policy.is_relay_domain("x.backup.test")
    assert policy.is_local_domain("a.sub.example.test")
    assert policy.is_local_domain("b.a.sub.example.test")
    assert not policy.is_local_domain("sub.example.test")
    assert not policy.is_local_domain("xsub.example.test")
    assert policy.decide(OUTSIDE_CLIENT, False, "", "u@a.example.test") == RELAY_DENIED


def test_percent_and_bang_hacks_do_not_relay() -> None:
    policy = make_policy()
    # The domain is the part after the last "@"; "%" and "!" are just local-part characters.
    assert policy.decide(OUTSIDE_CLIENT, False, "", "friend%elsewhere.test@example.test") is None
    assert (
        policy.decide(OUTSIDE_CLIENT, False, "", "example.test!friend@elsewhere.test")
        == RELAY_DENIED
    )
    assert policy.decide(OUTSIDE_CLIENT, False, "", "friend@elsewhere.test@example") == RELAY_DENIED


@pytest.mark.parametrize(
    ("client", "inside"),
    [
        ("127.0.1.1", True),
        ("127.0.1.255", True),
        ("127.0.2.1", False),
        ("::ffff:127.0.1.9", True),
        ("::ffff:127.0.2.9", False),
        ("fd12::1", True),
        ("fe80::1%eth0", False),
        ("2001:db8::1", False),
        ("", False),
        ("not-an-ip", False),
    ],
)
def test_inside_networks(client: str, inside: bool) -> None:
    policy = make_policy()
    assert policy.is_inside_network(client) is inside
    expected = None if inside else RELAY_DENIED
    assert policy.decide(client, False, "", OUTSIDE_RECIPIENT) == expected


def test_recipient_without_domain_is_not_local() -> None:
    assert make_policy().decide(OUTSIDE_CLIENT, False, "", "postmaster") == RELAY_DENIED
