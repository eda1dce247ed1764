"""DNSClient against a fake upstream on real loopback sockets; timeouts on a task.Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from appliance.dns import wire
from appliance.dns.client import DNSClient, DNSTimeoutError, DNSTransportError
from appliance.dns.wire import Message
from tests.harness import async_test
from tests.test_dns_resolver_fakes import (
    FakeUpstream,
    R,
    make_zone,
    n,
    rr_a,
    until,
    zone_answerer,
)

ZONE = make_zone("example.test", rr_a("www.example.test", "192.0.2.80"))




class ClientTests(unittest.TestCase):
    def make_server(
        self, mode: str = "normal", answer: Any = None, host: str = "127.0.2.1"
    ) -> FakeUpstream:
        server = FakeUpstream(host, answer or zone_answerer(ZONE), mode)
        server.start()
        self.addCleanup(server.stop)
        return server

    def setUp(self) -> None:
        self.clock = Clock()
        self.client = DNSClient(R, self.clock, "127.0.0.1")

    @async_test
    async def test_answer_from_queried_server_with_edns_and_fresh_socket(self) -> None:
        server = self.make_server()
        reply = await self.client.query(server.address, n("WWW.example.test"), 1)
        self.assertTrue(reply.qr and reply.aa)
        self.assertEqual([r.rdata for r in reply.answer], [bytes([192, 0, 2, 80])])
        transport, query = server.queries[0]
        self.assertEqual(transport, "udp")
        self.assertFalse(query.rd)
        self.assertIsNotNone(query.edns)
        assert query.edns is not None
        self.assertEqual(query.edns.udp_size, 1232)
        self.assertEqual(server.sources[0][0], "127.0.0.1")
        self.assertFalse(self.clock.getDelayedCalls())

    @async_test
    async def test_each_query_gets_new_source_port_and_random_id(self) -> None:
        server = self.make_server()
        for _ in range(6):
            await self.client.query(server.address, n("www.example.test"), 1, rd=True)
        ports = {port for _, port in server.sources}
        ids = {q.id for _, q in server.queries}
        # Fresh sockets; the kernel may (rarely) hand a closed port out again.
        self.assertGreaterEqual(len(ports), 5)
        self.assertGreater(len(ids), 1)
        self.assertTrue(all(q.rd for _, q in server.queries))

    @async_test
    async def test_silent_server_times_out_on_the_clock(self) -> None:
        server = self.make_server("silent")
        d = self.client.query(server.address, n("www.example.test"), 1, timeout=3)
        await until(lambda: len(server.queries) == 1)
        self.clock.advance(2.9)
        self.assertFalse(d.called)
        self.clock.advance(0.2)
        with self.assertRaises(DNSTimeoutError):
            await d
        self.assertEqual(self.client.stats["timeouts"], 1)

    @async_test
    async def test_reply_from_another_port_is_ignored(self) -> None:
        server = self.make_server("other-port")
        d = self.client.query(server.address, n("www.example.test"), 1)
        await until(lambda: self.client.stats["rejected_address"] >= 1)
        self.assertFalse(d.called)
        self.clock.advance(2)
        with self.assertRaises(DNSTimeoutError):
            await d

    @async_test
    async def test_reply_with_wrong_id_is_ignored(self) -> None:
        server = self.make_server("wrong-id")
        d = self.client.query(server.address, n("www.example.test"), 1)
        await until(lambda: self.client.stats["rejected_id"] >= 1)
        self.assertFalse(d.called)
        self.clock.advance(2)
        with self.assertRaises(DNSTimeoutError):
            await d

    @async_test
    async def test_reply_to_another_question_is_ignored(self) -> None:
        def other(query: Message) -> Message:
            q = query.question[0]
            forged = query._replace(question=(q._replace(name=n("evil.test")),))
            return wire.make_response(forged, ZONE.lookup(n("www.example.test"), 1))

        server = self.make_server(answer=other)
        d = self.client.query(server.address, n("www.example.test"), 1)
        await until(lambda: self.client.stats["rejected_question"] >= 1)
        self.clock.advance(2)
        with self.assertRaises(DNSTimeoutError):
            await d

    @async_test
    async def test_truncated_reply_is_retried_over_tcp_to_same_server(self) -> None:
        server = self.make_server("truncate")
        reply = await self.client.query(server.address, n("www.example.test"), 1)
        self.assertFalse(reply.tc)
        self.assertEqual(len(reply.answer), 1)
        self.assertEqual([t for t, _ in server.queries], ["udp", "tcp"])
        self.assertEqual(self.client.stats["tcp"], 1)

    @async_test
    async def test_tcp_refused_is_a_transport_error(self) -> None:
        server = self.make_server("truncate")
        await server.tcp.stopListening()
        server.tcp = None
        with self.assertRaises(DNSTransportError):
            await self.client.query(server.address, n("www.example.test"), 1)

    @async_test
    async def test_formerr_to_edns_falls_back_to_plain_dns(self) -> None:
        server = self.make_server("formerr-edns")
        reply = await self.client.query(server.address, n("www.example.test"), 1)
        self.assertEqual(len(reply.answer), 1)
        self.assertIsNotNone(server.queries[0][1].edns)
        self.assertIsNone(server.queries[1][1].edns)
        # Remembered: the next query to that server goes without EDNS at once.
        await self.client.query(server.address, n("www.example.test"), 1)
        self.assertIsNone(server.queries[2][1].edns)
        self.assertEqual(len(server.queries), 3)

    @async_test
    async def test_case_randomisation_requires_the_echoed_case(self) -> None:
        client = DNSClient(R, self.clock, "127.0.0.1", randomize_case=True)
        server = self.make_server()
        reply = await client.query(server.address, n("www.example.test"), 1)
        self.assertEqual(len(reply.answer), 1)

        def lower_echo(query: Message) -> Message:
            q = query.question[0]
            lowered = query._replace(question=(q._replace(name=q.name.lower()),))
            return wire.make_response(lowered, ZONE.lookup(n("www.example.test"), 1))

        server2 = self.make_server(answer=lower_echo, host="127.0.2.2")
        d = client.query(server2.address, n("www.example.test"), 1)
        await until(lambda: len(server2.queries) == 1)
        sent = server2.queries[0][1].question[0].name
        if sent == sent.lower():  # the 1-in-16384 all-lower pattern: nothing to reject
            await d
            return
        await until(lambda: client.stats["rejected_question"] >= 1)
        self.clock.advance(2)
        with self.assertRaises(DNSTimeoutError):
            await d

    @async_test
    async def test_cancel_closes_the_socket(self) -> None:
        server = self.make_server("silent")
        d = self.client.query(server.address, n("www.example.test"), 1)
        d.cancel()
        with self.assertRaises(defer.CancelledError):
            await d
        self.assertFalse(self.clock.getDelayedCalls())

    def test_bad_server_address_fails_at_once(self) -> None:
        d = self.client.query(("not-an-ip", 53), n("www.example.test"), 1)
        self.failureResultOf(d, DNSTransportError)
        d6 = self.client.query(("::1", 53), n("www.example.test"), 1)
        self.failureResultOf(d6, DNSTransportError)
