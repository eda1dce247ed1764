"""The control socket: how the ``appliance`` tools talk to the running process (O-2).

A UNIX stream socket, ``<state_dir>/control.sock``, mode 0600 and owned by the
user the process runs as, so only that user and root can connect; the peer's
credentials (SO_PEERCRED) are checked as well, in case the directory's
permissions were loosened.  The protocol is one JSON object per line each
way: ``{"command": NAME, ...arguments}`` is answered by ``{"ok": true,
"result": ...}`` or ``{"ok": false, "error": TEXT}``.  A client may send
several requests on one connection; answers come in order.

The handlers are plain callables registered by name (appliance.mail.queuetools
registers the queue and routing commands), returning a value or a Deferred;
whatever they raise becomes an error answer, never an exception in the reactor.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

log = Logger(namespace="appliance.control")

SOCKET_NAME = "control.sock"
MAX_REQUEST = 64 * 1024

#: A command handler: the request's arguments in, a JSON-serialisable result out.
Handler = Callable[[Mapping[str, Any]], Any]


class CommandError(Exception):
    """A request the handler refuses (bad argument, unknown queue id): its text goes to the client."""


def socket_path(state_dir: Path) -> Path:
    """Where the running process listens."""
    return Path(state_dir) / SOCKET_NAME


def peer_uid(transport: Any) -> int | None:
    """The uid of the process at the other end of a UNIX socket (Linux SO_PEERCRED), or None."""
    try:
        sock = transport.getHandle()
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", raw)
        return int(uid)
    except (AttributeError, OSError, struct.error):
        return None


class ControlProtocol(LineOnlyReceiver):
    """One client connection: a JSON request per line, a JSON answer per line, in order."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def __init__(self, handlers: Mapping[str, Handler], allowed_uids: frozenset[int]) -> None:
        self.handlers = handlers
        self.allowed_uids = allowed_uids
        self._queue: Deferred[None] = defer.succeed(None)

    def connectionMade(self) -> None:
        uid = peer_uid(self.transport)
        if uid is not None and uid not in self.allowed_uids:
            log.warn("control: refused a client with uid {uid}", uid=uid)
            self._send({"ok": False, "error": "permission denied"})
            self._close()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._send({"ok": False, "error": "request too long"})
        self._close()

    def lineReceived(self, line: bytes) -> None:
        self._queue.addCallback(lambda _: self._answer(line))

    def _answer(self, line: bytes) -> Deferred[None]:
        d = defer.maybeDeferred(self.dispatch, line)

        def ok(result: Any) -> None:
            self._send({"ok": True, "result": result})

        def failed(f: Failure) -> None:
            error: Any = f.value
            if f.check(CommandError, ValueError, KeyError):
                text = str(error.args[0]) if error.args else type(error).__name__
            else:
                log.failure("control: command failed", f)
                text = f"internal error: {type(error).__name__}: {error}"
            self._send({"ok": False, "error": text})

        d.addCallbacks(ok, failed)
        return d

    def dispatch(self, line: bytes) -> Any:
        """Decode one request and run its handler."""
        try:
            request = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise CommandError("request is not JSON") from None
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            raise CommandError('request must be an object with a "command" string')
        handler = self.handlers.get(request["command"])
        if handler is None:
            raise CommandError(f"unknown command {request['command']!r}")
        return handler(request)

    def _close(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.loseConnection()

    def _send(self, answer: Mapping[str, Any]) -> None:
        transport: Any = self.transport
        if transport is None:
            return
        try:
            data = json.dumps(answer, sort_keys=True, default=str).encode("utf-8")
        except (TypeError, ValueError) as e:
            data = json.dumps({"ok": False, "error": f"unserialisable result: {e}"}).encode()
        transport.write(data + b"\n")


class ControlFactory(Factory):
    """Builds a :class:`ControlProtocol` per connection, sharing the handler table."""

    def __init__(self, handlers: Mapping[str, Handler], allowed_uids: frozenset[int]) -> None:
        self.handlers = handlers
        self.allowed_uids = allowed_uids

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        protocol = ControlProtocol(self.handlers, self.allowed_uids)
        protocol.factory = self
        return protocol


class ControlService(Service):
    """Listens on the control socket while the appliance runs.

    Started in ``startService`` (after privileges are dropped), so the socket
    belongs to the appliance's own user; root and that user may connect.
    A stale socket left by a killed process is replaced.
    """

    name = "control"

    def __init__(
        self, path: Path, reactor: Any, handlers: dict[str, Handler] | None = None
    ) -> None:
        self.path = Path(path)
        self.reactor = reactor
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.port: IListeningPort | None = None

    def register(self, name: str, handler: Handler) -> None:
        """Add or replace the handler of one command."""
        self.handlers[name] = handler

    def startService(self) -> None:
        Service.startService(self)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("control: cannot remove stale {path}: {err}", path=str(self.path), err=e)
        uids = frozenset({0, os.getuid()})
        try:
            self.port = self._listen(ControlFactory(self.handlers, uids))
        except Exception as e:
            log.error("control: cannot listen on {path}: {err}", path=str(self.path), err=e)
            self.port = None
        if self.port is not None:
            log.info("control: listening on {path}", path=str(self.path))

    def _listen(self, factory: ControlFactory) -> IListeningPort:
        # The tight umask makes the socket 0600 from the moment it is bound (listenUNIX
        # chmods only afterwards).
        old = os.umask(0o177)
        try:
            port: IListeningPort = self.reactor.listenUNIX(str(self.path), factory, mode=0o600)
        finally:
            os.umask(old)
        return port

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        port: Any = self.port
        self.port = None
        if port is None:
            return None
        d = defer.maybeDeferred(port.stopListening)

        def unlink(_: object) -> None:
            try:
                self.path.unlink()
            except OSError:
                pass

        return d.addBoth(unlink)


class ControlClient:
    """The tools' side: a blocking connection to the control socket."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except OSError:
            self.sock.close()
            raise
        self._buffer = b""

    def call(self, command: str, **arguments: Any) -> Any:
        """Send one request; the result, or CommandError with the server's text."""
        request = dict(arguments, command=command)
        self.sock.sendall(json.dumps(request).encode("utf-8") + b"\n")
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise CommandError("the appliance closed the control connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer = json.loads(line.decode("utf-8"))
        if not answer.get("ok"):
            raise CommandError(str(answer.get("error", "unknown error")))
        return answer.get("result")

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
