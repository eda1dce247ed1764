"""Precomputed answers: the encoded reply to a question, reused for the next identical question.

Authoritative answers depend only on the question (name case-folded, type,
class), the RD and CD bits, the EDNS record the client sent (it decides the
size limit and the OPT we echo), the transport, and the view's state (its
zone generation and whether this client passes its ACL).  So the reply bytes
can be kept and reused: only the ID and the question's case differ, and both
sit at fixed offsets (RFC 1035 4.1.1, 4.1.2).  A hit skips decode, lookup and
encode, which is where an authoritative server in Python spends its time.

Only plain queries are keyed: QUERY opcode, QR clear, one question with an
uncompressed name, no answer or authority records, and at most one
additional record (the OPT).  Anything else goes the long way.
"""

from __future__ import annotations

from collections.abc import Hashable

#: Header flags byte 2: QR (0x80) and opcode (0x78) must be zero for a cacheable query.
_NOT_PLAIN_QUERY = 0xF8
_RD = 0x01
_CD = 0x10
_COUNTS_ONE_QUESTION = b"\x00\x01\x00\x00\x00\x00"
_NO_ADDITIONAL = b"\x00\x00"
_ONE_ADDITIONAL = b"\x00\x01"
#: Reply rcodes worth keeping: answers, NODATA, NXDOMAIN and REFUSED (low 4 bits of byte 3).
_CACHEABLE_RCODES = frozenset((0, 3, 5))


def question_key(data: bytes, transport: str) -> tuple[Hashable, int] | None:
    """(key, end of question) for a plain query, or None when it must not be answered from cache."""
    n = len(data)
    if n < 17 or data[2] & _NOT_PLAIN_QUERY or data[4:10] != _COUNTS_ONE_QUESTION:
        return None
    additional = data[10:12]
    if additional != _NO_ADDITIONAL and additional != _ONE_ADDITIONAL:
        return None
    i = 12
    while True:
        if i >= n:
            return None
        length = data[i]
        if length == 0:
            break
        if length > 63:
            return None
        i += length + 1
    end = i + 5
    if end > n or (additional == _NO_ADDITIONAL and end != n):
        return None
    flags = (data[2] & _RD) | (data[3] & _CD)
    # Only the name is case-folded: the type and class bytes must stay as they are.
    return (flags, data[12 : i + 1].lower(), data[i + 1 : end], data[end:], transport), end


class AnswerCache:
    """A bounded map from (question key, view token) to reply bytes; cleared when it fills up."""

    def __init__(self, max_entries: int = 50_000) -> None:
        self.max_entries = max_entries
        self._entries: dict[Hashable, bytes] = {}
        #: First level: the query's exact bytes after the ID -> the reply after the ID.
        self._exact: dict[Hashable, bytes] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, data: bytes, end: int) -> bytes | None:
        """The cached reply re-addressed to this query (its ID and question case), or None."""
        reply = self._entries.get(key)
        if reply is None:
            self.misses += 1
            return None
        self.hits += 1
        return data[:2] + reply[2:12] + data[12:end] + reply[end:]

    def get_exact(self, key: Hashable, data: bytes) -> bytes | None:
        """The reply to a byte-identical question (same case, same EDNS), re-addressed to ``data``."""
        tail = self._exact.get(key)
        if tail is None:
            return None
        self.hits += 1
        return data[:2] + tail

    def put_exact(self, key: Hashable, reply: bytes) -> None:
        if len(reply) < 12 or (reply[3] & 0x0F) not in _CACHEABLE_RCODES:
            return
        if len(self._exact) >= self.max_entries:
            self._exact.clear()
        self._exact[key] = reply[2:]

    def put(self, key: Hashable, reply: bytes) -> None:
        if len(reply) < 12 or (reply[3] & 0x0F) not in _CACHEABLE_RCODES:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[key] = reply

    def clear(self) -> None:
        self._entries.clear()
        self._exact.clear()

    def __len__(self) -> int:
        return len(self._entries)
