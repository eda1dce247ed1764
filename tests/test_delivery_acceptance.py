"""Issue 7's acceptance: remote delivery by the real ``twistd appliance`` into a small Internet.

The Internet is 127.0.2.0/24: a test name server authoritative for the
remote domains (the inside view forwards to it), scripted SMTP receivers and
Postfix's smtp-sink on port 25 of their MX addresses.  Mail goes in over
SMTP, the operator tools (mailq, flush, queue hold/release/delete, route)
run as the ``appliance`` command against the control socket.  The
statistical and the lifetime rules run below the process (a seeded RNG, a
fake clock), as the issue allows.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import itertools
import json
import random
import smtplib
import stat
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError

from appliance.control import ControlClient
from appliance.mail.interfaces import Reply
from appliance.mail.outbound import RemoteDelivery
from appliance.mail.queue import DEFERRED, FAILED, QueuedMessage, RecipientState
from appliance.mail.routing import Router
from appliance.mail.smtp_client import OutboundSettings
from tests.test_delivery_support import (
    DNSServer,
    Receiver,
    SmtpSink,
    internet_appliance,
    maildir_messages,
    sink_available,
    tool,
    wait_until,
)
from tests.test_mail_runner import Env

LAN_CLIENT = "127.0.1.101"
INTERNET_CLIENT = "127.0.2.150"

RECORDS: dict[str, list[tuple[str, str]]] = {
    "test": [("SOA", "ns.test. hostmaster.test. 1 3600 600 86400 1")],
    "remote.test": [("MX", "10 mx1.remote.test."), ("MX", "20 mx2.remote.test.")],
    "mx1.remote.test": [("A", "127.0.2.161")],
    "mx2.remote.test": [("A", "127.0.2.162")],
    "pref.test": [("MX", "10 dead.pref.test."), ("MX", "20 live.pref.test.")],
    "dead.pref.test": [("A", "127.0.2.163")],
    "live.pref.test": [("A", "127.0.2.164")],
    "afallback.test": [("A", "127.0.2.165")],
    "nullmx.test": [("MX", "0 .")],
    "partner.test": [
        ("MX", "10 mx10.partner.test."),
        ("MX", "20 mail.example.test."),
        ("MX", "20 mx20.partner.test."),
    ],
    "mx10.partner.test": [("A", "127.0.2.166")],
    "mx20.partner.test": [("A", "127.0.2.167")],
    "alias.test": [("CNAME", "target.test.")],
    "target.test": [("MX", "10 mx.target.test.")],
    "mx.target.test": [("A", "127.0.2.168")],
    "slow.test": [("MX", "10 mx.slow.test.")],
    "mx.slow.test": [("A", "127.0.2.169")],
    "mixed.test": [("MX", "10 mx.mixed.test.")],
    "mx.mixed.test": [("A", "127.0.2.170")],
}

pytestmark = pytest.mark.integration


class Internet:
    """The name server, the receivers and the appliance of one test module."""

    def __init__(self, tmp: Path) -> None:
        self.dns = DNSServer("127.0.2.153", RECORDS)
        self.mx1 = Receiver("127.0.2.161")
        self.mx2 = Receiver("127.0.2.162")
        self.sink = SmtpSink("127.0.2.164")
        self.afallback = Receiver("127.0.2.165")
        self.mx20 = Receiver("127.0.2.167")
        self.target = Receiver("127.0.2.168")
        self.slow = Receiver("127.0.2.169")
        self.mixed = Receiver("127.0.2.170")
        self.static = Receiver("127.0.2.171", 2525)
        # Anything the appliance sends to its own addresses' port 25 would land here.
        self.selves = [Receiver("127.0.0.10"), Receiver("127.0.0.20")]
        self.process, self.config, self.ports = internet_appliance(
            tmp,
            self.dns,
            mail='relay_domains = ["partner.test"]\nmasquerade_domains = ["*.lan.example.test"]\n',
            delivery='[delivery.static_routes]\n"static.test" = "[127.0.2.171]:2525"\n',
        )
        self.state = tmp / "state"
        self.process.start()

    def close(self) -> None:
        self.process.stop()
        for r in (self.mx1, self.mx2, self.afallback, self.mx20, self.target, self.slow):
            r.close()
        for r in (self.mixed, self.static, *self.selves):
            r.close()
        self.sink.close()
        self.dns.close()

    def send(
        self,
        recipients: Sequence[str],
        sender: str = "alice@example.test",
        body: str = "",
        inside: bool = True,
    ) -> None:
        """Submit one message over port 25 (from the LAN, or from the Internet)."""
        host, client = ("127.0.0.20", LAN_CLIENT) if inside else ("127.0.0.10", INTERNET_CLIENT)
        body = (
            body
            or f"From: {sender}\r\nSubject: test\r\nMessage-ID: <{uuid.uuid4()}@t>\r\n\r\nhi\r\n"
        )
        with smtplib.SMTP(host, self.ports["smtp"], source_address=(client, 0), timeout=30) as s:
            refused = s.sendmail(sender, list(recipients), body.encode())
            assert not refused

    def mailq(self) -> list[dict[str, Any]]:
        """The queue, straight from the control socket (the CLI is tested where it is asserted)."""
        with ControlClient(self.state / "control.sock", timeout=30) as client:
            return client.call("mailq")  # type: ignore[no-any-return]

    def state_of(self, address: str) -> dict[str, Any] | None:
        for entry in self.mailq():
            for r in entry["recipients"]:
                if r["address"] == address:
                    return dict(r, queue_id=entry["queue_id"], held=entry["held"])
        return None

    def wait_attempted(self, address: str, timeout: float = 30.0) -> dict[str, Any]:
        """The queue entry of ``address`` once an attempt has been recorded for it."""

        def attempted() -> dict[str, Any] | None:
            state = self.state_of(address)
            return state if state is not None and state["attempts"] > 0 else None

        return wait_until(attempted, timeout, f"an attempt for {address}")  # type: ignore[no-any-return]


def unique(domain: str, user: str = "u") -> str:
    return f"{user}-{uuid.uuid4().hex[:8]}@{domain}"


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Internet]:
    why = sink_available()
    if why:
        pytest.skip(why)
    internet = Internet(tmp_path_factory.mktemp("delivery"))
    try:
        yield internet
    finally:
        internet.close()


# -- MX selection -------------------------------------------------------------------------


def test_lowest_preference_mx_is_used(net: Internet) -> None:
    rcpts = [unique("remote.test"), unique("remote.test")]
    net.send(rcpts)
    wait_until(lambda: set(rcpts) <= set(net.mx1.delivered()), what="delivery to mx1")
    # Both recipients in one transaction (M-6).
    assert any(sorted(t.recipients) == sorted(rcpts) for t in net.mx1.transactions)
    assert not set(rcpts) & set(net.mx2.rcpt_seen)


def test_next_mx_when_the_best_is_down_and_smtp_sink_receives(net: Internet) -> None:
    rcpt = unique("pref.test")
    net.send([rcpt])
    message = wait_until(
        lambda: [m for m in net.sink.messages() if rcpt.encode() in m], what="smtp-sink dump"
    )
    assert b"Subject: test" in message[0]


def test_a_record_fallback_without_mx(net: Internet) -> None:
    rcpt = unique("afallback.test")
    net.send([rcpt])
    wait_until(lambda: rcpt in net.afallback.delivered(), what="delivery to the A address")


def test_cname_domain_is_followed(net: Internet) -> None:
    rcpt = unique("alias.test")
    net.send([rcpt])
    wait_until(lambda: rcpt in net.target.delivered(), what="delivery via the CNAME target")


def test_null_mx_bounces_5_1_10_without_trying(net: Internet) -> None:
    rcpt = unique("nullmx.test")
    before = len(maildir_messages(net.state, "alice"))
    net.send([rcpt])
    reports = wait_until(
        lambda: [m for m in maildir_messages(net.state, "alice")[before:] if rcpt.encode() in m],
        what="the DSN",
    )
    report = email.message_from_bytes(reports[0], policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert "Status: 5.1.10" in report.get_payload()[1].as_string()
    assert net.state_of(rcpt) is None


def test_lower_mx_keeps_the_mail_and_connects_neither_to_itself_nor_to_an_equal_mx(
    net: Internet,
) -> None:
    rcpt = unique("partner.test")
    net.send([rcpt], sender="someone@remote.test", inside=False)
    state = net.wait_attempted(rcpt)
    assert state["status"] == DEFERRED
    assert state["last_reply"]["code"] // 100 == 4
    assert net.mx20.connections == 0
    assert all(s.connections == 0 for s in net.selves)
    assert rcpt not in net.mx20.rcpt_seen
    # The operator can see why.
    out = tool(net.config, "route", rcpt)
    assert out.returncode == 0, out.stderr
    assert "1. mx10.partner.test (preference 10) 127.0.2.166 port 25" in out.stdout
    assert "mx20.partner.test (preference" not in out.stdout
    assert "dns: MX partner.test -> " in out.stdout
    assert "this host is MX 20 (mail.example.test)" in out.stdout
    result = tool(net.config, "queue", "delete", state["queue_id"])
    assert result.returncode == 0, result.stderr
    assert net.state_of(rcpt) is None


def test_dns_timeout_defers_and_delivers_after_dns_returns(net: Internet) -> None:
    rcpt = unique("slow.test")
    net.dns.drop.add("slow.test")
    try:
        net.send([rcpt])
        state = net.wait_attempted(rcpt, timeout=60)
        assert state["status"] == DEFERRED, state
        assert state["last_reply"]["code"] == 451
        assert net.slow.connections == 0
    finally:
        net.dns.drop.discard("slow.test")
    out = tool(net.config, "flush", "slow.test")
    assert out.returncode == 0, out.stderr
    assert "flushed 1 message(s)" in out.stdout
    # The resolver remembers a SERVFAIL for a few seconds (RFC 2308 7.1): until that
    # has passed a flush defers again, after it the mail goes out.

    def delivered() -> bool:
        if rcpt in net.slow.delivered():
            return True
        tool(net.config, "flush", "slow.test")
        return False

    wait_until(delivered, timeout=60, what="delivery after DNS is back")
    assert net.state_of(rcpt) is None


# -- routes ---------------------------------------------------------------------------------


def test_static_route_with_port_needs_no_dns(net: Internet) -> None:
    rcpt = unique("static.test")
    net.send([rcpt])
    wait_until(lambda: rcpt in net.static.delivered(), what="delivery by the static route")
    assert ("static.test", "MX") not in net.dns.queries


def test_route_tool_explains_local_alias_and_mx(net: Internet) -> None:
    out = tool(net.config, "route", "postmaster@example.test")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("postmaster@example.test: local")
    assert "mailbox example.test/alice" in out.stdout
    out = tool(net.config, "route", "--json", "x@remote.test")
    info = json.loads(out.stdout)
    assert [d["address"] for d in info["result"]["destinations"]] == ["127.0.2.161", "127.0.2.162"]
    assert {
        "query": "MX",
        "name": "remote.test",
        "answer": [[10, "mx1.remote.test"], [20, "mx2.remote.test"]],
    } in info["dns"] or any(
        a["query"] == "MX"
        and sorted(map(tuple, a["answer"])) == [(10, "mx1.remote.test"), (20, "mx2.remote.test")]
        for a in info["dns"]
    )
    out = tool(net.config, "route", "x@static.test")
    assert "route: static, directly to 127.0.2.171 port 2525" in out.stdout


# -- mixed results, DSN, hold ------------------------------------------------------------------


def test_mixed_results_one_delivered_one_retried_one_bounced_one_dsn(net: Internet) -> None:
    ok, later, gone = (unique("mixed.test", u) for u in ("ok", "later", "gone"))
    net.mixed.answers[later] = ["451 4.2.0 mailbox busy", "250 2.1.5 ok now"]
    net.mixed.answers[gone] = ["550 5.1.1 no such user"]
    before = len(maildir_messages(net.state, "alice"))
    net.send([ok, later, gone])
    wait_until(lambda: ok in net.mixed.delivered(), what="the 250 recipient")
    reports = wait_until(
        lambda: [m for m in maildir_messages(net.state, "alice")[before:] if gone.encode() in m],
        what="the DSN",
    )
    state = net.wait_attempted(later)
    assert state["status"] == DEFERRED
    assert state["last_reply"]["code"] == 451
    out = tool(net.config, "flush", state["queue_id"])
    assert out.returncode == 0, out.stderr
    wait_until(lambda: later in net.mixed.delivered(), what="the retried recipient")
    wait_until(lambda: net.state_of(later) is None, what="the message to leave the queue")

    mine = [m for m in maildir_messages(net.state, "alice")[before:] if gone.encode() in m]
    assert len(reports) == len(mine) == 1
    report = email.message_from_bytes(mine[0], policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["Return-Path"] == "<>"
    _human, status, original = report.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    # RFC 3464 2.2/2.3: per-message fields, then one block per recipient.
    blocks = status.get_payload()
    assert blocks[0]["Reporting-MTA"] == "dns; mail.example.test"
    assert email.utils.parsedate_to_datetime(blocks[0]["Arrival-Date"]) is not None
    (recipient,) = blocks[1:]
    assert recipient["Final-Recipient"] == f"rfc822; {gone}"
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "5.1.1"
    assert recipient["Diagnostic-Code"].startswith("smtp; 550")
    assert "mx.mixed.test" in recipient["Diagnostic-Code"]
    text = mine[0].decode()
    assert ok not in text and later not in text
    assert original.get_content_type() in ("message/rfc822", "text/rfc822-headers")


def test_hold_and_release(net: Internet) -> None:
    rcpt = unique("partner.test", "held")
    net.send([rcpt], sender="someone@remote.test", inside=False)
    state = net.wait_attempted(rcpt)
    qid = state["queue_id"]
    out = tool(net.config, "queue", "hold", qid)
    assert out.returncode == 0, out.stderr
    text = tool(net.config, "mailq").stdout
    assert f"{qid} (held)" in text
    assert f"<{rcpt}> deferred, 1 attempt(s)" in text
    out = tool(net.config, "flush", qid)
    assert f"{qid}: on hold, not flushed" in out.stdout
    assert tool(net.config, "queue", "release", qid).returncode == 0
    wait_until(lambda: (net.state_of(rcpt) or {}).get("attempts", 0) >= 2, what="a new attempt")
    assert net.state_of(rcpt)["held"] is False  # type: ignore[index]
    assert tool(net.config, "queue", "delete", qid).returncode == 0
    bad = tool(net.config, "queue", "delete", qid)
    assert bad.returncode == 1 and "no such message" in bad.stderr


def test_masquerading_of_inside_host_names(net: Internet) -> None:
    rcpt = unique("remote.test", "masq")
    net.send([rcpt], sender="carol@pc7.lan.example.test")
    wait_until(lambda: rcpt in net.mx1.delivered(), what="delivery")
    (t,) = [t for t in net.mx1.transactions if rcpt in t.recipients]
    assert t.sender == "carol@example.test"
    assert b"From: carol@example.test\r\n" in t.data
    root = unique("remote.test", "root")
    net.send([root], sender="root@pc7.lan.example.test")
    wait_until(lambda: root in net.mx1.delivered(), what="delivery")
    (t,) = [t for t in net.mx1.transactions if root in t.recipients]
    assert t.sender == "root@pc7.lan.example.test"


# -- smart host and fallback relay: a second appliance ---------------------------------------------


def test_smart_host_then_fallback_relay(tmp_path: Path) -> None:
    why = sink_available()
    if why:
        pytest.skip(why)
    dns_server = DNSServer("127.0.2.154", RECORDS)
    smart = Receiver("127.0.2.180")
    fallback = Receiver("127.0.2.181")
    process, config, ports = internet_appliance(
        tmp_path,
        dns_server,
        delivery='[delivery]\nsmart_host = "[127.0.2.180]"\nfallback_relay = "[127.0.2.181]"\n',
    )
    process.start()
    try:
        net = _Sender(ports["smtp"])
        first = unique("remote.test")
        net.send([first])
        wait_until(lambda: first in smart.delivered(), what="delivery to the smart host")
        assert fallback.connections == 0
        smart.greeting = "421 4.3.2 going down"
        time.sleep(2.5)  # the connection kept for reuse expires after 2 s idle (QUIT)
        second = unique("elsewhere.test")
        net.send([second])
        wait_until(lambda: second in fallback.delivered(), what="delivery to the fallback relay")
        assert second not in smart.delivered()
        assert dns_server.queries == []  # [host] targets: no lookups at all
        control = tmp_path / "state" / "control.sock"
        assert stat.S_IMODE(control.stat().st_mode) == 0o600
        assert process.stop() == 0
        assert not control.exists()
        # mailq reads the spool itself when the process is down.
        out = tool(config, "mailq")
        assert (out.returncode, out.stdout) == (0, "Mail queue is empty\n"), out.stderr
        flush = tool(config, "flush")
        assert flush.returncode == 1 and "cannot reach the running appliance" in flush.stderr
    finally:
        process.stop()
        smart.close()
        fallback.close()
        dns_server.close()


class _Sender:
    def __init__(self, port: int) -> None:
        self.port = port

    def send(self, recipients: Sequence[str]) -> None:
        with smtplib.SMTP("127.0.0.20", self.port, source_address=(LAN_CLIENT, 0)) as s:
            s.sendmail("alice@example.test", list(recipients), b"Subject: x\r\n\r\nhi\r\n")


# -- below the process: equal preferences, lifetimes -----------------------------------------


class _Refused:
    """An endpoint that records the address and refuses the connection."""

    def __init__(self, log: list[str], address: str) -> None:
        self.log = log
        self.address = address

    def connect(self, factory: object) -> defer.Deferred[object]:
        self.log.append(self.address)
        return defer.fail(ConnectionRefusedError())


class _Resolver:
    def mx(self, domain: str) -> defer.Deferred[list[tuple[int, str]]]:
        return defer.succeed(
            [(10, "a.eq.test"), (10, "b.eq.test"), (10, "c.eq.test"), (5, "best.eq.test")]
        )

    def addresses(self, host: str) -> defer.Deferred[list[str]]:
        table = {
            "best.eq.test": "127.0.2.190",
            "a.eq.test": "127.0.2.191",
            "b.eq.test": "127.0.2.192",
            "c.eq.test": "127.0.2.193",
        }
        return defer.succeed([table[host]])


def test_equal_preferences_are_tried_in_random_order_over_200_messages(tmp_path: Path) -> None:
    from twisted.internet import reactor

    env = Env(tmp_path)
    order: list[str] = []
    delivery = RemoteDelivery(
        Router({}, None, ["mail.example.test"], ["127.0.0.10"]),
        _Resolver(),
        OutboundSettings(helo_name="mail.example.test", opportunistic_tls=False),
        reactor,
        lambda address, port: _Refused(order, address),
        random.Random(7),
    )
    firsts: Counter[str] = Counter()
    for _ in range(200):
        qid = env.submit("x@eq.test")
        message = env.spool.load(qid)
        del order[:]
        replies: list[Mapping[str, Reply]] = []
        delivery(message, message.recipients).addCallback(replies.append)
        assert replies and replies[0]["x@eq.test"].code // 100 == 4
        assert order[0] == "127.0.2.190"  # the lowest preference always first
        assert sorted(order[1:]) == ["127.0.2.191", "127.0.2.192", "127.0.2.193"]
        firsts[order[1]] += 1
    # Three equal MXs, 200 draws: each comes first about 67 times; 35..100 is far outside chance.
    assert set(firsts) == {"127.0.2.191", "127.0.2.192", "127.0.2.193"}
    assert all(35 <= n <= 100 for n in firsts.values()), firsts


class _DeadMX:
    """remote_delivery that always gets no answer; remembers when it was called."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.times: dict[str, list[float]] = {}

    def __call__(
        self, message: QueuedMessage, recipients: Sequence[RecipientState]
    ) -> defer.Deferred[Mapping[str, Reply]]:
        for r in recipients:
            self.times.setdefault(r.address, []).append(self.clock.seconds())
        return defer.succeed(
            {r.address: Reply(451, "4.4.1", "connection refused") for r in recipients}
        )


def test_dead_mx_retried_on_schedule_bounced_once_at_lifetime_relay_domain_longer(
    tmp_path: Path,
) -> None:
    day = 86400.0
    holder: list[Any] = []
    env = Env(
        tmp_path,
        retry_intervals=(60.0, 300.0, 3600.0, 4 * 3600.0),
        lifetime=5 * day,
        lifetime_for=lambda a: 10 * day if a.endswith("@partner.test") else 5 * day,
        remote_delivery=lambda m, r: holder[0](m, r),
    )
    dead = _DeadMX(env.clock)
    holder.append(dead)
    start = env.clock.seconds()
    env.runner.start()
    env.submit("x@dead.test")
    env.submit("y@partner.test")
    for _ in range(int(11 * day / 60)):
        env.clock.advance(60)
    times = [t - start for t in dead.times["x@dead.test"]]
    assert times[:5] == [0, 60, 360, 3960, 3960 + 14400]
    gaps = {round(b - a) for a, b in itertools.pairwise(times[4:])}
    assert gaps == {14400}, gaps  # the last interval repeats
    # The first attempt at or after 5 days is the last one: it fails and bounces.
    assert times[-2] < 5 * day <= times[-1] < 5 * day + 14400
    assert [a for _, a in env.bounces] == [["x@dead.test"], ["y@partner.test"]]
    dead_failure, partner_failure = env.failed
    assert dead_failure.status == FAILED and "5 days" in dead_failure.last_reply.text  # type: ignore[union-attr]
    assert "10 days" in partner_failure.last_reply.text  # type: ignore[union-attr]
    partner = [t - start for t in dead.times["y@partner.test"]]
    assert partner[-2] < 10 * day <= partner[-1] < 10 * day + 14400
    assert env.spool.messages() == []
