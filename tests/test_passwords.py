"""Password hashing: format, salting, verification, malformed input."""

from __future__ import annotations

import base64

import pytest

from appliance.directory import passwords
from appliance.directory.passwords import (
    InvalidHash,
    hash_password,
    needs_rehash,
    parse_hash,
    verify_dummy,
    verify_password,
)

FAST = {"n": 1024, "r": 8, "p": 1}


def test_default_hash_is_self_describing_and_verifies() -> None:
    h = hash_password("s3cret")
    assert h.startswith("$scrypt$n=16384,r=8,p=1$")
    parsed = parse_hash(h)
    assert len(parsed.salt) == passwords.SALT_BYTES
    assert len(parsed.digest) == passwords.HASH_BYTES
    assert verify_password("s3cret", h)
    assert not verify_password("s3cret ", h)
    assert not needs_rehash(h)


def test_salt_is_random_per_hash() -> None:
    a = hash_password("same", **FAST)
    b = hash_password("same", **FAST)
    assert a != b
    assert parse_hash(a).salt != parse_hash(b).salt
    assert verify_password("same", a) and verify_password("same", b)


def test_unicode_passwords() -> None:
    h = hash_password("pässwörd-日本", **FAST)
    assert verify_password("pässwörd-日本", h)
    assert not verify_password("passwort-日本", h)


def test_weaker_parameters_need_rehash() -> None:
    assert needs_rehash(hash_password("x", **FAST))
    assert needs_rehash("garbage")


def test_verify_uses_stored_parameters() -> None:
    h = hash_password("pw", n=2048, r=4, p=2)
    assert parse_hash(h).n == 2048
    assert verify_password("pw", h)


def test_dummy_verification_never_succeeds() -> None:
    assert verify_dummy("") is False
    assert verify_dummy("\x00 no such user \x00") is False


def _good_parts() -> list[str]:
    return hash_password("pw", **FAST).split("$")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "plaintext",
        "$md5$x$y$z",
        "$scrypt$n=1024,r=8$c2FsdHNhbHQ=$aGFzaGhhc2hoYXNoaGFzaA==",
        "$scrypt$n=1000,r=8,p=1$c2FsdHNhbHQ=$aGFzaGhhc2hoYXNoaGFzaA==",
        "$scrypt$n=2097152,r=8,p=1$c2FsdHNhbHQ=$aGFzaGhhc2hoYXNoaGFzaA==",
        "$scrypt$n=1024,r=99,p=1$c2FsdHNhbHQ=$aGFzaGhhc2hoYXNoaGFzaA==",
        "$scrypt$n=1024,r=8,p=1,p=1$c2FsdHNhbHQ=$aGFzaGhhc2hoYXNoaGFzaA==",
        "$scrypt$n=1024,r=8,p=x$c2FsdHNhbHQ=$aGFzaGhhc2hoYXNoaGFzaA==",
        "$scrypt$n=1024,r=8,p=1$!!!$aGFzaGhhc2hoYXNoaGFzaA==",
        "$scrypt$n=1024,r=8,p=1$c2FsdA==$aGFzaGhhc2hoYXNoaGFzaA==",
        "$scrypt$n=1024,r=8,p=1$c2FsdHNhbHQ=$aGFzaA==",
        "$scrypt$n=1024,r=8,p=1$c2FsdHNhbHQ=$aGFzaGhhc2hoYXNoaGFzaA==$extra",
    ],
)
def test_malformed_hashes_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidHash):
        parse_hash(bad)
    with pytest.raises(InvalidHash):
        verify_password("pw", bad)


def test_tampered_digest_fails() -> None:
    parts = _good_parts()
    digest = bytearray(base64.b64decode(parts[4]))
    digest[0] ^= 1
    parts[4] = base64.b64encode(bytes(digest)).decode()
    assert not verify_password("pw", "$".join(parts))


def test_hash_password_rejects_bad_parameters() -> None:
    with pytest.raises(InvalidHash):
        hash_password("x", n=1000)
