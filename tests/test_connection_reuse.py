"""Connection reuse (M-6) over real loopback sockets: attempt and RemoteDelivery with a SessionPool.

A scripted ESMTP server counts connections, transactions and commands per
connection, and can close a connection after its first transaction, drop or
421 a reused one at MAIL, or answer the final dot slowly; the real reactor
is the clock.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineReceiver
from twisted.trial import unittest

from appliance.mail.connections import SessionPool
from appliance.mail.outbound import RemoteDelivery
from appliance.mail.queue import QueuedMessage, RecipientState
from appliance.mail.routing import MX, STATIC, Route, Router
from appliance.mail.smtp_client import (
    OutboundSettings,
    Outcome,
    Timeouts,
    attempt,
)
from tests.test_mail_mx import FakeResolver
from tests.test_mail_queue_support import envelope

SENDER = "alice@example.test"
#: The global reactor, untyped: mypy sees it as the module, not as IReactorTCP/IReactorTime.
REACTOR: Any = reactor


class NoDNS:
    """A resolver for static routes to addresses: any lookup fails the test."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"unexpected DNS lookup {name}")


class Counters:
    """Connections open at once, over several servers (to see destinations run in parallel)."""

    def __init__(self) -> None:
        self.open = 0
        self.max_open = 0


class ScriptedSMTP(LineReceiver):
    """One connection of :class:`ScriptedFactory`; records every command it receives."""

    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, factory: ScriptedFactory) -> None:
        self.f = factory
        self.commands: list[str] = []
        self.transactions = 0
        self.in_data = False
        self.rcpts: list[str] = []
        self.data: list[bytes] = []
        self.timer: Any = None

    @property
    def tx(self) -> Any:
        """The transport, untyped (mypy cannot see through the zope interfaces)."""
        return self.transport

    def connectionMade(self) -> None:
        self.f.connections.append(self)
        self.f.open += 1
        self.f.max_open = max(self.f.max_open, self.f.open)
        if self.f.shared is not None:
            self.f.shared.open += 1
            self.f.shared.max_open = max(self.f.shared.max_open, self.f.shared.open)
        self.sendLine(b"220 mx.remote.test ESMTP scripted")

    def connectionLost(self, reason: Any = None) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.f.open -= 1
        if self.f.shared is not None:
            self.f.shared.open -= 1
        self.f.closed.append(self)
        if len(self.f.closed) >= len(self.f.connections):
            waiting, self.f.waiting = self.f.waiting, []
            for d in waiting:
                d.callback(None)

    def lineReceived(self, line: bytes) -> None:
        if self.in_data:
            self._data_line(line)
            return
        text = line.decode("latin-1")
        self.commands.append(text)
        verb = text[:4].upper()
        if verb in ("EHLO", "HELO"):
            for keyword in (b"mx.remote.test", *self.f.extensions[:-1]):
                self.sendLine(b"250-" + keyword)
            self.sendLine(b"250 " + self.f.extensions[-1])
        elif verb == "MAIL":
            if self.transactions and self.f.reused_mail == "drop":
                self.tx.abortConnection()
                return
            if self.transactions and self.f.reused_mail == "421":
                self.sendLine(b"421 4.4.2 idle too long, closing")
                self.tx.loseConnection()
                return
            self.rcpts = []
            self.sendLine(b"250 2.1.0 ok")
        elif verb == "RCPT":
            address = text[8:].strip().strip("<>")
            if address.startswith("gone"):
                self.sendLine(b"550 5.1.1 no such user")
            else:
                self.rcpts.append(address)
                self.sendLine(b"250 2.1.5 ok")
        elif verb == "DATA":
            if not self.rcpts:
                self.sendLine(b"554 5.5.1 no valid recipients")
                return
            self.in_data = True
            self.data = []
            self.sendLine(b"354 go ahead")
        elif verb == "RSET":
            self.rcpts = []
            self.sendLine(b"250 2.0.0 ok")
        elif verb == "QUIT":
            self.sendLine(b"221 2.0.0 bye")
            self.tx.loseConnection()
        else:
            self.sendLine(b"502 5.5.2 what")

    def _data_line(self, line: bytes) -> None:
        if line != b".":
            self.data.append(line)
            return
        self.in_data = False
        self.transactions += 1
        self.commands.append(".")
        self.f.messages.append((list(self.rcpts), b"\r\n".join(self.data)))
        if self.f.dot_delay:
            self.timer = REACTOR.callLater(self.f.dot_delay, self._dot_reply)
        else:
            self._dot_reply()

    def _dot_reply(self) -> None:
        self.timer = None
        self.sendLine(b"250 2.0.0 queued")
        if self.f.close_after_first and self.transactions == 1:
            self.tx.loseConnection()  # the server's idle timeout, at once


class ScriptedFactory(Factory):
    def __init__(
        self,
        *,
        extensions: tuple[bytes, ...] = (b"PIPELINING", b"8BITMIME", b"SIZE 10000000"),
        close_after_first: bool = False,
        reused_mail: str = "",
        dot_delay: float = 0.0,
        shared: Counters | None = None,
    ) -> None:
        self.extensions = extensions
        self.close_after_first = close_after_first
        self.reused_mail = reused_mail
        self.dot_delay = dot_delay
        self.shared = shared
        self.connections: list[ScriptedSMTP] = []
        self.closed: list[ScriptedSMTP] = []
        self.waiting: list[defer.Deferred[None]] = []
        self.messages: list[tuple[list[str], bytes]] = []
        self.open = 0
        self.max_open = 0

    def buildProtocol(self, addr: Any) -> ScriptedSMTP:
        return ScriptedSMTP(self)

    def all_closed(self) -> defer.Deferred[None]:
        """Fires once the server has seen every connection go (so the reactor is clean)."""
        d: defer.Deferred[None] = defer.Deferred()
        if len(self.closed) >= len(self.connections):
            d.callback(None)
        else:
            self.waiting.append(d)
        return d

    def commands(self, verb: str) -> int:
        return sum(
            1 for c in self.connections for line in c.commands if line.upper().startswith(verb)
        )


def message(n: int) -> bytes:
    return f"From: {SENDER}\r\nSubject: message {n}\r\n\r\nbody {n}\r\n".encode()


class ReuseTestCase(unittest.TestCase):
    """Helpers: serve on 127.0.0.1, clean up servers and pools in the right order."""

    timeout = 30

    def serve(self, **kw: Any) -> tuple[ScriptedFactory, int]:
        factory = ScriptedFactory(**kw)
        port = REACTOR.listenTCP(0, factory, interface="127.0.0.1")
        # Cleanups run last-in first-out: the pool is closed (added later) before
        # the server waits for its connections to go, then stops listening.
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.all_closed)
        return factory, port.getHost().port

    def new_pool(self, **kw: Any) -> SessionPool:
        pool = SessionPool(reactor, **kw)
        self.addCleanup(pool.close_all)
        return pool

    def settings(self, **kw: Any) -> OutboundSettings:
        return OutboundSettings(
            helo_name="gw.example.test",
            own_names=("gw.example.test",),
            own_addresses=("127.0.0.10",),
            opportunistic_tls=False,
            timeouts=Timeouts(connect=5, greeting=5, quit=2),
            **kw,
        )


class AttemptRouteReuse(ReuseTestCase):
    """attempt(..., pool=pool) to a static route and to an MX route."""

    def attempt(
        self,
        route: Route,
        pool: SessionPool | None,
        recipients: list[str],
        body: bytes,
        resolver: Any = None,
        endpoints: Any = None,
    ) -> defer.Deferred[dict[str, Outcome]]:
        return defer.ensureDeferred(
            attempt(
                route,
                SENDER,
                recipients,
                body,
                resolver if resolver is not None else NoDNS(),
                self.settings(),
                reactor,
                endpoints or (lambda address, port: TCP4ClientEndpoint(reactor, address, port)),
                random.Random(1),
                pool=pool,
            )
        )

    @defer.inlineCallbacks
    def test_five_messages_in_sequence_share_one_connection(self) -> Any:
        factory, port = self.serve()
        pool = self.new_pool()
        route = Route(STATIC, "127.0.0.1", port, False)
        for n in range(5):
            outcomes = yield self.attempt(route, pool, [f"rcpt{n}@remote.test"], message(n))
            self.assertEqual(outcomes[f"rcpt{n}@remote.test"].reply.code, 250, outcomes)
        self.assertEqual(len(factory.connections), 1)
        [connection] = factory.connections
        self.assertEqual(connection.transactions, 5)
        self.assertEqual(
            [m[0] for m in factory.messages], [[f"rcpt{n}@remote.test"] for n in range(5)]
        )
        self.assertIn(b"body 4", factory.messages[4][1])
        # One greeting and EHLO; complete transactions need no RSET (RFC 5321 4.1.1.5).
        self.assertEqual(factory.commands("EHLO"), 1)
        self.assertEqual(factory.commands("RSET"), 0, connection.commands)
        self.assertEqual(factory.commands("QUIT"), 0)
        self.assertEqual(pool.reused, 4)
        self.assertEqual(len(pool), 1)
        yield pool.close_all()
        self.assertEqual(factory.commands("QUIT"), 1)

    @defer.inlineCallbacks
    def test_five_messages_without_pipelining_share_one_connection(self) -> Any:
        factory, port = self.serve(extensions=(b"8BITMIME",))
        pool = self.new_pool()
        route = Route(STATIC, "127.0.0.1", port, False)
        for n in range(5):
            outcomes = yield self.attempt(route, pool, [f"rcpt{n}@remote.test"], message(n))
            self.assertEqual(outcomes[f"rcpt{n}@remote.test"].reply.code, 250, outcomes)
        self.assertEqual(len(factory.connections), 1)
        self.assertEqual(factory.connections[0].transactions, 5)
        self.assertEqual(factory.commands("RSET"), 0)

    @defer.inlineCallbacks
    def test_unfinished_transaction_is_reset_before_the_next(self) -> Any:
        """The counterpart of "no RSET": a transaction left open (no recipient accepted) gets one."""
        factory, port = self.serve()
        pool = self.new_pool()
        route = Route(STATIC, "127.0.0.1", port, False)
        outcomes = yield self.attempt(route, pool, ["gone@remote.test"], message(0))
        self.assertEqual(outcomes["gone@remote.test"].reply.code, 550)
        outcomes = yield self.attempt(route, pool, ["ok@remote.test"], message(1))
        self.assertEqual(outcomes["ok@remote.test"].reply.code, 250)
        self.assertEqual(len(factory.connections), 1)
        commands = [c.split(":")[0].split()[0].upper() for c in factory.connections[0].commands]
        self.assertEqual(
            commands, ["EHLO", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA", "."]
        )
        self.assertEqual(len(factory.messages), 1)

    @defer.inlineCallbacks
    def test_server_closing_the_idle_connection(self) -> Any:
        """The server hangs up right after the first transaction; the second message still goes."""
        factory, port = self.serve(close_after_first=True)
        pool = self.new_pool()
        route = Route(STATIC, "127.0.0.1", port, False)
        first = yield self.attempt(route, pool, ["one@remote.test"], message(1))
        self.assertEqual(first["one@remote.test"].reply.code, 250)
        second = yield self.attempt(route, pool, ["two@remote.test"], message(2))
        self.assertEqual(second["two@remote.test"].reply.code, 250, second)
        self.assertEqual(len(factory.connections), 2)
        self.assertEqual(
            [m[0] for m in factory.messages], [["one@remote.test"], ["two@remote.test"]]
        )

    @defer.inlineCallbacks
    def test_server_closed_while_idle_noticed_before_reuse(self) -> Any:
        factory, port = self.serve(close_after_first=True)
        pool = self.new_pool()
        route = Route(STATIC, "127.0.0.1", port, False)
        yield self.attempt(route, pool, ["one@remote.test"], message(1))
        yield factory.all_closed()  # the close has certainly reached the client
        yield deferLater(reactor, 0.05, lambda: None)
        second = yield self.attempt(route, pool, ["two@remote.test"], message(2))
        self.assertEqual(second["two@remote.test"].reply.code, 250, second)
        self.assertEqual(pool.reused, 0)  # the dead session was dropped at take
        self.assertEqual(len(factory.connections), 2)
        self.assertEqual(len(factory.messages), 2)

    @defer.inlineCallbacks
    def test_reused_connection_dropped_before_any_answer_is_retried_fresh(self) -> Any:
        """The reused session breaks at MAIL (no reply at all): the recipients go the whole way."""
        factory, port = self.serve(reused_mail="drop")
        pool = self.new_pool()
        route = Route(STATIC, "127.0.0.1", port, False)
        yield self.attempt(route, pool, ["one@remote.test"], message(1))
        second = yield self.attempt(
            route, pool, ["two@remote.test", "three@remote.test"], message(2)
        )
        self.assertEqual(
            {r: (o.reply.code, o.remote_mta) for r, o in second.items()},
            {"two@remote.test": (250, "127.0.0.1"), "three@remote.test": (250, "127.0.0.1")},
        )
        self.assertEqual(pool.reused, 1)  # it was taken, and it failed
        self.assertEqual(len(factory.connections), 2)
        self.assertEqual(
            [m[0] for m in factory.messages],
            [["one@remote.test"], ["two@remote.test", "three@remote.test"]],
        )

    @defer.inlineCallbacks
    def test_broken_reused_session_is_not_kept_alive(self) -> Any:
        """The pool may not keep a record of a session it handed out that then broke (a leak).

        The session taken for the second message breaks at MAIL; the pool must
        not keep it (nor its protocol and transcript) for the life of the process.
        """
        factory, port = self.serve(reused_mail="drop")
        pool = self.new_pool()
        route = Route(STATIC, "127.0.0.1", port, False)
        yield self.attempt(route, pool, ["one@remote.test"], message(1))
        yield self.attempt(route, pool, ["two@remote.test"], message(2))
        yield pool.close_all()
        yield factory.all_closed()
        self.assertEqual([s.remote for s in list(pool._out.keys())], [], "sessions still recorded")
        self.assertEqual(len(pool), 0)

    @defer.inlineCallbacks
    def test_reused_connection_refused_with_421_is_retried_fresh(self) -> Any:
        factory, port = self.serve(reused_mail="421")
        pool = self.new_pool()
        route = Route(STATIC, "127.0.0.1", port, False)
        yield self.attempt(route, pool, ["one@remote.test"], message(1))
        second = yield self.attempt(route, pool, ["two@remote.test"], message(2))
        self.assertEqual(second["two@remote.test"].reply.code, 250, second)
        self.assertEqual(len(factory.connections), 2)
        self.assertEqual(len(factory.messages), 2)

    @defer.inlineCallbacks
    def test_pooled_session_is_not_used_after_the_idle_time(self) -> Any:
        factory, port = self.serve()
        pool = self.new_pool(idle=0.2)
        route = Route(STATIC, "127.0.0.1", port, False)
        yield self.attempt(route, pool, ["one@remote.test"], message(1))
        self.assertEqual(len(pool), 1)
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(len(pool), 0)
        yield factory.all_closed()
        self.assertEqual(factory.commands("QUIT"), 1)  # closed politely by the idle timer
        yield self.attempt(route, pool, ["two@remote.test"], message(2))
        self.assertEqual(pool.reused, 0)
        self.assertEqual(len(factory.connections), 2)
        self.assertEqual(factory.connections[1].transactions, 1)

    @defer.inlineCallbacks
    def test_session_reused_within_the_idle_time(self) -> Any:
        factory, port = self.serve()
        pool = self.new_pool(idle=1.0)
        route = Route(STATIC, "127.0.0.1", port, False)
        yield self.attempt(route, pool, ["one@remote.test"], message(1))
        yield deferLater(reactor, 0.3, lambda: None)
        yield self.attempt(route, pool, ["two@remote.test"], message(2))
        self.assertEqual(pool.reused, 1)
        self.assertEqual(len(factory.connections), 1)

    @defer.inlineCallbacks
    def test_no_dns_lookup_while_a_connection_is_cached(self) -> Any:
        factory, port = self.serve()
        resolver = FakeResolver(
            {"remote.test": [(10, "mx1.remote.test")]}, {"mx1.remote.test": ["127.0.2.1"]}
        )

        def endpoints(address: str, port_: int) -> TCP4ClientEndpoint:
            self.assertEqual((address, port_), ("127.0.2.1", 25))
            return TCP4ClientEndpoint(reactor, "127.0.0.1", port)

        pool = self.new_pool()
        route = Route(MX, "remote.test", 25, True)
        first = yield self.attempt(
            route, pool, ["one@remote.test"], message(1), resolver, endpoints
        )
        self.assertEqual(
            first["one@remote.test"], Outcome(first["one@remote.test"].reply, "mx1.remote.test")
        )
        self.assertEqual(first["one@remote.test"].reply.code, 250)
        lookups = list(resolver.queries)
        self.assertEqual(lookups, [("MX", "remote.test"), ("A/AAAA", "mx1.remote.test")])
        second = yield self.attempt(
            route, pool, ["two@remote.test"], message(2), resolver, endpoints
        )
        self.assertEqual(second["two@remote.test"].reply.code, 250)
        # The label kept with the session still names the MX host for the log and DSN.
        self.assertEqual(second["two@remote.test"].remote_mta, "mx1.remote.test")
        self.assertEqual(resolver.queries, lookups)
        self.assertEqual(len(factory.connections), 1)
        # Without a cached connection the lookups happen again.
        yield pool.close_all()
        yield self.attempt(route, pool, ["three@remote.test"], message(3), resolver, endpoints)
        self.assertEqual(len(resolver.queries), 4)
        self.assertEqual(len(factory.connections), 2)

    @defer.inlineCallbacks
    def test_without_a_pool_every_message_has_its_connection(self) -> Any:
        factory, port = self.serve()
        route = Route(STATIC, "127.0.0.1", port, False)
        for n in range(3):
            yield self.attempt(route, None, [f"r{n}@remote.test"], message(n))
        self.assertEqual(len(factory.connections), 3)
        self.assertEqual(factory.commands("QUIT"), 3)


class DestinationConcurrency(ReuseTestCase):
    """RemoteDelivery's per-destination limit on top of the overall one."""

    timeout = 60

    def setUp(self) -> None:
        # Not trial's mktemp(): that leaves a directory named after the test in the cwd.
        self.directory = Path(tempfile.mkdtemp(prefix="connection-reuse-"))
        self.addCleanup(shutil.rmtree, self.directory, True)

    def queued(self, n: int, recipient: str) -> QueuedMessage:
        path = self.directory / f"message-{n}"
        path.write_bytes(message(n))
        return QueuedMessage(
            queue_id=f"Q{n:04d}",
            envelope=envelope(recipient, sender=SENDER),
            recipients=(RecipientState(recipient),),
            size=path.stat().st_size,
            data_path=path,
        )

    def delivery(self, routes: dict[str, str], concurrency: int, per_destination: int) -> Any:
        """RemoteDelivery over static routes on loopback, closed at the end of the test."""
        router = Router(routes, None, ["gw.example.test"], ["127.0.0.10"])
        delivery = RemoteDelivery(
            router,
            NoDNS(),
            self.settings(),
            reactor,
            lambda address, port: TCP4ClientEndpoint(reactor, address, port),
            random.Random(1),
            concurrency=concurrency,
            destination_concurrency=per_destination,
        )
        self.addCleanup(delivery.close)
        return delivery

    @defer.inlineCallbacks
    def test_at_most_two_connections_to_one_destination(self) -> Any:
        shared = Counters()
        slow, slow_port = self.serve(dot_delay=0.3, shared=shared)
        other, other_port = self.serve(dot_delay=0.3, shared=shared)
        delivery = self.delivery(
            {
                "slow.test": f"[127.0.0.1]:{slow_port}",
                "other.test": f"[127.0.0.1]:{other_port}",
            },
            concurrency=10,
            per_destination=2,
        )

        done: list[str] = []

        def deliver(n: int, recipient: str) -> defer.Deferred[Any]:
            msg = self.queued(n, recipient)

            def finished(replies: Any) -> Any:
                done.append(recipient)
                return replies

            return delivery(msg, msg.recipients).addCallback(finished)

        slow_rcpts = [f"s{n}@slow.test" for n in range(6)]
        other_rcpts = [f"o{n}@other.test" for n in range(2)]
        attempts = [deliver(n, r) for n, r in enumerate(slow_rcpts)]
        attempts += [deliver(10 + n, r) for n, r in enumerate(other_rcpts)]
        results = yield defer.gatherResults(attempts)
        for replies in results:
            for rcpt, reply in replies.items():
                self.assertEqual(reply.code, 250, (rcpt, reply))

        self.assertEqual(sorted(r for m in slow.messages for r in m[0]), sorted(slow_rcpts))
        self.assertEqual(sorted(r for m in other.messages for r in m[0]), sorted(other_rcpts))
        # Never more than two connections to the slow destination, and it did use two.
        self.assertEqual(slow.max_open, 2)
        self.assertLessEqual(len(slow.connections), 2)
        self.assertEqual(sum(c.transactions for c in slow.connections), 6)
        # The other destination was not held up behind the slow one's queue:
        # both of its messages were done before the last slow one, and its
        # connections were open at the same time as the slow ones.
        self.assertGreaterEqual(shared.max_open, 3)
        self.assertLess(max(done.index(r) for r in other_rcpts), done.index(slow_rcpts[-1]))
        self.assertLess(max(done.index(r) for r in other_rcpts), 4)

    @defer.inlineCallbacks
    def test_overall_concurrency_still_applies(self) -> Any:
        slow, slow_port = self.serve(dot_delay=0.2)
        delivery = self.delivery(
            {"slow.test": f"[127.0.0.1]:{slow_port}"}, concurrency=1, per_destination=5
        )
        msgs = [self.queued(n, f"s{n}@slow.test") for n in range(3)]
        results = yield defer.gatherResults([delivery(m, m.recipients) for m in msgs])
        self.assertEqual([r[f"s{n}@slow.test"].code for n, r in enumerate(results)], [250] * 3)
        self.assertEqual(slow.max_open, 1)
        self.assertEqual(len(slow.connections), 1)
        self.assertEqual(delivery.pool.reused, 2)
