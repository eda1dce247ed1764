"""The ESMTP server protocol (RFC 5321) of the appliance's port-25 and submission listeners.

Written from scratch rather than on ``twisted.mail.smtp.ESMTP`` because of the
defects listed in research/twisted-notes.md 1.1: this class discards plaintext
pipelined after STARTTLS and resets the session (RFC 3207 4.2), keeps replies
in order while a check is asynchronous (RFC 2920), parses ESMTP parameters
(SIZE, BODY), never turns an over-long DATA line into commands, bounds lines,
recipients, errors and idle time, and lets no exception escape into the reactor.

DATA is scanned as a byte buffer, not line by line.  Only ``CRLF . CRLF`` ends
it (RFC 5321 4.1.1.4); every bare-LF or bare-CR variant of a terminator (the
2023 "SMTP smuggling" vectors) is message content.  Bare CR and bare LF inside
the content are stored normalised to CRLF, as Postfix does, so the spool only
ever holds CRLF lines and the outbound client's dot-stuffing makes any "."
line harmless downstream.  A message is never split.

AUTH (RFC 4954; PLAIN and LOGIN from appliance.mail.auth) is offered only
when the factory has an authenticator and only under TLS; wrong passwords
go through the shared LoginThrottle.  After AUTH the factory's
SenderPolicy judges MAIL FROM, and the header block of the message is held
back just long enough to add a missing Date and Message-ID (RFC 6409 8).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.directory.base import DirectoryUnavailable, User
from appliance.directory.throttle import LoginThrottle
from appliance.mail.address import (
    AddressError,
    Path,
    domain_of,
    parse_domain,
    parse_mail_from,
    parse_rcpt_to,
)
from appliance.mail.auth import (
    MECHANISMS,
    Authenticator,
    Credentials,
    Exchange,
    SASLError,
    decode_response,
    encode_challenge,
    new_exchange,
)
from appliance.mail.gate.verdict import Action as GateAction
from appliance.mail.interfaces import Envelope, IncomingMessage, MessageStore, RecipientCheck, Reply
from appliance.mail.lineends import to_crlf
from appliance.mail.relay import RelayPolicy
from appliance.mail.submission import HeaderCompleter, SenderPolicy
from appliance.netio import write_now

log = Logger(namespace="appliance.mail.smtp")

#: RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF.
MAX_COMMAND_LINE = 512
#: RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF.
MAX_TEXT_LINE = 998
DEFAULT_MAX_MESSAGE_SIZE = 10_240_000
#: RFC 4954 4: a SASL response line may be up to 12288 octets.
MAX_AUTH_LINE = 12288
#: Input held while a check is pending; a paused transport never gets near it.
MAX_PIPELINED_INPUT = 1 << 20

_FORBIDDEN_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT"})
_HELP = "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS"


class _Mode(enum.Enum):
    COMMAND = "command"
    DATA = "data"
    CLOSED = "closed"


def _clean_text(text: str) -> str:
    """Reply text without CR, LF or other control characters (a reply is one line)."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _received_date(seconds: float) -> str:
    return format_datetime(datetime.fromtimestamp(seconds, UTC))


_GATE_RELAY = GateAction.RELAY
_GATE_DISCARD = GateAction.DISCARD


class SMTPServer(Protocol):
    """One SMTP session.

    Commands are handled one at a time.  A handler either replies at once and
    returns None, or returns a Deferred that replies when it fires; meanwhile
    later input stays buffered and the transport is paused, so pipelined
    replies always come out in order.

    Subclasses add commands with ``cmd_<VERB>`` methods and EHLO keywords by
    overriding :meth:`extensions` (AUTH is added this way, only after TLS);
    :meth:`intercept_next_line` gives them the next raw line (AUTH
    continuation lines), and :meth:`check_sender` is the hook for sender
    policy (submission: "may this user send as this address").
    """

    max_line_length = MAX_COMMAND_LINE
    transport: Any = None

    def __init__(self, factory: SMTPServerFactory) -> None:
        self.factory = factory
        self.client_ip = ""
        self.client_helo: str | None = None
        self.esmtp = False
        self.tls = factory.implicit_tls
        self.authenticated_user: str | None = None
        #: The directory's User after a successful AUTH (sender ownership, header completion).
        self.auth_user: User | None = None
        self._sender: str | None = None
        self._mail_parameters: dict[str, str] = {}
        self._recipients: list[str] = []
        self._buffer = b""
        self._pos = 0  # start of unread input in _buffer (command mode)
        self._junk = 0
        self._mode = _Mode.COMMAND
        self._busy = False
        self._processing = False
        self._paused = False
        self._discarding_line = False
        self._out: list[bytes] = []
        self._errors = 0
        self._timer: Any = None
        self._registered = False
        self._interceptor: Callable[[bytes], Deferred[None] | None] | None = None
        # DATA state
        self._message: IncomingMessage | None = None
        self._queue_id = "-"
        self._data_skip = 0
        self._line_length = 0
        self._data_size = 0
        self._data_error: Reply | None = None
        self._pending_cr = False
        self._headers: HeaderCompleter | None = None
        # Anti-spam gate (appliance.mail.gate): its per-connection session, the greeting wait,
        # the header block held back until the gate has judged it, and a DISCARD verdict.
        self.gate_session: Any = None
        self._greeting = False
        self._greet_call: Any = None
        self._header_capture: bytearray | None = None
        self._discard = False

    # ------------------------------------------------------------------ connection

    def connectionMade(self) -> None:
        try:
            peer = self.transport.getPeer()
            self.client_ip = str(getattr(peer, "host", "") or "")
            self._set_nodelay()
            self._registered = self.factory.register(self.client_ip)
            if not self._registered:
                log.info("too many connections from {client}", client=self.client_ip)
                self.reply(421, "4.7.0", f"{self.factory.hostname} Error: too many connections")
                self._close()
                self._flush()
                return
            self._timer = self.factory.clock.callLater(self.factory.idle_timeout, self._timed_out)
            if self.factory.gate is None:
                self.reply(220, None, f"{self.factory.hostname} ESMTP ready")
            else:
                self._open_gate(self.factory.gate)
        except Exception:
            log.failure("SMTP connection setup failed")
            self._close()
        self._flush()

    def _open_gate(self, gate: Any) -> None:
        """Greet pause and connect checks (access map, DNSBL) before the banner (M-10, seed 004)."""
        self.gate_session = gate.session(self.client_ip, self.factory.listener_name)
        waits: list[Deferred[Any]] = [gate.connect(self.gate_session)]
        delay = gate.greet_delay(self.client_ip, self.factory.listener_name)
        if delay > 0:
            pause: Deferred[None] = Deferred()
            self._greet_call = self.factory.clock.callLater(delay, pause.callback, None)
            waits.append(pause)
        self._greeting = True
        self._busy = True
        done = gatherResults(waits, consumeErrors=True)
        done.addCallback(lambda results: self._greeted(results[0]))
        done.addErrback(self._greet_failed)

    def _greeted(self, verdict: Any) -> None:
        if self._mode is _Mode.CLOSED:
            return
        self._greeting = False
        self._busy = False
        if verdict.refused:
            self._fatal(verdict.reply)
            return
        self.reply(220, None, f"{self.factory.hostname} ESMTP ready")
        self._process()
        self._flush()

    def _greet_failed(self, failure: Failure) -> None:
        log.failure("SMTP gate failed at connect from {client}", failure, client=self.client_ip)
        self._fatal(
            Reply(421, "4.3.0", f"{self.factory.hostname} Error: internal error, try again later")
        )

    def _early_talker(self) -> None:
        """Input before the banner: a bot that does not wait (greet_pause, pregreet)."""
        if self._greet_call is not None and self._greet_call.active():
            self._greet_call.cancel()
        self._greeting = False
        self._fatal(self.factory.gate.early_talker(self.gate_session).reply)

    def _set_nodelay(self) -> None:
        transport: Any = self.transport
        for _ in range(3):
            setter = getattr(transport, "setTcpNoDelay", None)
            if setter is not None:
                try:
                    setter(True)
                except (OSError, AttributeError):
                    pass
                return
            transport = getattr(transport, "transport", None)
            if transport is None:
                return

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._registered:
            self._registered = False
            self.factory.unregister(self.client_ip)
        self._mode = _Mode.CLOSED
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._greet_call is not None and self._greet_call.active():
            self._greet_call.cancel()
        self._abort_message()

    def dataReceived(self, data: bytes) -> None:
        if self._mode is _Mode.CLOSED:
            return
        if self._greeting and data:
            try:
                self._early_talker()
            except Exception:
                log.failure("SMTP early-talker handling failed for {client}", client=self.client_ip)
                self._close()
            self._flush()
            return
        try:
            self._touch()
            self._compact()
            self._buffer += data
            if self._busy and len(self._buffer) > MAX_PIPELINED_INPUT:
                log.info("too much pipelined input from {client}", client=self.client_ip)
                self._fatal(Reply(421, "4.7.0", f"{self.factory.hostname} Error: too much input"))
                return
            self._process()
        except Exception:
            log.failure("Internal error in SMTP session from {client}", client=self.client_ip)
            self._fatal(Reply(421, "4.3.0", f"{self.factory.hostname} Internal error, closing"))
        self._flush()

    # ------------------------------------------------------------------ output

    def reply(self, code: int, enhanced: str | None, text: str) -> None:
        """Queue a one-line reply; ``enhanced`` None for the greeting only (RFC 2034 3)."""
        if self._mode is _Mode.CLOSED:
            return
        line = f"{code} {enhanced} {text}" if enhanced else f"{code} {text}"
        self._out.append(_clean_text(line).encode("ascii") + b"\r\n")
        if code >= 500 and self._mode is _Mode.COMMAND:
            self._errors += 1

    def send(self, reply: Reply) -> None:
        """Queue a Reply object."""
        self.reply(reply.code, reply.enhanced, reply.text)

    def reply_lines(self, code: int, lines: list[str]) -> None:
        """Queue a multi-line reply (``250-first`` ... ``250 last``)."""
        if self._mode is _Mode.CLOSED:
            return
        for index, text in enumerate(lines):
            sep = " " if index == len(lines) - 1 else "-"
            self._out.append(_clean_text(f"{code}{sep}{text}").encode("ascii") + b"\r\n")

    def _flush(self) -> None:
        if self._out and self.transport is not None:
            data = b"".join(self._out)
            self._out = []
            write_now(self.transport, data)

    def _close(self) -> None:
        """Send what is queued and drop the connection; later input is ignored."""
        self._flush()
        self._mode = _Mode.CLOSED
        self._abort_message()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.transport is not None:
            self.transport.loseConnection()

    def _fatal(self, reply: Reply) -> None:
        self._out = []
        self.send(reply)
        self._close()

    # ------------------------------------------------------------------ input loop

    def _touch(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.factory.idle_timeout)

    def _timed_out(self) -> None:
        log.info(
            "timeout after {state} from {client}", state=self._mode.value, client=self.client_ip
        )
        self._fatal(Reply(421, "4.4.2", f"{self.factory.hostname} Error: timeout exceeded"))

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while (
                len(self._buffer) > self._pos and not self._busy and self._mode is not _Mode.CLOSED
            ):
                if self._mode is _Mode.DATA:
                    self._compact()
                    self._consume_data()
                    if self._mode is _Mode.DATA:
                        break
                elif not self._consume_command():
                    break
        finally:
            self._processing = False
            self._compact()
        if self._busy:
            self._pause()
        else:
            self._resume()

    def _pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()

    def _resume(self) -> None:
        if self._paused and self.transport is not None and self._mode is not _Mode.CLOSED:
            self._paused = False
            self.transport.resumeProducing()

    def _compact(self) -> None:
        if self._pos:
            self._buffer = self._buffer[self._pos :]
            self._pos = 0

    def _consume_command(self) -> bool:
        """Handle one complete command line; False when more input is needed.

        Lines are taken by moving ``_pos`` rather than by slicing the buffer,
        so a large pipelined burst costs linear, not quadratic, time.
        """
        buf, start = self._buffer, self._pos
        if self._discarding_line:
            end = buf.find(b"\r\n", start)
            if end < 0:
                self._buffer = b"\r" if buf.endswith(b"\r") else b""
                self._pos = 0
                return False
            self._pos = end + 2
            self._discarding_line = False
            self._interceptor = None
            self._end_sasl_line()
            self.reply(500, "5.5.2", "Error: line too long")
            self._check_errors()
            return True
        end = buf.find(b"\r\n", start, start + self.max_line_length)
        if end < 0:
            if len(buf) - start >= self.max_line_length:
                self._discarding_line = True
                return True
            return False
        line = buf[start:end]
        self._pos = end + 2
        self._run(self._handle_line, line)
        return True

    def _run(self, handler: Callable[[bytes], Deferred[None] | None], line: bytes) -> None:
        """Run one handler; if it returns an unfired Deferred, hold input until it fires."""
        try:
            result = handler(line)
        except Exception:
            log.failure("Internal error handling a command from {client}", client=self.client_ip)
            self.reply(451, "4.3.0", "Error: internal error, try again later")
            result = None
        if result is None:
            self._check_errors()
            return
        self._busy = True
        result.addErrback(self._async_failed)
        result.addBoth(self._async_done)

    def _async_failed(self, failure: Failure) -> None:
        log.failure("Check failed for a command from {client}", failure, client=self.client_ip)
        self.reply(451, "4.3.0", "Error: internal error, try again later")

    def _async_done(self, _: object) -> None:
        try:
            self._busy = False
            if self._mode is _Mode.CLOSED:
                return
            self._touch()
            self._check_errors()
            if not self._processing:
                self._process()
        except Exception:
            log.failure("Internal error resuming SMTP session from {client}", client=self.client_ip)
            self._fatal(Reply(421, "4.3.0", f"{self.factory.hostname} Internal error, closing"))
        finally:
            if not self._processing:
                self._flush()

    def _check_errors(self) -> None:
        if self._mode is _Mode.COMMAND and self._errors >= self.factory.max_errors:
            log.info("too many errors from {client}", client=self.client_ip)
            self.reply(421, "4.7.0", f"{self.factory.hostname} Error: too many errors")
            self._close()

    def intercept_next_line(self, handler: Callable[[bytes], Deferred[None] | None]) -> None:
        """Pass the next command line, raw, to ``handler`` instead of the dispatcher (AUTH)."""
        self._interceptor = handler

    def _handle_line(self, line: bytes) -> Deferred[None] | None:
        if self._interceptor is not None:
            handler, self._interceptor = self._interceptor, None
            return handler(line)
        if b"\r" in line or b"\n" in line or b"\x00" in line:
            self.reply(500, "5.5.2", "Error: bare CR, LF or NUL in command")
            return None
        text = line.decode("latin-1")
        verb, _, argument = text.partition(" ")
        verb = verb.upper()
        if verb in _FORBIDDEN_VERBS:
            log.info("non-SMTP command {verb} from {client}", verb=verb, client=self.client_ip)
            self.reply(421, "4.7.0", f"{self.factory.hostname} Error: not an SMTP client")
            self._close()
            return None
        command = getattr(self, "cmd_" + verb, None) if verb.isalpha() and verb.isascii() else None
        if command is None:
            self.reply(500, "5.5.2", "Error: command not recognized")
            return None
        result: Deferred[None] | None = command(argument)
        return result

    # ------------------------------------------------------------------ session state

    @property
    def sender(self) -> str | None:
        """The reverse-path of the open transaction (``""`` for ``<>``), None outside one."""
        return self._sender

    @property
    def recipients(self) -> tuple[str, ...]:
        """The recipients accepted so far in the open transaction."""
        return tuple(self._recipients)

    def extensions(self) -> list[str]:
        """EHLO keywords (RFC 5321 4.1.1.1); override to add AUTH once TLS is up."""
        keywords = [
            "PIPELINING",
            f"SIZE {self.factory.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
        ]
        if self.factory.tls_options is not None and not self.tls:
            keywords.append("STARTTLS")
        if self.auth_offered():
            keywords.append("AUTH " + " ".join(MECHANISMS))
        return keywords

    def auth_offered(self) -> bool:
        """AUTH is offered only with an authenticator and only under TLS (RFC 4954 4, M-8)."""
        return self.factory.authenticator is not None and self.tls

    def protocol_name(self) -> str:
        """The RFC 3848 ``with`` keyword: SMTP, ESMTP, ESMTPS, ESMTPA or ESMTPSA."""
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if self.authenticated_user else "")

    def reset_transaction(self) -> None:
        """Forget MAIL and RCPT (RSET, HELO/EHLO, end of DATA)."""
        self._sender = None
        self._mail_parameters = {}
        self._recipients = []

    def reset_session(self) -> None:
        """Forget everything the client said, as after STARTTLS (RFC 3207 4.2)."""
        self.reset_transaction()
        self.client_helo = None
        self.esmtp = False
        self.authenticated_user = None
        self.auth_user = None
        self._interceptor = None
        self._end_sasl_line()

    def check_sender(self, path: Path) -> Deferred[Reply | None] | None:
        """Sender policy hook: None or a Deferred firing None to accept, or with the refusal.

        After AUTH the factory's SenderPolicy decides (RFC 6409 and M-8: a
        user sends only as their own addresses).
        """
        policy = self.factory.sender_policy
        if policy is None or self.auth_user is None:
            return None
        refusal = policy.check(self.auth_user, path.address)
        return None if refusal is None else succeed(refusal)

    def _refuse(self, stage: str, reply: Reply, **details: str) -> None:
        log.info(
            "reject: {stage} from {client}: {code} {enhanced} {text}; {details}",
            stage=stage,
            client=self.client_ip,
            code=reply.code,
            enhanced=reply.enhanced,
            text=reply.text,
            details=" ".join(f"{k}=<{v}>" for k, v in details.items()),
        )
        self.send(reply)

    # ------------------------------------------------------------------ commands

    def cmd_HELO(self, argument: str) -> None:
        self._greet(argument, esmtp=False)

    def cmd_EHLO(self, argument: str) -> None:
        self._greet(argument, esmtp=True)

    def _greet(self, argument: str, esmtp: bool) -> None:
        name = argument.strip(" ")
        if not name or " " in name:
            self.reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
            return
        self.reset_transaction()
        self.client_helo = name
        self.esmtp = esmtp
        if self.gate_session is not None:
            # HELO is recorded (SPF's HELO identity, logs); no check refuses it.
            self.factory.gate.helo(self.gate_session, name)
        if esmtp:
            self.reply_lines(250, [self.factory.hostname, *self.extensions()])
        else:
            self.reply(250, None, self.factory.hostname)

    def cmd_MAIL(self, argument: str) -> Deferred[None] | None:
        if self.client_helo is None:
            self.reply(503, "5.5.1", "Error: send HELO/EHLO first")
            return None
        if self.factory.require_tls and not self.tls:
            self.reply(530, "5.7.0", "Must issue a STARTTLS command first")
            return None
        if self.factory.require_auth and self.authenticated_user is None:
            # RFC 6409 4.3: submission accepts mail only from authenticated users.
            self.reply(530, "5.7.0", "Authentication required")
            return None
        if self._sender is not None:
            self.reply(503, "5.5.1", "Error: nested MAIL command")
            return None
        try:
            path = parse_mail_from(argument, max_size=self.factory.max_message_size)
        except AddressError as error:
            self._refuse("MAIL", error.reply, argument=argument[:100])
            return None
        if path.parameters and not self.esmtp:
            self.reply(555, "5.5.4", "Error: parameters need EHLO")
            return None
        checked = self.check_sender(path)
        if checked is None:
            return self._accept_sender(None, path)
        return checked.addCallback(self._accept_sender, path)

    def _accept_sender(self, refusal: Reply | None, path: Path) -> Deferred[None] | None:
        if refusal is not None:
            self._refuse("MAIL", refusal, sender=path.address)
            return None
        if self.gate_session is not None:
            self.gate_session.authenticated = self.authenticated_user is not None
            judged: Deferred[Any] = self.factory.gate.mail(self.gate_session, path.address)
            return judged.addCallback(self._gate_sender, path)
        self._set_sender(path)
        return None

    def _gate_sender(self, verdict: Any, path: Path) -> None:
        if verdict.refused:
            self._refuse("MAIL", verdict.reply, sender=path.address)
            return
        self._set_sender(path)

    def _set_sender(self, path: Path) -> None:
        self._sender = path.address
        self._mail_parameters = dict(path.parameters)
        self.reply(250, "2.1.0", "Ok")

    def cmd_RCPT(self, argument: str) -> Deferred[None] | None:
        if self._sender is None:
            self.reply(503, "5.5.1", "Error: need MAIL command")
            return None
        try:
            path = parse_rcpt_to(argument)
        except AddressError as error:
            self._refuse("RCPT", error.reply, argument=argument[:100])
            return None
        address = path.address if path.domain else f"postmaster@{self.factory.hostname.lower()}"
        if len(self._recipients) >= self.factory.max_recipients:
            self.reply(452, "4.5.3", "Error: too many recipients")
            return None
        relay = self.factory.relay
        # An access-map RELAY for this client counts like authentication (sendmail access_db).
        trusted = self.authenticated_user is not None or (
            self.gate_session is not None and self.gate_session.access is _GATE_RELAY
        )
        refusal = relay.decide(self.client_ip, trusted, self._sender, address)
        if refusal is not None:
            self._refuse("RCPT", refusal, sender=self._sender, recipient=address)
            return None
        if not relay.accepts_for(domain_of(address)):
            return self._accept_recipient(None, address)
        checked = self.factory.recipients.check_recipient(address)
        return checked.addCallback(self._accept_recipient, address)

    def _accept_recipient(self, refusal: Reply | None, address: str) -> Deferred[None] | None:
        if refusal is not None:
            self._refuse("RCPT", refusal, sender=self._sender or "", recipient=address)
            return None
        if self.gate_session is not None and self._sender is not None:
            # After the recipient is known to exist: seed 004 greylists only real recipients.
            judged: Deferred[Any] = self.factory.gate.rcpt(self.gate_session, address)
            return judged.addCallback(self._gate_recipient, address)
        self._add_recipient(address)
        return None

    def _gate_recipient(self, verdict: Any, address: str) -> None:
        if verdict.refused:
            self._refuse("RCPT", verdict.reply, sender=self._sender or "", recipient=address)
            return
        self._add_recipient(address)

    def _add_recipient(self, address: str) -> None:
        if self._sender is None:
            # RSET cannot overtake a pending RCPT (one command at a time), but be safe.
            self.reply(503, "5.5.1", "Error: need MAIL command")
            return
        if address not in self._recipients:
            self._recipients.append(address)
        self.reply(250, "2.1.5", "Ok")

    def cmd_DATA(self, argument: str) -> None:
        if argument.strip(" "):
            self.reply(501, "5.5.4", "Syntax: DATA")
            return
        if self._sender is None:
            self.reply(503, "5.5.1", "Error: need MAIL command")
            return
        if not self._recipients:
            self.reply(554, "5.5.1", "Error: no valid recipients")
            return
        try:
            message = self.factory.store.begin()
        except Exception:
            log.failure("Spool refused a new message from {client}", client=self.client_ip)
            self.reply(452, "4.3.1", "Error: insufficient system storage")
            return
        self._message = message
        self._queue_id = message.queue_id
        self._headers = None
        self._discard = False
        self._header_capture = None
        if self.authenticated_user is not None and self.factory.complete_headers:
            # RFC 6409 8.3, 8.4: a submitted message gets Date and Message-ID if it lacks them.
            self._headers = HeaderCompleter(
                self.factory.hostname, self.factory.clock.seconds(), message.queue_id
            )
        if self.gate_session is not None and self._headers is None:
            self._header_capture = bytearray()
        try:
            message.write(self._received_header(message.queue_id))
        except Exception:
            log.failure("Spool write failed for {queue_id}", queue_id=message.queue_id)
            self._abort_message()
            self.reply(452, "4.3.1", "Error: insufficient system storage")
            return
        self._start_data()
        self.reply(354, None, "End data with <CR><LF>.<CR><LF>")

    def cmd_RSET(self, argument: str) -> None:
        if argument.strip(" "):
            self.reply(501, "5.5.4", "Syntax: RSET")
            return
        self._junk_command()
        self.reset_transaction()
        self.reply(250, "2.0.0", "Ok")

    def _junk_command(self) -> None:
        """Count NOOP, RSET, VRFY, HELP; past the limit each one counts as an error (as Postfix)."""
        self._junk += 1
        if self._junk > self.factory.max_junk_commands:
            self._errors += 1

    def cmd_NOOP(self, argument: str) -> None:
        self._junk_command()
        self.reply(250, "2.0.0", "Ok")

    def cmd_QUIT(self, argument: str) -> None:
        self.reply(221, "2.0.0", "Bye")
        self._close()

    def cmd_VRFY(self, argument: str) -> None:
        if not argument.strip(" "):
            self.reply(501, "5.5.4", "Syntax: VRFY address")
            return
        self._junk_command()
        self.reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def cmd_EXPN(self, argument: str) -> None:
        self.reply(502, "5.5.1", "Error: command not implemented")

    def cmd_HELP(self, argument: str) -> None:
        self._junk_command()
        self.reply(214, "2.0.0", _HELP)

    def cmd_STARTTLS(self, argument: str) -> None:
        if argument.strip(" "):
            self.reply(501, "5.5.4", "Syntax: STARTTLS")
            return
        if self.tls:
            self.reply(503, "5.5.1", "Error: TLS already active")
            return
        options = self.factory.tls_options
        if options is None:
            self.reply(502, "5.5.1", "Error: command not implemented")
            return
        self._compact()
        if self._buffer:
            # RFC 3207 4.2 / CVE-2011-0411: nothing sent before the handshake may be acted upon.
            log.warn(
                "discarded {count} octets pipelined after STARTTLS from {client}",
                count=len(self._buffer),
                client=self.client_ip,
            )
        self._buffer = b""
        self._pos = 0
        self._discarding_line = False
        self.reply(220, "2.0.0", "Ready to start TLS")
        self._flush()
        self.transport.startTLS(options)
        self.tls = True
        self.reset_session()

    # ------------------------------------------------------------------ AUTH (RFC 4954)

    def cmd_AUTH(self, argument: str) -> Deferred[None] | None:
        if self.factory.authenticator is None:
            self.reply(500, "5.5.2", "Error: command not recognized")
            return None
        if not self.tls:
            # RFC 4954 6: never accept a password in the clear (M-8).
            self.reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
            return None
        if not self.esmtp:
            self.reply(503, "5.5.1", "Error: send EHLO first")
            return None
        if self.authenticated_user is not None:
            self.reply(503, "5.5.1", "Error: already authenticated")
            return None
        if self._sender is not None:
            self.reply(503, "5.5.1", "Error: MAIL transaction in progress")
            return None
        parts = argument.strip(" ").split(" ")
        if not parts[0] or len(parts) > 2:
            self.reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
            return None
        exchange = new_exchange(parts[0])
        if exchange is None:
            self.reply(504, "5.5.4", "Unrecognized authentication type")
            return None
        throttle = self.factory.throttle
        if throttle is not None and throttle.blocked(self.client_ip):
            log.info("AUTH refused: {client} is throttled", client=self.client_ip)
            self.reply(454, "4.7.0", "Too many failed authentication attempts, try again later")
            return None
        initial: bytes | None = None
        if len(parts) == 2:
            if parts[1] == "=":
                initial = b""
            else:
                try:
                    initial = decode_response(parts[1].encode("latin-1"))
                except SASLError:
                    self.reply(501, "5.5.2", "Cannot decode response")
                    return None
        return self._sasl_step(exchange, initial)

    def _end_sasl_line(self) -> None:
        """Back to the class's command line limit after a SASL response line."""
        self.__dict__.pop("max_line_length", None)

    def _sasl_step(self, exchange: Exchange, response: bytes | None) -> Deferred[None] | None:
        try:
            result = exchange.step(response)
        except SASLError as error:
            log.info(
                "AUTH {mechanism} from {client}: malformed response: {error}",
                mechanism=exchange.name,
                client=self.client_ip,
                error=str(error),
            )
            self.reply(501, "5.5.2", "Error: malformed authentication response")
            return None
        if isinstance(result, Credentials):
            return self._check_credentials(exchange.name, result)
        self.reply(334, None, encode_challenge(result))
        self.max_line_length = MAX_AUTH_LINE
        self.intercept_next_line(lambda line: self._sasl_continue(exchange, line))
        return None

    def _sasl_continue(self, exchange: Exchange, line: bytes) -> Deferred[None] | None:
        self._end_sasl_line()
        if line.strip(b" ") == b"*":
            self.reply(501, "5.7.0", "Authentication aborted")
            return None
        try:
            response = decode_response(line)
        except SASLError:
            self.reply(501, "5.5.2", "Cannot decode response")
            return None
        return self._sasl_step(exchange, response)

    def _check_credentials(self, mechanism: str, credentials: Credentials) -> Deferred[None]:
        authenticator = self.factory.authenticator
        assert authenticator is not None
        login = credentials.login
        if credentials.authzid and credentials.authzid.lower() != login.lower():
            # Acting as another user (proxy authorisation) is not offered.
            checked: Deferred[User | None] = succeed(None)
        else:
            checked = maybeDeferred(authenticator.authenticate, login, credentials.password)
        result: Deferred[None] = checked.addCallbacks(
            self._auth_checked,
            self._auth_error,
            callbackArgs=(mechanism, login),
            errbackArgs=(login,),
        )
        return result

    def _auth_checked(self, user: User | None, mechanism: str, login: str) -> Deferred[None] | None:
        if self._mode is _Mode.CLOSED:
            return None
        throttle = self.factory.throttle
        if user is None:
            delay = 0.0
            if throttle is not None:
                delay = throttle.record_failure(self.client_ip, login, "smtp")
            else:
                log.warn(
                    "auth failure: service=smtp client={client} login=<{login}>",
                    client=self.client_ip,
                    login=login[:100],
                )
            if delay > 0:
                return deferLater(self.factory.clock, delay, self._auth_failed)
            self._auth_failed()
            return None
        self.authenticated_user = user.login
        self.auth_user = user
        if throttle is not None:
            throttle.record_success(self.client_ip, user.login, "smtp")
        log.info(
            "AUTH {mechanism} from {client}: authenticated as {login}",
            mechanism=mechanism,
            client=self.client_ip,
            login=user.login,
        )
        self.reply(235, "2.7.0", "Authentication successful")
        return None

    def _auth_failed(self) -> None:
        self.reply(535, "5.7.8", "Error: authentication failed")

    def _auth_error(self, failure: Failure, login: str) -> None:
        if failure.check(DirectoryUnavailable):
            log.warn(
                "AUTH from {client} for {login}: directory unavailable: {error}",
                client=self.client_ip,
                login=login[:100],
                error=failure.getErrorMessage(),
            )
        else:
            log.failure("AUTH check failed for {client}", failure, client=self.client_ip)
        self.reply(454, "4.7.0", "Temporary authentication failure")

    # ------------------------------------------------------------------ DATA

    def _received_header(self, queue_id: str) -> bytes:
        """The RFC 5321 4.4 trace header for this message."""
        ip = self.client_ip
        literal = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
        helo = self.client_helo or ""
        try:
            from_name = parse_domain(helo)
        except ValueError:
            from_name = literal
        if from_name != literal:
            from_clause = f"{from_name} ({literal})"
        elif helo and helo.lower() != literal.lower():
            from_clause = (
                f"{literal} (helo={_clean_text(helo)[:64].replace('(', '?').replace(')', '?')})"
            )
        else:
            from_clause = literal
        for_clause = f"\r\n\tfor <{self._recipients[0]}>" if len(self._recipients) == 1 else ""
        date = _received_date(self.factory.clock.seconds())
        header = (
            f"Received: from {from_clause}\r\n"
            f"\tby {self.factory.hostname} with {self.protocol_name()} id {queue_id}"
            f"{for_clause}; {date}\r\n"
        )
        return header.encode("ascii", "replace")

    def _start_data(self) -> None:
        self._mode = _Mode.DATA
        self._compact()
        # A virtual CRLF in front of the body lets "." on the very first line end it.
        self._buffer = b"\r\n" + self._buffer
        self._data_skip = 2
        self._line_length = 0
        self._data_size = 0
        self._data_error = None
        self._pending_cr = False

    def _consume_data(self) -> None:
        """Scan the buffer for CRLF.CRLF, unstuffing dots; keep any undecided tail."""
        buf = self._buffer
        pos = self._data_skip
        search = 0
        pieces: list[bytes] = []
        while True:
            found = buf.find(b"\r\n.", search)
            if found < 0:
                break
            after = buf[found + 3 : found + 5]
            if after == b"\r\n":
                if found + 2 > pos:
                    pieces.append(buf[pos : found + 2])
                self._buffer = buf[found + 5 :]
                self._data_content(b"".join(pieces))
                self._end_data()
                return
            if after in (b"", b"\r"):
                # Cannot tell yet whether this is the terminator: keep it for later.
                self._emit_and_keep(buf, pieces, pos, found)
                return
            pieces.append(buf[pos : found + 2])
            pos = search = found + 3
        length = len(buf)
        keep_from = (
            length - 2 if buf.endswith(b"\r\n") else length - 1 if buf.endswith(b"\r") else length
        )
        self._emit_and_keep(buf, pieces, pos, max(keep_from, 0))

    def _emit_and_keep(self, buf: bytes, pieces: list[bytes], pos: int, keep_from: int) -> None:
        if keep_from > pos:
            pieces.append(buf[pos:keep_from])
        self._buffer = buf[keep_from:]
        self._data_skip = max(0, pos - keep_from)
        if pieces:
            self._data_content(b"".join(pieces))

    def _data_content(self, chunk: bytes) -> None:
        """Normalise bare CR/LF, check line length and size, then write to the spool."""
        if self._data_error is not None:
            return
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
        if not chunk:
            return
        chunk = to_crlf(chunk)
        if self._line_length + len(chunk) <= MAX_TEXT_LINE:
            last = chunk.rfind(b"\n")
            self._line_length = (
                self._line_length + len(chunk) if last < 0 else len(chunk) - last - 1
            )
        else:
            lines = chunk.split(b"\r\n")
            first = self._line_length + len(lines[0])
            self._line_length = first if len(lines) == 1 else len(lines[-1])
            if first > MAX_TEXT_LINE or max(map(len, lines)) > MAX_TEXT_LINE:
                self._data_failed(Reply(500, "5.5.2", "Error: message line too long"))
                return
        self._data_size += len(chunk)
        if self._data_size > self.factory.max_message_size:
            self._data_failed(Reply(552, "5.3.4", "Error: message too big for system"))
            return
        assert self._message is not None
        if self._headers is not None:
            chunk = self._headers.feed(chunk)
        if self._header_capture is not None:
            chunk = self._capture_headers(chunk, final=False)
        try:
            if chunk and self._message is not None:
                self._message.write(chunk)
        except Exception:
            log.failure("Spool write failed for {queue_id}", queue_id=self._message.queue_id)
            self._data_failed(Reply(452, "4.3.1", "Error: insufficient system storage"))

    def _capture_headers(self, chunk: bytes, final: bool) -> bytes:
        """Hold the header block until it is complete, then let the gate judge it.

        Returns what may be written now: nothing while the block is incomplete,
        then the gate's tag lines, the block and whatever followed it.
        """
        capture = self._header_capture
        assert capture is not None
        capture += chunk
        if capture.startswith(b"\r\n"):
            end = 0
        else:
            found = capture.find(b"\r\n\r\n")
            end = found + 2 if found >= 0 else -1
        limit = self.factory.gate.settings.headers.max_header_bytes
        if end < 0 and not final and len(capture) <= limit:
            return b""
        self._header_capture = None
        block = bytes(capture) if end < 0 else bytes(capture[:end])
        verdict = self.factory.gate.judge_headers(self.gate_session, block)
        if verdict.refused:
            self._data_failed(verdict.reply)
            return b""
        if verdict.action is _GATE_DISCARD:
            self._discard = True
        lines = b"".join(
            _clean_text(line).encode("ascii", "replace") + b"\r\n" for line in verdict.headers
        )
        return lines + bytes(capture)

    def _data_failed(self, reply: Reply) -> None:
        """Remember why the message will be refused; read on to the terminator, store nothing."""
        self._data_error = reply
        self._abort_message()

    def _abort_message(self) -> None:
        message, self._message = self._message, None
        if message is not None:
            try:
                message.abort()
            except Exception:
                log.failure("Aborting message {queue_id} failed", queue_id=message.queue_id)

    def _end_data(self) -> None:
        if self._pending_cr:
            self._data_content(b"\n")
        if (
            self._header_capture is not None
            and self._data_error is None
            and self._message is not None
        ):
            # A message that is all header block (or empty) is judged now.
            rest = self._capture_headers(b"", final=True)
            try:
                if rest and self._message is not None:
                    self._message.write(rest)
            except Exception:
                log.failure("Spool write failed for {queue_id}", queue_id=self._queue_id)
                self._data_failed(Reply(452, "4.3.1", "Error: insufficient system storage"))
        self._header_capture = None
        if self._discard and self._data_error is None:
            # Access map DISCARD: the client hears 250, the message is dropped (sendmail access_db).
            self._discard = False
            self._abort_message()
            self._data_error = Reply(250, "2.0.0", "Ok: discarded")
        headers, self._headers = self._headers, None
        if headers is not None and self._data_error is None and self._message is not None:
            try:
                self._message.write(headers.finish())
            except Exception:
                log.failure("Spool write failed for {queue_id}", queue_id=self._message.queue_id)
                self._data_failed(Reply(452, "4.3.1", "Error: insufficient system storage"))
        self._mode = _Mode.COMMAND
        message, self._message = self._message, None
        sender = self._sender or ""
        recipients = tuple(self._recipients)
        parameters = self._mail_parameters
        size = self._data_size
        self.reset_transaction()
        if self._data_error is not None or message is None:
            reply = self._data_error or Reply(451, "4.3.0", "Error: internal error")
            self._data_error = None
            self._log_transaction(self._queue_id, sender, recipients, size, reply)
            self.send(reply)
            return
        envelope = Envelope(
            sender=sender,
            recipients=recipients,
            client_address=self.client_ip,
            client_helo=self.client_helo or "",
            listener=self.factory.listener_name,
            protocol=self.protocol_name(),
            received_at=self.factory.clock.seconds(),
            authenticated_user=self.authenticated_user,
            mail_parameters=dict(parameters),
        )
        queue_id = message.queue_id
        try:
            committed = message.commit(envelope)
        except Exception:
            committed = fail(Failure())

        def done(queue_id_: str) -> None:
            reply = Reply(250, "2.0.0", f"Ok: queued as {queue_id_}")
            self._log_transaction(queue_id_, sender, recipients, size, reply)
            self.send(reply)

        def failed(failure: Failure) -> None:
            log.failure("Commit of {queue_id} failed", failure, queue_id=queue_id)
            try:
                message.abort()
            except Exception:
                log.failure("Aborting message {queue_id} failed", queue_id=queue_id)
            reply = Reply(452, "4.3.1", "Error: insufficient system storage")
            self._log_transaction(queue_id, sender, recipients, size, reply)
            self.send(reply)

        self._busy = True
        committed.addCallbacks(done, failed)
        committed.addErrback(self._async_failed)
        committed.addBoth(self._async_done)

    def _log_transaction(
        self, queue_id: str, sender: str, recipients: tuple[str, ...], size: int, reply: Reply
    ) -> None:
        rcpts = ",".join(f"<{r}>" for r in recipients)
        listener = self.factory.listener_name
        # Formatted here (C speed); the fields stay in the event for observers.
        log.info(
            "{line}",
            line=f"{queue_id}: client={self.client_ip} listener={listener} from=<{sender}> "
            f"to={rcpts} size={size} reply={reply.code} {reply.enhanced}",
            queue_id=queue_id,
            client=self.client_ip,
            listener=listener,
            sender=sender,
            recipients=rcpts,
            size=size,
            code=reply.code,
        )


class SMTPServerFactory(Factory):
    """Builds :class:`SMTPServer` sessions for one listener (``outside``, ``inside``, ``submission``).

    ``tls_options`` (an ``IOpenSSLServerConnectionCreator`` such as
    ``CertificateOptions``) enables STARTTLS; ``implicit_tls`` says the
    endpoint already wraps the connection in TLS (port 465); ``require_tls``
    refuses MAIL before STARTTLS; ``require_auth`` refuses MAIL before AUTH
    (the submission listeners).  ``clock`` drives the idle timeout.
    ``authenticator`` (the directory) enables AUTH PLAIN/LOGIN, offered only
    under TLS; ``throttle`` (a LoginThrottle shared with POP3) slows and
    then refuses clients that keep failing; ``sender_policy`` limits an
    authenticated user to their own envelope senders; ``complete_headers``
    adds Date and Message-ID to authenticated mail lacking them.
    ``max_connections`` and ``max_connections_per_client`` (MISSION M-11)
    turn extra sessions away with ``421 4.7.0`` at connect time.
    """

    # One log line per event: our own, not Twisted's per-connection factory start/stop.
    noisy = False

    protocol = SMTPServer  # type: ignore[assignment]

    def __init__(
        self,
        listener_name: str,
        hostname: str,
        store: MessageStore,
        recipients: RecipientCheck,
        relay: RelayPolicy,
        tls_options: Any,
        clock: IReactorTime,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_recipients: int = 100,
        max_errors: int = 20,
        max_junk_commands: int = 100,
        idle_timeout: float = 300.0,
        require_tls: bool = False,
        require_auth: bool = False,
        implicit_tls: bool = False,
        max_connections: int | None = None,
        max_connections_per_client: int | None = None,
        authenticator: Authenticator | None = None,
        throttle: LoginThrottle | None = None,
        sender_policy: SenderPolicy | None = None,
        complete_headers: bool = True,
        gate: Any = None,
    ) -> None:
        self.listener_name = listener_name
        self.hostname = hostname
        self.store = store
        self.recipients = recipients
        self.relay = relay
        self.tls_options = tls_options
        self.clock = clock
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.max_errors = max_errors
        self.max_junk_commands = max_junk_commands
        self.idle_timeout = idle_timeout
        self.require_tls = require_tls
        self.require_auth = require_auth
        self.implicit_tls = implicit_tls
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client
        self.authenticator = authenticator
        self.throttle = throttle
        self.sender_policy = sender_policy
        self.complete_headers = complete_headers
        #: The anti-spam gate (appliance.mail.gate.Gate) for this listener, or None.
        self.gate = gate
        self.connections = 0
        self.connections_by_client: dict[str, int] = {}

    def register(self, client_ip: str) -> bool:
        """Count a new session; False (and nothing counted) when a connection limit is reached."""
        if self.max_connections is not None and self.connections >= self.max_connections:
            return False
        per_client = self.connections_by_client.get(client_ip, 0)
        limit = self.max_connections_per_client
        if limit is not None and per_client >= limit:
            return False
        self.connections += 1
        self.connections_by_client[client_ip] = per_client + 1
        return True

    def unregister(self, client_ip: str) -> None:
        """Forget a session counted by :meth:`register`."""
        self.connections -= 1
        remaining = self.connections_by_client.get(client_ip, 0) - 1
        if remaining > 0:
            self.connections_by_client[client_ip] = remaining
        else:
            self.connections_by_client.pop(client_ip, None)

    def buildProtocol(self, addr: Any) -> SMTPServer:
        return self.protocol(self)  # type: ignore[call-arg,no-any-return]


__all__ = ["SMTPServer", "SMTPServerFactory"]
