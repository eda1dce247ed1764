"""Domain names: presentation text <-> uncompressed wire form, and helpers on wire names.

Names are ``bytes`` in wire form (RFC 1035 3.1): length-prefixed labels ending
with the zero-length root label, case preserved.  Comparisons are
case-insensitive over ASCII (RFC 4343) and go through ``canonical``.  Text is
handled as ``str`` where every character is one octet (files are decoded as
latin-1), so ``\\DDD`` escapes and raw 8-bit octets round-trip.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from appliance.dns.rr import ROOT, canonical

__all__ = [
    "MAX_LABEL",
    "MAX_NAME",
    "ROOT",
    "NameSyntaxError",
    "concat",
    "from_labels",
    "from_text",
    "is_hostname",
    "is_subdomain",
    "is_wildcard",
    "label_count",
    "labels",
    "parent",
    "relativize_text",
    "strip_suffix",
    "to_text",
    "wildcard_for",
]

MAX_LABEL = 63
MAX_NAME = 255

# Octets printed with a backslash in presentation form, as BIND does.
_SPECIAL = frozenset(b'"().;\\@$')


class NameSyntaxError(ValueError):
    """A name in presentation or wire form that is not a valid domain name."""


def from_labels(parts: list[bytes]) -> bytes:
    """Build a wire name from label octet strings (without the root label)."""
    out = bytearray()
    for part in parts:
        if not part:
            raise NameSyntaxError("empty label")
        if len(part) > MAX_LABEL:
            raise NameSyntaxError(f"label longer than {MAX_LABEL} octets")
        out.append(len(part))
        out += part
    out.append(0)
    if len(out) > MAX_NAME:
        raise NameSyntaxError(f"name longer than {MAX_NAME} octets")
    return bytes(out)


def _parse_labels(text: str) -> tuple[list[bytes], bool]:
    """Split presentation text into label octets; also say whether it ended with a dot."""
    if "\\" not in text:
        # Fast path: no escapes, so dots are separators and characters are octets.
        absolute = text.endswith(".")
        body = text[:-1] if absolute else text
        if absolute and not body:
            return [], True
        try:
            return [p.encode("latin-1") for p in body.split(".")], absolute
        except UnicodeEncodeError as e:
            raise NameSyntaxError("character outside one octet") from e
    parts: list[bytes] = []
    cur = bytearray()
    i = 0
    n = len(text)
    absolute = False
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 >= n:
                raise NameSyntaxError("trailing backslash")
            d = text[i + 1]
            if d.isdigit():
                digits = text[i + 1 : i + 4]
                if len(digits) < 3 or not digits.isdigit() or not digits.isascii():
                    raise NameSyntaxError("bad \\DDD escape")
                v = int(digits)
                if v > 255:
                    raise NameSyntaxError("\\DDD escape above 255")
                cur.append(v)
                i += 4
            else:
                cur.append(_octet(d))
                i += 2
            continue
        if c == ".":
            if not cur:
                if i == 0 and n == 1:
                    absolute = True
                    i += 1
                    continue
                raise NameSyntaxError("empty label")
            parts.append(bytes(cur))
            cur = bytearray()
            if i == n - 1:
                absolute = True
            i += 1
            continue
        cur.append(_octet(c))
        i += 1
    if cur:
        parts.append(bytes(cur))
    return parts, absolute


def _octet(c: str) -> int:
    v = ord(c)
    if v > 255:
        raise NameSyntaxError("character outside one octet")
    return v


def from_text(text: str, origin: bytes | None = None) -> bytes:
    """Parse a presentation-form name (RFC 1035 5.1) into wire form.

    ``@`` is the origin; a name without a trailing dot is relative and the
    origin is appended; a relative name without an origin is an error.
    """
    if text == "@":
        if origin is None:
            raise NameSyntaxError("'@' used without an origin")
        return origin
    if not text:
        raise NameSyntaxError("empty name")
    parts, absolute = _parse_labels(text)
    if absolute:
        return from_labels(parts)
    if origin is None:
        raise NameSyntaxError(f"relative name {text!r} without an origin")
    rel = from_labels(parts)
    return concat(rel[:-1], origin)


def concat(prefix: bytes, suffix: bytes) -> bytes:
    """Join label octets ``prefix`` (wire labels without the root) to the wire name ``suffix``."""
    out = prefix + suffix
    if len(out) > MAX_NAME:
        raise NameSyntaxError(f"name longer than {MAX_NAME} octets")
    return out


def label_text(label: bytes) -> str:
    """One label in presentation form with BIND's escaping."""
    out: list[str] = []
    for b in label:
        if b in _SPECIAL:
            out.append("\\" + chr(b))
        elif 0x21 <= b <= 0x7E:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


def to_text(name: bytes, origin: bytes | None = None) -> str:
    """Presentation form of a wire name, absolute (with trailing dot) unless ``origin`` is given.

    With an origin, names under it are printed relative and the origin itself as ``@``.
    """
    if origin is not None:
        rel = strip_suffix(name, origin)
        if rel is not None:
            if rel == b"":
                return "@"
            return ".".join(label_text(lab) for lab in _iter_labels(rel + b"\x00"))
    if name == ROOT:
        return "."
    return "".join(label_text(lab) + "." for lab in _iter_labels(name))


def _iter_labels(name: bytes) -> Iterator[bytes]:
    i = 0
    while True:
        n = name[i]
        if n == 0:
            return
        yield name[i + 1 : i + 1 + n]
        i += n + 1


def labels(name: bytes) -> list[bytes]:
    """The labels of a wire name, leftmost first, without the root label."""
    return list(_iter_labels(name))


def label_offsets(name: bytes) -> list[int]:
    """Offsets of every label in the wire name, including the root label's."""
    out = []
    i = 0
    while True:
        out.append(i)
        n = name[i]
        if n == 0:
            return out
        i += n + 1


def label_count(name: bytes) -> int:
    """Number of labels, not counting the root (RFC 4034 style: ``.`` has 0)."""
    return len(label_offsets(name)) - 1


def validate_wire(name: bytes) -> None:
    """Raise NameSyntaxError unless ``name`` is exactly one well-formed uncompressed wire name."""
    if len(name) > MAX_NAME:
        raise NameSyntaxError(f"name longer than {MAX_NAME} octets")
    i = 0
    while True:
        if i >= len(name):
            raise NameSyntaxError("name not terminated")
        n = name[i]
        if n > MAX_LABEL:
            raise NameSyntaxError("label too long or compressed")
        if n == 0:
            if i != len(name) - 1:
                raise NameSyntaxError("octets after the root label")
            return
        i += n + 1


def wire_length(buf: bytes, offset: int) -> int:
    """Length of the uncompressed wire name that starts at ``offset`` in ``buf``."""
    i = offset
    while True:
        if i >= len(buf):
            raise NameSyntaxError("name runs past the end of the data")
        n = buf[i]
        if n > MAX_LABEL:
            raise NameSyntaxError("label too long or compressed")
        i += n + 1
        if n == 0:
            if i - offset > MAX_NAME:
                raise NameSyntaxError(f"name longer than {MAX_NAME} octets")
            return i - offset


def strip_suffix(name: bytes, suffix: bytes) -> bytes | None:
    """The labels of ``name`` above ``suffix`` (wire, without root), or None if not a subdomain."""
    if len(suffix) > len(name):
        return None
    csuf = canonical(suffix)
    i = 0
    delta = len(name) - len(suffix)
    while i < delta:
        i += name[i] + 1
    if i == delta and canonical(name[i:]) == csuf:
        return name[:i]
    return None


def is_subdomain(name: bytes, ancestor: bytes) -> bool:
    """True if ``name`` equals or is below ``ancestor`` (case-insensitive, label boundaries)."""
    return strip_suffix(name, ancestor) is not None


def parent(name: bytes) -> bytes:
    """The name with its leftmost label removed; the root has no parent."""
    if name == ROOT:
        raise NameSyntaxError("the root has no parent")
    return name[name[0] + 1 :]


def is_wildcard(name: bytes) -> bool:
    """True if the leftmost label is the single asterisk (RFC 4592 2.1.1)."""
    return name[:2] == b"\x01*"


def wildcard_for(name: bytes) -> bytes:
    """``*.`` + name: the wildcard owner that could match children of ``name``."""
    return b"\x01*" + name


def relativize_text(name: bytes, origin: bytes) -> str:
    """Presentation form relative to origin (or absolute when outside it)."""
    return to_text(name, origin)


_HOST_LABEL = re.compile(rb"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")


def is_hostname(name: bytes, wildcard: bool = False) -> bool:
    """RFC 952/1123 host name check as BIND's check-names applies it.

    Letters, digits and hyphens, no hyphen at either end of a label; with
    ``wildcard`` a leading ``*`` label is also allowed.
    """
    labs = labels(name)
    if wildcard and labs and labs[0] == b"*":
        labs = labs[1:]
    return all(_HOST_LABEL.fullmatch(lab) for lab in labs)


def is_mailbox(name: bytes) -> bool:
    """BIND's mailbox check: any first label, host-name rules for the rest."""
    if name == ROOT:
        return True
    return is_hostname(parent(name))
