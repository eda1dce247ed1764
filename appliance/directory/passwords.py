"""Password hashing for the file directory (P-1), with nothing but the standard library.

A stored hash is one self-describing string,
``$scrypt$n=16384,r=8,p=1$<salt, base64>$<hash, base64>``, so the cost can be
raised later without breaking old entries.  Verifying costs tens of
milliseconds of CPU by design: call :func:`verify_password` off the reactor
thread (``FileDirectory`` does it through a thread pool).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass

SCHEME = "scrypt"
DEFAULT_N = 16384
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32

# Bounds on parameters read from a file: a hostile or mistyped cost must not
# make one login eat gigabytes of memory or minutes of CPU.
_MAX_N = 1 << 20
_MAX_R = 32
_MAX_P = 16


class InvalidHash(ValueError):
    """A stored password hash string is not one this module understands."""


@dataclass(frozen=True)
class ScryptHash:
    """The parts of a parsed ``$scrypt$`` string."""

    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def encode(self) -> str:
        """The self-describing string form."""
        salt = base64.b64encode(self.salt).decode("ascii")
        digest = base64.b64encode(self.digest).decode("ascii")
        return f"${SCHEME}$n={self.n},r={self.r},p={self.p}${salt}${digest}"


def _derive(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # scrypt needs 128 * r * n bytes (plus a little); OpenSSL's default cap is 32 MiB.
    maxmem = 128 * r * (n + p + 2) + (1 << 20)
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen
    )


def _check_params(n: int, r: int, p: int) -> None:
    if n < 2 or n > _MAX_N or n & (n - 1):
        raise InvalidHash(f"scrypt n must be a power of two between 2 and {_MAX_N}, not {n}")
    if not 1 <= r <= _MAX_R:
        raise InvalidHash(f"scrypt r must be between 1 and {_MAX_R}, not {r}")
    if not 1 <= p <= _MAX_P:
        raise InvalidHash(f"scrypt p must be between 1 and {_MAX_P}, not {p}")


def hash_password(
    password: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P
) -> str:
    """Hash a password with a fresh random salt; the result is what the users file stores."""
    _check_params(n, r, p)
    salt = os.urandom(SALT_BYTES)
    return ScryptHash(n, r, p, salt, _derive(password, salt, n, r, p, HASH_BYTES)).encode()


def parse_hash(encoded: str) -> ScryptHash:
    """Parse a stored hash string; raises InvalidHash saying what is wrong with it."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "":
        raise InvalidHash("password hash is not of the form $scrypt$n=..,r=..,p=..$salt$hash")
    if parts[1] != SCHEME:
        raise InvalidHash(f"unknown password hash scheme {parts[1]!r}")
    params: dict[str, int] = {}
    for item in parts[2].split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in ("n", "r", "p") or key in params or not value.isdigit():
            raise InvalidHash(f"bad scrypt parameter {item!r}")
        params[key] = int(value)
    if set(params) != {"n", "r", "p"}:
        raise InvalidHash("scrypt parameters n, r and p are all required")
    _check_params(params["n"], params["r"], params["p"])
    try:
        salt = base64.b64decode(parts[3], validate=True)
        digest = base64.b64decode(parts[4], validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidHash(f"bad base64 in password hash: {e}") from None
    if len(salt) < 8:
        raise InvalidHash("password hash salt is shorter than 8 bytes")
    if len(digest) < 16:
        raise InvalidHash("password hash is shorter than 16 bytes")
    return ScryptHash(params["n"], params["r"], params["p"], salt, digest)


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches the stored hash, compared in constant time.

    CPU-heavy: run it in a thread.  A malformed hash raises InvalidHash (the
    file loader rejects those up front, so this means a programming error).
    """
    h = parse_hash(encoded)
    candidate = _derive(password, h.salt, h.n, h.r, h.p, len(h.digest))
    return hmac.compare_digest(candidate, h.digest)


_DUMMY_HASH: str | None = None


def verify_dummy(password: str) -> bool:
    """Spend the same time as a real verification and return False.

    Used for unknown or locked users so the response time does not tell an
    attacker which login names exist.
    """
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password("\x00 no such user \x00")
    verify_password(password, _DUMMY_HASH)
    return False


def needs_rehash(encoded: str) -> bool:
    """Whether a stored hash uses weaker parameters than the current defaults."""
    try:
        h = parse_hash(encoded)
    except InvalidHash:
        return True
    return h.n < DEFAULT_N or h.r < DEFAULT_R or h.p < DEFAULT_P
