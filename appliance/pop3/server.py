"""The POP3 server (M-9): RFC 1939 with CAPA (RFC 2449), STLS (RFC 2595), AUTH PLAIN (RFC 5034), APOP.

A small protocol of its own rather than a twisted.mail.pop3 subclass: the
parts that would need overriding (CAPA, STLS, SASL, error handling,
streaming with stuffing, the mailbox) are most of it.  Commands are handled
one at a time; while one waits (a password check, a message being
streamed) pipelined input stays buffered (RFC 2449 section 6.6).

Plaintext credentials (USER/PASS, AUTH PLAIN) are accepted only on a TLS
connection, or from an inside network when ``allow_plaintext_inside``.  APOP
sends no password and is offered when the directory can check it.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IPushProducer, IReactorTime, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from appliance.directory.base import Directory, DirectoryUnavailable, User
from appliance.netio import write_now
from appliance.pop3.mailbox import (
    CHUNK,
    DEFAULT_LOCKS,
    DEFAULT_SIZES,
    LineEncoder,
    MailboxLocks,
    MaildirMailbox,
    NoSuchMessage,
    SizeCache,
    encode_message,
)

__all__ = ["POP3Server", "POP3ServerFactory"]

_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 2449 section 4 limits command lines to 255 octets; AUTH responses may be
# longer, so allow some room before calling a line hostile.
MAX_LINE = 4096
# Pipelined input kept while a command is busy before we stop reading.
MAX_BUFFER = 64 * 1024

_AUTH = "AUTHORIZATION"
_TRANSACTION = "TRANSACTION"
_CLOSED = "CLOSED"


def _client_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _number(arg: str) -> int | None:
    if not arg.isascii() or not arg.isdigit() or len(arg) > 9:
        return None
    return int(arg)


class POP3ServerFactory(Factory):
    """Builds :class:`POP3Server` sessions for one listener (110 with STLS, or 995 implicit TLS).

    ``tls_options`` is an OpenSSL context factory (CertificateOptions) or
    None (no STLS).  ``implicit_tls`` starts TLS before the greeting (RFC
    8314); a listener that already wraps connections in TLS also works.
    ``on_login(client_ip)`` runs after each successful login
    (POP-before-SMTP).  ``on_auth_failure(client_ip, login)`` runs after each
    failed one and ``failure_delay(client_ip)`` gives seconds to wait before
    answering it: the hooks for brute-force throttling.  ``locks`` and
    ``sizes`` default to process-wide registries shared by all listeners.
    ``run_io(f)`` runs the Maildir scan at login and the UPDATE at QUIT
    (thousands of stats/renames for a big mailbox) and returns a Deferred;
    the default runs them inline, production should pass a thread pool
    (``lambda f: deferToThreadPool(reactor, pool, f)``).
    """

    # One log line per event: our own, not Twisted's per-connection factory start/stop.
    noisy = False

    def __init__(
        self,
        directory: Directory,
        mail_root: str,
        hostname: str,
        tls_options: Any,
        inside_networks: Iterable[_IPNetwork | str],
        allow_plaintext_inside: bool,
        implicit_tls: bool,
        clock: IReactorTime | Any,
        idle_timeout: float = 600,
        on_login: Callable[[str], object] | None = None,
        *,
        on_auth_failure: Callable[[str, str], object] | None = None,
        failure_delay: Callable[[str], float] | None = None,
        max_auth_failures: int = 3,
        locks: MailboxLocks | None = None,
        sizes: SizeCache | None = None,
        run_io: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
    ) -> None:
        if implicit_tls and tls_options is None:
            raise ValueError("implicit TLS needs tls_options")
        self.directory = directory
        self.mail_root = mail_root
        self.hostname = hostname
        self.tls_options = tls_options
        self.inside_networks = tuple(ipaddress.ip_network(n) for n in inside_networks)
        self.allow_plaintext_inside = allow_plaintext_inside
        self.implicit_tls = implicit_tls
        self.clock: Any = clock
        self.idle_timeout = idle_timeout
        self.on_login = on_login
        self.on_auth_failure = on_auth_failure
        self.failure_delay = failure_delay
        self.max_auth_failures = max_auth_failures
        self.locks = DEFAULT_LOCKS if locks is None else locks
        self.sizes = DEFAULT_SIZES if sizes is None else sizes
        self.run_io: Callable[[Callable[[], Any]], Deferred[Any]] = run_io or maybeDeferred

    @property
    def apop_available(self) -> bool:
        return callable(getattr(self.directory, "authenticate_apop", None))

    def is_inside(self, host: str) -> bool:
        ip = _client_ip(host)
        return ip is not None and any(ip in net for net in self.inside_networks)

    def buildProtocol(self, addr: Any) -> Any:
        p = POP3Server()
        p.factory = self
        return p


class _MessageSender:
    """Streams one big message (RETR) through a LineEncoder, one chunk per step."""

    def __init__(self, server: POP3Server, f: BinaryIO, number: int) -> None:
        self._server = server
        self._file: BinaryIO | None = f
        self._number = number
        self.encoder = LineEncoder()

    def step(self) -> None:
        """Send the next chunk; after the last one, the final "." and streamDone."""
        f = self._file
        if f is None:
            return
        try:
            chunk = f.read(CHUNK)
        except OSError as e:
            self._server.log.error("pop3 read error while sending: {error}", error=e)
            self.stop()
            self._server.streamFailed()
            return
        self._server.resetTimeout()
        if chunk:
            out = self.encoder.feed(chunk)
            if out:
                self._server.write(out)
            return
        self._server.write(self.encoder.finish() + b".\r\n")
        self.stop()
        self._server.streamDone(self._number)

    def stop(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@implementer(IPushProducer)
class POP3Server(Protocol):
    """One POP3 session.  States: AUTHORIZATION, TRANSACTION, then closed (UPDATE at QUIT).

    The session is its transport's streaming producer: when the send buffer
    fills (a client that pipelines RETRs but reads slowly), the transport
    pauses it and no further command or chunk is produced until it resumes,
    so memory stays bounded.
    """

    log = Logger()
    factory: POP3ServerFactory
    # Typed loosely: without mypy-zope, interface-typed attributes confuse mypy.
    transport: Any

    def __init__(self) -> None:
        self.state = _AUTH
        self.secure = False
        self.client = ""
        self.user: User | None = None
        self.mailbox: MaildirMailbox | None = None
        self._buffer = b""
        self._pos = 0
        self._busy = False
        self._processing = False
        self._out: list[bytes] = []
        self._out_size = 0
        self._paused = False
        self._write_paused = False
        self._registered = False
        self._disconnected = False
        self._user_name: str | None = None
        self._sasl_pending = False
        self._failures = 0
        self._timestamp: str | None = None
        self._timer: Any = None
        self._sender: _MessageSender | None = None
        self._locked_path: str | None = None
        self._committing = False
        self._delayed_refusal: Any = None

    # -- connection -----------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        peer = transport.getPeer()
        host = str(getattr(peer, "host", ""))
        ip = _client_ip(host)
        # IPv4-mapped IPv6 peers are reported as plain IPv4, as SMTP sees them.
        self.client = str(ip) if ip is not None else host
        nodelay = getattr(transport, "setTcpNoDelay", None)
        if nodelay is not None:
            try:
                nodelay(True)
            except OSError:
                pass
        if ISSLTransport.providedBy(transport):
            self.secure = True
        elif self.factory.implicit_tls:
            transport.startTLS(self.factory.tls_options)
            self.secure = True
        transport.registerProducer(self, True)
        self._registered = True
        greeting = f"+OK {self.factory.hostname} POP3 server ready"
        if self.factory.apop_available:
            clock = int(self.factory.clock.seconds())
            self._timestamp = (
                f"<{os.getpid()}.{os.urandom(8).hex()}.{clock}@{self.factory.hostname}>"
            )
            greeting += " " + self._timestamp
        self._send(greeting)
        self.resetTimeout()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._disconnected = True
        self.state = _CLOSED
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._sender is not None:
            self._sender.stop()
            self._sender = None
        if self._delayed_refusal is not None and self._delayed_refusal.active():
            self._delayed_refusal.cancel()
        if not self._committing:
            self._unlock()

    def resetTimeout(self) -> None:
        """Restart the inactivity timer (RFC 1939 section 3: at least 10 minutes)."""
        if self._disconnected:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.factory.idle_timeout)
        else:
            self._timer = self.factory.clock.callLater(self.factory.idle_timeout, self._idle)

    def _idle(self) -> None:
        self._timer = None
        self.log.info("pop3 idle timeout for {client}", client=self.client)
        # No UPDATE on a timeout: deletions are forgotten (RFC 1939 section 3).
        self._send("-ERR autologout: idle for too long")
        self._close()

    def _close(self) -> None:
        self.state = _CLOSED
        self._buffer = b""
        self._pos = 0
        if self._sender is not None:
            self._sender.stop()
            self._sender = None
        self._flush()
        if self.transport is not None:
            # A transport with a registered producer would never close.
            if self._registered:
                self._registered = False
                self.transport.unregisterProducer()
            self.transport.loseConnection()

    # -- IPushProducer: the transport's send buffer is full / drained ---

    def pauseProducing(self) -> None:
        self._write_paused = True

    def resumeProducing(self) -> None:
        self._write_paused = False
        try:
            self.resetTimeout()  # the client is reading: not idle
            if self._sender is not None:
                self._pump()
            elif not self._busy:
                self._process()
        except Exception:
            self.log.failure("pop3 session error for {client}", client=self.client)
            if self.transport is not None:
                self.transport.abortConnection()

    def stopProducing(self) -> None:
        self._write_paused = True

    def _pump(self) -> None:
        """Send chunks of the message being streamed for as long as the transport takes them."""
        while self._sender is not None and not self._write_paused and not self._disconnected:
            self._sender.step()

    def _unlock(self) -> None:
        if self._locked_path is not None:
            self.factory.locks.release(self._locked_path)
            self._locked_path = None

    # -- input ----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        try:
            if self.state == _CLOSED:
                return
            self.resetTimeout()
            self._buffer += data
            self._process()
        except Exception:
            self.log.failure("pop3 session error from {client}", client=self.client)
            if self.transport is not None:
                self.transport.abortConnection()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            # Lines are taken by position and the buffer compacted once at the
            # end, so a long pipelined burst is not copied once per command.
            while not self._busy and not self._write_paused and self.state != _CLOSED:
                end = self._buffer.find(b"\n", self._pos)
                if end < 0:
                    if len(self._buffer) - self._pos > MAX_LINE:
                        self._send("-ERR line too long")
                        self._close()
                    break
                line = self._buffer[self._pos : end]
                self._pos = end + 1
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) > MAX_LINE:
                    self._send("-ERR line too long")
                    self._close()
                    break
                try:
                    self._line(line)
                except Exception:
                    self.log.failure("pop3 command failed for {client}", client=self.client)
                    self._busy = False
                    self._send("-ERR [SYS/TEMP] internal error")
        finally:
            self._processing = False
            self._flush()
            if self._pos:
                self._buffer = self._buffer[self._pos :]
                self._pos = 0
        transport = self.transport
        if transport is None or self._disconnected:
            return
        blocked = self._busy or self._write_paused
        if blocked and len(self._buffer) > MAX_BUFFER and not self._paused:
            self._paused = True
            transport.pauseProducing()
        elif self._paused and not blocked:
            self._paused = False
            transport.resumeProducing()

    def _done(self) -> None:
        """A busy command finished: go on with pipelined input."""
        self._busy = False
        if not self._disconnected:
            self._process()

    def _send(self, text: str) -> None:
        self._write(text.encode("utf-8") + b"\r\n")

    def write(self, data: bytes) -> None:
        """Send raw bytes (nothing once the connection is gone)."""
        self._write(data)

    def _write(self, data: bytes) -> None:
        if self.transport is None or self._disconnected:
            return
        if self._processing and not self._busy:
            # The replies to a pipelined burst go out in one send (_flush at the end
            # of _process, or once OUT_BATCH bytes are waiting, to keep flow control).
            self._out.append(data)
            self._out_size += len(data)
            if self._out_size >= OUT_BATCH:
                self._flush()
            return
        self._flush(data)

    def _flush(self, more: bytes = b"") -> None:
        """Send the replies held back during a burst (and ``more`` after them)."""
        if self._out:
            more = b"".join(self._out) + more
            self._out = []
            self._out_size = 0
        if more and self.transport is not None and not self._disconnected:
            write_now(self.transport, more)

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace")
        if self._sasl_pending:
            self._sasl_pending = False
            self._auth_plain_response(text)
            return
        command, _, rest = text.partition(" ")
        command = command.upper()
        handler = getattr(self, f"do_{command}", None) if command.isalpha() else None
        if handler is None:
            self._send("-ERR unknown command")
            return
        allowed = _ALLOWED.get(command, ())
        if self.state not in allowed:
            self._send("-ERR command not valid in this state")
            return
        handler(rest)

    # -- capabilities ---------------------------------------------------

    def plaintext_allowed(self) -> bool:
        """Whether passwords may be sent now: over TLS, or from inside when allowed."""
        if self.secure:
            return True
        return self.factory.allow_plaintext_inside and self.factory.is_inside(self.client)

    def capabilities(self) -> list[str]:
        """RFC 2449 section 6 capabilities for the current state."""
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state == _AUTH:
            if self.plaintext_allowed():
                caps += ["USER", "SASL PLAIN"]
            if self.factory.tls_options is not None and not self.secure:
                caps.append("STLS")
        caps.append("IMPLEMENTATION appliance")
        return caps

    def do_CAPA(self, rest: str) -> None:
        lines = ["+OK capability list follows", *self.capabilities(), "."]
        self._write("".join(f"{line}\r\n" for line in lines).encode("ascii"))

    # -- AUTHORIZATION --------------------------------------------------

    def do_STLS(self, rest: str) -> None:
        if self.factory.tls_options is None:
            self._send("-ERR STLS not available")
            return
        if self.secure:
            self._send("-ERR already using TLS")
            return
        self._send("+OK begin TLS negotiation")
        # RFC 2595 section 4 / CVE-2011-0411: plaintext sent after STLS must not
        # be taken as if it had come over TLS.
        self._buffer = b""
        self._pos = 0
        self._user_name = None
        assert self.transport is not None
        self._flush()  # the +OK goes out in the clear, before the handshake
        self.transport.startTLS(self.factory.tls_options)
        self.secure = True

    def _plaintext_refused(self) -> bool:
        if self.plaintext_allowed():
            return False
        self._send("-ERR [AUTH] plaintext authentication disallowed on non-secure connections")
        return True

    def do_USER(self, rest: str) -> None:
        if self._plaintext_refused():
            return
        name = rest.strip()
        if not name:
            self._send("-ERR USER needs a name")
            return
        self._user_name = name
        self._send("+OK send PASS")

    def do_PASS(self, rest: str) -> None:
        if self._plaintext_refused():
            return
        name, self._user_name = self._user_name, None
        if name is None:
            self._send("-ERR USER first")
            return
        # RFC 1939 section 7: the argument is the rest of the line, spaces included.
        self._login(name, "PASS", lambda: self.factory.directory.authenticate(name, rest))

    def do_APOP(self, rest: str) -> None:
        if not self.factory.apop_available or self._timestamp is None:
            self._send("-ERR APOP not available")
            return
        args = rest.split()
        if len(args) != 2:
            self._send("-ERR usage: APOP name digest")
            return
        name, digest = args
        challenge = self._timestamp.encode("utf-8")
        apop = getattr(self.factory.directory, "authenticate_apop")  # noqa: B009
        self._login(name, "APOP", lambda: apop(name, challenge, digest))

    def do_AUTH(self, rest: str) -> None:
        args = rest.split()
        if not args:
            # The RFC 1734 listing form, which some clients still send.
            mechs = ["PLAIN"] if self.plaintext_allowed() else []
            self._write("".join(f"{m}\r\n" for m in ["+OK", *mechs, "."]).encode("ascii"))
            return
        if args[0].upper() != "PLAIN" or len(args) > 2:
            self._send("-ERR unsupported SASL mechanism")
            return
        if self._plaintext_refused():
            return
        if len(args) == 2:
            self._auth_plain_response(args[1], initial=True)
        else:
            self._sasl_pending = True
            self._write(b"+ \r\n")

    def _auth_plain_response(self, text: str, initial: bool = False) -> None:
        text = text.strip()
        if text == "*":
            self._send("-ERR authentication cancelled")
            return
        if initial and text == "=":
            text = ""
        try:
            decoded = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            self._send("-ERR invalid base64 in SASL response")
            return
        parts = decoded.split(b"\x00")
        if len(parts) != 3:
            self._send("-ERR [AUTH] malformed PLAIN response")
            return
        try:
            authzid, authcid, password = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            self._send("-ERR [AUTH] malformed PLAIN response")
            return
        if authzid and authzid != authcid:
            self._send("-ERR [AUTH] cannot act as another user")
            return
        self._login(
            authcid, "PLAIN", lambda: self.factory.directory.authenticate(authcid, password)
        )

    def _login(self, name: str, mechanism: str, check: Callable[[], Deferred[User | None]]) -> None:
        self._busy = True
        d = maybeDeferred(check)
        d.addCallbacks(self._login_checked, self._login_error, (name, mechanism), {}, (name,))
        d.addErrback(self._login_crashed)

    def _login_error(self, failure: Failure, name: str) -> None:
        if self._disconnected:
            return
        if failure.check(DirectoryUnavailable):
            self.log.warn(
                "pop3 login for {login} from {client}: directory unavailable: {error}",
                login=name,
                client=self.client,
                error=failure.getErrorMessage(),
            )
        else:
            self.log.failure(
                "pop3 login for {login} from {client} failed",
                failure,
                login=name,
                client=self.client,
            )
        self._send("-ERR [SYS/TEMP] authentication temporarily unavailable, try again later")
        self._done()

    def _login_crashed(self, failure: Failure) -> None:
        self.log.failure("pop3 login handling crashed for {client}", failure, client=self.client)
        self._unlock()
        self.mailbox = None
        self.state = _AUTH if not self._disconnected else _CLOSED
        self._send("-ERR [SYS/TEMP] internal error")
        self._done()

    def _login_checked(self, user: User | None, name: str, mechanism: str) -> None:
        if self._disconnected:
            return
        if user is None:
            self._failures += 1
            self.log.warn(
                "pop3 login failed: {login} from {client} ({mechanism}, failure {count})",
                login=name,
                client=self.client,
                mechanism=mechanism,
                count=self._failures,
            )
            if self.factory.on_auth_failure is not None:
                try:
                    self.factory.on_auth_failure(self.client, name)
                except Exception:
                    self.log.failure("on_auth_failure hook failed")
            delay = 0.0
            if self.factory.failure_delay is not None:
                try:
                    delay = float(self.factory.failure_delay(self.client))
                except Exception:
                    self.log.failure("failure_delay hook failed")
            if delay > 0:
                self._delayed_refusal = self.factory.clock.callLater(delay, self._refuse)
            else:
                self._refuse()
            return
        path = os.path.join(self.factory.mail_root, user.mailbox)
        if not self.factory.locks.acquire(path):
            self.log.info(
                "pop3 {login} from {client}: mailbox in use", login=user.login, client=self.client
            )
            self._send("-ERR [IN-USE] mailbox is locked by another POP3 session")
            self._done()
            return
        self._locked_path = path
        sizes = self.factory.sizes
        d = self.factory.run_io(lambda: MaildirMailbox.open(path, sizes))
        d.addCallbacks(self._opened, self._open_failed, (user, mechanism), {}, (path,))
        d.addErrback(self._login_crashed)

    def _open_failed(self, failure: Failure, path: str) -> None:
        if self._disconnected:
            return
        self._unlock()
        if failure.check(OSError):
            self.log.error(
                "pop3 cannot open mailbox {path}: {error}", path=path, error=failure.value
            )
        else:
            self.log.failure("pop3 cannot open mailbox {path}", failure, path=path)
        self._send("-ERR [SYS/TEMP] cannot open the mailbox, try again later")
        self._done()

    def _opened(self, mailbox: MaildirMailbox, user: User, mechanism: str) -> None:
        if self._disconnected:
            return
        self.mailbox = mailbox
        self.user = user
        self.state = _TRANSACTION
        count, octets = mailbox.stat()
        self.log.info(
            "pop3 login {login} from {client} ({mechanism}): {count} messages",
            login=user.login,
            client=self.client,
            mechanism=mechanism,
            count=count,
        )
        if self.factory.on_login is not None:
            try:
                self.factory.on_login(self.client)
            except Exception:
                self.log.failure("on_login hook failed")
        self._send(f"+OK {count} messages ({octets} octets)")
        self._done()

    def _refuse(self) -> None:
        if self._disconnected:
            return
        self._send("-ERR [AUTH] authentication failed")
        if self._failures >= self.factory.max_auth_failures:
            self._close()
        self._done()

    # -- TRANSACTION ----------------------------------------------------

    def _message_arg(self, rest: str) -> int | None:
        """The message number argument, or None after sending the error."""
        assert self.mailbox is not None
        args = rest.split()
        number = _number(args[0]) if len(args) == 1 else None
        if number is None:
            self._send("-ERR invalid message number")
            return None
        try:
            self.mailbox.get(number)
        except NoSuchMessage:
            self._send("-ERR no such message")
            return None
        return number

    def do_STAT(self, rest: str) -> None:
        assert self.mailbox is not None
        if rest.strip():
            self._send("-ERR STAT takes no argument")
            return
        count, octets = self.mailbox.stat()
        self._send(f"+OK {count} {octets}")

    def _listing(self, rest: str, field: Callable[[Any], object]) -> None:
        assert self.mailbox is not None
        if rest.strip():
            number = self._message_arg(rest)
            if number is not None:
                self._send(f"+OK {number} {field(self.mailbox.get(number))}")
            return
        count, octets = self.mailbox.stat()
        lines = [f"+OK {count} messages ({octets} octets)\r\n"]
        lines.extend(f"{n} {field(m)}\r\n" for n, m in self.mailbox.live())
        lines.append(".\r\n")
        self._write("".join(lines).encode("ascii"))

    def do_LIST(self, rest: str) -> None:
        self._listing(rest, lambda m: m.size)

    def do_UIDL(self, rest: str) -> None:
        self._listing(rest, lambda m: m.uidl)

    def do_DELE(self, rest: str) -> None:
        assert self.mailbox is not None
        args = rest.split()
        number = _number(args[0]) if len(args) == 1 else None
        if number is None:
            self._send("-ERR invalid message number")
            return
        if 1 <= number <= len(self.mailbox) and self.mailbox.messages[number - 1].deleted:
            self._send(f"-ERR message {number} already deleted")
            return
        try:
            self.mailbox.delete(number)
        except NoSuchMessage:
            self._send("-ERR no such message")
            return
        self._send(f"+OK message {number} deleted")

    def do_NOOP(self, rest: str) -> None:
        self._send("+OK")

    def do_RSET(self, rest: str) -> None:
        assert self.mailbox is not None
        self.mailbox.reset()
        count, octets = self.mailbox.stat()
        self._send(f"+OK maildrop has {count} messages ({octets} octets)")

    def _open(self, number: int) -> BinaryIO | None:
        assert self.mailbox is not None
        try:
            _, f = self.mailbox.open_file(number)
        except FileNotFoundError:
            self._send("-ERR message was removed by another program")
            return None
        except OSError as e:
            self.log.error("pop3 cannot read message: {error}", error=e)
            self._send("-ERR [SYS/TEMP] cannot read the message")
            return None
        return f

    def do_RETR(self, rest: str) -> None:
        assert self.mailbox is not None
        number = self._message_arg(rest)
        if number is None:
            return
        f = self._open(number)
        if f is None:
            return
        size = self.mailbox.get(number).size
        try:
            data = f.read(CHUNK + 1)
        except OSError as e:
            f.close()
            self.log.error("pop3 cannot read message: {error}", error=e)
            self._send("-ERR [SYS/TEMP] cannot read the message")
            return
        head = b"+OK %d octets\r\n" % size
        if len(data) <= CHUNK:
            f.close()
            self._write(head + encode_message(data) + b".\r\n")
            self.mailbox.mark_retrieved(number)
            return
        # A big message: stream it, stuffing across chunk boundaries.
        self._busy = True
        sender = _MessageSender(self, f, number)
        self._sender = sender
        self._write(head + sender.encoder.feed(data))
        self._pump()

    def streamDone(self, number: int) -> None:
        """Called by the sender after the final ".": RETR is complete."""
        self._sender = None
        if self.mailbox is not None:
            self.mailbox.mark_retrieved(number)
        self._done()

    def streamFailed(self) -> None:
        """The file could not be read half-way: the response cannot be completed."""
        self._sender = None
        if self.transport is not None:
            self.transport.abortConnection()

    def do_TOP(self, rest: str) -> None:
        assert self.mailbox is not None
        args = rest.split()
        if len(args) != 2 or _number(args[1]) is None:
            self._send("-ERR usage: TOP message lines")
            return
        number = self._message_arg(args[0])
        if number is None:
            return
        lines = _number(args[1])
        assert lines is not None
        f = self._open(number)
        if f is None:
            return
        try:
            text = _top(f, lines)
        except OSError as e:
            self.log.error("pop3 cannot read message: {error}", error=e)
            self._send("-ERR [SYS/TEMP] cannot read the message")
            return
        finally:
            f.close()
        self._write(b"+OK top of message follows\r\n" + encode_message(text) + b".\r\n")

    def do_QUIT(self, rest: str) -> None:
        if self.state != _TRANSACTION or self.mailbox is None:
            self._send(f"+OK {self.factory.hostname} POP3 server signing off")
            self._close()
            return
        # UPDATE (RFC 1939 section 6).  The lock is kept until the files are
        # moved, even if the client goes away meanwhile.
        self._busy = True
        self._committing = True
        self.state = _CLOSED
        d = self.factory.run_io(self.mailbox.commit)
        d.addCallbacks(self._committed, self._commit_failed)

    def _committed(self, failures: list[str]) -> None:
        self._committing = False
        self._unlock()
        if failures:
            self.log.error(
                "pop3 update for {login}: {failures}",
                login=self.user.login if self.user else "?",
                failures="; ".join(failures),
            )
            self._send("-ERR [SYS/TEMP] some deleted messages not removed")
        else:
            self._send(f"+OK {self.factory.hostname} POP3 server signing off")
        self._close()

    def _commit_failed(self, failure: Failure) -> None:
        self.log.failure("pop3 update failed", failure)
        self._committed(["internal error"])


def _top_cut(text: bytes, lines: int) -> int | None:
    """Where TOP stops in CRLF text: after the headers, the blank line and ``lines`` lines."""
    if text.startswith(b"\r\n"):
        pos = 2
    else:
        end = text.find(b"\r\n\r\n")
        if end < 0:
            return None
        pos = end + 4
    for _ in range(lines):
        nl = text.find(b"\r\n", pos)
        if nl < 0:
            return None
        pos = nl + 2
    return pos


def _top(f: BinaryIO, lines: int) -> bytes:
    """The headers and first ``lines`` body lines of a message file, CRLF-normalised, unstuffed."""
    encoder = LineEncoder(stuff=False)
    text = b""
    while True:
        chunk = f.read(CHUNK)
        text += encoder.feed(chunk) if chunk else encoder.finish()
        cut = _top_cut(text, lines)
        if cut is not None:
            return text[:cut]
        if not chunk:
            return text


#: Replies held back while a pipelined burst is processed are sent at this size at the latest.
OUT_BATCH = 64 * 1024

_ALLOWED: dict[str, tuple[str, ...]] = {
    "CAPA": (_AUTH, _TRANSACTION),
    "QUIT": (_AUTH, _TRANSACTION),
    "STLS": (_AUTH,),
    "USER": (_AUTH,),
    "PASS": (_AUTH,),
    "APOP": (_AUTH,),
    "AUTH": (_AUTH,),
    "STAT": (_TRANSACTION,),
    "LIST": (_TRANSACTION,),
    "UIDL": (_TRANSACTION,),
    "RETR": (_TRANSACTION,),
    "TOP": (_TRANSACTION,),
    "DELE": (_TRANSACTION,),
    "NOOP": (_TRANSACTION,),
    "RSET": (_TRANSACTION,),
}
