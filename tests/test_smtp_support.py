"""In-memory fakes and a session driver shared by the SMTP server tests (no tests here)."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from appliance.mail.interfaces import Envelope, Reply
from appliance.mail.relay import RelayPolicy
from appliance.mail.smtp import SMTPServer, SMTPServerFactory

HOSTNAME = "mail.example.test"
INSIDE_CLIENT = "127.0.1.5"
OUTSIDE_CLIENT = "127.0.2.7"


class FakeMessage:
    """An IncomingMessage kept in memory."""

    def __init__(self, store: FakeStore, queue_id: str) -> None:
        self.store = store
        self.queue_id = queue_id
        self.data = bytearray()
        self.envelope: Envelope | None = None
        self.committed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.committed and not self.aborted
        if self.store.fail_write:
            raise OSError(28, "No space left on device")
        self.data += data

    def commit(self, envelope: Envelope) -> Deferred[str]:
        self.envelope = envelope
        if self.store.commit_mode == "fail":
            return fail(OSError(5, "I/O error"))
        if self.store.commit_mode == "raise":
            raise OSError(5, "I/O error")
        if self.store.commit_mode == "manual":
            d: Deferred[str] = Deferred()
            self.store.pending_commits.append((self, d))
            d.addCallback(self._mark)
            return d
        self.committed = True
        return succeed(self.queue_id)

    def _mark(self, queue_id: str) -> str:
        self.committed = True
        return queue_id

    def abort(self) -> None:
        self.aborted = True


class FakeStore:
    """A MessageStore whose failures the test chooses."""

    def __init__(self) -> None:
        self.messages: list[FakeMessage] = []
        self.fail_begin = False
        self.fail_write = False
        self.commit_mode = "sync"
        self.pending_commits: list[tuple[FakeMessage, Deferred[str]]] = []

    def begin(self) -> FakeMessage:
        if self.fail_begin:
            raise OSError(28, "No space left on device")
        message = FakeMessage(self, f"Q{len(self.messages) + 1:04d}")
        self.messages.append(message)
        return message

    @property
    def committed(self) -> list[FakeMessage]:
        return [m for m in self.messages if m.committed]


class FakeRecipients:
    """A RecipientCheck: known addresses pass; ``manual`` leaves the Deferreds to the test."""

    def __init__(self, known: tuple[str, ...] = ("bob@example.test", "alice@example.test")) -> None:
        self.known = {k.lower() for k in known} | {f"postmaster@{HOSTNAME}"}
        self.manual = False
        self.raise_error = False
        self.answers: dict[str, Reply] = {}
        self.pending: dict[str, Deferred[Reply | None]] = {}
        self.asked: list[str] = []

    def check_recipient(self, address: str) -> Deferred[Reply | None]:
        self.asked.append(address)
        if self.raise_error:
            raise RuntimeError("directory exploded")
        if self.manual:
            d: Deferred[Reply | None] = Deferred()
            self.pending[address] = d
            return d
        if address in self.answers:
            return succeed(self.answers[address])
        if address.lower() in self.known:
            return succeed(None)
        return succeed(Reply(550, "5.1.1", "User unknown"))


class TLSStringTransport(StringTransport):
    """A StringTransport that records STARTTLS and TCP_NODELAY instead of doing them."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tls_options: object = None
        self.written_before_tls: bytes | None = None
        self.nodelay = False

    def startTLS(self, options: object) -> None:
        self.tls_options = options
        self.written_before_tls = self.value()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled


def make_policy() -> RelayPolicy:
    return RelayPolicy(
        inside_networks=["127.0.1.0/24"],
        local_domains=["example.test"],
        relay_domains=["backup.test"],
        own_names=[HOSTNAME],
    )


class Session:
    """One protocol instance on a fake transport, with helpers to talk to it."""

    def __init__(
        self, client: str = OUTSIDE_CLIENT, listener: str = "outside", **factory_kwargs: Any
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1_795_000_000)
        self.store = FakeStore()
        self.recipients = FakeRecipients()
        self.relay = make_policy()
        kwargs: dict[str, Any] = {"tls_options": None}
        kwargs.update(factory_kwargs)
        self.factory = SMTPServerFactory(
            listener,
            HOSTNAME,
            self.store,
            self.recipients,
            self.relay,
            clock=cast(Any, self.clock),
            **kwargs,
        )
        self.protocol: SMTPServer = self.factory.buildProtocol(None)
        address = (
            IPv6Address("TCP", client, 5000) if ":" in client else IPv4Address("TCP", client, 5000)
        )
        self.transport = TLSStringTransport(peerAddress=address)
        self.protocol.makeConnection(self.transport)
        self._seen = 0

    def output(self) -> bytes:
        """Everything written since the last call."""
        value = self.transport.value()
        new, self._seen = value[self._seen :], len(value)
        return new

    def lines(self) -> list[str]:
        return [line.decode("ascii") for line in self.output().split(b"\r\n") if line]

    def send(self, data: bytes) -> list[str]:
        self.protocol.dataReceived(data)
        return self.lines()

    def send_slowly(self, data: bytes) -> list[str]:
        for index in range(len(data)):
            self.protocol.dataReceived(data[index : index + 1])
        return self.lines()

    def codes(self, data: bytes) -> list[str]:
        return [line[:3] for line in self.send(data)]

    def ehlo(self, name: str = "client.remote.test") -> list[str]:
        return self.send(f"EHLO {name}\r\n".encode())

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def transaction(
    sender: str = "someone@remote.test",
    rcpts: tuple[str, ...] = ("bob@example.test",),
    body: bytes = b"Subject: hi\r\n\r\nhello\r\n",
) -> bytes:
    """The bytes of MAIL, RCPT..., DATA, body and the terminator."""
    out = f"MAIL FROM:<{sender}>\r\n".encode()
    for rcpt in rcpts:
        out += f"RCPT TO:<{rcpt}>\r\n".encode()
    return out + b"DATA\r\n" + body + b".\r\n"


def body_of(message: FakeMessage) -> bytes:
    """The stored message without the Received header the server prepends."""
    data = bytes(message.data)
    assert data.startswith(b"Received: ")
    end = data.index(b"\r\n")
    while data[end + 2 : end + 3] == b"\t":
        end = data.index(b"\r\n", end + 2)
    return data[end + 2 :]


def received_of(message: FakeMessage) -> str:
    """The Received header the server prepended, unfolded."""
    data = bytes(message.data)
    return data[: len(data) - len(body_of(message))].decode("ascii").replace("\r\n\t", " ")
