"""The record model shared by the zone-file parser, the zone lookup and the wire codec.

Names are kept in uncompressed DNS wire form (length-prefixed labels ending in
the zero-length root label), with the case they were written in: the wire
codec compresses and decompresses, the zone model compares with
``canonical()``.  Rdata is likewise kept as uncompressed wire bytes, so the
parser (text -> wire), the codec (wire <-> packet) and the lookup never need a
per-type object model on the hot path.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple


class RRType(enum.IntEnum):
    """Record types the appliance knows by name; any other is handled in RFC 3597 form."""

    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    HINFO = 13
    MX = 15
    TXT = 16
    AAAA = 28
    SRV = 33
    DNAME = 39
    OPT = 41
    IXFR = 251
    AXFR = 252
    ANY = 255
    CAA = 257


class RCode(enum.IntEnum):
    """Response codes (RFC 1035 4.1.1, RFC 6891 for BADVERS)."""

    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5
    NOTAUTH = 9
    BADVERS = 16


class Opcode(enum.IntEnum):
    QUERY = 0
    NOTIFY = 4
    UPDATE = 5


CLASS_IN = 1
CLASS_ANY = 255

ROOT = b"\x00"


def canonical(name: bytes) -> bytes:
    """The case-folded form of a wire name, used as a dictionary key (RFC 4343)."""
    return name.lower()


class RR(NamedTuple):
    """One resource record: owner and rdata in uncompressed wire form."""

    name: bytes
    rtype: int
    rclass: int
    ttl: int
    rdata: bytes


@dataclass(frozen=True)
class LookupResult:
    """What a zone (or a view) answers for one question, before encoding.

    ``rcode`` is NOERROR for answers, referrals and NODATA; ``authoritative``
    is the AA flag (false for referrals).
    """

    rcode: int
    authoritative: bool
    answer: tuple[RR, ...] = ()
    authority: tuple[RR, ...] = ()
    additional: tuple[RR, ...] = ()
    extra: dict[str, object] = field(default_factory=dict, compare=False)
