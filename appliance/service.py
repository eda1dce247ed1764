"""The service tree: one named child per role, started in order, listeners last.

Listening sockets are bound in ``privilegedStartService`` (before twistd
drops privileges) but accept nothing until ``startService`` reaches them, and
that happens only after storage (TLS material, directory, spool recovery,
zones) has started: nothing is accepted before the spool is ready.  A reload
(SIGHUP or ``appliance reload``) re-reads the configuration and hands it to
every child that can apply it; a configuration that no longer validates is
refused with a logged error and everything keeps running as it was.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from appliance import config as config_module
from appliance.config import Config

log = Logger(namespace="appliance")


@runtime_checkable
class Reconfigurable(Protocol):
    """A child that can apply a new, already validated configuration without a restart."""

    def reconfigure(self, config: Config) -> None: ...


class OrderedMultiService(service.MultiService):
    """Starts children one after the other, waiting on each; stops them in reverse order.

    The stock MultiService starts every child at once and ignores the
    Deferreds they return (research/twisted-notes.md 3.1).
    """

    def startService(self) -> defer.Deferred[None]:  # type: ignore[override]
        service.Service.startService(self)
        return defer.ensureDeferred(self._start_children())

    async def _start_children(self) -> None:
        for child in list(self):
            await defer.maybeDeferred(child.startService)

    def stopService(self) -> defer.Deferred[None]:  # type: ignore[override]
        service.Service.stopService(self)
        return defer.ensureDeferred(self._stop_children())

    async def _stop_children(self) -> None:
        for child in reversed(list(self)):
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {name} failed", name=child.name)


class ListenerService(service.Service):
    """One listening socket: bound early (privileged), reading only once started.

    ``listen`` binds and returns the port; it is called from
    ``privilegedStartService`` so ports below 1024 work before twistd drops
    privileges.
    """

    def __init__(self, name: str, description: str, listen: Callable[[], IListeningPort]) -> None:
        self.setName(name)
        self.description = description
        self._listen = listen
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        self._bind()

    def _bind(self) -> None:
        if self.port is None:
            self.port = self._listen()
            self.port.stopReading()  # type: ignore[attr-defined]

    def startService(self) -> None:
        service.Service.startService(self)
        self._bind()
        assert self.port is not None
        self.port.startReading()  # type: ignore[attr-defined]
        log.info("listening: {description}", description=self.description)

    def stopService(self) -> defer.Deferred[None] | None:
        service.Service.stopService(self)
        port: Any = self.port
        self.port = None
        if port is not None:
            stopped = port.stopListening()
            return stopped if isinstance(stopped, defer.Deferred) else None
        return None


class ApplianceService(OrderedMultiService):
    """The root of the tree: owns the current configuration and reloads it on SIGHUP."""

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self._previous_handler: Any = None

    @property
    def pidfile(self) -> Path:
        return self.config.state_dir / "appliance.pid"

    def startService(self) -> defer.Deferred[None]:  # type: ignore[override]
        d = super().startService()

        def started(_: object) -> None:
            self._write_pidfile()
            self._install_sighup()
            log.info("appliance started with {config}", config=str(self.config.path))

        d.addCallback(started)
        return d

    def stopService(self) -> defer.Deferred[None]:  # type: ignore[override]
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        try:
            self.pidfile.unlink()
        except OSError:
            pass
        return super().stopService()

    def _write_pidfile(self) -> None:
        try:
            self.pidfile.parent.mkdir(parents=True, exist_ok=True)
            self.pidfile.write_text(f"{os.getpid()}\n")
        except OSError as e:
            log.error("cannot write {path}: {error}", path=str(self.pidfile), error=e)

    def _install_sighup(self) -> None:
        def handler(signum: int, frame: object) -> None:
            self.reactor.callFromThread(self.reload)

        try:
            self._previous_handler = signal.signal(signal.SIGHUP, handler)
        except ValueError:
            # Not the main thread (some test runners): reload stays available as a method.
            self._previous_handler = None

    def reload(self) -> bool:
        """Re-read the configuration file and apply it; False (and logged) when it is refused."""
        try:
            new = config_module.load(self.config.path)
        except config_module.ConfigError as e:
            for problem in e.problems:
                log.error("reload refused: {problem}", problem=str(problem))
            log.error("reload refused: the running configuration is kept")
            return False
        if new.listeners != self.config.listeners:
            log.warn("reload: listener changes take effect only after a restart")
        self.config = new
        for child in self:
            if isinstance(child, Reconfigurable):
                try:
                    child.reconfigure(new)
                except Exception:
                    log.failure(
                        "reload of {name} failed; it keeps its previous state",
                        name=getattr(child, "name", "?"),
                    )
        log.info("configuration reloaded from {path}", path=str(new.path))
        return True


class ThreadPoolService(service.Service):
    """A thread pool of our own for blocking work (fsync, password hashing), started with the tree.

    Kept apart from the reactor's default pool so that a slow disk cannot
    starve name resolution, and stopped (joined) at shutdown.
    """

    name = "threads"

    def __init__(self, reactor: Any, size: int = 16) -> None:
        from twisted.python.threadpool import ThreadPool

        self.reactor = reactor
        self.pool = ThreadPool(minthreads=2, maxthreads=size, name="appliance-io")

    def startService(self) -> None:
        service.Service.startService(self)
        self.pool.start()

    def stopService(self) -> None:
        service.Service.stopService(self)
        self.pool.stop()

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        """Run ``f`` in the pool; the Deferred fires in the reactor thread with its result."""
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self.reactor, self.pool, f, *args, **kwargs)
