"""SASL PLAIN (RFC 4616) and LOGIN exchanges for SMTP AUTH (RFC 4954), without any I/O.

An exchange is fed the client's decoded responses and answers either with
the next challenge (bytes the server base64-encodes after ``334``) or with
the :class:`Credentials` to check.  Decoding, cancellation (``*``) and the
checking itself belong to the protocol; this module only knows the shapes
of the two mechanisms every mail client speaks.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    from appliance.directory.base import User

#: The mechanisms offered, in the order they are advertised after ``AUTH``.
MECHANISMS = ("PLAIN", "LOGIN")

#: RFC 4616 2: authzid, authcid and passwd are each at most 255 octets.
_MAX_FIELD = 255


class Authenticator(Protocol):
    """What AUTH needs of the directory: a password check that runs off the reactor thread."""

    def authenticate(self, login: str, password: str) -> Deferred[User | None]:
        """The user when the password is right, None when wrong; errback DirectoryUnavailable."""
        ...


class SASLError(Exception):
    """The client's response is malformed (bad base64, wrong PLAIN layout, not UTF-8)."""


@dataclass(frozen=True)
class Credentials:
    """What the client claims: who it is (``login``), as whom it acts (``authzid``), its secret."""

    login: str
    password: str
    authzid: str = ""


def decode_response(text: bytes) -> bytes:
    """Strict base64 of one SASL response line (RFC 4954 4); raises SASLError when invalid."""
    stripped = text.strip(b" ")
    if not stripped:
        return b""
    try:
        return base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError) as error:
        raise SASLError("invalid base64") from error


def encode_challenge(challenge: bytes) -> str:
    """The text after ``334 `` for a challenge."""
    return base64.b64encode(challenge).decode("ascii")


def _text(data: bytes, what: str) -> str:
    if len(data) > _MAX_FIELD:
        raise SASLError(f"{what} too long")
    try:
        value = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SASLError(f"{what} is not UTF-8") from error
    if any(c in value for c in "\x00\r\n"):
        raise SASLError(f"{what} contains control characters")
    return value


def parse_plain(message: bytes) -> Credentials:
    """``[authzid] NUL authcid NUL passwd`` (RFC 4616 2) -> Credentials; raises SASLError."""
    parts = message.split(b"\x00")
    if len(parts) != 3:
        raise SASLError("PLAIN response needs exactly two NUL separators")
    authzid, login, password = parts
    if not login or not password:
        raise SASLError("PLAIN response lacks the login or the password")
    return Credentials(
        _text(login, "login"), _text(password, "password"), _text(authzid, "authzid")
    )


class Exchange:
    """One mechanism's conversation: :meth:`step` takes a decoded response (None: none yet)."""

    name = ""

    def step(self, response: bytes | None) -> bytes | Credentials:
        """The next challenge to send, or the credentials once the client has said enough."""
        raise NotImplementedError


class PlainExchange(Exchange):
    """PLAIN: an empty challenge unless the response came with the AUTH command."""

    name = "PLAIN"

    def step(self, response: bytes | None) -> bytes | Credentials:
        if response is None:
            return b""
        return parse_plain(response)


class LoginExchange(Exchange):
    """LOGIN (draft-murchison-sasl-login): ``Username:`` then ``Password:`` challenges."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._login: str | None = None

    def step(self, response: bytes | None) -> bytes | Credentials:
        if response is None:
            return b"Username:"
        if self._login is None:
            login = _text(response, "login")
            if not login:
                raise SASLError("empty login")
            self._login = login
            return b"Password:"
        password = _text(response, "password")
        if not password:
            raise SASLError("empty password")
        return Credentials(self._login, password)


def new_exchange(mechanism: str) -> Exchange | None:
    """A fresh exchange for ``mechanism`` (case-insensitive), None when it is not offered."""
    name = mechanism.upper()
    if name == "PLAIN":
        return PlainExchange()
    if name == "LOGIN":
        return LoginExchange()
    return None


__all__ = [
    "MECHANISMS",
    "Authenticator",
    "Credentials",
    "Exchange",
    "LoginExchange",
    "PlainExchange",
    "SASLError",
    "decode_response",
    "encode_challenge",
    "new_exchange",
    "parse_plain",
]
