"""The users file: format, errors, lookups, password checks, atomic edits and the CLI."""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from hashlib import md5
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial import unittest

from appliance.directory import filedb
from appliance.directory.base import DirectoryUnavailable, User
from appliance.directory.filedb import (
    FileDirectory,
    UsersFileError,
    add_user,
    delete_user,
    list_users,
    load_users,
    register_user_commands,
    set_password,
    show_user,
)
from appliance.directory.passwords import hash_password, verify_password


def fast_hash(pw: str) -> str:
    return hash_password(pw, n=1024)


ALICE_HASH = fast_hash("alice-pw")
BOB_HASH = fast_hash("bob-pw")


class SyncReactor:
    """Just enough reactor for deferToThreadPool: callFromThread runs at once."""

    def callFromThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None:
        f(*a, **kw)


class SyncPool:
    """A 'thread pool' that runs the work at once, recording that it was used."""

    def __init__(self, fail: bool = False) -> None:
        self.calls = 0
        self.fail = fail

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *a: Any, **kw: Any
    ) -> None:
        self.calls += 1
        if self.fail:
            on_result(False, Failure(RuntimeError("thread died")))
            return
        try:
            result = f(*a, **kw)
        except Exception:
            on_result(False, Failure())
        else:
            on_result(True, result)


def result_of(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return write(
        tmp_path / "users",
        "# demo users\n"
        f"alice@Example.Test:{ALICE_HASH}::postmaster@example.test, abuse@example.test:\n"
        "\n"
        f"bob@example.test:{BOB_HASH}:custom/bob-box\n"
        "nologin@example.test:*\n"
        f"carol@example.test:{fast_hash('carol-pw')}:::apop:secret\n",
    )


def make_dir(path: Path, pool: Any = None) -> FileDirectory:
    return FileDirectory(str(path), reactor=SyncReactor(), threadpool=pool or SyncPool())


# -- parsing -------------------------------------------------------------


def test_parse_fields_and_defaults(users: Path) -> None:
    data = load_users(str(users))
    assert [e.login for e in data.entries] == [
        "alice@Example.Test",
        "bob@example.test",
        "nologin@example.test",
        "carol@example.test",
    ]
    alice = data.get("ALICE@example.test")
    assert alice is not None
    assert alice.effective_mailbox == "example.test/alice"
    assert alice.addresses == ("postmaster@example.test", "abuse@example.test")
    assert alice.apop_secret is None
    assert alice.to_user() == User(
        "alice@Example.Test",
        "example.test/alice",
        ("alice@Example.Test", "postmaster@example.test", "abuse@example.test"),
    )
    bob = data.get("bob@example.test")
    assert bob is not None and bob.effective_mailbox == "custom/bob-box"
    nologin = data.get("nologin@example.test")
    assert nologin is not None and not nologin.can_login
    carol = data.get("carol@example.test")
    assert carol is not None and carol.apop_secret == "apop:secret"


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("# c\nalice\n", 2, "expected login:password-hash"),
        ("alice:*\n", 1, "bad login"),
        ("a b@x.test:*\n", 1, "whitespace"),
        ("a@x.test:plaintext\n", 1, "bad password hash"),
        ("a@x.test:*:/etc\n", 1, "relative"),
        ("a@x.test:*:x/../y\n", 1, ".. component"),
        ("a@x.test:*\nA@X.TEST:*\n", 2, "already defined on line 1"),
        ("a@x.test:*::b@x.test\nb@x.test:*\n", 2, "already belongs to a@x.test"),
        ("a@x.test:*::not-an-address\n", 1, "bad extra address"),
        ("../x@x.test:*\n", 1, "one of"),
        ("a@x.test:*:::sec\x01ret\n", 1, "control characters"),
    ],
)
def test_errors_name_file_line_and_reason(
    tmp_path: Path, text: str, line: int, fragment: str
) -> None:
    path = write(tmp_path / "users", text)
    with pytest.raises(UsersFileError) as info:
        load_users(str(path))
    assert info.value.line == line
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert fragment in str(info.value)


def test_not_utf8_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"# ok\nal\xffce@x.test:*\n")
    with pytest.raises(UsersFileError, match=r":2: not valid UTF-8"):
        load_users(str(path))
    with pytest.raises(UsersFileError, match="cannot read"):
        load_users(str(tmp_path / "absent"))
    with pytest.raises(UsersFileError):
        FileDirectory(str(tmp_path / "absent"), reactor=SyncReactor())


# -- Directory -----------------------------------------------------------


def test_find_user_by_login_and_alias_case_insensitively(users: Path) -> None:
    d = make_dir(users)
    alice = result_of(d.find_user("alice@example.test"))
    assert isinstance(alice, User) and alice.login == "alice@Example.Test"
    assert result_of(d.find_user("postmaster@example.test")) == alice
    assert result_of(d.find_user("ABUSE@EXAMPLE.TEST")) == alice
    assert result_of(d.find_user("nologin@example.test")).mailbox == "example.test/nologin"
    assert result_of(d.find_user("nobody@example.test")) is None


def test_authenticate_in_thread_pool(users: Path) -> None:
    pool = SyncPool()
    d = make_dir(users, pool)
    user = result_of(d.authenticate("Alice@example.TEST", "alice-pw"))
    assert user is not None and user.mailbox == "example.test/alice"
    assert result_of(d.authenticate("alice@example.test", "wrong")) is None
    assert result_of(d.authenticate("nobody@example.test", "alice-pw")) is None
    assert result_of(d.authenticate("nologin@example.test", "")) is None
    assert result_of(d.authenticate("bob@example.test", "bob-pw")).login == "bob@example.test"
    # Every check, including unknown and locked users, cost a (dummy) hash in the pool.
    assert pool.calls == 5


def test_authenticate_thread_failure_is_directory_unavailable(users: Path) -> None:
    d = make_dir(users, SyncPool(fail=True))
    with pytest.raises(DirectoryUnavailable):
        result_of(d.authenticate("alice@example.test", "alice-pw"))


def test_apop(users: Path) -> None:
    d = make_dir(users)
    challenge = b"<1.2@host>"
    good = md5(challenge + b"apop:secret").hexdigest()
    assert result_of(d.authenticate_apop("carol@example.test", challenge, good)).login == (
        "carol@example.test"
    )
    assert result_of(d.authenticate_apop("carol@example.test", challenge, good.upper())) is not None
    assert result_of(d.authenticate_apop("carol@example.test", b"<other>", good)) is None
    assert result_of(d.authenticate_apop("carol@example.test", challenge, "zz\u00e9")) is None
    # No APOP secret stored: APOP is refused even with the right password.
    alice = md5(challenge + b"alice-pw").hexdigest()
    assert result_of(d.authenticate_apop("alice@example.test", challenge, alice)) is None


def test_reload_keeps_old_data_when_broken(users: Path) -> None:
    d = make_dir(users)
    write(users, f"dave@example.test:{ALICE_HASH}\n")
    d.reload()
    assert result_of(d.find_user("dave@example.test")) is not None
    assert result_of(d.find_user("alice@example.test")) is None
    write(users, "broken\n")
    with pytest.raises(UsersFileError):
        d.reload()
    assert result_of(d.find_user("dave@example.test")) is not None


class RealThreadPoolTests(unittest.TestCase):
    """The default path: the reactor's own thread pool runs scrypt."""

    def test_authenticate_with_reactor_pool(self) -> Deferred[None]:
        tmp = tempfile.mkdtemp(prefix="filedb-")
        self.addCleanup(shutil.rmtree, tmp, True)
        path = Path(tmp) / "users"
        write(path, f"alice@example.test:{ALICE_HASH}\n")
        d = FileDirectory(str(path))
        result = d.authenticate("alice@example.test", "alice-pw")

        def check(user: User | None) -> None:
            self.assertIsNotNone(user)

        return result.addCallback(check)


# -- editing -------------------------------------------------------------


def test_add_creates_private_file_and_refuses_duplicates(tmp_path: Path) -> None:
    path = str(tmp_path / "users")
    entry = add_user(
        path, "alice@example.test", "pw1", addresses=["a@example.test"], hasher=fast_hash
    )
    assert entry.line == 2
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert os.stat(path).st_gid == os.stat(tmp_path).st_gid
    assert open(path).read().startswith("# login:")
    with pytest.raises(ValueError, match="already exists"):
        add_user(path, "ALICE@example.test", "x", hasher=fast_hash)
    with pytest.raises(ValueError, match="already belongs"):
        add_user(path, "bob@example.test", "x", addresses=["a@example.test"], hasher=fast_hash)
    with pytest.raises(ValueError):
        add_user(path, "bad login", "x", hasher=fast_hash)
    with pytest.raises(ValueError):
        add_user(path, "c@example.test", "x", mailbox="../etc", hasher=fast_hash)
    add_user(path, "bob@example.test", None, mailbox="boxes/bob")
    users = list_users(path)
    assert [u.login for u in users] == ["alice@example.test", "bob@example.test"]
    assert verify_password("pw1", users[0].password_hash)
    assert not users[1].can_login and users[1].mailbox == "boxes/bob"


def test_edits_keep_comments_mode_and_other_lines(users: Path) -> None:
    os.chmod(users, 0o620)
    before = users.read_text().splitlines()
    set_password(str(users), "bob@example.test", "new-bob", hasher=fast_hash)
    after = users.read_text().splitlines()
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o620
    assert len(after) == len(before)
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert changed == [3]
    bob = show_user(str(users), "bob@example.test")
    assert verify_password("new-bob", bob.password_hash) and bob.mailbox == "custom/bob-box"

    delete_user(str(users), "alice@example.test")
    text = users.read_text()
    assert "# demo users" in text and "alice@" not in text
    with pytest.raises(KeyError):
        delete_user(str(users), "alice@example.test")
    with pytest.raises(KeyError):
        show_user(str(users), "alice@example.test")


def test_set_password_follows_apop_choice(users: Path) -> None:
    carol = set_password(str(users), "carol@example.test", "carol2", hasher=fast_hash)
    assert carol.apop_secret == "carol2"
    carol = set_password(str(users), "carol@example.test", "carol3", apop=False, hasher=fast_hash)
    assert carol.apop_secret is None
    bob = set_password(str(users), "bob@example.test", "b", apop=True, hasher=fast_hash)
    assert bob.apop_secret == "b"
    bob = set_password(str(users), "bob@example.test", None, apop=False)
    assert not bob.can_login
    with pytest.raises(KeyError):
        set_password(str(users), "nobody@example.test", "x", hasher=fast_hash)


def test_crash_before_rename_leaves_old_file(users: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = users.read_bytes()

    def boom(src: str, dst: str) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(filedb.os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        add_user(str(users), "dave@example.test", "pw", hasher=fast_hash)
    with pytest.raises(OSError, match="simulated crash"):
        delete_user(str(users), "alice@example.test")
    assert users.read_bytes() == original
    load_users(str(users))
    assert [p.name for p in users.parent.iterdir()] == ["users"]


def test_concurrent_editors_do_not_lose_updates(tmp_path: Path) -> None:
    path = str(tmp_path / "users")
    logins = [f"user{i}@example.test" for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda login: add_user(path, login, None), logins))
    assert sorted(u.login for u in list_users(path)) == sorted(logins)
    assert sorted(os.listdir(tmp_path)) == ["users"]


def test_edit_refuses_to_touch_a_broken_file(tmp_path: Path) -> None:
    path = write(tmp_path / "users", "broken line\n")
    with pytest.raises(UsersFileError):
        add_user(str(path), "a@example.test", "pw", hasher=fast_hash)
    assert path.read_text() == "broken line\n"


def test_file_without_final_newline(tmp_path: Path) -> None:
    path = write(tmp_path / "users", f"a@example.test:{ALICE_HASH}")
    add_user(str(path), "b@example.test", None)
    assert [u.login for u in list_users(str(path))] == ["a@example.test", "b@example.test"]


# -- CLI -----------------------------------------------------------------


def run_cli(argv: list[str], stdin: str = "", monkeypatch: pytest.MonkeyPatch | None = None) -> int:
    parser = argparse.ArgumentParser(prog="appliance user")
    register_user_commands(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    if monkeypatch is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    result: int = args.func(args)
    return result


@pytest.fixture(autouse=True)
def _fast_cli_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filedb, "hash_password", fast_hash)


def test_cli_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "users")
    base = ["--users", path]
    assert (
        run_cli(
            [
                "add",
                *base,
                "alice@example.test",
                "--password-stdin",
                "--address",
                "postmaster@example.test",
            ],
            "pw-a\n",
            monkeypatch,
        )
        == 0
    )
    assert run_cli(["add", *base, "bob@example.test", "--no-password"]) == 0
    assert run_cli(["list", *base]) == 0
    out = capsys.readouterr().out
    assert "alice@example.test\texample.test/alice" in out
    assert "bob@example.test\texample.test/bob  (login disabled)" in out

    assert (
        run_cli(["passwd", *base, "bob@example.test", "--password-stdin"], "pw-b\n", monkeypatch)
        == 0
    )
    assert verify_password("pw-b", show_user(path, "bob@example.test").password_hash)
    assert run_cli(["show", *base, "alice@example.test"]) == 0
    out = capsys.readouterr().out
    assert "postmaster@example.test" in out and "apop:      no" in out

    assert run_cli(["del", *base, "bob@example.test"]) == 0
    assert [u.login for u in list_users(path)] == ["alice@example.test"]


def test_cli_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "users")
    base = ["--users", path]
    assert run_cli(["del", *base, "nobody@example.test"]) == 1
    assert "no such user nobody@example.test" in capsys.readouterr().err
    assert run_cli(["add", *base, "a@example.test", "--password-stdin"], "\n", monkeypatch) == 1
    assert "empty password" in capsys.readouterr().err
    answers = iter(["one", "two"])
    monkeypatch.setattr(filedb.getpass, "getpass", lambda prompt="": next(answers))
    assert run_cli(["add", *base, "a@example.test"]) == 1
    assert "do not match" in capsys.readouterr().err
    assert not os.path.exists(path)
    answers = iter(["same", "same"])
    assert run_cli(["add", *base, "a@example.test"]) == 0
    assert verify_password("same", show_user(path, "a@example.test").password_hash)
    write(Path(path), "broken\n")
    assert run_cli(["list", *base]) == 1
    assert f"{path}:1:" in capsys.readouterr().err
