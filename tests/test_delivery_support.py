"""A small Internet on 127.0.2.0/24 for the delivery acceptance tests (no tests in here).

* :class:`DNSServer`: an authoritative UDP name server (dnspython) in a
  thread, serving a dict of records; names can be made to time out (R-1).
* :class:`Receiver`: a scripted SMTP server in a thread: per-recipient
  answers (each attempt takes the next one), a refused greeting, a server
  that never answers, a slow final reply; it records every connection and
  every transaction.
* :class:`SmtpSink`: Postfix's ``smtp-sink`` dumping each message to a file.
* :func:`internet_appliance`: a copy of the demo configuration on free ports
  whose inside view forwards to the test name server.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from tests.harness import ApplianceProcess, demo_copy, free_port
from tests.test_dns_bind_support import shift_ports

SMTP_SINK = "/usr/sbin/smtp-sink"
APPLIANCE = Path(sys.executable).parent / "appliance"


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.05)


# -- DNS ------------------------------------------------------------------------------


class DNSServer:
    """Authoritative answers for ``records`` (name -> [(type, rdata text)]) on UDP.

    A CNAME is followed inside the data (bounded), as an authoritative server
    does; names not in the data get NXDOMAIN; a name ending in one of
    ``drop`` gets no answer at all (a timeout).
    """

    def __init__(self, address: str, records: Mapping[str, Iterable[tuple[str, str]]]) -> None:
        self.address = address
        self.port = free_port(address)
        self.records = {k.lower().rstrip("."): list(v) for k, v in records.items()}
        self.drop: set[str] = set()
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, self.port))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                answer = self.answer(data)
            except Exception:
                continue
            if answer is not None:
                self.sock.sendto(answer, peer)

    def _dropped(self, name: str) -> bool:
        return any(name == d or name.endswith("." + d) for d in self.drop)

    def answer(self, wire: bytes) -> bytes | None:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        qtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, qtype))
        if self._dropped(name):
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        current = name
        for _ in range(8):
            if self._dropped(current):
                return None
            records = self.records.get(current)
            if records is None:
                if current == name:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                break
            cname = [r for t, r in records if t == "CNAME"]
            if cname and qtype != "CNAME":
                response.answer.append(self._rrset(current, "CNAME", cname))
                current = cname[0].lower().rstrip(".")
                continue
            matching = [r for t, r in records if t == qtype]
            if matching:
                response.answer.append(self._rrset(current, qtype, matching))
            break
        if not response.answer:
            response.authority.append(
                self._rrset("test", "SOA", ["ns.test. hostmaster.test. 1 3600 600 86400 1"])
            )
        return response.to_wire()  # type: ignore[no-any-return]

    @staticmethod
    def _rrset(name: str, rdtype: str, rdatas: list[str]) -> dns.rrset.RRset:
        return dns.rrset.from_text_list(dns.name.from_text(name), 60, "IN", rdtype, rdatas)


# -- SMTP receivers ------------------------------------------------------------------------


@dataclass
class Transaction:
    """One message as a receiver saw it: envelope, accepted recipients and data."""

    sender: str
    recipients: list[str]
    data: bytes
    peer: str


@dataclass
class Receiver:
    """A scripted SMTP server on ``address:port`` (see the module docstring)."""

    address: str
    port: int = 25
    answers: dict[str, list[str]] = field(default_factory=dict)
    greeting: str = "220 receiver ESMTP"
    silent: bool = False
    data_delay: float = 0.0
    data_reply: str = "250 2.0.0 queued"
    #: Count a message as delivered only once the client has proved it read the
    #: final reply (its next command), not when the reply was written.
    confirm: bool = False
    data_received: int = 0
    connections: int = 0
    transactions: list[Transaction] = field(default_factory=list)
    rcpt_seen: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        receiver = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                receiver._session(self)

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server((self.address, self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.1,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def delivered(self) -> list[str]:
        """Every recipient of every completed transaction."""
        with self.lock:
            return [r for t in self.transactions for r in t.recipients]

    def _answer(self, address: str) -> str:
        with self.lock:
            script = self.answers.get(address.lower())
            if not script:
                return "250 2.1.5 ok"
            return script.pop(0) if len(script) > 1 else script[0]

    def _session(self, h: socketserver.StreamRequestHandler) -> None:
        with self.lock:
            self.connections += 1
        peer = h.client_address[0]
        if self.silent:
            while h.rfile.read(1):  # never answer; wait for the client to give up
                pass
            return

        def send(line: str) -> None:
            h.wfile.write(line.encode() + b"\r\n")
            h.wfile.flush()

        send(self.greeting)
        if not self.greeting.startswith("2"):
            return
        sender: str | None = None
        rcpts: list[str] = []
        unconfirmed: Transaction | None = None
        while True:
            raw = h.rfile.readline(4096)
            if not raw:
                return
            if unconfirmed is not None:
                with self.lock:
                    self.transactions.append(unconfirmed)
                unconfirmed = None
            line = raw.decode("latin-1").rstrip("\r\n")
            verb = line[:4].upper()
            if verb in ("EHLO", "HELO"):
                send("250 receiver")
            elif verb == "MAIL":
                sender = re.sub(r"^MAIL FROM:\s*<([^>]*)>.*$", r"\1", line, flags=re.I)
                rcpts = []
                send("250 2.1.0 ok")
            elif verb == "RCPT":
                address = re.sub(r"^RCPT TO:\s*<([^>]*)>.*$", r"\1", line, flags=re.I).lower()
                reply = self._answer(address)
                with self.lock:
                    self.rcpt_seen.append(address)
                if reply.startswith("2"):
                    rcpts.append(address)
                send(reply)
            elif verb == "DATA":
                if not rcpts:
                    send("554 5.5.1 no valid recipients")
                    continue
                send("354 go ahead")
                chunks = []
                while True:
                    raw = h.rfile.readline(1 << 20)
                    if not raw:
                        return
                    if raw in (b".\r\n", b".\n"):
                        break
                    chunks.append(raw[1:] if raw.startswith(b".") else raw)
                with self.lock:
                    self.data_received += 1
                if self.data_delay:
                    time.sleep(self.data_delay)
                if self.data_reply.startswith("2"):
                    t = Transaction(sender or "", list(rcpts), b"".join(chunks), peer)
                    if self.confirm:
                        unconfirmed = t
                    else:
                        with self.lock:
                            self.transactions.append(t)
                try:
                    send(self.data_reply)
                except OSError:
                    return
            elif verb == "RSET":
                sender, rcpts = None, []
                send("250 2.0.0 ok")
            elif verb == "QUIT":
                send("221 2.0.0 bye")
                return
            else:
                send("502 5.5.2 not implemented")


class SmtpSink:
    """Postfix's smtp-sink on ``address:port``, one file per message in a fresh directory.

    smtp-sink writes as ``nobody``, so the directory is made directly under the
    system temporary directory (pytest's are private to root) and removed by close().
    """

    def __init__(self, address: str, port: int = 25, backlog: int = 256) -> None:
        directory = Path(tempfile.mkdtemp(prefix="smtp-sink-"))
        self.directory = directory
        nobody = pwd.getpwnam("nobody")
        os.chown(directory, nobody.pw_uid, nobody.pw_gid)
        self.process = subprocess.Popen(
            [
                SMTP_SINK,
                "-u",
                "nobody",
                "-d",
                f"{directory}/%M.",
                f"{address}:{port}",
                str(backlog),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((address, port), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.05)

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.directory.iterdir())]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(5)
        shutil.rmtree(self.directory, ignore_errors=True)


def sink_available() -> str | None:
    """Why smtp-sink tests cannot run, or None."""
    if not os.path.exists(SMTP_SINK):
        return "Postfix's smtp-sink is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "receivers on port 25 need root"
    return None


# -- the appliance --------------------------------------------------------------------------


def internet_appliance(
    tmp_path: Path, dns_server: DNSServer, mail: str = "", delivery: str = ""
) -> tuple[ApplianceProcess, Path, dict[str, int]]:
    """The demo appliance on free ports, resolving through ``dns_server``; not started yet.

    ``mail`` is appended to the [mail] table; ``delivery`` is a [delivery] section.
    """
    config = demo_copy(tmp_path)
    ports = {
        role: free_port("127.0.0.10")
        for role in ("dns", "smtp", "submission", "smtps", "pop3", "pop3s")
    }
    shift_ports(config, ports)
    text = config.read_text()
    text = text.replace("127.0.2.53:10053", f"{dns_server.address}:{dns_server.port}")
    text = text.replace("[mail]\n", "[mail]\n" + mail)
    text += "\n" + delivery + "\n"
    config.write_text(text)
    return ApplianceProcess(config, tmp_path / "appliance.log"), config, ports


def tool(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run an ``appliance`` subcommand against the test configuration."""
    return subprocess.run(
        [str(APPLIANCE), *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def maildir_messages(state: Path, user: str) -> list[bytes]:
    new = state / "mail" / "example.test" / user / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
