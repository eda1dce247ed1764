"""The users file: a local user directory (P-1), its safe editing, and the ``appliance user`` commands.

Format: UTF-8 text, one user per line, ``#`` comments and blank lines
ignored (and kept when the tools rewrite the file)::

    # login:password-hash:mailbox:extra-addresses:apop-secret
    alice@example.test:$scrypt$n=16384,r=8,p=1$c2FsdA==$aGFzaA==::postmaster@example.test,abuse@example.test:
    bob@example.test:$scrypt$n=16384,r=8,p=1$...$...:example.test/bob

* ``login``: the full address the user logs in with (virtual domains keep
  user spaces apart).  Matching is case-insensitive (the whole address: the
  mail code hands lower-cased addresses to the directory).
* ``password-hash``: a ``$scrypt$`` string from :mod:`.passwords`, or ``*``
  (or empty) for an account that receives mail but cannot log in.
* ``mailbox``: the Maildir, relative to the mail root; empty means
  ``<domain>/<local>``.  Never absolute, never ``..``.
* ``extra-addresses``: comma-separated addresses that also deliver to this
  user and that the user may send as.
* ``apop-secret``: only for users who opted in to APOP (RFC 1939 section 7),
  which needs the plaintext secret at rest; everything after the fourth
  ``:`` (so it may itself contain ``:``).  Trailing fields may be omitted.

The editing functions lock the file's directory, rewrite the whole file to a
temporary file, fsync it, rename it over the old one and fsync the
directory, so a crash at any moment leaves either the old or the new file.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import hmac
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from hashlib import md5
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from appliance.directory.base import DirectoryUnavailable, User
from appliance.directory.passwords import (
    InvalidHash,
    hash_password,
    parse_hash,
    verify_dummy,
    verify_password,
)

__all__ = [
    "FileDirectory",
    "UserEntry",
    "UsersFile",
    "UsersFileError",
    "add_user",
    "delete_user",
    "list_users",
    "load_users",
    "parse_users",
    "register_user_commands",
    "set_password",
    "show_user",
]

_T = TypeVar("_T")
_LOCKED = "*"
_HEADER = "# login:password-hash:mailbox:extra-addresses:apop-secret\n"


class UsersFileError(Exception):
    """The users file is unreadable or wrong; the message names file, line and reason."""

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class UserEntry:
    """One line of the users file, parsed."""

    login: str
    password_hash: str  # "" when login is disabled
    mailbox: str  # as written; "" means the default
    addresses: tuple[str, ...] = ()
    apop_secret: str | None = None
    line: int | None = field(default=None, compare=False)

    @property
    def effective_mailbox(self) -> str:
        """The Maildir path relative to the mail root."""
        return self.mailbox or default_mailbox(self.login)

    @property
    def can_login(self) -> bool:
        return bool(self.password_hash)

    def to_user(self) -> User:
        """The directory-neutral view the mail and POP3 code use."""
        return User(
            login=self.login,
            mailbox=self.effective_mailbox,
            addresses=(self.login, *self.addresses),
        )

    def to_line(self) -> str:
        """The line as written to the file (with its newline)."""
        fields = [
            self.login,
            self.password_hash or _LOCKED,
            self.mailbox,
            ",".join(self.addresses),
            self.apop_secret or "",
        ]
        while len(fields) > 2 and fields[-1] == "":
            fields.pop()
        return ":".join(fields) + "\n"


@dataclass(frozen=True)
class UsersFile:
    """A parsed users file: the entries plus the raw lines, so rewrites keep comments."""

    path: str
    lines: tuple[str, ...]
    entries: tuple[UserEntry, ...]
    by_login: dict[str, UserEntry]
    by_address: dict[str, UserEntry]

    def get(self, login: str) -> UserEntry | None:
        return self.by_login.get(login.lower())


def default_mailbox(login: str) -> str:
    """``<domain>/<local>`` for a login address."""
    local, _, domain = login.rpartition("@")
    return f"{domain.lower()}/{local}"


def _bad_chars(text: str) -> bool:
    return any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in text)


def check_address(address: str) -> str | None:
    """Why an address cannot be used as a login or extra address, or None when it can."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return f"{address!r} is not of the form local@domain"
    if _bad_chars(address):
        return f"{address!r} contains whitespace or control characters"
    if any(c in address for c in ":,/\\"):
        return f"{address!r} contains one of : , / \\"
    if local in (".", "..") or domain.startswith("."):
        return f"{address!r} would make an unsafe mailbox path"
    return None


def check_mailbox(mailbox: str) -> str | None:
    """Why a mailbox path is unsafe (absolute, ``..``, empty parts), or None."""
    if mailbox.startswith("/"):
        return f"mailbox {mailbox!r} must be relative to the mail root"
    if _bad_chars(mailbox) or ":" in mailbox or "\\" in mailbox:
        return f"mailbox {mailbox!r} contains whitespace, control characters, : or \\"
    parts = mailbox.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return f"mailbox {mailbox!r} has an empty, . or .. component"
    return None


def _parse_line(path: str, number: int, text: str) -> UserEntry:
    fields = text.split(":", 4)
    if len(fields) < 2:
        raise UsersFileError(
            path, number, "expected login:password-hash[:mailbox[:addresses[:apop]]]"
        )
    login = fields[0].strip()
    why = check_address(login)
    if why:
        raise UsersFileError(path, number, f"bad login: {why}")
    pw = fields[1].strip()
    if pw in ("", _LOCKED, "!"):
        pw = ""
    else:
        try:
            parse_hash(pw)
        except InvalidHash as e:
            raise UsersFileError(path, number, f"bad password hash for {login}: {e}") from None
    mailbox = fields[2].strip() if len(fields) > 2 else ""
    if mailbox:
        why = check_mailbox(mailbox)
        if why:
            raise UsersFileError(path, number, why)
    addresses: list[str] = []
    if len(fields) > 3 and fields[3].strip():
        for a in fields[3].split(","):
            a = a.strip()
            why = check_address(a)
            if why:
                raise UsersFileError(path, number, f"bad extra address: {why}")
            addresses.append(a)
    apop = fields[4] if len(fields) > 4 and fields[4] != "" else None
    if apop is not None and any(ord(c) < 0x20 or c == "\x7f" for c in apop):
        raise UsersFileError(path, number, "APOP secret contains control characters")
    return UserEntry(login, pw, mailbox, tuple(addresses), apop, number)


def parse_users(path: str, text: str) -> UsersFile:
    """Parse users file text; raises UsersFileError naming the first bad line."""
    lines = tuple(text.splitlines(keepends=True))
    entries: list[UserEntry] = []
    by_login: dict[str, UserEntry] = {}
    by_address: dict[str, UserEntry] = {}
    for number, raw in enumerate(lines, 1):
        body = raw.rstrip("\r\n")
        if not body.strip() or body.lstrip().startswith("#"):
            continue
        entry = _parse_line(path, number, body)
        key = entry.login.lower()
        if key in by_login:
            raise UsersFileError(
                path, number, f"login {entry.login} already defined on line {by_login[key].line}"
            )
        for address in (entry.login, *entry.addresses):
            other = by_address.get(address.lower())
            if other is not None and other.login.lower() != key:
                raise UsersFileError(
                    path,
                    number,
                    f"address {address} already belongs to {other.login} (line {other.line})",
                )
            by_address[address.lower()] = entry
        by_login[key] = entry
        entries.append(entry)
    return UsersFile(path, lines, tuple(entries), by_login, by_address)


def load_users(path: str) -> UsersFile:
    """Read and parse the users file; UsersFileError when missing, unreadable or wrong."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsersFileError(path, None, f"cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UsersFileError(path, line, "not valid UTF-8") from None
    return parse_users(path, text)


# ----------------------------------------------------------------------------
# Safe editing


@contextlib.contextmanager
def _edit_lock(path: str) -> Iterator[None]:
    """Serialise editors (two ``appliance user`` runs at once).

    The lock is a flock on the file's directory: the file itself is replaced
    on every edit, so a lock on it would not hold across the rename, and a
    separate lock file would litter /etc/appliance.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_for_edit(path: str) -> UsersFile:
    if not os.path.exists(path):
        return parse_users(path, "")
    return load_users(path)


def write_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text``: temp file, fsync, rename, fsync the directory.

    Keeps the old file's mode and owner; a new file gets 0640 and the
    group of its directory (it holds password hashes).
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(prefix=".users.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            if st is not None:
                os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
                with contextlib.suppress(PermissionError):
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
            else:
                # New file: readable by the directory's group (the daemon's, as
                # packaged: /etc/appliance is root:appliance), never by others.
                os.fchmod(f.fileno(), 0o640)
                with contextlib.suppress(PermissionError):
                    os.fchown(f.fileno(), -1, os.stat(directory).st_gid)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _rewrite(path: str, edit: Callable[[UsersFile], list[str]]) -> UsersFile:
    """Lock, load, let ``edit`` produce the new lines, validate them, write atomically."""
    with _edit_lock(path):
        current = _load_for_edit(path)
        lines = edit(current)
        text = "".join(lines)
        new = parse_users(path, text)  # never write a file we could not load back
        write_atomically(path, text)
        return new


def _replace_line(current: UsersFile, entry: UserEntry, line: str | None) -> list[str]:
    lines = list(current.lines)
    assert entry.line is not None
    if line is None:
        del lines[entry.line - 1]
    else:
        lines[entry.line - 1] = line
    return lines


def _require(current: UsersFile, login: str) -> UserEntry:
    entry = current.get(login)
    if entry is None:
        raise KeyError(f"no such user {login}")
    return entry


def add_user(
    path: str,
    login: str,
    password: str | None,
    *,
    mailbox: str = "",
    addresses: Sequence[str] = (),
    apop: bool = False,
    hasher: Callable[[str], str] | None = None,
) -> UserEntry:
    """Add a user (``password=None``: receives mail, cannot log in).

    ``apop=True`` also stores the password in plaintext for APOP.  Raises
    ValueError for a bad login/mailbox/address or one already taken,
    UsersFileError when the existing file is broken.
    """
    for a in (login, *addresses):
        why = check_address(a)
        if why:
            raise ValueError(why)
    if mailbox:
        why = check_mailbox(mailbox)
        if why:
            raise ValueError(why)
    if apop and password is None:
        raise ValueError("APOP needs a password")
    pw_hash = (hasher or hash_password)(password) if password is not None else ""
    entry = UserEntry(login, pw_hash, mailbox, tuple(addresses), password if apop else None)

    def edit(current: UsersFile) -> list[str]:
        if current.get(login) is not None:
            raise ValueError(f"user {login} already exists")
        for a in (login, *addresses):
            owner = current.by_address.get(a.lower())
            if owner is not None:
                raise ValueError(f"address {a} already belongs to {owner.login}")
        lines = list(current.lines)
        if not lines:
            lines.append(_HEADER)
        elif not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(entry.to_line())
        return lines

    new = _rewrite(path, edit)
    result = new.get(login)
    assert result is not None
    return result


def set_password(
    path: str,
    login: str,
    password: str | None,
    *,
    apop: bool | None = None,
    hasher: Callable[[str], str] | None = None,
) -> UserEntry:
    """Change (or with None, disable) a user's password.

    ``apop=None`` keeps the user's APOP choice (a stored APOP secret follows
    the new password); True/False turns APOP on/off.  KeyError for an
    unknown user.
    """
    pw_hash = (hasher or hash_password)(password) if password is not None else ""

    def edit(current: UsersFile) -> list[str]:
        entry = _require(current, login)
        keep_apop = entry.apop_secret is not None if apop is None else apop
        if keep_apop and password is None:
            raise ValueError("APOP needs a password")
        new_entry = replace(
            entry, password_hash=pw_hash, apop_secret=password if keep_apop else None
        )
        return _replace_line(current, entry, new_entry.to_line())

    new = _rewrite(path, edit)
    result = new.get(login)
    assert result is not None
    return result


def delete_user(path: str, login: str) -> None:
    """Remove a user's line (the Maildir is left alone).  KeyError for an unknown user."""

    def edit(current: UsersFile) -> list[str]:
        return _replace_line(current, _require(current, login), None)

    _rewrite(path, edit)


def list_users(path: str) -> list[UserEntry]:
    """Every user in file order (a missing file has none)."""
    return list(_load_for_edit(path).entries)


def show_user(path: str, login: str) -> UserEntry:
    """One user's entry; KeyError when there is none."""
    return _require(_load_for_edit(path), login)


# ----------------------------------------------------------------------------
# The Directory implementation


class FileDirectory:
    """A :class:`~appliance.directory.base.Directory` backed by the users file.

    Lookups are answered from memory; password checks (scrypt, tens of ms of
    CPU) run in ``threadpool`` (default: the reactor's pool).  ``reload()``
    re-reads the file (SIGHUP); when the new file is broken the old data
    stays in service and UsersFileError is raised for the caller to log.
    """

    log = Logger()

    def __init__(
        self, path: str, reactor: Any = None, threadpool: ThreadPool | None = None
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._path = path
        self._reactor = reactor
        self._threadpool = threadpool
        self._data = load_users(path)

    @property
    def path(self) -> str:
        return self._path

    def reload(self) -> None:
        """Re-read the file; on error keep serving the old data and raise UsersFileError."""
        self._data = load_users(self._path)
        self.log.info(
            "users file {path} loaded: {count} users",
            path=self._path,
            count=len(self._data.entries),
        )

    def _in_thread(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        pool = self._threadpool if self._threadpool is not None else self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, f, *args)

    def find_user(self, address: str) -> Deferred[User | None]:
        """The user owning ``address`` (login or extra address), case-insensitively."""
        entry = self._data.by_address.get(address.lower())
        return succeed(entry.to_user() if entry is not None else None)

    def authenticate(self, login: str, password: str) -> Deferred[User | None]:
        """Check a password in the thread pool; unknown and locked users cost the same time."""
        entry = self._data.get(login)
        if entry is None or not entry.can_login:
            d: Deferred[bool] = self._in_thread(verify_dummy, password)
        else:
            d = self._in_thread(verify_password, password, entry.password_hash)

        def done(ok: bool) -> User | None:
            return entry.to_user() if ok and entry is not None else None

        def failed(f: Any) -> Any:
            self.log.failure("password check for {login} failed", f, login=login)
            return fail(DirectoryUnavailable("password check failed"))

        return d.addCallbacks(done, failed)

    def authenticate_apop(self, login: str, challenge: bytes, digest: str) -> Deferred[User | None]:
        """APOP (RFC 1939 section 7): ``digest`` is hex MD5 of the banner timestamp + secret."""
        entry = self._data.get(login)
        if entry is None or entry.apop_secret is None or not entry.can_login:
            return succeed(None)
        expected = md5(challenge + entry.apop_secret.encode("utf-8")).hexdigest()
        if hmac.compare_digest(expected.encode("ascii"), digest.lower().encode("ascii", "replace")):
            return succeed(entry.to_user())
        return succeed(None)


# ----------------------------------------------------------------------------
# CLI: `appliance user add|passwd|del|list|show`


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
        if not password:
            raise ValueError("empty password on standard input")
        return password
    first = getpass.getpass("New password: ")
    second = getpass.getpass("Repeat password: ")
    if first != second:
        raise ValueError("passwords do not match")
    if not first:
        raise ValueError("empty password")
    return first


def _print_entry(entry: UserEntry, out: Any) -> None:
    print(f"login:     {entry.login}", file=out)
    print(f"mailbox:   {entry.effective_mailbox}", file=out)
    print(f"addresses: {', '.join((entry.login, *entry.addresses))}", file=out)
    print(f"password:  {'set' if entry.can_login else 'none (login disabled)'}", file=out)
    print(f"apop:      {'yes' if entry.apop_secret is not None else 'no'}", file=out)


def _run(action: Callable[[], int]) -> int:
    try:
        return action()
    except UsersFileError as e:
        print(f"appliance user: {e}", file=sys.stderr)
        return 1
    except KeyError as e:
        print(f"appliance user: {e.args[0]}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"appliance user: {e}", file=sys.stderr)
        return 1


def cmd_add(args: argparse.Namespace) -> int:
    """``appliance user add LOGIN``."""

    def action() -> int:
        password = None if args.no_password else _read_password(args)
        entry = add_user(
            args.users,
            args.login,
            password,
            mailbox=args.mailbox or "",
            addresses=args.address or (),
            apop=args.apop,
        )
        print(f"added {entry.login} (mailbox {entry.effective_mailbox})")
        return 0

    return _run(action)


def cmd_passwd(args: argparse.Namespace) -> int:
    """``appliance user passwd LOGIN``."""

    def action() -> int:
        show_user(args.users, args.login)  # fail before prompting for an unknown user
        password = None if args.disable else _read_password(args)
        apop = True if args.apop else False if args.no_apop else None
        set_password(args.users, args.login, password, apop=apop)
        print(f"password for {args.login} {'disabled' if password is None else 'changed'}")
        return 0

    return _run(action)


def cmd_del(args: argparse.Namespace) -> int:
    """``appliance user del LOGIN``."""

    def action() -> int:
        delete_user(args.users, args.login)
        print(f"deleted {args.login} (its Maildir was left in place)")
        return 0

    return _run(action)


def cmd_list(args: argparse.Namespace) -> int:
    """``appliance user list``."""

    def action() -> int:
        for entry in list_users(args.users):
            flag = "" if entry.can_login else "  (login disabled)"
            print(f"{entry.login}\t{entry.effective_mailbox}{flag}")
        return 0

    return _run(action)


def cmd_show(args: argparse.Namespace) -> int:
    """``appliance user show LOGIN``."""

    def action() -> int:
        _print_entry(show_user(args.users, args.login), sys.stdout)
        return 0

    return _run(action)


def register_user_commands(subparsers: Any, *, default_users_path: str | None = None) -> None:
    """Add ``add``, ``passwd``, ``del``, ``list``, ``show`` to an argparse subparsers object.

    Each sets ``func`` to a handler taking the parsed Namespace and returning
    an exit status.  ``--users PATH`` is required unless a default is given.
    """

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--users",
            default=default_users_path,
            required=default_users_path is None,
            metavar="PATH",
            help="the users file",
        )

    def password_source(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the password from the first line of standard input instead of prompting",
        )

    p = subparsers.add_parser("add", help="add a user")
    common(p)
    p.add_argument("login", help="full address the user logs in with")
    password_source(p)
    p.add_argument("--no-password", action="store_true", help="mail only, login disabled")
    p.add_argument("--mailbox", help="Maildir relative to the mail root (default domain/local)")
    p.add_argument("--address", action="append", help="an extra address (repeatable)")
    p.add_argument("--apop", action="store_true", help="allow APOP (stores the password in clear)")
    p.set_defaults(func=cmd_add)

    p = subparsers.add_parser("passwd", help="change a user's password")
    common(p)
    p.add_argument("login")
    password_source(p)
    p.add_argument("--disable", action="store_true", help="remove the password (no login)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--apop", action="store_true", help="also allow APOP")
    g.add_argument("--no-apop", action="store_true", help="stop allowing APOP")
    p.set_defaults(func=cmd_passwd)

    p = subparsers.add_parser("del", help="delete a user (the Maildir stays)")
    common(p)
    p.add_argument("login")
    p.set_defaults(func=cmd_del)

    p = subparsers.add_parser("list", help="list users")
    common(p)
    p.set_defaults(func=cmd_list)

    p = subparsers.add_parser("show", help="show one user")
    common(p)
    p.add_argument("login")
    p.set_defaults(func=cmd_show)
