"""``write_now`` on real loopback TCP connections: direct when the buffer is empty, ordered otherwise."""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
from twisted.internet import reactor as _reactor
from twisted.internet import threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from appliance.netio import write_now

pytestmark = pytest.mark.integration
reactor: Any = _reactor

BIG = b"x" * (8 * 1024 * 1024)


class Echo(Protocol):
    """Answers every chunk at once with write_now and records whether it was buffered."""

    def __init__(self, buffered: list[bool], prefix: bytes = b"") -> None:
        self.buffered = buffered
        self.prefix = prefix

    def dataReceived(self, data: bytes) -> None:
        if self.prefix:
            self.transport.write(self.prefix)  # type: ignore[union-attr]
        write_now(self.transport, b"got " + data)
        t: Any = self.transport
        self.buffered.append(bool(t._tempDataBuffer or t.dataBuffer))


def exchange(port: int, message: bytes, expect: int) -> bytes:
    """Blocking client: send ``message``, read ``expect`` bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(message)
        out = b""
        while len(out) < expect:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            out += chunk
        return out


class WriteNowTests(unittest.TestCase):
    def listen(self, buffered: list[bool], prefix: bytes = b"") -> int:
        factory = Factory.forProtocol(lambda: Echo(buffered, prefix))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    @inlineCallbacks
    def test_small_reply_goes_straight_to_the_socket(self) -> Any:
        buffered: list[bool] = []
        port = self.listen(buffered)
        out = yield threads.deferToThread(exchange, port, b"hello", 9)
        self.assertEqual(out, b"got hello")
        self.assertEqual(buffered, [False])

    @inlineCallbacks
    def test_reply_behind_buffered_data_keeps_its_order(self) -> Any:
        buffered: list[bool] = []
        port = self.listen(buffered, prefix=BIG)
        out = yield threads.deferToThread(exchange, port, b"ping", len(BIG) + 8)
        self.assertEqual(len(out), len(BIG) + 8)
        self.assertTrue(out.startswith(BIG[:1024]))
        self.assertEqual(out[-8:], b"got ping")
        self.assertEqual(buffered, [True])

    def test_other_transports_use_their_own_write(self) -> None:
        transport = StringTransport()
        write_now(transport, b"abc")
        self.assertEqual(transport.value(), b"abc")

    @inlineCallbacks
    def test_peer_reset_is_reported_by_the_transport_not_raised(self) -> Any:
        made: Deferred[Any] = Deferred()
        lost: Deferred[None] = Deferred()

        class Quiet(Protocol):
            def connectionMade(self) -> None:
                made.callback(self.transport)

            def connectionLost(self, reason: object = None) -> None:
                lost.callback(None)

        port = reactor.listenTCP(0, Factory.forProtocol(Quiet), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        transport = yield made
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST, before the reactor has seen it
        for _ in range(3):
            write_now(transport, b"too late\r\n")
        yield lost
