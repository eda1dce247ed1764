"""The DNS wire codec: untrusted packet bytes <-> `Message`, with compression, EDNS and truncation.

Written instead of ``twisted.names.dns.Message`` because that decoder has no
bound on compression-pointer chains on Twisted 22.4 (CVE-2026-42304), knows no
EDNS on the server path and truncates by slicing bytes.  This module behaves
identically on every Twisted version because it uses none.

Names and rdata in a decoded `Message` are uncompressed wire bytes with their
case preserved, as ``appliance.dns.rr`` specifies.  `decode` raises `WireError`
for every malformed packet; `encode` compresses names (RFC 1035 4.1.4, only in
the rdata types RFC 3597 section 4 allows) and truncates to a size limit by
dropping whole additional RRsets, then by setting TC (RFC 2181 9, RFC 6891 7).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from appliance.dns.rr import RR, LookupResult, Opcode, RCode

__all__ = [
    "DEFAULT_UDP_SIZE",
    "MAX_MESSAGE",
    "MIN_UDP_SIZE",
    "Edns",
    "Message",
    "Question",
    "WireError",
    "decode",
    "encode",
    "encode_stream",
    "error_response",
    "make_response",
]

#: The UDP payload size we advertise and accept (DNS flag day 2020, BIND's default).
DEFAULT_UDP_SIZE = 1232
#: The classic UDP limit, and the floor for an advertised EDNS size (RFC 6891 6.2.3, 6.2.5).
MIN_UDP_SIZE = 512
#: The largest message that fits a TCP length prefix (RFC 1035 4.2.2).
MAX_MESSAGE = 65535

_MAX_NAME = 255
_MAX_POINTER = 0x3FFF
#: No legitimate name needs more pointer hops than it has labels (at most 127).
_MAX_HOPS = 127

_TYPE_OPT = 41

_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")
_QUESTION_FIXED = struct.Struct("!HH")
_U16 = struct.Struct("!H")

# Rdata layouts used to find the domain names inside rdata.  A positive number
# is that many fixed octets, _NAME a domain name, _CSTR a <character-string>,
# _REST whatever is left (may be empty).  Without _REST the layout must use up
# the rdata exactly.
_NAME = 0
_CSTR = -1
_REST = -2

#: Types whose rdata names we compress on output: RFC 3597 section 4 (the RFC 1035 types only).
_COMPRESS_LAYOUT: dict[int, tuple[int, ...]] = {
    2: (_NAME,),  # NS
    3: (_NAME,),  # MD
    4: (_NAME,),  # MF
    5: (_NAME,),  # CNAME
    6: (_NAME, _NAME, 20),  # SOA
    7: (_NAME,),  # MB
    8: (_NAME,),  # MG
    9: (_NAME,),  # MR
    12: (_NAME,),  # PTR
    14: (_NAME, _NAME),  # MINFO
    15: (2, _NAME),  # MX
}

#: Types whose rdata names we expand on input: the above, the types RFC 3597 section 4 lets
#: receivers decompress, and DNAME (RFC 6672 2.5 says senders must not compress it, but old ones do).
_EXPAND_LAYOUT: dict[int, tuple[int, ...]] = {
    **_COMPRESS_LAYOUT,
    17: (_NAME, _NAME),  # RP
    18: (2, _NAME),  # AFSDB
    21: (2, _NAME),  # RT
    24: (18, _NAME, _REST),  # SIG
    26: (2, _NAME, _NAME),  # PX
    30: (_NAME, _REST),  # NXT
    33: (6, _NAME),  # SRV
    35: (4, _CSTR, _CSTR, _CSTR, _NAME),  # NAPTR
    39: (_NAME,),  # DNAME
}

#: Classes NONE and ANY carry empty rdata of any type in UPDATE messages (RFC 2136 2.4, 2.5).
_EMPTY_RDATA_CLASSES = (254, 255)

#: Fixed rdata sizes checked in class IN (RFC 1035 3.4.1, RFC 3596 2.2).
_IN_RDATA_SIZE = {1: 4, 28: 16}


class WireError(ValueError):
    """A packet that is not a well-formed DNS message.

    ``rcode`` is the response code to answer with (FORMERR).  ``id``,
    ``opcode``, ``qr``, ``rd`` and ``cd`` come from the header when it was
    complete (``id`` is None otherwise, and the packet cannot be answered);
    ``question`` holds the question section when it parsed, so a FORMERR
    reply can echo it.
    """

    def __init__(
        self,
        reason: str,
        *,
        rcode: int = RCode.FORMERR,
        id: int | None = None,
        opcode: int = 0,
        qr: bool = False,
        rd: bool = False,
        cd: bool = False,
        question: tuple[Question, ...] = (),
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rcode = rcode
        self.id = id
        self.opcode = opcode
        self.qr = qr
        self.rd = rd
        self.cd = cd
        self.question = question


class Question(NamedTuple):
    """One entry of the question section; the name as sent, case kept."""

    name: bytes
    qtype: int
    qclass: int = 1


class Edns(NamedTuple):
    """The OPT pseudo-RR of a message (RFC 6891 6.1): sender's UDP size, version, DO bit, options.

    ``udp_size`` is the value as sent (the receiver applies the 512 floor);
    ``options`` is the raw, already length-checked option list.
    """

    udp_size: int = DEFAULT_UDP_SIZE
    version: int = 0
    do: bool = False
    options: bytes = b""


class Message(NamedTuple):
    """A DNS message with its header flags broken out (RFC 1035 4.1.1, RFC 4035 for AD/CD).

    ``rcode`` is the full 12-bit response code: its upper bits travel in the
    OPT record, so a value above 15 needs ``edns``.  The OPT record is not in
    ``additional``: it is ``edns``.
    """

    id: int = 0
    qr: bool = False
    opcode: int = Opcode.QUERY
    aa: bool = False
    tc: bool = False
    rd: bool = False
    ra: bool = False
    ad: bool = False
    cd: bool = False
    rcode: int = RCode.NOERROR
    question: tuple[Question, ...] = ()
    answer: tuple[RR, ...] = ()
    authority: tuple[RR, ...] = ()
    additional: tuple[RR, ...] = ()
    edns: Edns | None = None


_new_message = Message._make

# --------------------------------------------------------------------------- decoding


class _Malformed(Exception):
    """Internal: raised deep in the decoder, turned into a WireError carrying the header."""


def _read_name(data: bytes, off: int) -> tuple[bytes, int]:
    """Read a possibly compressed name at ``off``; return it uncompressed and the offset after it.

    A pointer must point before the start of the run of labels that contains
    it, so every hop goes strictly backwards: no loops, no forward
    references, and the hop count is bounded as well (RFC 1035 4.1.4, RFC 9267 2).
    """
    n = len(data)
    parts: list[bytes] = []
    total = 1
    end = -1
    run = off
    hops = 0
    while True:
        if off >= n:
            raise _Malformed("name runs past the end of the message")
        length = data[off]
        if length == 0:
            parts.append(data[run : off + 1])
            if end < 0:
                end = off + 1
            break
        if length < 0x40:
            total += length + 1
            if total > _MAX_NAME:
                raise _Malformed("name longer than 255 octets")
            off += length + 1
            continue
        if length < 0xC0:
            raise _Malformed(f"reserved label type {length & 0xC0:#x}")
        if off + 1 >= n:
            raise _Malformed("truncated compression pointer")
        target = ((length & 0x3F) << 8) | data[off + 1]
        if target >= run:
            raise _Malformed("compression pointer does not point backwards")
        hops += 1
        if hops > _MAX_HOPS:
            raise _Malformed("too many compression pointers")
        parts.append(data[run:off])
        if end < 0:
            end = off + 2
        off = run = target
    if len(parts) == 1:
        return parts[0], end
    return b"".join(parts), end


def _read_rdata(data: bytes, start: int, end: int, layout: tuple[int, ...]) -> bytes:
    """Rebuild rdata with every name of ``layout`` expanded; it must fit ``data[start:end]``."""
    out: list[bytes] = []
    off = start
    for item in layout:
        if item > 0:
            if off + item > end:
                raise _Malformed("rdata shorter than its fixed fields")
            out.append(data[off : off + item])
            off += item
        elif item == _NAME:
            name, off = _read_name(data, off)
            if off > end:
                raise _Malformed("name in rdata overruns rdlength")
            out.append(name)
        elif item == _CSTR:
            if off >= end or off + 1 + data[off] > end:
                raise _Malformed("character-string overruns rdlength")
            nxt = off + 1 + data[off]
            out.append(data[off:nxt])
            off = nxt
        else:
            out.append(data[off:end])
            off = end
    if off != end:
        raise _Malformed("trailing octets in rdata")
    return b"".join(out)


def _check_options(options: bytes) -> None:
    """EDNS options are (code, length, value) triples that must tile the rdata (RFC 6891 6.1.2)."""
    off = 0
    n = len(options)
    while off < n:
        if off + 4 > n:
            raise _Malformed("truncated EDNS option header")
        off += 4 + _U16.unpack_from(options, off + 2)[0]
        if off > n:
            raise _Malformed("EDNS option overruns the OPT record")


def decode(data: bytes) -> Message:
    """Parse one DNS message from untrusted bytes (RFC 1035 4.1, RFC 6891 6.1).

    Raise `WireError` for anything malformed: truncation, reserved label
    types, names over 255 octets, bad or looping pointers, counts that do not
    match, rdlength overruns, trailing octets, a misplaced, misnamed or second
    OPT record.
    """
    if type(data) is not bytes:
        data = bytes(data)
    if len(data) < 12:
        raise WireError("message shorter than its header")
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    opcode = (flags >> 11) & 0xF
    qr = bool(flags & 0x8000)
    rd = bool(flags & 0x0100)
    cd = bool(flags & 0x0010)
    questions: tuple[Question, ...] = ()
    try:
        n = len(data)
        off = 12
        qlist: list[Question] = []
        for _ in range(qdcount):
            name, off = _read_name(data, off)
            if off + 4 > n:
                raise _Malformed("truncated question")
            qtype, qclass = _QUESTION_FIXED.unpack_from(data, off)
            off += 4
            qlist.append(Question(name, qtype, qclass))
        questions = tuple(qlist)
        sections: list[tuple[RR, ...]] = [(), (), ()]
        edns: Edns | None = None
        rcode = flags & 0xF
        for index, count in enumerate((ancount, nscount, arcount)):
            if not count:
                continue
            rrs: list[RR] = []
            for _ in range(count):
                name, off = _read_name(data, off)
                if off + 10 > n:
                    raise _Malformed("truncated resource record header")
                rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, off)
                off += 10
                end = off + rdlength
                if end > n:
                    raise _Malformed("rdlength overruns the message")
                if rtype == _TYPE_OPT:
                    if index != 2:
                        raise _Malformed("OPT record outside the additional section")
                    if edns is not None:
                        raise _Malformed("more than one OPT record")
                    if name != b"\x00":
                        raise _Malformed("OPT record not owned by the root")
                    options = data[off:end]
                    _check_options(options)
                    edns = Edns(rclass, (ttl >> 16) & 0xFF, bool(ttl & 0x8000), options)
                    rcode |= (ttl >> 24) << 4
                    off = end
                    continue
                layout = _EXPAND_LAYOUT.get(rtype)
                if rdlength == 0 and rclass in _EMPTY_RDATA_CLASSES:
                    rdata = b""
                elif layout is not None:
                    rdata = _read_rdata(data, off, end, layout)
                else:
                    if rclass == 1 and _IN_RDATA_SIZE.get(rtype, rdlength) != rdlength:
                        raise _Malformed(f"bad rdlength {rdlength} for type {rtype}")
                    rdata = data[off:end]
                off = end
                rrs.append(RR(name, rtype, rclass, ttl, rdata))
            sections[index] = tuple(rrs)
        if off != n:
            raise _Malformed("trailing octets after the last record")
    except _Malformed as exc:
        raise WireError(
            str(exc), id=ident, opcode=opcode, qr=qr, rd=rd, cd=cd, question=questions
        ) from None
    # Positional, in field order: building the tuple directly is several times faster.
    return _new_message(
        (
            ident,
            qr,
            opcode,
            bool(flags & 0x0400),
            bool(flags & 0x0200),
            rd,
            bool(flags & 0x0080),
            bool(flags & 0x0020),
            cd,
            rcode,
            questions,
            sections[0],
            sections[1],
            sections[2],
            edns,
        )
    )


# --------------------------------------------------------------------------- encoding

_suffix_cache: dict[bytes, tuple[tuple[int, bytes], ...]] = {}
_SUFFIX_CACHE_MAX = 8192


def _suffixes(name: bytes) -> tuple[tuple[int, bytes], ...]:
    """(offset, lower-cased suffix) for each non-root label of a wire name; ValueError if malformed.

    Cached, because the same owner and target names are encoded over and over.
    """
    found = _suffix_cache.get(name)
    if found is not None:
        return found
    n = len(name)
    if n > _MAX_NAME:
        raise ValueError(f"name longer than 255 octets: {name!r}")
    lname = name.lower()
    items: list[tuple[int, bytes]] = []
    off = 0
    while True:
        if off >= n:
            raise ValueError(f"name lacks the root label: {name!r}")
        length = name[off]
        if length == 0:
            break
        if length >= 0x40:
            raise ValueError(f"bad label length in name: {name!r}")
        items.append((off, lname[off:]))
        off += length + 1
    if off + 1 != n:
        raise ValueError(f"octets after the root label: {name!r}")
    found = tuple(items)
    if len(_suffix_cache) >= _SUFFIX_CACHE_MAX:
        _suffix_cache.clear()
    _suffix_cache[name] = found
    return found


def _name_end(data: bytes, off: int, end: int) -> int:
    """End offset of the uncompressed name at ``data[off:]``, or -1 if it is not one within ``end``."""
    start = off
    while off < end:
        length = data[off]
        if length == 0:
            return off + 1 if off + 1 - start <= _MAX_NAME else -1
        if length >= 0x40:
            return -1
        off += length + 1
    return -1


def _put_name(buf: bytearray, name: bytes, table: dict[bytes, int]) -> None:
    """Append ``name`` compressed against ``table`` (lower-cased suffix -> offset) and extend it.

    Matching is case-insensitive, as in BIND, so a later name may take the
    case of an earlier one; the first occurrence, e.g. the question, is
    written exactly as given.  Offsets past 0x3FFF cannot be pointed at and
    are not recorded.
    """
    base = len(buf)
    for i, suffix in _suffix_cache.get(name) or _suffixes(name):
        target = table.get(suffix)
        if target is not None:
            if i:
                buf += name[:i]
            buf += _U16.pack(0xC000 | target)
            return
        if base + i <= _MAX_POINTER:
            table[suffix] = base + i
    buf += name


#: Per record: the octets after the owner name, whole (pieces None) or up to the TTL, followed by
#: the rdata cut into (octets, is_name) pieces to compress.
_Plan = tuple[bytes, "tuple[tuple[bytes, bool], ...] | None"]
_plan_cache: dict[RR, _Plan] = {}
_PLAN_CACHE_MAX = 16384
_TYPE_CLASS_TTL = struct.Struct("!HHI")


def _plan(rr: RR) -> _Plan:
    """Work out once how to write a record; cached, since zone records are sent again and again."""
    _, rtype, rclass, ttl, rdata = rr
    if len(rdata) > 0xFFFF:
        raise ValueError("rdata longer than 65535 octets")
    layout = _COMPRESS_LAYOUT.get(rtype)
    pieces = _split_rdata(rdata, layout) if layout is not None else None
    plan: _Plan
    if pieces is None:
        # No names to compress, or not the layout the type requires: send the rdata as it is.
        plan = (_RR_FIXED.pack(rtype, rclass, ttl, len(rdata)) + rdata, None)
    else:
        plan = (_TYPE_CLASS_TTL.pack(rtype, rclass, ttl), tuple(pieces))
    if len(_plan_cache) >= _PLAN_CACHE_MAX:
        _plan_cache.clear()
    _plan_cache[rr] = plan
    return plan


def _put_rr(buf: bytearray, rr: RR, table: dict[bytes, int]) -> None:
    """Append one resource record, compressing its owner and, for RFC 3597 4 types, its rdata names."""
    tail, pieces = _plan_cache.get(rr) or _plan(rr)
    _put_name(buf, rr[0], table)
    buf += tail
    if pieces is not None:
        at = len(buf)
        buf += b"\x00\x00"
        for piece, is_name in pieces:
            if is_name:
                _put_name(buf, piece, table)
            else:
                buf += piece
        _U16.pack_into(buf, at, len(buf) - at - 2)


def _split_rdata(rdata: bytes, layout: tuple[int, ...]) -> list[tuple[bytes, bool]] | None:
    """Cut uncompressed rdata into (octets, is_name) pieces per ``layout``; None if it does not fit."""
    pieces: list[tuple[bytes, bool]] = []
    off = 0
    end = len(rdata)
    for item in layout:
        if item > 0:
            if off + item > end:
                return None
            pieces.append((rdata[off : off + item], False))
            off += item
        else:
            nend = _name_end(rdata, off, end)
            if nend < 0:
                return None
            pieces.append((rdata[off:nend], True))
            off = nend
    return pieces if off == end else None


def _required_glue(message: Message) -> frozenset[bytes]:
    """Lower-cased owners of the address records a referral cannot do without (RFC 9471 2.1).

    A referral has no answer, no AA and NS records in the authority section;
    an NS target at or below its NS owner (in-domain) cannot be resolved
    without its glue.
    """
    if message.aa or message.answer:
        return frozenset()
    required = set()
    for rr in message.authority:
        if rr.rtype != 2:
            continue
        target = rr.rdata.lower()
        zone = rr.name.lower()
        try:
            suffixes = _suffix_cache.get(target) or _suffixes(target)
        except ValueError:
            continue
        if zone == b"\x00" or any(suffix == zone for _, suffix in suffixes):
            required.add(target)
    if not required:
        return frozenset()
    present = {rr.name.lower() for rr in message.additional if rr.rtype in (1, 28)}
    return frozenset(required & present)


def _is_glue(rrset: tuple[RR, ...], glue: frozenset[bytes]) -> bool:
    return rrset[0].rtype in (1, 28) and rrset[0].name.lower() in glue


def _rrsets(rrs: tuple[RR, ...]) -> list[tuple[RR, ...]]:
    """Split a section into runs of records with the same owner, type and class."""
    groups: list[tuple[RR, ...]] = []
    current: list[RR] = []
    key: tuple[bytes, int, int] | None = None
    for rr in rrs:
        k = (rr.name.lower(), rr.rtype, rr.rclass)
        if k != key and current:
            groups.append(tuple(current))
            current = []
        key = k
        current.append(rr)
    if current:
        groups.append(tuple(current))
    return groups


def _opt_record(message: Message) -> bytes:
    """The OPT pseudo-RR for ``message`` (RFC 6891 6.1.2, 6.1.3), or b"" without EDNS."""
    edns = message.edns
    rcode = message.rcode
    if edns is None:
        if rcode > 0xF:
            raise ValueError(f"rcode {rcode} needs an OPT record")
        return b""
    if rcode > 0xFFF or rcode < 0:
        raise ValueError(f"rcode {rcode} out of range")
    try:
        fixed = _RR_FIXED.pack(
            _TYPE_OPT,
            edns.udp_size,
            ((rcode >> 4) << 24) | (edns.version << 16) | (0x8000 if edns.do else 0),
            len(edns.options),
        )
    except struct.error as exc:
        raise ValueError(f"OPT field out of range: {exc}") from None
    return b"\x00" + fixed + edns.options


def _flags(message: Message, tc: bool) -> int:
    return (
        (0x8000 if message.qr else 0)
        | ((message.opcode & 0xF) << 11)
        | (0x0400 if message.aa else 0)
        | (0x0200 if tc else 0)
        | (0x0100 if message.rd else 0)
        | (0x0080 if message.ra else 0)
        | (0x0020 if message.ad else 0)
        | (0x0010 if message.cd else 0)
        | (message.rcode & 0xF)
    )


def _start(message: Message) -> tuple[bytearray, dict[bytes, int]]:
    """A buffer holding a header placeholder and the question section, and its compression table."""
    buf = bytearray(12)
    table: dict[bytes, int] = {}
    for qname, qtype, qclass in message.question:
        _put_name(buf, qname, table)
        buf += _QUESTION_FIXED.pack(qtype, qclass)
    return buf, table


def _finish(buf: bytearray, message: Message, tc: bool, counts: list[int], opt: bytes) -> bytes:
    if opt:
        buf += opt
    try:
        _HEADER.pack_into(
            buf,
            0,
            message.id,
            _flags(message, tc),
            len(message.question),
            counts[0],
            counts[1],
            counts[2] + (1 if opt else 0),
        )
    except struct.error as exc:
        raise ValueError(f"header field out of range: {exc}") from None
    return bytes(buf)


def encode(message: Message, max_size: int | None = None) -> bytes:
    """Serialise ``message`` with name compression, fitting it into ``max_size`` octets.

    If it does not fit, whole RRsets are dropped from the additional section
    first; if the answer and authority sections still do not fit, or a
    referral loses in-domain glue (RFC 9471 3), the result is the header with
    TC=1, the question and the OPT record (RFC 2181 9, RFC 6891 7).  No limit means the 65535 octets TCP can carry.  Raise
    ValueError for a message that cannot be encoded at all (bad names, an
    extended rcode without EDNS, out-of-range fields).
    """
    limit = MAX_MESSAGE if max_size is None else min(max_size, MAX_MESSAGE)
    opt = _opt_record(message)
    room = limit - len(opt)
    counts = [len(message.answer), len(message.authority), len(message.additional)]
    tc = message.tc
    try:
        buf, table = _start(message)
        question_end = len(buf)
        for rr in message.answer:
            _put_rr(buf, rr, table)
        for rr in message.authority:
            _put_rr(buf, rr, table)
        if len(buf) > room:
            del buf[question_end:]
            counts = [0, 0, 0]
            tc = True
        elif message.additional:
            additional_start = len(buf)
            for rr in message.additional:
                _put_rr(buf, rr, table)
            if len(buf) > room:
                del buf[additional_start:]
                table = {k: v for k, v in table.items() if v < additional_start}
                counts[2] = 0
                glue = _required_glue(message)
                rrsets = _rrsets(message.additional)
                if glue:
                    # Required glue goes first so that optional data cannot crowd it out.
                    rrsets.sort(key=lambda rrset: not _is_glue(rrset, glue))
                for rrset in rrsets:
                    mark = len(buf)
                    for rr in rrset:
                        _put_rr(buf, rr, table)
                    if len(buf) <= room:
                        counts[2] += len(rrset)
                        continue
                    del buf[mark:]
                    table = {k: v for k, v in table.items() if v < mark}
                    if glue and _is_glue(rrset, glue):
                        # RFC 9471 3: a referral without all its in-domain glue must set TC.
                        del buf[question_end:]
                        counts = [0, 0, 0]
                        tc = True
                        break
    except struct.error as exc:
        raise ValueError(f"field out of range: {exc}") from None
    return _finish(buf, message, tc, counts, opt)


def encode_stream(message: Message, max_size: int | None = None) -> list[bytes]:
    """Serialise a long reply as several messages of at most ``max_size`` octets each.

    For zone transfers over TCP (RFC 5936 2.2): records are cut between
    messages in order, never dropped and never with TC; every message repeats
    the header, the question and the OPT record.  A single record too big
    for a message raises ValueError.
    """
    limit = MAX_MESSAGE if max_size is None else min(max_size, MAX_MESSAGE)
    opt = _opt_record(message)
    room = limit - len(opt)
    out: list[bytes] = []
    try:
        buf, table = _start(message)
        empty = len(buf)
        counts = [0, 0, 0]
        for index, section in enumerate((message.answer, message.authority, message.additional)):
            for rr in section:
                mark = len(buf)
                _put_rr(buf, rr, table)
                if len(buf) <= room:
                    counts[index] += 1
                    continue
                if mark == empty:
                    raise ValueError("a record does not fit in one message")
                del buf[mark:]
                out.append(_finish(buf, message, message.tc, counts, opt))
                buf, table = _start(message)
                counts = [0, 0, 0]
                _put_rr(buf, rr, table)
                if len(buf) > room:
                    raise ValueError("a record does not fit in one message")
                counts[index] = 1
    except struct.error as exc:
        raise ValueError(f"field out of range: {exc}") from None
    out.append(_finish(buf, message, message.tc, counts, opt))
    return out


# --------------------------------------------------------------------------- responses


def _response_edns(query: Message, udp_size: int) -> Edns | None:
    """Our OPT record for a reply: present iff the query had one, DO echoed (RFC 6891 7, RFC 3225 3)."""
    if query.edns is None:
        return None
    return Edns(udp_size=udp_size, version=0, do=query.edns.do)


def make_response(
    query: Message,
    result: LookupResult,
    *,
    ra: bool = False,
    udp_size: int = DEFAULT_UDP_SIZE,
) -> Message:
    """Build the reply to ``query`` from a lookup result.

    Copies id, opcode, RD and CD and the question with the query's case
    (RFC 1035 4.1.1); sets QR, AA and rcode from ``result``; adds an OPT record
    advertising ``udp_size`` when the query carried one.
    """
    edns = None
    if query.edns is not None:
        edns = Edns(udp_size, 0, query.edns.do, b"")
    # Positional, in field order (id, qr, opcode, aa, tc, rd, ra, ad, cd, rcode, sections, edns).
    return _new_message(
        (
            query.id,
            True,
            query.opcode,
            result.authoritative,
            False,
            query.rd,
            ra,
            False,
            query.cd,
            result.rcode,
            query.question,
            result.answer,
            result.authority,
            result.additional,
            edns,
        )
    )


def error_response(
    query: Message, rcode: int, *, ra: bool = False, udp_size: int = DEFAULT_UDP_SIZE
) -> Message:
    """An empty reply to ``query`` with ``rcode`` (REFUSED, SERVFAIL, NOTIMP, BADVERS...).

    An extended rcode such as BADVERS always gets an OPT record, since only
    OPT can carry it (RFC 6891 6.1.3).
    """
    edns = _response_edns(query, udp_size)
    if edns is None and rcode > 0xF:
        edns = Edns(udp_size=udp_size)
    return Message(
        id=query.id,
        qr=True,
        opcode=query.opcode,
        rd=query.rd,
        ra=ra,
        cd=query.cd,
        rcode=rcode,
        question=query.question,
        edns=edns,
    )
