"""Outbound ESMTP: one session with one remote address, every recipient answered (MISSION M-6, R-4).

Written instead of ``twisted.mail.smtp.ESMTPClient`` (research/twisted-notes.md
1.2), which dot-stuffs each 16 KiB chunk on its own and so ends a message early
at a "." line just after a chunk boundary, has no timeouts, no PIPELINING, no
SIZE check and only all-or-nothing TLS.  Here:

* :class:`DotStuffer` stuffs and CRLF-normalises the whole stream, whatever
  the read chunks (RFC 5321 4.5.2);
* every wait has the timeout of RFC 5321 4.5.3.2, on an injected clock;
* STARTTLS is used whenever offered (opportunistic, RFC 3207; the
  certificate is not verified by default) and the result records it;
* PIPELINING (RFC 2920) sends MAIL and all RCPTs in one write;
* SIZE (RFC 1870): a message larger than the server's limit is not sent,
  every recipient gets 552 5.3.4;
* 8BITMIME (RFC 6152): 8-bit bodies are declared ``BODY=8BITMIME``; to a
  server without 8BITMIME they are sent as they are by default, as Postfix
  does for non-MIME mail (``eight_bit="refuse"`` bounces them with 5.6.3);
* each recipient gets exactly one :class:`Reply`: the server's own, or a
  temporary one when the session broke before it was answered (R-4).  A
  connection lost after the final dot but before its reply is temporary for
  all: the message may arrive twice, as with every MTA (RFC 1047).

A :class:`Session` may carry several transactions to the same destination,
with RSET in between; :func:`deliver` is the one-message shortcut, and
:func:`attempt` walks the MX addresses of a route (appliance.mail.mx)
for the queue runner, one :class:`Outcome` per recipient.
"""

from __future__ import annotations

import base64
import io
import os
import re
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, TypeAlias

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from appliance.mail import mx
from appliance.mail.connections import SessionPool
from appliance.mail.interfaces import Reply
from appliance.mail.lineends import to_crlf
from appliance.mail.routing import SMART_HOST, Route
from appliance.netio import write_now

log = Logger(namespace="appliance.mail.smtp_client")

#: A message: its bytes, or the path of a file holding them (CRLF or LF line ends).
MessageSource: TypeAlias = "bytes | str | os.PathLike[str]"

READ_CHUNK = 64 * 1024
MAX_LINE = 8192
MAX_REPLY_LINES = 200
MAX_QUEUED_REPLIES = 10_000
MAX_TRANSCRIPT = 400

SEND_8BIT = "send"
REFUSE_8BIT = "refuse"

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_BAD_ADDRESS_CHARS = re.compile(r"[\x00-\x20\x7f<>]")


@dataclass(frozen=True)
class Timeouts:
    """Seconds to wait for each reply (RFC 5321 4.5.3.2 minimums; connect and QUIT as Postfix)."""

    connect: float = 30.0
    greeting: float = 300.0
    helo: float = 300.0
    starttls: float = 300.0
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    final_dot: float = 600.0
    rset: float = 120.0
    quit: float = 30.0


@dataclass
class DeliveryResult:
    """The outcome of one transaction: one :class:`Reply` per recipient, in the order given.

    ``error`` is set when the session itself failed (connect, timeout, lost
    connection, refused greeting); ``try_next`` then says whether the
    recipients left with a temporary reply may be tried at the next address
    at once (false after the final dot, where that could duplicate the message).
    ``tls_failed`` means the connection broke right after STARTTLS: retrying
    that address without TLS is the usual remedy.
    """

    replies: dict[str, Reply]
    remote: str = ""
    error: Reply | None = None
    try_next: bool = False
    tls: bool = False
    tls_failed: bool = False
    transcript: list[str] = field(default_factory=list)

    @property
    def delivered(self) -> list[str]:
        return [r for r, reply in self.replies.items() if 200 <= reply.code < 300]

    @property
    def deferred(self) -> list[str]:
        return [r for r, reply in self.replies.items() if reply.temporary]

    @property
    def bounced(self) -> list[str]:
        return [r for r, reply in self.replies.items() if reply.permanent]


class DotStuffer:
    """CRLF normalisation and dot-stuffing (RFC 5321 4.5.2) over a stream fed in any chunks.

    Bare LF and bare CR become CRLF; a line starting with "." gets a second
    one, wherever the chunk boundaries fall.  :meth:`finish` ends the last
    line if needed and adds the terminating ``.CRLF``.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._pending_cr = False

    def feed(self, chunk: bytes) -> bytes:
        data = (b"\r" if self._pending_cr else b"") + chunk
        self._pending_cr = data.endswith(b"\r")
        if self._pending_cr:
            data = data[:-1]
        if not data:
            return b""
        stuffed = to_crlf(data).replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        self._at_line_start = stuffed.endswith(b"\n")
        return stuffed

    def finish(self) -> bytes:
        out = b"\r\n" if self._pending_cr or not self._at_line_start else b""
        self._pending_cr = False
        self._at_line_start = True
        return out + b".\r\n"


@implementer(IOpenSSLClientConnectionCreator)
class OpportunisticTLS:
    """Client TLS that encrypts without verifying the peer (RFC 7435), with SNI when named.

    Unverified is what opportunistic SMTP means: an MX's certificate rarely
    matches anything the sender could check without DANE or MTA-STS.  TLS 1.2
    is the floor.
    """

    #: One context for every attempt: building it (CA store, ciphers) costs far more than a
    #: delivery that never says STARTTLS.  Made on first use, shared by all instances.
    _shared_context: SSL.Context | None = None

    def __init__(self, server_name: str | None = None) -> None:
        self._server_name: bytes | None = None
        if server_name and not _is_address(server_name):
            try:
                self._server_name = server_name.rstrip(".").encode("idna")
            except UnicodeError:
                self._server_name = None

    @classmethod
    def _context(cls) -> SSL.Context:
        if cls._shared_context is None:
            cls._shared_context = CertificateOptions(raiseMinimumTo=TLSVersion.TLSv1_2).getContext()
        return cls._shared_context

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context(), None)
        connection.set_app_data(tlsProtocol)
        if self._server_name:
            connection.set_tlsext_host_name(self._server_name)
        return connection


def _is_address(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def tcp_endpoint(
    reactor: IReactorTCP, address: str, port: int
) -> TCP4ClientEndpoint | TCP6ClientEndpoint:
    """A TCP client endpoint for an IPv4 or IPv6 address (the clock enforces the connect timeout)."""
    if ":" in address:
        return TCP6ClientEndpoint(reactor, address, port, timeout=3600)
    return TCP4ClientEndpoint(reactor, address, port, timeout=3600)


# -- the wire ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RawReply:
    code: int
    lines: tuple[str, ...]

    def reply(self, default_class: str | None = None) -> Reply:
        """As a :class:`Reply`: enhanced code from the text (RFC 2034), else ``X.0.0``."""
        texts = list(self.lines)
        klass = str(self.code)[0]
        enhanced = ""
        match = _ENHANCED.match(texts[0]) if texts else None
        if match and match.group(1) == klass:
            enhanced = f"{match.group(1)}.{match.group(2)}.{match.group(3)}"
            texts = [_ENHANCED.sub("", t, count=1) for t in texts]
        if not enhanced:
            enhanced = f"{default_class or klass}.0.0" if klass in "245" else ""
        return Reply(self.code, enhanced, " ".join(t.strip() for t in texts).strip())


class _SessionBroken(Exception):
    """The session cannot go on; ``why`` says what happened, for the temporary replies."""

    def __init__(self, why: str, enhanced: str = "4.4.2") -> None:
        super().__init__(why)
        self.why = why
        self.enhanced = enhanced


class _ClientProtocol(Protocol):
    """Line framing, reply assembly and per-wait timeouts; the logic lives in :class:`Session`."""

    def __init__(self, clock: IReactorTime, transcript: list[str]) -> None:
        self._clock: Any = clock
        self._transcript = transcript
        self._buffer = b""
        self._lines: list[str] = []
        self._code = 0
        self._replies: deque[_RawReply] = deque()
        self._waiter: Deferred[_RawReply] | None = None
        self._timer: Any = None
        self._broken: _SessionBroken | None = None
        self.lost: Deferred[None] = Deferred()
        self.producer: _DataProducer | None = None

    def connectionMade(self) -> None:
        # Commands and the end of the message are small writes the server must see at
        # once; with Nagle's algorithm the last one waits for the peer's delayed ACK.
        nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if nodelay is not None:
            nodelay(True)

    # transcript -----------------------------------------------------------------------------

    def note(self, line: str) -> None:
        if len(self._transcript) < MAX_TRANSCRIPT:
            self._transcript.append(line[:300])

    # receiving ------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._broken is not None:
            return
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for raw in lines:
            if len(raw) > MAX_LINE:
                self._fail(_SessionBroken("reply line too long"))
                return
            self._line(raw.rstrip(b"\r").decode("utf-8", "replace"))
            if self._broken is not None:
                return
        if len(self._buffer) > MAX_LINE:
            self._fail(_SessionBroken("reply line too long"))

    def _line(self, line: str) -> None:
        self.note(f"S: {line}")
        if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
            self._fail(_SessionBroken(f"malformed reply {line[:80]!r}"))
            return
        if len(self._lines) >= MAX_REPLY_LINES or len(self._replies) >= MAX_QUEUED_REPLIES:
            self._fail(_SessionBroken("reply too long, or too many replies nobody asked for"))
            return
        self._code = int(line[:3])
        self._lines.append(line[4:])
        if len(line) == 3 or line[3] == " ":
            reply = _RawReply(self._code, tuple(self._lines))
            self._lines = []
            self._replies.append(reply)
            self._deliver()

    def _deliver(self) -> None:
        if self._waiter is not None and self._replies:
            waiter, self._waiter = self._waiter, None
            self._cancel_timer()
            waiter.callback(self._replies.popleft())

    def _fail(self, error: _SessionBroken, abort: bool = True) -> None:
        if self._broken is None:
            self._broken = error
        self._cancel_timer()
        if abort and self.transport is not None:
            self.tx.abortConnection()
        if self.producer is not None:
            self.producer.fail(self._broken)
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.errback(self._broken)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._fail(_SessionBroken(f"lost connection ({reason.getErrorMessage()})"), abort=False)
        if not self.lost.called:
            self.lost.callback(None)

    def read_reply(self, timeout: float, what: str) -> Deferred[_RawReply]:
        """The next reply; fails with :class:`_SessionBroken` on timeout or loss."""
        if self._replies:
            return defer.succeed(self._replies.popleft())
        if self._broken is not None:
            return defer.fail(self._broken)
        waiter: Deferred[_RawReply] = Deferred()
        self._waiter = waiter
        self._timer = self._clock.callLater(timeout, self._timed_out, what)
        return waiter

    def _timed_out(self, what: str) -> None:
        self._fail(_SessionBroken(f"timed out while {what}"))

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # sending --------------------------------------------------------------------------------

    def send_lines(self, lines: Sequence[str]) -> None:
        if self._broken is not None or self.transport is None:
            return
        for line in lines:
            self.note(f"C: {line}")
        write_now(self.tx, b"".join(line.encode("utf-8") + b"\r\n" for line in lines))

    def send_data(self, data: bytes) -> None:
        """Send a whole, already stuffed message with its terminating dot line."""
        if self._broken is not None or self.transport is None:
            return
        self.note("C: <message>")
        self.note("C: .")
        write_now(self.tx, data)

    def pending_reply(self) -> _RawReply | None:
        """A reply that arrived unasked (a server refusing in the middle of the data), if any."""
        return self._replies.popleft() if self._replies else None

    @property
    def tx(self) -> Any:
        """The transport, untyped: mypy cannot see through zope interfaces."""
        return self.transport

    @property
    def broken(self) -> _SessionBroken | None:
        return self._broken


class _OneProtocolFactory(ClientFactory):
    def __init__(self, protocol: _ClientProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> _ClientProtocol:  # type: ignore[override]
        return self._protocol


class _DataProducer:
    """Streams the stuffed message to the transport as a pull producer, with the data-block timeout."""

    # One log line per event: our own, not Twisted's per-connection factory start/stop.
    noisy = False

    def __init__(
        self, protocol: _ClientProtocol, source: IO[bytes], clock: IReactorTime, timeout: float
    ) -> None:
        self._protocol = protocol
        self._source = source
        self._clock: Any = clock
        self._timeout = timeout
        self._stuffer = DotStuffer()
        self._timer: Any = None
        self.done: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        transport: Any = self._protocol.tx
        self._protocol.producer = self
        self._arm()
        transport.registerProducer(self, False)
        return self.done

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._clock.callLater(
            self._timeout,
            self._protocol._fail,
            _SessionBroken("timed out while sending the message"),
        )

    def resumeProducing(self) -> None:
        if self.done.called:
            return
        self._arm()
        transport: Any = self._protocol.tx
        try:
            chunk = self._source.read(READ_CHUNK)
        except OSError as e:
            self._protocol._fail(_SessionBroken(f"cannot read the message: {e}", "4.3.0"))
            return
        if chunk:
            transport.write(self._stuffer.feed(chunk))
            return
        transport.write(self._stuffer.finish())
        self._protocol.note("C: <message>")
        self._protocol.note("C: .")
        self._finish()
        self.done.callback(None)

    def _finish(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._protocol.producer = None
        transport: Any = self._protocol.tx
        if transport is not None:
            transport.unregisterProducer()
        self._source.close()

    def fail(self, error: _SessionBroken) -> None:
        if not self.done.called:
            self._finish()
            self.done.errback(error)

    def stopProducing(self) -> None:
        self.fail(_SessionBroken("lost connection while sending the message"))

    def pauseProducing(self) -> None:
        pass


# -- the message ------------------------------------------------------------------------------


def _open_source(message: MessageSource) -> IO[bytes]:
    if isinstance(message, bytes):
        return io.BytesIO(message)
    return open(message, "rb")  # closed by the producer


#: Messages up to this size are read into memory once and sent in one write.
SMALL_MESSAGE = 256 * 1024


def _small_in_memory(message: MessageSource) -> MessageSource:
    """The bytes of a small message file (one read instead of one to measure and one to send)."""
    if isinstance(message, bytes):
        return message
    with open(message, "rb") as f:
        if os.fstat(f.fileno()).st_size > SMALL_MESSAGE:
            return message  # not 256 KiB read for nothing
        head = f.read(SMALL_MESSAGE + 1)
    return head if len(head) <= SMALL_MESSAGE else message


def _measure(message: MessageSource) -> tuple[int, bool]:
    """(size in bytes, whether any byte is 8-bit)."""
    if isinstance(message, bytes):
        return len(message), not message.isascii()
    size = 0
    eight = False
    with open(message, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            size += len(chunk)
            eight = eight or not chunk.isascii()
    return size, eight


def _soft(reply: Reply) -> Reply:
    """A temporary version of ``reply`` (a refused greeting or HELO should not bounce)."""
    if not reply.permanent:
        return reply
    enhanced = "4" + reply.enhanced[1:] if reply.enhanced.startswith("5.") else "4.0.0"
    return Reply(451, enhanced, f"{reply.code} {reply.text}".strip())


# -- the session ------------------------------------------------------------------------------


class Session:
    """One SMTP connection to one address, able to carry several transactions.

    ``endpoint`` is any stream client endpoint (see :func:`tcp_endpoint`);
    ``remote`` names the peer in replies and logs (``mx.example.com[192.0.2.1]:25``);
    ``tls_options`` is a client TLS connection creator used for STARTTLS when
    the server offers it (None: never STARTTLS); with ``require_tls`` a session
    that could not start TLS fails with 4.7.4 instead (for a smart host that
    must see the password only encrypted); ``clock`` runs the timeouts.
    ``credentials`` (a smart host's) are sent with AUTH (RFC 4954) after
    STARTTLS and imply ``require_tls``: never in the clear, not even on retry.
    """

    def __init__(
        self,
        endpoint: IStreamClientEndpoint,
        helo_name: str,
        clock: IReactorTime,
        *,
        remote: str = "",
        tls_options: IOpenSSLClientConnectionCreator | None = None,
        timeouts: Timeouts | None = None,
        eight_bit: str = SEND_8BIT,
        require_tls: bool = False,
        credentials: Credentials | None = None,
    ) -> None:
        if eight_bit not in (SEND_8BIT, REFUSE_8BIT):
            raise ValueError(f"eight_bit must be {SEND_8BIT!r} or {REFUSE_8BIT!r}")
        self._endpoint: Any = endpoint
        self._helo_name = helo_name
        self._clock: Any = clock
        self.remote = remote or "remote host"
        self._tls_options = tls_options
        self._timeouts = timeouts or Timeouts()
        self._eight_bit = eight_bit
        self._require_tls = (require_tls and tls_options is not None) or credentials is not None
        self._credentials = credentials
        self.transcript: list[str] = []
        self._protocol: _ClientProtocol | None = None
        self.extensions: dict[str, str] = {}
        self.esmtp = False
        self.tls = False
        self.tls_failed = False
        self._open_transaction = False
        self._error: Reply | None = None
        self._try_next = True

    @property
    def requires_tls(self) -> bool:
        """Whether this session must not go on in the clear (a failed STARTTLS is no reason to retry without it)."""
        return self._require_tls

    @property
    def usable(self) -> bool:
        """Whether another transaction may be sent on this session."""
        return self._protocol is not None and self._error is None and self._protocol.broken is None

    @property
    def error(self) -> Reply | None:
        """Why the session failed (connect, greeting, timeout, ...), or None."""
        return self._error

    # opening --------------------------------------------------------------------------------

    def open(self) -> Deferred[Reply | None]:
        """Connect, read the greeting, EHLO/HELO, STARTTLS if offered; None when ready, else the error."""
        return ensureDeferred(self._open_guarded())

    async def _open_guarded(self) -> Reply | None:
        try:
            await self._open()
        except _SessionBroken as e:
            self._set_error(Reply(451, e.enhanced, f"{self.remote}: {e.why}"), try_next=True)
            if self._protocol is not None and self._protocol.tx is not None:
                self._protocol.tx.abortConnection()
        except Exception as e:
            log.failure("unexpected error talking to {remote}", remote=self.remote)
            self._set_error(Reply(451, "4.3.0", f"{self.remote}: internal error {e!r}"), True)
            self._abort()
        return self._error

    def _set_error(self, reply: Reply, try_next: bool) -> None:
        if self._error is None:
            self._error = reply
            self._try_next = try_next

    def _abort(self) -> None:
        if self._protocol is not None and self._protocol.tx is not None:
            self._protocol.tx.abortConnection()

    async def _connect(self) -> _ClientProtocol:
        protocol = _ClientProtocol(self._clock, self.transcript)
        connecting = self._endpoint.connect(_OneProtocolFactory(protocol))
        timer = self._clock.callLater(self._timeouts.connect, connecting.cancel)
        try:
            await connecting
        except defer.CancelledError:
            raise _SessionBroken("connect timed out", "4.4.1") from None
        except Exception as e:
            raise _SessionBroken(f"connect failed: {e}", "4.4.1") from None
        finally:
            if timer.active():
                timer.cancel()
        return protocol

    async def _open(self) -> None:
        self._protocol = protocol = await self._connect()
        banner = await protocol.read_reply(self._timeouts.greeting, "reading the greeting")
        if banner.code != 220:
            # RFC 5321 3.1: a 554 greeting means "try elsewhere"; never a bounce (as Postfix).
            reply = _soft(banner.reply())
            self._set_error(
                Reply(reply.code, reply.enhanced, f"{self.remote} greeting: {reply.text}"), True
            )
            await self._quit_quietly()
            return
        if not await self._hello():
            return
        if self._tls_options is not None and "STARTTLS" in self.extensions:
            protocol.send_lines(["STARTTLS"])
            answer = await protocol.read_reply(self._timeouts.starttls, "waiting for STARTTLS")
            if answer.code == 220:
                protocol.tx.startTLS(self._tls_options)
                try:
                    ok = await self._hello()
                except _SessionBroken as e:
                    if self._require_tls:
                        # No retry in the clear: say "TLS required", and leave tls_failed unset.
                        raise _SessionBroken(
                            f"TLS failed after STARTTLS: {e.why}; TLS is required", "4.7.4"
                        ) from None
                    self.tls_failed = True
                    raise _SessionBroken(f"TLS failed after STARTTLS: {e.why}", "4.7.5") from None
                if not ok:
                    return
                self.tls = True
        if self._require_tls and not self.tls:
            self._set_error(
                Reply(451, "4.7.4", f"{self.remote}: TLS is required but was not available"), True
            )
            await self._quit_quietly()
            return
        if self._credentials is not None:
            await self._authenticate()

    async def _authenticate(self) -> None:
        """SMTP AUTH (RFC 4954) with PLAIN (RFC 4616, initial response) if offered, else LOGIN.

        Only ever over TLS.  Every failure is temporary, 5xx included (Postfix's
        ``smtp_sasl_auth_soft_bounce``): a wrong password is the operator's to
        fix while the mail waits.  The transcript shows ``<hidden>`` for secrets.
        """
        protocol = self._protocol
        credentials = self._credentials
        assert protocol is not None and credentials is not None
        if not self.tls:  # _open checks this first; the password never goes out in the clear
            self._set_error(
                Reply(451, "4.7.4", f"{self.remote}: TLS is required before AUTH"), True
            )
            await self._quit_quietly()
            return

        def b64(data: str) -> str:
            return base64.b64encode(data.encode("utf-8")).decode("ascii")

        def secret(line: str, shown: str) -> None:
            if protocol.broken is not None:
                raise protocol.broken
            protocol.note(f"C: {shown}")
            protocol.tx.write(line.encode("ascii") + b"\r\n")

        mechanisms: set[str] = set()
        for keyword, params in self.extensions.items():
            if keyword == "AUTH" or keyword.startswith("AUTH="):  # "AUTH=LOGIN": old servers
                mechanisms.update(m.upper() for m in (keyword[5:] + " " + params).split() if m)
        what = "waiting for the AUTH reply"
        if "PLAIN" in mechanisms:
            token = b64(f"\0{credentials.username}\0{credentials.password}")
            secret(f"AUTH PLAIN {token}", "AUTH PLAIN <hidden>")
            answer = await protocol.read_reply(self._timeouts.helo, what)
        elif "LOGIN" in mechanisms:
            protocol.send_lines(["AUTH LOGIN"])
            answer = await protocol.read_reply(self._timeouts.helo, what)
            for value in (credentials.username, credentials.password):
                if answer.code != 334:
                    break
                secret(b64(value), "<hidden>")
                answer = await protocol.read_reply(self._timeouts.helo, what)
        else:
            offered = " ".join(sorted(mechanisms)) or "none"
            self._set_error(
                Reply(
                    451,
                    "4.7.0",
                    f"{self.remote} offers no AUTH mechanism this client has"
                    f" (PLAIN, LOGIN; offered: {offered})",
                ),
                True,
            )
            await self._quit_quietly()
            return
        if answer.code == 235:
            return
        reply = answer.reply()
        if answer.code == 334:
            secret("*", "*")  # cancel the exchange (RFC 4954 4)
            await protocol.read_reply(self._timeouts.helo, what)
        if answer.code // 100 == 5:
            enhanced = "4" + reply.enhanced[1:] if reply.enhanced != "5.0.0" else "4.7.8"
            failed = Reply(
                451, enhanced, f"{self.remote}: authentication failed: {answer.code} {reply.text}"
            )
        elif answer.code // 100 == 4:
            failed = Reply(
                answer.code, reply.enhanced, f"{self.remote}: authentication failed: {reply.text}"
            )
        else:
            failed = Reply(
                451, "4.7.0", f"{self.remote}: unexpected AUTH reply {answer.code} {reply.text}"
            )
        self._set_error(failed, True)
        await self._quit_quietly()

    async def _hello(self) -> bool:
        """EHLO, and HELO when EHLO is refused with 5xx (RFC 5321 4.1.4); false after an error."""
        protocol = self._protocol
        assert protocol is not None
        protocol.send_lines([f"EHLO {self._helo_name}"])
        answer = await protocol.read_reply(self._timeouts.helo, "waiting for the EHLO reply")
        if answer.code == 250:
            self.esmtp = True
            self.extensions = {}
            for line in answer.lines[1:]:
                keyword, _, params = line.strip().partition(" ")
                if keyword:
                    self.extensions[keyword.upper()] = params.strip()
            return True
        if 500 <= answer.code < 600:
            protocol.send_lines([f"HELO {self._helo_name}"])
            answer = await protocol.read_reply(self._timeouts.helo, "waiting for the HELO reply")
            if answer.code == 250:
                self.esmtp = False
                self.extensions = {}
                return True
        reply = _soft(answer.reply())
        self._set_error(
            Reply(reply.code, reply.enhanced, f"{self.remote} refused HELO: {reply.text}"), True
        )
        await self._quit_quietly()
        return False

    # the transaction ------------------------------------------------------------------------

    def send(
        self,
        sender: str,
        recipients: Iterable[str],
        message: MessageSource,
        *,
        body_8bit: bool | None = None,
    ) -> Deferred[DeliveryResult]:
        """One transaction; every recipient gets a reply, whatever happens.  Never errbacks.

        ``body_8bit`` says whether the message has 8-bit bytes; None: scan it.
        """
        return ensureDeferred(self.transaction(sender, recipients, message, body_8bit=body_8bit))

    def transaction(
        self,
        sender: str,
        recipients: Iterable[str],
        message: MessageSource,
        *,
        body_8bit: bool | None = None,
    ) -> Coroutine[Any, Any, DeliveryResult]:
        """:meth:`send` as a coroutine, for callers that are coroutines themselves (one layer less)."""
        return self._send_guarded(sender, list(dict.fromkeys(recipients)), message, body_8bit)

    async def _send_guarded(
        self, sender: str, recipients: list[str], message: MessageSource, body_8bit: bool | None
    ) -> DeliveryResult:
        result = DeliveryResult(replies={}, remote=self.remote, transcript=self.transcript)
        after_dot = [False]
        try:
            await self._send(sender, recipients, message, body_8bit, result, after_dot)
        except _SessionBroken as e:
            if after_dot[0]:
                why = f"{e.why} after the end of the message; it may have been delivered (possible duplicate)"
                self._set_error(Reply(451, e.enhanced, f"{self.remote}: {why}"), try_next=False)
            else:
                self._set_error(Reply(451, e.enhanced, f"{self.remote}: {e.why}"), try_next=True)
            self._abort()
        except Exception as e:
            log.failure("unexpected error talking to {remote}", remote=self.remote)
            self._set_error(Reply(451, "4.3.0", f"{self.remote}: internal error {e!r}"), True)
            self._abort()
        if self._error is not None:
            result.error = self._error
            result.try_next = self._try_next
            for rcpt in recipients:
                result.replies.setdefault(rcpt, self._error)
        for rcpt in recipients:
            if rcpt not in result.replies:  # cannot happen; never leave a recipient unanswered
                log.error("no reply recorded for {rcpt} at {remote}", rcpt=rcpt, remote=self.remote)
                result.replies[rcpt] = Reply(451, "4.3.0", "internal error: no reply recorded")
        result.replies = {r: result.replies[r] for r in recipients}
        result.tls = self.tls
        result.tls_failed = self.tls_failed
        return result

    def _all(self, result: DeliveryResult, recipients: Iterable[str], reply: Reply) -> None:
        for rcpt in recipients:
            result.replies.setdefault(rcpt, reply)

    async def _send(
        self,
        sender: str,
        recipients: list[str],
        message: MessageSource,
        body_8bit: bool | None,
        result: DeliveryResult,
        after_dot: list[bool],
    ) -> None:
        protocol = self._protocol
        if protocol is None:
            opened = await self._open_guarded()
            if opened is not None:
                return
            protocol = self._protocol
        if self._error is not None or protocol is None:
            return
        if protocol.broken is not None:
            raise protocol.broken

        for rcpt in recipients:
            if not rcpt or _BAD_ADDRESS_CHARS.search(rcpt):
                result.replies[rcpt] = Reply(
                    553, "5.1.3", f"bad recipient address syntax: {rcpt!r}"
                )
        wanted = [r for r in recipients if r not in result.replies]
        if not wanted:
            return
        if _BAD_ADDRESS_CHARS.search(sender):
            self._all(result, wanted, Reply(553, "5.1.7", f"bad sender address syntax: {sender!r}"))
            return
        try:
            message = _small_in_memory(message)
            size, eight = _measure(message)
        except OSError as e:
            self._all(result, wanted, Reply(451, "4.3.0", f"cannot read the message: {e}"))
            return
        if body_8bit is not None:
            eight = body_8bit
        utf8 = not (sender.isascii() and all(r.isascii() for r in wanted))

        limit_text = self.extensions.get("SIZE", "")
        limit = int(limit_text) if limit_text.isdigit() else 0
        if limit and size > limit:
            self._all(
                result,
                wanted,
                Reply(
                    552, "5.3.4", f"message size {size} exceeds the limit {limit} of {self.remote}"
                ),
            )
            return
        if eight and "8BITMIME" not in self.extensions and self._eight_bit == REFUSE_8BIT:
            self._all(
                result,
                wanted,
                Reply(554, "5.6.3", f"{self.remote} does not accept 8-bit data (no 8BITMIME)"),
            )
            return
        if utf8 and "SMTPUTF8" not in self.extensions:
            self._all(
                result,
                wanted,
                Reply(553, "5.6.7", f"{self.remote} does not accept UTF-8 addresses (no SMTPUTF8)"),
            )
            return

        if self._open_transaction:
            # The previous transaction ended before its final dot: clear it (RFC 5321 4.1.1.5).
            protocol.send_lines(["RSET"])
            answer = await protocol.read_reply(self._timeouts.rset, "waiting for the RSET reply")
            if answer.code != 250:
                raise _SessionBroken(f"RSET refused: {answer.code}")
            self._open_transaction = False

        params = []
        if "SIZE" in self.extensions:
            params.append(f"SIZE={size}")
        if eight and "8BITMIME" in self.extensions:
            params.append("BODY=8BITMIME")
        if utf8:
            params.append("SMTPUTF8")
        mail = " ".join([f"MAIL FROM:<{sender}>", *params])
        rcpts = [f"RCPT TO:<{r}>" for r in wanted]

        # RFC 2920 3.1: with PIPELINING, MAIL, every RCPT and DATA go out as one group.
        pipelining = "PIPELINING" in self.extensions
        if pipelining:
            protocol.send_lines([mail, *rcpts, "DATA"])
        else:
            protocol.send_lines([mail])
        mail_answer = await protocol.read_reply(self._timeouts.mail, "waiting for the MAIL reply")
        mail_reply = mail_answer.reply()
        if mail_answer.code // 100 == 2:
            self._open_transaction = True
        else:
            if mail_answer.code // 100 not in (4, 5):
                mail_reply = Reply(451, "4.5.0", f"unexpected MAIL reply: {mail_reply.text}")
            self._all(result, wanted, mail_reply)
            if pipelining:  # the pipelined RCPTs and DATA get answers too; read them off
                for _ in rcpts:
                    await protocol.read_reply(self._timeouts.rcpt, "waiting for an RCPT reply")
                await self._refuse_pipelined_data(protocol)
            if mail_answer.code == 421:
                raise _SessionBroken(f"service closing: {mail_reply.text}", mail_reply.enhanced)
            return

        accepted: list[str] = []
        for rcpt, line in zip(wanted, rcpts, strict=True):
            if not pipelining:
                protocol.send_lines([line])
            answer = await protocol.read_reply(self._timeouts.rcpt, "waiting for an RCPT reply")
            reply = answer.reply()
            if answer.code // 100 == 2:
                accepted.append(rcpt)  # its reply is the one to the final dot
                continue
            if answer.code // 100 not in (4, 5):
                reply = Reply(451, "4.5.0", f"unexpected RCPT reply: {answer.code} {reply.text}")
            result.replies[rcpt] = reply
        if not accepted:
            if pipelining:
                await self._refuse_pipelined_data(protocol)
            return

        if not pipelining:
            protocol.send_lines(["DATA"])
        answer = await protocol.read_reply(self._timeouts.data_init, "waiting for the DATA reply")
        if answer.code != 354:
            reply = answer.reply()
            if answer.code // 100 not in (4, 5):
                reply = Reply(451, "4.5.0", f"unexpected DATA reply: {answer.code} {reply.text}")
            self._all(result, accepted, reply)
            return
        try:
            if isinstance(message, bytes) and len(message) <= SMALL_MESSAGE:
                # A small message goes out in one write, end-of-data included.
                stuffer = DotStuffer()
                protocol.send_data(stuffer.feed(message) + stuffer.finish())
            else:
                try:
                    source = _open_source(message)
                except OSError as e:
                    raise _SessionBroken(f"cannot read the message: {e}", "4.3.0") from None
                await _DataProducer(
                    protocol, source, self._clock, self._timeouts.data_block
                ).start()
        except _SessionBroken:
            early = protocol.pending_reply()
            if early is None or early.code // 100 not in (4, 5):
                raise
            # The server refused part-way (552 too big, 554 policy) and closed: its answer stands.
            self._all(result, accepted, early.reply())
            raise
        after_dot[0] = True
        answer = await protocol.read_reply(
            self._timeouts.final_dot, "waiting for the end-of-data reply"
        )
        self._open_transaction = False
        reply = answer.reply()
        if answer.code // 100 not in (2, 4, 5):
            reply = Reply(451, "4.5.0", f"unexpected end-of-data reply: {answer.code} {reply.text}")
        self._all(result, accepted, reply)
        after_dot[0] = False

    async def _refuse_pipelined_data(self, protocol: _ClientProtocol) -> None:
        """Read the reply to a pipelined DATA after no recipient was accepted.

        It should be a refusal (RFC 2920 3.1); a server that says 354 anyway
        gets an empty message it must not deliver, and its reply is ignored.
        """
        answer = await protocol.read_reply(self._timeouts.data_init, "waiting for the DATA reply")
        if answer.code == 354:
            protocol.send_lines(["."])
            await protocol.read_reply(self._timeouts.final_dot, "waiting for the end-of-data reply")

    # closing --------------------------------------------------------------------------------

    async def _quit_quietly(self) -> None:
        protocol = self._protocol
        if protocol is None or protocol.broken is not None:
            return
        protocol.send_lines(["QUIT"])
        try:
            await protocol.read_reply(self._timeouts.quit, "waiting for the QUIT reply")
        except _SessionBroken:
            pass
        if protocol.tx is not None:
            protocol.tx.loseConnection()

    def close(self) -> Deferred[None]:
        """QUIT (if the session still works) and wait until the connection is gone."""

        async def closing() -> None:
            protocol = self._protocol
            if protocol is None:
                return
            try:
                await self._quit_quietly()
            except Exception:
                log.failure("closing the session with {remote}", remote=self.remote)
            if protocol.tx is not None and not protocol.lost.called:
                timer = self._clock.callLater(self._timeouts.quit, self._abort)
                await protocol.lost
                if timer.active():
                    timer.cancel()

        return ensureDeferred(closing())


def deliver(
    endpoint_or_address: IStreamClientEndpoint | tuple[str, int],
    helo_name: str,
    sender: str,
    recipients: Sequence[str],
    message: MessageSource,
    tls_options: IOpenSSLClientConnectionCreator | None,
    clock: IReactorTime,
    *,
    reactor: IReactorTCP | None = None,
    remote: str = "",
    timeouts: Timeouts | None = None,
    eight_bit: str = SEND_8BIT,
    body_8bit: bool | None = None,
    require_tls: bool = False,
) -> Deferred[DeliveryResult]:
    """Deliver one message to one destination: connect, transaction, QUIT.  Never errbacks.

    ``endpoint_or_address`` is an endpoint or ``(address, port)``; for the
    latter ``reactor`` (default: ``clock`` when it can connect) makes the TCP
    connection, IPv4 or IPv6.
    """
    endpoint: Any
    if isinstance(endpoint_or_address, tuple):
        address, port = endpoint_or_address
        tcp = reactor if reactor is not None else clock
        if not IReactorTCP.providedBy(tcp):
            raise TypeError("an (address, port) destination needs a reactor that can connect")
        endpoint = tcp_endpoint(tcp, address, port)  # type: ignore[arg-type]
        remote = remote or (f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
    else:
        endpoint = endpoint_or_address
    session = Session(
        endpoint,
        helo_name,
        clock,
        remote=remote,
        tls_options=tls_options,
        timeouts=timeouts,
        eight_bit=eight_bit,
        require_tls=require_tls,
    )

    async def run() -> DeliveryResult:
        result = await session.send(sender, recipients, message, body_8bit=body_8bit)
        await session.close()
        return result

    return ensureDeferred(run())


# -- one attempt for one route: walk the destinations --------------------------------------------

BOUNCE_SELF = "bounce"
TRY_ADDRESSES = "addresses"


@dataclass(frozen=True)
class Outcome:
    """The last word on one recipient in this attempt; ``remote_mta`` is the host that said it."""

    reply: Reply
    remote_mta: str | None = None


@dataclass(frozen=True)
class Credentials:
    """A login for the smart host's SMTP AUTH (Postfix's ``smtp_sasl_password_maps``); never printed."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class OutboundSettings:
    """What the queue runner configures once for every remote attempt.

    ``opportunistic_tls`` uses STARTTLS whenever offered, unverified
    (:class:`OpportunisticTLS`); a handshake that fails is retried once in
    the clear on the same address, as Postfix does at security level "may".
    ``self_is_best_mx`` is :data:`BOUNCE_SELF` (5.4.6, the default) or
    :data:`TRY_ADDRESSES` (sendmail's TryNullMXList: deliver to the domain's
    own address records).  ``fallback`` is a route tried for the recipients
    still deferred after every destination of the main route (``FallbackMX``).
    """

    helo_name: str
    own_names: tuple[str, ...] = ()
    own_addresses: tuple[str, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    opportunistic_tls: bool = True
    eight_bit: str = SEND_8BIT
    self_is_best_mx: str = BOUNCE_SELF
    max_addresses: int = 10
    fallback: Route | None = None
    #: AUTH for the smart host route only (not static routes or MXs), only over TLS.
    smart_host_credentials: Credentials | None = None


EndpointFactory = Callable[[str, int], Any]


async def _attempt(
    route: Route,
    sender: str,
    recipients: list[str],
    message: MessageSource,
    resolver: Any,
    settings: OutboundSettings,
    clock: IReactorTime,
    endpoints: EndpointFactory,
    rng: Any,
    allow_fallback: bool,
    pool: SessionPool | None = None,
) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    remaining = list(recipients)
    credentials = settings.smart_host_credentials if route.kind == SMART_HOST else None
    key = (route, settings.opportunistic_tls, credentials)

    # A connection kept from the last message to this next hop goes first, without
    # a DNS lookup (as Postfix's connection cache by destination).  If it fails
    # before the end of the message, the recipients go the whole way below.
    taken = pool.take(key) if pool is not None else None
    if taken is not None:
        session, host = taken
        result = await session.transaction(sender, remaining, message)
        remaining = _settle(result, remaining, host, outcomes, cached=True)
        await _keep_or_close(pool, key, session, host)
        if not remaining:
            return outcomes

    found = await mx.destinations(
        route,
        resolver,
        settings.own_names,
        settings.own_addresses,
        rng,
        max_addresses=settings.max_addresses,
    )
    if isinstance(found, mx.SelfIsBestMX) and settings.self_is_best_mx == TRY_ADDRESSES:
        direct = Route(route.kind, route.host, route.port, False)
        found = await mx.destinations(
            direct, resolver, (), settings.own_addresses, rng, max_addresses=settings.max_addresses
        )
    if isinstance(found, mx.SelfIsBestMX):
        return {**outcomes, **{r: Outcome(found.reply) for r in remaining}}
    if isinstance(found, mx.PermanentFailure | mx.TemporaryFailure):
        failed = {**outcomes, **{r: Outcome(found.reply) for r in remaining}}
        if isinstance(found, mx.TemporaryFailure) and allow_fallback and settings.fallback:
            return await _fallback(
                failed, sender, message, resolver, settings, clock, endpoints, rng, pool
            )
        return failed

    for destination in found.hosts:
        if not remaining:
            break
        tls = settings.opportunistic_tls
        remote = f"{destination.host}[{destination.address}]:{destination.port}"
        while True:
            session = _new_session(
                destination, remote, tls, credentials, settings, clock, endpoints
            )
            result = await session.transaction(sender, remaining, message)
            await _keep_or_close(pool, key, session, destination.host)
            if result.tls_failed and tls and not session.requires_tls:
                tls = False  # once more on the same address, in the clear
                continue
            break
        remaining = _settle(result, remaining, destination.host, outcomes)
    if remaining and allow_fallback and settings.fallback:
        return await _fallback(
            outcomes, sender, message, resolver, settings, clock, endpoints, rng, pool
        )
    return outcomes


def _settle(
    result: DeliveryResult,
    recipients: list[str],
    host: str,
    outcomes: dict[str, Outcome],
    cached: bool = False,
) -> list[str]:
    """Record what ``host`` said; return the recipients to try at the next address.

    Those are the ones left with the session's own temporary error when it may
    be retried elsewhere (``try_next``).  On a ``cached`` connection the
    destination may simply have closed it while it waited: a recipient the
    server never answered is tried again from the start, not recorded.
    """
    still: list[str] = []
    for rcpt in recipients:
        reply = result.replies[rcpt]
        if cached and result.error is not None and reply is result.error and result.try_next:
            still.append(rcpt)
            continue
        outcomes[rcpt] = Outcome(reply, host)
        if reply.temporary and result.try_next:
            still.append(rcpt)
    return still


async def _keep_or_close(pool: SessionPool | None, key: Any, session: Session, host: str) -> None:
    """Keep a session that still works for the next message to the same next hop, else QUIT."""
    if pool is not None:
        pool.give(key, session, host)  # closes it unless it is still good
    else:
        await session.close()


def _new_session(
    destination: Any,
    remote: str,
    tls: bool,
    credentials: Credentials | None,
    settings: OutboundSettings,
    clock: IReactorTime,
    endpoints: EndpointFactory,
) -> Session:
    tls_options: Any = OpportunisticTLS(destination.host) if tls else None
    return Session(
        endpoints(destination.address, destination.port),
        settings.helo_name,
        clock,
        remote=remote,
        tls_options=tls_options,
        timeouts=settings.timeouts,
        eight_bit=settings.eight_bit,
        credentials=credentials,
    )


async def _fallback(
    outcomes: dict[str, Outcome],
    sender: str,
    message: MessageSource,
    resolver: Any,
    settings: OutboundSettings,
    clock: IReactorTime,
    endpoints: EndpointFactory,
    rng: Any,
    pool: SessionPool | None = None,
) -> dict[str, Outcome]:
    deferred = [r for r, o in outcomes.items() if o.reply.temporary]
    if deferred and settings.fallback is not None:
        more = await _attempt(
            settings.fallback,
            sender,
            deferred,
            message,
            resolver,
            settings,
            clock,
            endpoints,
            rng,
            False,
            pool,
        )
        for rcpt, outcome in more.items():
            if not (outcome.reply.temporary and outcome.remote_mta is None):
                outcomes[rcpt] = outcome
    return outcomes


async def attempt(
    route: Route,
    sender: str,
    recipients: Sequence[str],
    message: MessageSource,
    resolver: Any,
    settings: OutboundSettings,
    clock: IReactorTime,
    endpoints: EndpointFactory,
    rng: Any,
    pool: SessionPool | None = None,
) -> dict[str, Outcome]:
    """One delivery attempt for the recipients sharing ``route``: every recipient gets an :class:`Outcome`.

    Resolves the destinations (:func:`appliance.mail.mx.destinations`) and
    walks them in order, one transaction per address, handing the recipients
    still deferred by a session-level failure (``try_next``) to the next
    address, then to the fallback route.  2xx: delivered; 5xx: bounce; 4xx:
    retry later.  ``endpoints(address, port)`` makes the connection endpoint
    (normally ``lambda a, p: tcp_endpoint(reactor, a, p)``).  With a ``pool``
    a session still usable after its transaction is kept there for the next
    message to the same destination (:mod:`appliance.mail.connections`).
    Never raises.
    """
    rcpts = list(dict.fromkeys(recipients))
    try:
        return await _attempt(
            route, sender, rcpts, message, resolver, settings, clock, endpoints, rng, True, pool
        )
    except Exception:
        log.failure("delivery attempt via {route} failed", route=route)
        return {r: Outcome(Reply(451, "4.3.0", "internal error during delivery")) for r in rcpts}


__all__ = [
    "BOUNCE_SELF",
    "TRY_ADDRESSES",
    "Credentials",
    "DeliveryResult",
    "DotStuffer",
    "MessageSource",
    "OpportunisticTLS",
    "OutboundSettings",
    "Outcome",
    "Session",
    "Timeouts",
    "attempt",
    "deliver",
    "tcp_endpoint",
]
