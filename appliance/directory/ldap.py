"""The LDAP user directory (MISSION P-2) through ldap3, with server failover and the canary rule R-2.

Every LDAP call blocks, so each lookup runs whole (connect, StartTLS,
service bind, search, unbind) in a thread pool, never on the reactor
thread.  Servers are tried in order, starting with the last one that
answered; a server that cannot be reached, times out or fails mid-way
passes the question to the next one.  When no server can answer, the
result is :class:`~appliance.directory.base.DirectoryUnavailable`, which
the SMTP side turns into ``451 4.4.3`` and never into "user unknown".

R-2: a directory that answers "no such entry" may simply be broken (an
empty replica, a wrong base DN after a migration).  So when a recipient is
not found, the configured *canary* address, which must always exist, is
looked up too; when it is missing as well, the directory is treated as
unavailable.

Passwords are checked by binding as the user's DN (RFC 4513 5.1.3); an
empty password is refused before any bind, because LDAP treats a simple
bind with an empty password as an anonymous bind that succeeds (RFC 4513
5.1.2).
"""

from __future__ import annotations

import dataclasses
import math
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import ldap3
from ldap3.core.exceptions import LDAPException, LDAPInvalidCredentialsResult
from ldap3.utils.conv import escape_filter_chars
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from appliance.directory.base import DirectoryUnavailable, User
from appliance.directory.filedb import check_mailbox, default_mailbox

log = Logger(namespace="appliance.directory.ldap")

_T = TypeVar("_T")

DEFAULT_FILTER = "(|(mail={address})(mailLocalAddress={address}))"


@dataclass(frozen=True)
class LDAPSettings:
    """How to find users in the directory.

    ``servers`` are URIs (``ldap://host:389``, ``ldaps://host:636``), tried
    in order.  ``bind_dn``/``bind_password`` are the service account for
    searches (empty: anonymous).  ``user_filter`` finds the entry owning
    an address (``{address}``, ``{local}`` and ``{domain}`` are replaced by
    escaped values); ``login_filter`` finds the entry for a login (default:
    ``user_filter``).  ``login_attribute`` holds the login (the canonical
    address), ``address_attributes`` every address of the user,
    ``mailbox_attribute`` (optional) the Maildir path relative to the mail
    root (default ``<domain>/<local>`` of the login).  ``starttls`` upgrades
    ``ldap://`` connections; ``ca_file`` and ``verify`` control certificate
    checks.  ``timeout`` bounds connecting and every operation.
    ``canary`` is the address that must always be found (R-2).
    """

    servers: tuple[str, ...]
    base_dn: str
    bind_dn: str = ""
    bind_password: str = ""
    user_filter: str = DEFAULT_FILTER
    login_filter: str | None = None
    login_attribute: str = "mail"
    address_attributes: tuple[str, ...] = ("mail", "mailLocalAddress")
    mailbox_attribute: str | None = None
    starttls: bool = False
    ca_file: str | None = None
    verify: bool = True
    timeout: float = 5.0
    canary: str | None = None


class _Unusable(Exception):
    """This server's answer cannot be trusted (canary missing, ambiguous entry): try the next one."""


def _filter(template: str, address: str) -> str:
    local, _, domain = address.rpartition("@")
    return template.format(
        address=escape_filter_chars(address),
        local=escape_filter_chars(local),
        domain=escape_filter_chars(domain),
    )


def _values(attributes: dict[str, Any], name: str) -> list[str]:
    for key, value in attributes.items():
        if key.lower() == name.lower():
            items = value if isinstance(value, list | tuple) else [value]
            return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in items]
    return []


class LDAPDirectory:
    """A :class:`~appliance.directory.base.Directory` backed by one or more LDAP servers.

    ``threadpool`` runs the blocking ldap3 calls (default: the reactor's).
    """

    def __init__(
        self, settings: LDAPSettings, reactor: Any = None, threadpool: ThreadPool | None = None
    ) -> None:
        if not settings.servers:
            raise ValueError("at least one LDAP server is needed")
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.settings = settings
        self._reactor = reactor
        self._threadpool = threadpool
        self._tls = ldap3.Tls(
            validate=ssl.CERT_REQUIRED if settings.verify else ssl.CERT_NONE,
            ca_certs_file=settings.ca_file,
        )
        self._preferred = 0

    # ------------------------------------------------------------------ Directory

    def find_user(self, address: str) -> Deferred[User | None]:
        """The user owning ``address``; DirectoryUnavailable when no server can tell (R-2)."""
        return self._in_thread(self._find_user, address)

    def authenticate(self, login: str, password: str) -> Deferred[User | None]:
        """Bind as the user's DN with ``password``: the User, or None when it is wrong."""
        if not login or not password:
            return succeed(None)
        return self._in_thread(self._authenticate, login, password)

    def reload(self) -> None:
        """Nothing is cached, so a reload has nothing to re-read."""

    # ------------------------------------------------------------------ in the thread

    def _in_thread(self, f: Callable[..., _T], *args: Any) -> Deferred[_T]:
        pool = self._threadpool if self._threadpool is not None else self._reactor.getThreadPool()
        d: Deferred[_T] = deferToThreadPool(self._reactor, pool, f, *args)

        def unexpected(failure: Failure) -> Failure:
            if failure.check(DirectoryUnavailable):
                return failure
            log.failure("LDAP lookup failed unexpectedly", failure)
            return Failure(DirectoryUnavailable("LDAP lookup failed"))

        return d.addErrback(unexpected)

    def _server(self, index: int) -> Any:
        # A fresh Server each time: ldap3 marks an address that once failed as unusable
        # for minutes, which would keep a restarted LDAP server out of service.
        return ldap3.Server(
            self.settings.servers[index],
            get_info=ldap3.NONE,
            connect_timeout=self.settings.timeout,
            tls=self._tls,
        )

    def _connection(self, server: Any, user: str | None, password: str | None) -> Any:
        settings = self.settings
        connection = ldap3.Connection(
            server,
            user=user or None,
            password=password or None,
            auto_bind=ldap3.AUTO_BIND_NONE,
            client_strategy=ldap3.SYNC,
            read_only=True,
            raise_exceptions=True,
            # ldap3 packs this into SO_RCVTIMEO as whole seconds.
            receive_timeout=max(1, math.ceil(settings.timeout)),
            auto_referrals=False,
        )
        try:
            connection.open()
            if settings.starttls and not server.ssl:
                connection.start_tls()
            connection.bind()
        except BaseException:
            _unbind(connection)
            raise
        return connection

    def _with_server(
        self, what: str, operation: Callable[[Any, Any], _T], service_bind: bool = True
    ) -> _T:
        """Run ``operation(server, connection)`` on the first server that can answer.

        ``connection`` is bound as the service account, or None when
        ``service_bind`` is false (the operation opens its own).
        """
        count = len(self.settings.servers)
        problems: list[str] = []
        for step in range(count):
            index = (self._preferred + step) % count
            server = self._server(index)
            connection = None
            try:
                if service_bind:
                    connection = self._connection(
                        server, self.settings.bind_dn, self.settings.bind_password
                    )
                result = operation(server, connection)
            except (LDAPException, OSError, _Unusable) as error:
                problems.append(f"{self.settings.servers[index]}: {error}")
                log.warn(
                    "LDAP server {server} failed during {what}: {error}",
                    server=self.settings.servers[index],
                    what=what,
                    error=str(error) or type(error).__name__,
                )
                continue
            finally:
                if connection is not None:
                    _unbind(connection)
            self._preferred = index
            return result
        raise DirectoryUnavailable("no LDAP server answered: " + "; ".join(problems))

    def _search(self, connection: Any, template: str, address: str) -> dict[str, Any] | None:
        settings = self.settings
        attributes = {settings.login_attribute, *settings.address_attributes}
        if settings.mailbox_attribute:
            attributes.add(settings.mailbox_attribute)
        connection.search(
            settings.base_dn,
            _filter(template, address),
            search_scope=ldap3.SUBTREE,
            attributes=sorted(attributes),
            size_limit=2,
            time_limit=max(1, int(settings.timeout)),
        )
        entries = [r for r in connection.response or () if r.get("type") == "searchResEntry"]
        if len(entries) > 1:
            raise _Unusable(f"{address} matches more than one entry")
        return entries[0] if entries else None

    def _check_canary(self, connection: Any, address: str) -> None:
        canary = self.settings.canary
        if canary is None or canary == address.lower():
            return
        if self._search(connection, self.settings.user_filter, canary) is None:
            raise _Unusable(f"canary {canary} not found either")

    def _user(self, entry: dict[str, Any], address: str) -> User:
        settings = self.settings
        attributes = entry.get("attributes") or {}
        logins = _values(attributes, settings.login_attribute)
        if not logins or "@" not in logins[0]:
            raise _Unusable(f"entry {entry.get('dn')} has no usable {settings.login_attribute}")
        login = logins[0].lower()
        addresses = [login]
        for name in settings.address_attributes:
            for value in _values(attributes, name):
                if value.lower() not in addresses:
                    addresses.append(value.lower())
        mailbox = default_mailbox(login)
        if settings.mailbox_attribute:
            stored = _values(attributes, settings.mailbox_attribute)
            if stored:
                problem = check_mailbox(stored[0])
                if problem is not None:
                    raise _Unusable(f"entry {entry.get('dn')}: {problem}")
                mailbox = stored[0]
        return User(login=login, mailbox=mailbox, addresses=tuple(addresses))

    def _find_user(self, address: str) -> User | None:
        def operation(server: Any, connection: Any) -> User | None:
            entry = self._search(connection, self.settings.user_filter, address)
            if entry is None:
                self._check_canary(connection, address)
                return None
            return self._user(entry, address)

        return self._with_server("recipient lookup", operation)

    def _authenticate(self, login: str, password: str) -> User | None:
        template = self.settings.login_filter or self.settings.user_filter

        def operation(server: Any, connection: Any) -> tuple[User, str] | None:
            entry = self._search(connection, template, login)
            if entry is None:
                self._check_canary(connection, login)
                return None
            return self._user(entry, login), str(entry["dn"])

        found = self._with_server("login lookup", operation)
        if found is None:
            return None
        user, dn = found

        def bind(server: Any, _: Any) -> bool:
            try:
                _unbind(self._connection(server, dn, password))
            except LDAPInvalidCredentialsResult:
                return False
            return True

        return user if self._with_server("password check", bind, service_bind=False) else None


def _unbind(connection: Any) -> None:
    """Unbind and close; also closes the socket ldap3 leaves behind after a failed connect."""
    try:
        connection.unbind()
    except (LDAPException, OSError):
        pass
    sock = getattr(connection, "socket", None)
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def settings_from_config(config: Any) -> LDAPSettings:
    """LDAPSettings from the config's LDAPConfig (a dataclass with the same field names)."""
    return settings_from_mapping(dataclasses.asdict(config))


def settings_from_mapping(values: dict[str, Any]) -> LDAPSettings:
    """LDAPSettings from a mapping of the same names (the config's ``[directory.ldap]`` table)."""
    known = set(LDAPSettings.__dataclass_fields__)
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown LDAP settings: {', '.join(sorted(unknown))}")
    data = dict(values)
    for key in ("servers", "address_attributes"):
        if key in data and isinstance(data[key], Sequence):
            data[key] = tuple(data[key])
    return LDAPSettings(**data)


class LDAPDirectoryService(Service):
    """The LDAP directory as a service (the counterpart of DirectoryService for the file backend)."""

    name = "directory"

    def __init__(self, settings: LDAPSettings, reactor: Any, threadpool: Any) -> None:
        self.directory = LDAPDirectory(settings, reactor, threadpool)
        if settings.canary is None:
            log.warn(
                "directory.ldap.canary is not set: a broken or empty directory would make "
                "every recipient unknown (550) instead of deferring mail (451)"
            )

    def reconfigure(self, config: Any) -> None:
        log.info("directory: LDAP settings take effect after a restart")


__all__ = [
    "DEFAULT_FILTER",
    "LDAPDirectory",
    "LDAPDirectoryService",
    "LDAPSettings",
    "settings_from_config",
    "settings_from_mapping",
]
