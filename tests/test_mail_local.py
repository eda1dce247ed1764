"""Local recipient resolution: aliases, extensions, virtual domains, role addresses, directory outages."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.defer import Deferred

from appliance.directory.base import Directory, DirectoryUnavailable, User
from appliance.mail.aliases import parse_aliases
from appliance.mail.interfaces import RecipientCheck, Reply
from appliance.mail.local import (
    LocalRecipients,
    MailboxTarget,
    RemoteTarget,
    UnknownRecipient,
)
from tests.test_mail_queue_support import failure, result


class FakeDirectory:
    """An in-memory Directory: users by address; ``down`` makes every lookup fail."""

    def __init__(self, *users: User) -> None:
        self.users = {a: u for u in users for a in u.addresses}
        self.down = False
        self.lookups: list[str] = []

    def find_user(self, address: str) -> Deferred[User | None]:
        self.lookups.append(address)
        if self.down:
            return defer.fail(DirectoryUnavailable("ldap down"))
        return defer.succeed(self.users.get(address))

    def authenticate(self, login: str, password: str) -> Deferred[User | None]:
        return defer.succeed(None)


ALICE = User("alice@example.test", "example.test/alice", ("alice@example.test",))
BOB = User("bob@example.test", "example.test/bob", ("bob@example.test",))
MARY_ANN = User("mary-ann@example.test", "example.test/mary-ann", ("mary-ann@example.test",))
VBOB = User("bob@virtual.test", "virtual.test/bob", ("bob@virtual.test",))

ALIASES = """\
postmaster: alice
abuse: postmaster
staff: alice, bob, carol@remote.test, ghost
self: self, alice
loop1: loop2
loop2: loop1
alice-copy: alice, alice+x, bob
info@virtual.test: bob
list@virtual.test: bob, friend@remote.test
deep: d1
d1: d2
d2: d3
d3: alice
"""


def make(**kw) -> tuple[LocalRecipients, FakeDirectory]:  # type: ignore[no-untyped-def]
    directory = FakeDirectory(ALICE, BOB, MARY_ANN, VBOB)
    table, errors = parse_aliases(ALIASES)
    assert errors == []
    d: Directory = directory
    return LocalRecipients(d, table, ("example.test", "virtual.test"), **kw), directory


def resolve(lr: LocalRecipients, address: str) -> list[object]:
    return list(result(lr.resolve(address)))


def box(path: str, address: str) -> MailboxTarget:
    return MailboxTarget(path, address)


def test_is_a_recipient_check() -> None:
    lr, _ = make()
    check: RecipientCheck = lr
    assert result(check.check_recipient("alice@example.test")) is None


def test_plain_users_and_case() -> None:
    lr, _ = make()
    assert resolve(lr, "Alice@EXAMPLE.test.") == [box("example.test/alice", "alice@example.test")]
    assert resolve(lr, "bob@virtual.test") == [box("virtual.test/bob", "bob@virtual.test")]


def test_virtual_domains_are_separate() -> None:
    lr, _ = make()
    # bare aliases apply to the primary domain only
    assert resolve(lr, "staff@example.test")
    failure(lr.resolve("staff@virtual.test")).trap(UnknownRecipient)
    failure(lr.resolve("alice@virtual.test")).trap(UnknownRecipient)
    assert resolve(lr, "info@virtual.test") == [box("virtual.test/bob", "bob@virtual.test")]
    assert resolve(lr, "list@virtual.test") == [
        box("virtual.test/bob", "bob@virtual.test"),
        RemoteTarget("friend@remote.test"),
    ]


def test_extensions() -> None:
    lr, _ = make()
    # Delivered-To keeps the extension
    assert resolve(lr, "alice+news@example.test") == [
        box("example.test/alice", "alice+news@example.test")
    ]
    assert resolve(lr, "alice-news@example.test") == [
        box("example.test/alice", "alice-news@example.test")
    ]
    # an exact name wins over a shorter one; the longest match is tried first
    assert resolve(lr, "mary-ann@example.test") == [
        box("example.test/mary-ann", "mary-ann@example.test")
    ]
    assert resolve(lr, "mary-ann+x@example.test") == [
        box("example.test/mary-ann", "mary-ann+x@example.test")
    ]
    failure(lr.resolve("+x@example.test")).trap(UnknownRecipient)
    only_plus, _ = make(extension_separators="+")
    failure(only_plus.resolve("alice-news@example.test")).trap(UnknownRecipient)
    # an alias reached through an extension
    assert len(resolve(lr, "staff+x@example.test")) == 3


def test_alias_expansion_mixed_and_deduplicated() -> None:
    lr, _ = make()
    assert resolve(lr, "staff@example.test") == [
        box("example.test/alice", "alice@example.test"),
        box("example.test/bob", "bob@example.test"),
        RemoteTarget("carol@remote.test"),
    ]  # ghost@example.test reaches nobody: logged and skipped
    assert resolve(lr, "alice-copy@example.test") == [
        box("example.test/alice", "alice@example.test"),
        box("example.test/bob", "bob@example.test"),
    ]
    assert resolve(lr, "deep@example.test") == [box("example.test/alice", "alice@example.test")]


def test_alias_loops_terminate() -> None:
    lr, _ = make()
    failure(lr.resolve("loop1@example.test")).trap(UnknownRecipient)
    assert resolve(lr, "self@example.test") == [box("example.test/alice", "alice@example.test")]
    shallow, _ = make(max_depth=2)
    failure(shallow.resolve("deep@example.test")).trap(UnknownRecipient)


def test_role_addresses_always_routable() -> None:
    lr, _ = make()
    alice = [box("example.test/alice", "alice@example.test")]
    assert resolve(lr, "postmaster@example.test") == alice
    assert resolve(lr, "POSTMASTER@virtual.test") == alice
    assert resolve(lr, "abuse@virtual.test") == alice
    assert resolve(lr, "hostmaster@example.test") == alice
    assert resolve(lr, "postmaster") == alice  # RCPT TO:<Postmaster> (RFC 5321 4.5.1)
    assert resolve(lr, "postmaster+x@virtual.test") == alice
    other, _ = make(role_target="bob@virtual.test")
    assert resolve(other, "hostmaster@example.test") == [
        box("virtual.test/bob", "bob@virtual.test")
    ]
    # a role target that reaches nobody does not loop
    broken, _ = make(role_target="nobody@example.test")
    failure(broken.resolve("hostmaster@virtual.test")).trap(UnknownRecipient)
    assert not make(role_addresses=())[0].is_local("x@remote.test")


def test_check_recipient_replies() -> None:
    lr, directory = make()
    assert result(lr.check_recipient("bob+x@example.test")) is None
    assert result(lr.check_recipient("someone@remote.test")) is None  # not ours to judge
    reply = result(lr.check_recipient("nobody@example.test"))
    assert isinstance(reply, Reply)
    assert (reply.code, reply.enhanced) == (550, "5.1.1")
    assert "nobody@example.test" in reply.text
    directory.down = True
    reply = result(lr.check_recipient("alice@example.test"))
    assert reply is not None and (reply.code, reply.enhanced) == (451, "4.4.3")
    failure(lr.resolve("alice@example.test")).trap(DirectoryUnavailable)


def test_unexpected_error_is_temporary() -> None:
    lr, directory = make()

    def boom(address: str) -> Deferred[User | None]:
        return defer.fail(RuntimeError("bug"))

    directory.find_user = boom  # type: ignore[method-assign]
    reply = result(lr.check_recipient("alice@example.test"))
    assert reply is not None and reply.code == 451


def test_directory_gets_full_lower_case_address() -> None:
    lr, directory = make()
    result(lr.check_recipient("Bob@Virtual.Test"))
    assert directory.lookups == ["bob@virtual.test"]


def test_is_local() -> None:
    lr, _ = make()
    assert lr.is_local("x@EXAMPLE.test")
    assert lr.is_local("x@virtual.test")
    assert not lr.is_local("x@remote.test")
    assert lr.is_local("postmaster")
