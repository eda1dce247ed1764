"""CRLF line ends for message text, as SMTP wants them (RFC 5321 2.3.8).

Bare CR and bare LF become CRLF, as Postfix does.  Text that is already in
that form (what the SMTP side stores, hence almost everything the client
sends) is recognised by three counts and returned as it is, without the
copies a round of ``replace`` calls would make.  The caller keeps a CR that
ends a chunk back until the next one, so that a CRLF split between two
chunks stays one line end.
"""

from __future__ import annotations


def to_crlf(data: bytes) -> bytes:
    """``data`` with every line end CRLF; ``data`` itself when that holds already."""
    crlf = data.count(b"\r\n")
    if crlf == data.count(b"\n") and crlf == data.count(b"\r"):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
