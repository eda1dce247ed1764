"""The demo topology through the real ``twistd appliance`` process: every listener answers its protocol.

This is issue 2's acceptance check for `make demo`: DNS on udp and tcp on both
sides, the SMTP/submission banners, POP3's greeting, and TLS handshakes with
the certificate generated at first start.
"""

from __future__ import annotations

import poplib
import signal
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.harness import ApplianceProcess, demo_copy

pytestmark = pytest.mark.integration

OUTSIDE, INSIDE = "127.0.0.10", "127.0.0.20"
LAN_CLIENT, INTERNET_CLIENT = "127.0.1.5", "127.0.2.5"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApplianceProcess]:
    tmp = tmp_path_factory.mktemp("demo")
    process = ApplianceProcess(demo_copy(tmp), tmp / "appliance.log")
    process.start()
    try:
        yield process
    finally:
        assert process.stop() == 0, process.read_log()


def query(
    server: str, name: str, rdtype: str, source: str, tcp: bool = False
) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    if tcp:
        return dns.query.tcp(q, server, port=10053, source=source, timeout=5)
    return dns.query.udp(q, server, port=10053, source=source, timeout=5)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_dns_both_views(demo: ApplianceProcess, tcp: bool) -> None:
    outside = query(OUTSIDE, "mail.example.test", "A", INTERNET_CLIENT, tcp)
    assert outside.rcode() == dns.rcode.NOERROR
    assert outside.answer[0][0].address == "127.0.0.10"
    hidden = query(OUTSIDE, "files.example.test", "A", INTERNET_CLIENT, tcp)
    assert hidden.rcode() == dns.rcode.NXDOMAIN
    inside = query(INSIDE, "files.example.test", "A", LAN_CLIENT, tcp)
    assert inside.answer[0][0].address == "127.0.1.10"
    reverse = query(INSIDE, "10.1.0.127.in-addr.arpa", "PTR", LAN_CLIENT, tcp)
    assert str(reverse.answer[0][0].target) == "files.example.test."
    refused = query(OUTSIDE, "example.org", "A", INTERNET_CLIENT, tcp)
    assert refused.rcode() == dns.rcode.REFUSED


def test_outside_mx_carries_its_address(demo: ApplianceProcess) -> None:
    response = query(OUTSIDE, "example.test", "MX", INTERNET_CLIENT)
    assert str(response.answer[0][0].exchange) == "mail.example.test."
    additional = {(str(rrset.name), rrset.rdtype) for rrset in response.additional}
    assert ("mail.example.test.", dns.rdatatype.A) in additional


def test_reload_on_sighup_keeps_serving_and_refuses_a_broken_config(demo: ApplianceProcess) -> None:
    mark = len(demo.read_log())
    demo.signal(signal.SIGHUP)
    demo.wait_for_log("configuration reloaded", after=mark)
    config = demo.config
    original = config.read_text()
    try:
        config.write_text(original + "\n[nonsense]\n")
        mark = len(demo.read_log())
        demo.signal(signal.SIGHUP)
        demo.wait_for_log("reload refused: the running configuration is kept", after=mark)
        assert "nonsense: unknown setting" in demo.read_log()[mark:]
    finally:
        config.write_text(original)
    assert query(OUTSIDE, "www.example.test", "A", INTERNET_CLIENT).rcode() == dns.rcode.NOERROR


class InsidePOP3(poplib.POP3):
    """poplib from a chosen source address (a LAN client)."""

    def __init__(self, host: str, port: int, source: str) -> None:
        self.source = source
        super().__init__(host, port, timeout=10)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )


def certificate_context(demo: ApplianceProcess) -> ssl.SSLContext:
    context = ssl.create_default_context(
        cafile=str(demo.config.parent.parent / "state" / "tls" / "certificate.pem")
    )
    return context


@pytest.mark.parametrize("address", [OUTSIDE, INSIDE])
def test_smtp_and_submission_banners(demo: ApplianceProcess, address: str) -> None:
    for port in (10025, 10587):
        with smtplib.SMTP(address, port, timeout=10) as smtp:
            code, _ = smtp.ehlo("client.test")
            assert code == 250
            assert smtp.has_extn("starttls")
            smtp.starttls(context=certificate_context(demo))
            assert smtp.ehlo("client.test")[0] == 250


@pytest.mark.parametrize("address", [OUTSIDE, INSIDE])
def test_implicit_tls_ports_present_the_generated_certificate(
    demo: ApplianceProcess, address: str
) -> None:
    context = certificate_context(demo)
    with smtplib.SMTP_SSL(
        address, 10465, timeout=10, context=context, source_address=(INTERNET_CLIENT, 0)
    ) as smtp:
        assert smtp.ehlo("client.test")[0] == 250
    pop = poplib.POP3_SSL(address, 10995, timeout=10, context=context)
    try:
        assert pop.getwelcome().startswith(b"+OK")
        cert = pop.sock.getpeercert()  # type: ignore[attr-defined]
        assert ("DNS", "mail.example.test") in cert["subjectAltName"]
    finally:
        pop.quit()


def test_submission_wants_authentication(demo: ApplianceProcess) -> None:
    with smtplib.SMTP(OUTSIDE, 10587, timeout=10) as smtp:
        smtp.starttls(context=certificate_context(demo))
        smtp.ehlo("client.test")
        code, message = smtp.mail("alice@example.test")
        assert code == 530 and b"5.7.0" in message


def test_mail_from_the_internet_reaches_bob_over_pop3(demo: ApplianceProcess) -> None:
    body = "Subject: demo\r\n\r\nHello Bob.\r\n.leading dot line\r\n"
    with smtplib.SMTP(OUTSIDE, 10025, timeout=10, source_address=(INTERNET_CLIENT, 0)) as smtp:
        refused = smtp.sendmail("someone@remote.test", ["bob+news@example.test"], body)
        assert refused == {}
        code, message = smtp.docmd("RCPT", "TO:<victim@example.org>")
        assert code == 503 or (code == 550 and b"5.7.1" in message)
    deadline = time.monotonic() + 10
    while True:
        pop = InsidePOP3(INSIDE, 10110, LAN_CLIENT)
        assert pop.getwelcome().startswith(b"+OK")
        pop.user("bob@example.test")
        pop.pass_("demo-bob")
        count, _ = pop.stat()
        if count or time.monotonic() > deadline:
            break
        pop.quit()
        time.sleep(0.1)
    try:
        assert count == 1
        lines = pop.retr(1)[1]
        text = b"\n".join(lines)
        assert b"Delivered-To: bob+news@example.test" in text
        assert b"Return-Path: <someone@remote.test>" in text
        assert b"Received: from client.test" in text or b"Received: from " in text
        assert b".leading dot line" in text
    finally:
        pop.quit()


def test_plaintext_pop3_login_refused_outside_inside_networks(demo: ApplianceProcess) -> None:
    pop = InsidePOP3(INSIDE, 10110, INTERNET_CLIENT)
    try:
        with pytest.raises(poplib.error_proto):
            pop.user("bob@example.test")
            pop.pass_("demo-bob")
    finally:
        pop.close()
