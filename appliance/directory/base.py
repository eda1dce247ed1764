"""What every directory backend (file, LDAP) offers the mail and POP3 code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred


class DirectoryUnavailable(Exception):
    """The directory could not answer (LDAP down, file unreadable): a temporary failure (R-2)."""


@dataclass(frozen=True)
class User:
    """One mailbox owner.

    ``login`` is the full address used to log in (virtual domains keep users
    apart); ``mailbox`` is the Maildir path relative to the mail root
    (``example.test/alice``: tmp, new and cur live directly inside it);
    ``addresses`` are every address that delivers to this user and that the
    user may send as.
    """

    login: str
    mailbox: str
    addresses: tuple[str, ...]


class Directory(Protocol):
    def find_user(self, address: str) -> Deferred[User | None]:
        """The user an address (lower-cased, extension already removed) belongs to, or None.

        Errbacks with DirectoryUnavailable when the directory cannot tell.
        """

    def authenticate(self, login: str, password: str) -> Deferred[User | None]:
        """The user when the password is right, None when it is wrong.

        Errbacks with DirectoryUnavailable when the directory cannot tell.
        """
