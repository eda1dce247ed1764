"""Per-type RDATA: zone-file text -> wire bytes, wire -> presentation text, and embedded names.

Rdata is kept as uncompressed wire bytes (see ``rr.py``).  ``from_tokens``
turns the tokens of one zone-file record (after owner, TTL, class and type)
into wire form, resolving relative names against the origin; ``to_text``
prints wire rdata the way BIND/dig print it; any type, known or not, may be
written in the RFC 3597 generic form ``\\# LEN HEX``.

``name_offsets`` and ``compressible_names`` locate the domain names inside
rdata: the wire codec may compress only the ones RFC 3597 section 4 allows
(NS, MD, MF, CNAME, SOA, MB, MG, MR, PTR, MINFO, MX), and comparisons of
rdata fold the case of names for the types of RFC 4034 section 6.2.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple

from appliance.dns import names
from appliance.dns.names import NameSyntaxError

__all__ = [
    "RdataError",
    "Token",
    "canonical_rdata",
    "class_from_text",
    "class_to_text",
    "compressible_names",
    "from_tokens",
    "from_wire_check",
    "name_offsets",
    "parse_ttl",
    "to_text",
    "type_from_text",
    "type_to_text",
]


class RdataError(ValueError):
    """Rdata text or wire form that is not valid for its type."""


class Token(NamedTuple):
    """One zone-file token: its text (escapes still in place) and whether it was quoted."""

    text: str
    quoted: bool = False


# --- type and class mnemonics ---------------------------------------------------------------

TYPES: dict[str, int] = {
    "A": 1,
    "NS": 2,
    "MD": 3,
    "MF": 4,
    "CNAME": 5,
    "SOA": 6,
    "MB": 7,
    "MG": 8,
    "MR": 9,
    "NULL": 10,
    "WKS": 11,
    "PTR": 12,
    "HINFO": 13,
    "MINFO": 14,
    "MX": 15,
    "TXT": 16,
    "RP": 17,
    "AFSDB": 18,
    "RT": 21,
    "AAAA": 28,
    "SRV": 33,
    "NAPTR": 35,
    "KX": 36,
    "DNAME": 39,
    "OPT": 41,
    "DS": 43,
    "SSHFP": 44,
    "RRSIG": 46,
    "NSEC": 47,
    "DNSKEY": 48,
    "TLSA": 52,
    "CDS": 59,
    "CDNSKEY": 60,
    "SPF": 99,
    "IXFR": 251,
    "AXFR": 252,
    "ANY": 255,
    "URI": 256,
    "CAA": 257,
}
_TYPE_NAMES = {v: k for k, v in TYPES.items()}

CLASSES: dict[str, int] = {"IN": 1, "CH": 3, "HS": 4, "NONE": 254, "ANY": 255}
_CLASS_NAMES = {v: k for k, v in CLASSES.items()}
_CLASS_NAMES[3] = "CH"


def type_from_text(text: str) -> int | None:
    """The type number for a mnemonic or ``TYPEnnn``; None if the text is not a type."""
    up = text.upper()
    if up in TYPES:
        return TYPES[up]
    if up.startswith("TYPE") and up[4:].isdigit() and up[4:].isascii():
        v = int(up[4:])
        if v > 0xFFFF:
            raise RdataError(f"type {text} out of range")
        return v
    return None


def type_to_text(rtype: int) -> str:
    """The mnemonic for a type, or ``TYPEnnn`` (RFC 3597 section 5)."""
    return _TYPE_NAMES.get(rtype) or f"TYPE{rtype}"


def class_from_text(text: str) -> int | None:
    """The class number for a mnemonic or ``CLASSnnn``; None if the text is not a class."""
    up = text.upper()
    if up in CLASSES:
        return CLASSES[up]
    if up == "CHAOS":
        return 3
    if up == "HESIOD":
        return 4
    if up.startswith("CLASS") and up[5:].isdigit() and up[5:].isascii():
        v = int(up[5:])
        if v > 0xFFFF:
            raise RdataError(f"class {text} out of range")
        return v
    return None


def class_to_text(rclass: int) -> str:
    """The mnemonic for a class, or ``CLASSnnn``."""
    return _CLASS_NAMES.get(rclass) or f"CLASS{rclass}"


# --- numbers and TTLs -------------------------------------------------------------------------

_UNITS = {"W": 604800, "D": 86400, "H": 3600, "M": 60, "S": 1}


def parse_ttl(text: str) -> int:
    """A TTL in BIND syntax: plain seconds, or unit groups like ``1h30m`` / ``1w`` (case-insensitive).

    Every number after the first must carry a unit; the result must fit in 32 bits.
    """
    if not text or not text.isascii():
        raise RdataError(f"bad TTL {text!r}")
    if text.isdigit():
        v = int(text)
    else:
        v = 0
        num = ""
        for c in text.upper():
            if c.isdigit():
                num += c
            elif c in _UNITS and num:
                v += int(num) * _UNITS[c]
                num = ""
            else:
                raise RdataError(f"bad TTL {text!r}")
        if num:
            raise RdataError(f"bad TTL {text!r}")
    if v > 0xFFFFFFFF:
        raise RdataError(f"TTL {text!r} out of range")
    return v


def is_ttl(text: str) -> bool:
    """True if the token reads as a TTL (used to tell a TTL field from a class or type)."""
    try:
        parse_ttl(text)
    except RdataError:
        return False
    return True


def _uint(text: str, bits: int, what: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise RdataError(f"bad {what} {text!r}")
    v = int(text)
    if v >= 1 << bits:
        raise RdataError(f"{what} {text} out of range")
    return v


# --- character strings --------------------------------------------------------------------------


def unescape(text: str) -> bytes:
    """Resolve ``\\DDD`` and ``\\X`` escapes in a token (RFC 1035 5.1)."""
    if "\\" not in text:
        try:
            return text.encode("latin-1")
        except UnicodeEncodeError as e:
            raise RdataError("character outside one octet") from e
    out = bytearray()
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 >= n:
                raise RdataError("trailing backslash")
            d = text[i + 1]
            if d.isdigit():
                digits = text[i + 1 : i + 4]
                if len(digits) < 3 or not digits.isdigit() or not digits.isascii():
                    raise RdataError("bad \\DDD escape")
                v = int(digits)
                if v > 255:
                    raise RdataError("\\DDD escape above 255")
                out.append(v)
                i += 4
                continue
            c = d
            i += 1
        v = ord(c)
        if v > 255:
            raise RdataError("character outside one octet")
        out.append(v)
        i += 1
    return bytes(out)


def _charstring(tok: Token) -> bytes:
    raw = unescape(tok.text)
    if len(raw) > 255:
        raise RdataError("character string longer than 255 octets")
    return bytes([len(raw)]) + raw


def _charstring_text(data: bytes) -> str:
    out = ['"']
    for b in data:
        if b == 0x22 or b == 0x5C:
            out.append("\\" + chr(b))
        elif 0x20 <= b <= 0x7E:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    out.append('"')
    return "".join(out)


# --- per-type parsers ---------------------------------------------------------------------------

Parser = Callable[[list[Token], bytes], bytes]


def _name(tok: Token, origin: bytes) -> bytes:
    try:
        return names.from_text(tok.text, origin)
    except NameSyntaxError as e:
        raise RdataError(f"bad name {tok.text!r}: {e}") from e


def _need(tokens: list[Token], n: int, what: str) -> None:
    if len(tokens) < n:
        raise RdataError(f"{what}: too few fields")
    if len(tokens) > n:
        raise RdataError(f"{what}: extra fields {' '.join(t.text for t in tokens[n:])!r}")


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IPV4 = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")


def _p_a(tokens: list[Token], origin: bytes) -> bytes:
    _need(tokens, 1, "A")
    text = tokens[0].text
    if not _IPV4.fullmatch(text):
        raise RdataError(f"bad IPv4 address {text!r}")
    return bytes(map(int, text.split(".")))


def _p_aaaa(tokens: list[Token], origin: bytes) -> bytes:
    _need(tokens, 1, "AAAA")
    text = tokens[0].text
    if "%" in text or "/" in text:
        raise RdataError(f"bad IPv6 address {text!r}")
    try:
        return ipaddress.IPv6Address(text).packed
    except ValueError as e:
        raise RdataError(f"bad IPv6 address {text!r}") from e


def _p_name(tokens: list[Token], origin: bytes) -> bytes:
    _need(tokens, 1, "name")
    return _name(tokens[0], origin)


def _p_two_names(tokens: list[Token], origin: bytes) -> bytes:
    _need(tokens, 2, "two names")
    return _name(tokens[0], origin) + _name(tokens[1], origin)


def _p_pref_name(tokens: list[Token], origin: bytes) -> bytes:
    _need(tokens, 2, "preference and name")
    return struct.pack("!H", _uint(tokens[0].text, 16, "preference")) + _name(tokens[1], origin)


def _p_soa(tokens: list[Token], origin: bytes) -> bytes:
    _need(tokens, 7, "SOA")
    out = _name(tokens[0], origin) + _name(tokens[1], origin)
    serial = _uint(tokens[2].text, 32, "serial")
    timers = [parse_ttl(t.text) for t in tokens[3:7]]
    return out + struct.pack("!5I", serial, *timers)


def _p_txt(tokens: list[Token], origin: bytes) -> bytes:
    if not tokens:
        raise RdataError("TXT: no strings")
    return b"".join(_charstring(t) for t in tokens)


def _p_hinfo(tokens: list[Token], origin: bytes) -> bytes:
    _need(tokens, 2, "HINFO")
    return _charstring(tokens[0]) + _charstring(tokens[1])


def _p_srv(tokens: list[Token], origin: bytes) -> bytes:
    _need(tokens, 4, "SRV")
    nums = [_uint(t.text, 16, "SRV field") for t in tokens[:3]]
    return struct.pack("!3H", *nums) + _name(tokens[3], origin)


def _p_caa(tokens: list[Token], origin: bytes) -> bytes:
    _need(tokens, 3, "CAA")
    flags = _uint(tokens[0].text, 8, "CAA flags")
    tag = unescape(tokens[1].text)
    if not tag or len(tag) > 255 or not tag.isalnum() or not tag.isascii():
        raise RdataError(f"bad CAA tag {tokens[1].text!r}")
    return bytes([flags, len(tag)]) + tag + unescape(tokens[2].text)


def _hex(tokens: Sequence[Token]) -> bytes:
    text = "".join(t.text for t in tokens)
    try:
        return bytes.fromhex(text)
    except ValueError as e:
        raise RdataError(f"bad hexadecimal data {text!r}") from e


# Digest lengths BIND checks (RFC 4034 5.1.4, RFC 4509, RFC 6605; RFC 4255, RFC 6594).
_DIGEST_LENGTHS = {1: 20, 2: 32, 4: 48}
_SSHFP_LENGTHS = {1: 20, 2: 32}


def _p_ds(tokens: list[Token], origin: bytes) -> bytes:
    if len(tokens) < 4:
        raise RdataError("DS: too few fields")
    tag = _uint(tokens[0].text, 16, "key tag")
    alg = _uint(tokens[1].text, 8, "algorithm")
    dig = _uint(tokens[2].text, 8, "digest type")
    digest = _hex(tokens[3:])
    if _DIGEST_LENGTHS.get(dig, len(digest)) != len(digest):
        raise RdataError(f"DS digest type {dig} needs {_DIGEST_LENGTHS[dig]} octets")
    return struct.pack("!HBB", tag, alg, dig) + digest


def _p_sshfp(tokens: list[Token], origin: bytes) -> bytes:
    if len(tokens) < 3:
        raise RdataError("SSHFP: too few fields")
    a = _uint(tokens[0].text, 8, "algorithm")
    b = _uint(tokens[1].text, 8, "fingerprint type")
    fingerprint = _hex(tokens[2:])
    if _SSHFP_LENGTHS.get(b, len(fingerprint)) != len(fingerprint):
        raise RdataError(f"SSHFP fingerprint type {b} needs {_SSHFP_LENGTHS[b]} octets")
    return bytes([a, b]) + fingerprint


def _p_tlsa(tokens: list[Token], origin: bytes) -> bytes:
    if len(tokens) < 4:
        raise RdataError("TLSA: too few fields")
    vals = [_uint(t.text, 8, "TLSA field") for t in tokens[:3]]
    return bytes(vals) + _hex(tokens[3:])


def _p_dnskey(tokens: list[Token], origin: bytes) -> bytes:
    if len(tokens) < 4:
        raise RdataError("DNSKEY: too few fields")
    flags = _uint(tokens[0].text, 16, "flags")
    proto = _uint(tokens[1].text, 8, "protocol")
    alg = _uint(tokens[2].text, 8, "algorithm")
    text = "".join(t.text for t in tokens[3:])
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RdataError(f"bad base64 key {text!r}") from e
    return struct.pack("!HBB", flags, proto, alg) + key


def _p_uri(tokens: list[Token], origin: bytes) -> bytes:
    _need(tokens, 3, "URI")
    prio = _uint(tokens[0].text, 16, "priority")
    weight = _uint(tokens[1].text, 16, "weight")
    if not tokens[2].quoted:
        raise RdataError("URI target must be quoted")
    return struct.pack("!HH", prio, weight) + unescape(tokens[2].text)


def _p_naptr(tokens: list[Token], origin: bytes) -> bytes:
    _need(tokens, 6, "NAPTR")
    order = _uint(tokens[0].text, 16, "order")
    pref = _uint(tokens[1].text, 16, "preference")
    strings = b"".join(_charstring(t) for t in tokens[2:5])
    return struct.pack("!HH", order, pref) + strings + _name(tokens[5], origin)


PARSERS: dict[int, Parser] = {
    1: _p_a,
    2: _p_name,
    3: _p_name,
    4: _p_name,
    5: _p_name,
    6: _p_soa,
    7: _p_name,
    8: _p_name,
    9: _p_name,
    12: _p_name,
    13: _p_hinfo,
    14: _p_two_names,
    15: _p_pref_name,
    16: _p_txt,
    17: _p_two_names,
    18: _p_pref_name,
    21: _p_pref_name,
    28: _p_aaaa,
    33: _p_srv,
    35: _p_naptr,
    36: _p_pref_name,
    39: _p_name,
    43: _p_ds,
    44: _p_sshfp,
    48: _p_dnskey,
    52: _p_tlsa,
    59: _p_ds,
    60: _p_dnskey,
    256: _p_uri,
    99: _p_txt,
    257: _p_caa,
}

# Types that are not data and may never appear in a zone file.
META_TYPES = frozenset({0, 41, 128, 129, 249, 250, 251, 252, 253, 254, 255})


def from_tokens(rtype: int, tokens: list[Token], origin: bytes) -> bytes:
    """Wire rdata for one record from its zone-file tokens (RFC 1035 5.1, RFC 3597 5).

    Relative names are made absolute with ``origin``.  The generic form
    ``\\# LEN HEX`` is accepted for every type and checked against the type's
    wire layout when the type is known.
    """
    if rtype in META_TYPES:
        raise RdataError(f"meta type {type_to_text(rtype)} not allowed in zone data")
    if tokens and tokens[0].text == "\\#" and not tokens[0].quoted:
        if len(tokens) < 2:
            raise RdataError("generic rdata: missing length")
        length = _uint(tokens[1].text, 16, "generic rdata length")
        data = _hex(tokens[2:]) if len(tokens) > 2 else b""
        if len(data) != length:
            raise RdataError(f"generic rdata: length {length} but {len(data)} octets given")
        from_wire_check(rtype, data)
        return data
    parser = PARSERS.get(rtype)
    if parser is None:
        raise RdataError(f"type {type_to_text(rtype)} needs the generic \\# form")
    return parser(tokens, origin)


# --- wire layout: embedded names --------------------------------------------------------------

# Layout per type: a sequence of field kinds.  "N" a domain name, "2"/"4"/"1" fixed octets,
# "S" one character-string, "*" the rest (opaque).
_LAYOUTS: dict[int, str] = {
    1: "4",
    2: "N",
    3: "N",
    4: "N",
    5: "N",
    6: "NN44444",
    7: "N",
    8: "N",
    9: "N",
    12: "N",
    13: "SS",
    14: "NN",
    15: "2N",
    17: "NN",
    18: "2N",
    21: "2N",
    28: "4444",
    33: "222N",
    35: "22SSSN",
    36: "2N",
    39: "N",
}

_COMPRESSIBLE = frozenset({2, 3, 4, 5, 6, 7, 8, 9, 12, 14, 15})
# RFC 4034 6.2 (as corrected by RFC 6840 5.1): names lower-cased in canonical rdata.
_CANONICAL_NAMES = frozenset({2, 3, 4, 5, 6, 7, 8, 9, 12, 14, 15, 18, 21, 33, 35, 36, 39})


def name_offsets(rtype: int, rdata: bytes) -> list[tuple[int, int]]:
    """``(offset, length)`` of every domain name embedded in rdata of a known layout."""
    layout = _LAYOUTS.get(rtype)
    if layout is None:
        return []
    out = []
    i = 0
    for kind in layout:
        if kind == "N":
            n = names.wire_length(rdata, i)
            out.append((i, n))
            i += n
        elif kind == "S":
            i += 1 + rdata[i]
        else:
            i += int(kind)
    return out


def compressible_names(rtype: int, rdata: bytes) -> list[tuple[int, int]]:
    """``(offset, length)`` of the names a sender may compress (RFC 3597 section 4).

    Only NS, MD, MF, CNAME, SOA, MB, MG, MR, PTR, MINFO and MX qualify; every
    other type, DNAME and SRV included (RFC 6672 2.5, RFC 2782), goes out
    uncompressed, so the list is empty for them.
    """
    if rtype not in _COMPRESSIBLE:
        return []
    return name_offsets(rtype, rdata)


def canonical_rdata(rtype: int, rdata: bytes) -> bytes:
    """Rdata with embedded names lower-cased where RFC 4034 6.2 says so (for comparisons)."""
    if rtype not in _CANONICAL_NAMES:
        return rdata
    offs = name_offsets(rtype, rdata)
    if not offs:
        return rdata
    out = bytearray(rdata)
    for off, n in offs:
        out[off : off + n] = rdata[off : off + n].lower()
    return bytes(out)


def from_wire_check(rtype: int, rdata: bytes) -> None:
    """Raise RdataError unless ``rdata`` is well formed for a type whose layout we know."""
    try:
        _check_wire(rtype, rdata)
    except (IndexError, NameSyntaxError, struct.error) as e:
        raise RdataError(f"malformed {type_to_text(rtype)} rdata: {e}") from e


def _check_wire(rtype: int, rdata: bytes) -> None:
    if rtype in (16, 99):
        i = 0
        if not rdata:
            raise RdataError("empty TXT rdata")
        while i < len(rdata):
            i += 1 + rdata[i]
        if i != len(rdata):
            raise RdataError("TXT string runs past the end")
        return
    if rtype == 257:
        if len(rdata) < 2 or rdata[1] == 0 or 2 + rdata[1] > len(rdata):
            raise RdataError("bad CAA rdata")
        return
    layout = _LAYOUTS.get(rtype)
    if layout is None:
        return
    i = 0
    for kind in layout:
        if kind == "N":
            i += names.wire_length(rdata, i)
        elif kind == "S":
            i += 1 + rdata[i]
        else:
            i += int(kind)
    if i != len(rdata):
        raise RdataError(f"{type_to_text(rtype)} rdata has the wrong length")


# --- wire -> text -------------------------------------------------------------------------------


def _generic(rdata: bytes) -> str:
    if not rdata:
        return "\\# 0"
    return f"\\# {len(rdata)} {rdata.hex().upper()}"


def to_text(rtype: int, rdata: bytes) -> str:
    """Presentation form of rdata, as BIND prints it (names absolute).

    Types without a printer, and malformed rdata, come out in RFC 3597 generic form.
    """
    try:
        return _to_text(rtype, rdata)
    except (IndexError, NameSyntaxError, struct.error, RdataError, ValueError):
        return _generic(rdata)


def _to_text(rtype: int, rdata: bytes) -> str:
    if rtype == 1 and len(rdata) == 4:
        return socket.inet_ntop(socket.AF_INET, rdata)
    if rtype == 28 and len(rdata) == 16:
        return socket.inet_ntop(socket.AF_INET6, rdata)
    if rtype in (16, 99, 13):
        from_wire_check(rtype, rdata)
        parts = []
        i = 0
        while i < len(rdata):
            n = rdata[i]
            parts.append(_charstring_text(rdata[i + 1 : i + 1 + n]))
            i += 1 + n
        return " ".join(parts)
    if rtype == 257:
        from_wire_check(rtype, rdata)
        tag_len = rdata[1]
        tag = rdata[2 : 2 + tag_len].decode("latin-1")
        return f"{rdata[0]} {tag} {_charstring_text(rdata[2 + tag_len :])}"
    if rtype in (48, 60) and len(rdata) > 4:
        flags, proto, alg = struct.unpack("!HBB", rdata[:4])
        return f"{flags} {proto} {alg} {base64.b64encode(rdata[4:]).decode('ascii')}"
    if rtype == 256 and len(rdata) >= 4:
        prio, weight = struct.unpack("!HH", rdata[:4])
        return f"{prio} {weight} {_charstring_text(rdata[4:])}"
    if rtype in (43, 59) and len(rdata) > 4:
        tag, alg, dig = struct.unpack("!HBB", rdata[:4])
        return f"{tag} {alg} {dig} {rdata[4:].hex().upper()}"
    if rtype == 44 and len(rdata) > 2:
        return f"{rdata[0]} {rdata[1]} {rdata[2:].hex().upper()}"
    if rtype == 52 and len(rdata) > 3:
        return f"{rdata[0]} {rdata[1]} {rdata[2]} {rdata[3:].hex().upper()}"
    layout = _LAYOUTS.get(rtype)
    if layout is None or rtype in (1, 28):
        return _generic(rdata)
    from_wire_check(rtype, rdata)
    fields = []
    i = 0
    for kind in layout:
        if kind == "N":
            n = names.wire_length(rdata, i)
            fields.append(names.to_text(rdata[i : i + n]))
            i += n
        elif kind == "S":
            n = rdata[i]
            fields.append(_charstring_text(rdata[i + 1 : i + 1 + n]))
            i += 1 + n
        elif kind == "2":
            fields.append(str(struct.unpack_from("!H", rdata, i)[0]))
            i += 2
        elif kind == "4":
            fields.append(str(struct.unpack_from("!I", rdata, i)[0]))
            i += 4
        else:
            fields.append(str(rdata[i]))
            i += 1
    return " ".join(fields)
