"""Send a reply at once instead of on the reactor's next turn.

Twisted's TCP transport only registers for writability in ``write``; the bytes
leave on the next reactor iteration, which costs an ``epoll_wait``, two
``epoll_ctl`` calls and a round of logging-context plumbing per reply.  A
request/response protocol whose client waits for every answer (SMTP without
pipelining, a POP3 client fetching one message at a time) pays that on every
command; servers written in C (Dovecot, Postfix) write from the read handler.

:func:`write_now` does the same when it is safe: on a plain TCP connection
whose buffer is empty it hands the bytes to the kernel directly, and whatever
the kernel does not take (or any error) goes through the transport's normal
buffered path, so ordering, flow control and error handling are unchanged.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def write_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to ``transport``, straight to the socket when nothing is queued ahead of it."""
    if (
        data
        and isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # EAGAIN, or an error the transport's own write path will report properly.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


__all__ = ["write_now"]
