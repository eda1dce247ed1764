"""Side-by-side POP3 retrieval: the appliance vs Dovecot, 5,000 messages of 4 KB in one session each.

Both servers are started here (the appliance with ``twistd appliance``,
Dovecot with a private ``dovecot -F -c FILE`` config; the system service is
never touched), on their own loopback address and high port, pinned to CPU 0
while the client runs on CPU 1.  Before every session each server gets a
fresh copy of the same Maildir (RETR + QUIT moves messages from ``new/`` to
``cur/`` and Dovecot writes its index files there) and is restarted, so every
session starts cold, as a client's daily fetch would.

One session: connect, USER/PASS (plaintext from an inside address), STAT,
RETR 1..N, QUIT.  ``lockstep`` waits for each reply before the next RETR (as
fetchmail and most clients do); ``pipelined`` keeps ``--window`` RETRs in
flight (RFC 2449 PIPELINING).  Every reply is checked: +OK, and the
un-dot-stuffed body length equals the octet count announced by the server.

Run from the repository root::

    .venv/bin/python bench/pop3/run.py                  # 5,000 x 4 KB, 3 rounds
    .venv/bin/python bench/pop3/run.py --messages 500 --rounds 1

Needs the Debian package dovecot-pop3d (see bench/README.md).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import stop, tree_cpu  # noqa: E402

SERVER_CPU = 0
CLIENT_CPU = 1
LOGIN = "bench@bench.test"
PASSWORD = "bench-password"
CLIENT_ADDRESS = "127.0.4.1"
_TERMINATOR = b"\r\n.\r\n"


# --- the Maildir ----------------------------------------------------------------------------------


def message(i: int, size: int) -> bytes:
    """A plausible message of exactly ``size`` octets with LF line ends, some lines needing dot-stuffing."""
    head = (
        f"Return-Path: <sender{i % 17}@remote.test>\n"
        f"Received: from mx.remote.test (mx.remote.test [192.0.2.25])\n"
        f"\tby mail.bench.test with ESMTP id {i:08d}; Sun, 22 Nov 2026 08:00:00 +0000\n"
        f"From: Sender {i % 17} <sender{i % 17}@remote.test>\n"
        f"To: {LOGIN}\n"
        f"Subject: benchmark message {i}\n"
        f"Date: Sun, 22 Nov 2026 08:00:00 +0000\n"
        f"Message-ID: <{i}.bench@remote.test>\n"
        f"MIME-Version: 1.0\n"
        f"Content-Type: text/plain; charset=us-ascii\n\n"
    ).encode()
    body = bytearray()
    line = 0
    while len(head) + len(body) < size:
        if line % 20 == 7:
            body += b". a line that starts with a dot and has to be stuffed on the wire\n"
        else:
            body += b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do %06d\n" % line
        line += 1
    data = head + bytes(body)
    return data[: size - 1] + b"\n"


def make_maildir(path: Path, count: int, size: int) -> None:
    """``count`` messages in ``new/``, named as the appliance's delivery names them (``,S=``, ``,W=``)."""
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        data = message(i, size)
        crlf = len(data) + data.count(b"\n")
        name = f"{1795000000 + i}.M{i:06d}P4242Q{i}.mail.bench.test,S={len(data)},W={crlf}"
        (path / "new" / name).write_bytes(data)


# --- servers --------------------------------------------------------------------------------------


@dataclass
class Server:
    """One contender: setup writes config and a fresh Maildir copy, returns the argv; stop stops it."""

    name: str
    address: str
    port: int
    setup: Callable[[Path, Path, str, int], list[str]]
    sessions: dict[str, list[dict[str, float]]] = field(default_factory=dict)


def appliance_setup(venv: str) -> Callable[[Path, Path, str, int], list[str]]:
    def setup(work: Path, maildir: Path, address: str, port: int) -> list[str]:
        from appliance.directory.passwords import hash_password

        d = work / f"appliance-{venv}"
        d.mkdir(exist_ok=True)
        users = d / "users"
        if not users.exists():
            users.write_text(
                "# login:password-hash:mailbox:extra-addresses:apop-secret\n"
                f"{LOGIN}:{hash_password(PASSWORD)}:bench\n"
            )
        mail_root = d / "mail"
        shutil.rmtree(mail_root, ignore_errors=True)
        mail_root.mkdir()
        shutil.copytree(maildir, mail_root / "bench", symlinks=True)
        (d / "appliance.toml").write_text(
            f"""[appliance]
hostname = "mail.bench.test"
state_dir = "{d / "state"}"

[interfaces.outside]
addresses = ["127.0.3.250"]

[interfaces.inside]
addresses = ["{address}"]
networks = ["{CLIENT_ADDRESS}/32"]

[listeners]
pop3 = {{ sides = ["inside"], port = {port} }}

[tls]
self_signed = true

[mail]
local_domains = ["bench.test"]
mail_root = "{mail_root}"

[directory]
users = "users"

[pop3]
allow_plaintext_inside = true
"""
        )
        twistd = ROOT / venv / "bin" / "twistd"
        return [
            str(twistd), "--nodaemon", "--pidfile=", f"--logfile={d / 'twistd.log'}",
            "appliance", "--config", str(d / "appliance.toml"),
        ]  # fmt: skip

    return setup


#: Argon2id cost for Dovecot's password: 16 MiB like the appliance's scrypt (n=16384, r=8), and about as slow.
ARGON2_MEMORY = 16 << 20
ARGON2_PASSES = 8


def _sodium() -> Any:
    lib = ctypes.CDLL(ctypes.util.find_library("sodium") or "libsodium.so.23")
    if lib.sodium_init() < 0:
        raise OSError("sodium_init failed")
    return lib


def argon2id_hash(password: str) -> str:
    """A Dovecot ``{ARGON2ID}`` hash made with libsodium (Dovecot's own library for it)."""
    out = ctypes.create_string_buffer(128)
    pw = password.encode()
    rc = _sodium().crypto_pwhash_str_alg(
        out, pw, ctypes.c_ulonglong(len(pw)), ctypes.c_ulonglong(ARGON2_PASSES),
        ctypes.c_size_t(ARGON2_MEMORY), ctypes.c_int(2),
    )  # fmt: skip
    if rc != 0:
        raise OSError("crypto_pwhash_str_alg failed")
    return "{ARGON2ID}" + out.value.decode()


def login_costs() -> str:
    """How long one password check takes for each server here (they should be alike)."""
    from appliance.directory.passwords import hash_password, verify_password

    scrypt = hash_password(PASSWORD)
    t0 = time.perf_counter()
    verify_password(PASSWORD, scrypt)
    t1 = time.perf_counter()
    argon = argon2id_hash(PASSWORD).removeprefix("{ARGON2ID}").encode()
    t2 = time.perf_counter()
    _sodium().crypto_pwhash_str_verify(argon, PASSWORD.encode(), ctypes.c_ulonglong(len(PASSWORD)))
    t3 = time.perf_counter()
    return f"password check: appliance scrypt {1000 * (t1 - t0):.0f} ms, Dovecot argon2id {1000 * (t3 - t2):.0f} ms"


def dovecot_setup(work: Path, maildir: Path, address: str, port: int) -> list[str]:
    """A private Dovecot: POP3 only, passwd-file passdb with an Argon2id hash, static userdb (user mail).

    Dovecot keeps its index files in the Maildir (its default).
    """
    d = work / "dovecot"
    for sub in ("run", "state", "home"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    passwd = d / "passwd"
    if not passwd.exists():
        passwd.write_text(f"{LOGIN}:{argon2id_hash(PASSWORD)}\n")
    mail = d / "mail"
    shutil.rmtree(mail, ignore_errors=True)
    shutil.copytree(maildir, mail, symlinks=True)
    # Dovecot refuses to give mail processes uid 0: they run as Debian's "mail" user.
    for path in (mail, d / "home", *mail.rglob("*")):
        shutil.chown(path, "mail", "mail")
    conf = d / "dovecot.conf"
    conf.write_text(
        f"""base_dir = {d / "run"}
state_dir = {d / "state"}
log_path = {d / "dovecot.log"}
protocols = pop3
listen = {address}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
first_valid_uid = 1
mail_location = maildir:{mail}
passdb {{
  driver = passwd-file
  args = scheme=ARGON2ID {passwd}
}}
userdb {{
  driver = static
  args = uid=mail gid=mail home={d / "home"}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {address}
    port = {port}
  }}
}}
service anvil {{
  chroot =
}}
"""
    )
    return ["/usr/sbin/dovecot", "-F", "-c", str(conf)]


# --- client ---------------------------------------------------------------------------------------


class Client:
    """A minimal pipelining POP3 client over a blocking socket that verifies every reply."""

    def __init__(self, address: str, port: int) -> None:
        self.sock = socket.create_connection(
            (address, port), timeout=60, source_address=(CLIENT_ADDRESS, 0)
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.received = 0

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError("server closed the connection")
        self.received += len(data)
        self.buf += data

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return out
            self._fill()

    def command(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        reply = self.line()
        if not reply.startswith(b"+OK"):
            raise RuntimeError(f"{text.split()[0]}: {reply!r}")
        return reply

    def multiline(self) -> tuple[bytes, int]:
        """(status line, body length) of one multi-line reply; the body is checked, not kept."""
        status = self.line()
        if not status.startswith(b"+OK"):
            raise RuntimeError(f"RETR: {status!r}")
        start = 0
        while True:
            # The body always ends with CRLF, so ".\r\n" right at the start also needs a look-behind.
            if self.buf.startswith(b".\r\n"):
                end, cut = 0, 3
                break
            i = self.buf.find(_TERMINATOR, start)
            if i >= 0:
                end, cut = i + 2, i + 5
                break
            start = max(0, len(self.buf) - 4)
            self._fill()
        body = bytes(self.buf[:end])
        del self.buf[:cut]
        unstuffed = len(body) - body.count(b"\r\n..") - (1 if body.startswith(b"..") else 0)
        announced = status.split()[1] if len(status.split()) > 1 else b""
        if announced.isdigit() and int(announced) != unstuffed:
            raise RuntimeError(
                f"announced {announced.decode()} octets, got {unstuffed}: {status!r}"
            )
        return status, unstuffed

    def close(self) -> None:
        self.sock.close()


def session(address: str, port: int, window: int, cpu: Callable[[], float]) -> dict[str, float]:
    """One timed session: phase times (s), server CPU per phase (``cpu()`` samples it), counts.

    Sampling the CPU takes the client a few milliseconds; that time is taken
    out of the phase it fell into.
    """
    skew = 0.0

    def sample() -> float:
        nonlocal skew
        start = time.perf_counter()
        value = cpu()
        skew += time.perf_counter() - start
        return value

    t0 = time.perf_counter()
    c0 = sample()
    c = Client(address, port)
    greeting = c.line()
    if not greeting.startswith(b"+OK"):
        raise RuntimeError(f"greeting: {greeting!r}")
    c.command(f"USER {LOGIN}")
    c.command(f"PASS {PASSWORD}")
    c1 = sample()
    t_login, skew_login = time.perf_counter(), skew
    count = int(c.command("STAT").split()[1])
    sent = done = octets = 0
    while done < count:
        batch = []
        while sent < count and sent - done < window:
            sent += 1
            batch.append(b"RETR %d\r\n" % sent)
        if batch:
            c.sock.sendall(b"".join(batch))
        octets += c.multiline()[1]
        done += 1
    c2 = sample()
    t_retr, skew_retr = time.perf_counter(), skew
    c.command("QUIT")
    t_quit = time.perf_counter()
    c.close()
    time.sleep(0.3)  # let Dovecot reap its pop3 process, so its CPU time is counted
    c3 = sample()
    login = t_login - t0 - skew_login
    retr = t_retr - t_login - (skew_retr - skew_login)
    quit_ = t_quit - t_retr
    return {
        "messages": count,
        "octets": octets,
        "login": login,
        "retr": retr,
        "quit": quit_,
        "total": login + retr + quit_,
        "cpu_login": c1 - c0,
        "cpu_retr": c2 - c1,
        "cpu_quit": c3 - c2,
        "cpu": c3 - c0,
    }


# --- plumbing -------------------------------------------------------------------------------------


def wait_port(
    proc: subprocess.Popen[bytes], address: str, port: int, log: Path, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}); see {log}")
        try:
            with socket.create_connection((address, port), 0.5) as s:
                s.settimeout(2)
                if s.recv(100).startswith(b"+OK"):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"no POP3 greeting on {address}:{port} within {timeout}s; see {log}")






def run_session(s: Server, work: Path, maildir: Path, mode: str, window: int) -> dict[str, float]:
    log = work / f"{s.name}.out"
    argv = ["taskset", "-c", str(SERVER_CPU), *s.setup(work, maildir, s.address, s.port)]
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=str(work))
    try:
        wait_port(proc, s.address, s.port, log)
        time.sleep(0.5)
        return session(s.address, s.port, window, lambda: tree_cpu(proc.pid))
    finally:
        stop(proc)


def summary(servers: list[Server], modes: list[str]) -> None:
    """Best of rounds per server and mode, three ways, and the appliance/Dovecot ratios."""
    metrics = {
        "session": lambda r: r["messages"] / r["total"],
        "RETR phase": lambda r: r["messages"] / r["retr"],
        "per CPU-s": lambda r: r["messages"] / r["cpu"] if r["cpu"] > 0 else 0.0,
        "RETR per CPU-s": lambda r: r["messages"] / r["cpu_retr"] if r["cpu_retr"] > 0 else 0.0,
    }
    print(
        f"\nbest of rounds, messages/s {'':15s}{'session':>11s}{'RETR':>11s}{'per CPU-s':>11s}{'RETR/CPU-s':>11s}"
    )
    for mode in modes:
        best: dict[str, list[float]] = {}
        for s in servers:
            runs = s.sessions.get(mode, [])
            if runs:
                best[s.name] = [max(f(r) for r in runs) for f in metrics.values()]
                cells = "".join(f"{v:>11,.0f}" for v in best[s.name])
                print(f"  {mode:9s} {s.name:15s}{cells}")
        if "appliance" in best and "dovecot" in best:
            a, d = best["appliance"], best["dovecot"]
            ratios = [x / y if y else 0.0 for x, y in zip(a, d, strict=True)]
            verdict = "met" if ratios[0] >= 0.8 else "NOT met"
            cells = "".join(f"{v:>11.2f}" for v in ratios)
            print(
                f"  {mode:9s} {'appliance/dovecot':15s}{cells}   (target >= 0.8, session: {verdict})"
            )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window", type=int, default=16, help="RETRs in flight in pipelined mode")
    p.add_argument("--modes", default="lockstep,pipelined")
    p.add_argument(
        "--only", default="", help="comma-separated subset of: appliance,dovecot,appliance-tw22"
    )
    p.add_argument("--tw22", action="store_true", help="also run the appliance under .venv-tw22")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()

    if shutil.which("/usr/sbin/dovecot") is None:
        print("missing dovecot: apt-get install dovecot-pop3d", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {CLIENT_CPU})
    work = Path(tempfile.mkdtemp(prefix="pop3bench-"))
    work.chmod(0o755)  # Dovecot's mail processes (user mail) must reach their Maildir
    maildir = work / "maildir"
    make_maildir(maildir, args.messages, args.size)
    servers = [
        Server("appliance", "127.0.3.31", 21110, appliance_setup(".venv")),
        Server("dovecot", "127.0.3.32", 21110, dovecot_setup),
    ]
    if args.tw22:
        servers.append(Server("appliance-tw22", "127.0.3.33", 21110, appliance_setup(".venv-tw22")))
    if args.only:
        servers = [s for s in servers if s.name in set(args.only.split(","))]
    modes = {"lockstep": 1, "pipelined": args.window}
    wanted = [m for m in args.modes.split(",") if m in modes]
    print(
        f"# {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}"
    )
    print(
        f"# {args.messages} messages x {args.size} octets in new/, server on CPU {SERVER_CPU}, "
        f"client on CPU {CLIENT_CPU}, fresh Maildir copy and server restart per session"
    )
    print(f"# {login_costs()}")
    try:
        for rnd in range(args.rounds):
            for mode in wanted:
                for s in servers:
                    load = os.getloadavg()[0]
                    try:
                        r = run_session(s, work, maildir, mode, modes[mode])
                    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                        print(f"round {rnd + 1} {mode:9s} {s.name:15s} FAILED: {e}", flush=True)
                        continue
                    s.sessions.setdefault(mode, []).append(r)
                    print(
                        f"round {rnd + 1} {mode:9s} {s.name:15s} {r['messages'] / r['total']:>8,.0f} msg/s session"
                        f"  {r['messages'] / r['retr']:>8,.0f} msg/s RETR phase"
                        f"  (login+scan {r['login']:.3f} s, RETR {r['retr']:.3f} s, QUIT {r['quit']:.3f} s,"
                        f" server CPU {r['cpu_login']:.2f}+{r['cpu_retr']:.2f}+{r['cpu_quit']:.2f} s)"
                        f"  [load {load:.2f}]",
                        flush=True,
                    )
    finally:
        if args.keep:
            print(f"# work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    summary(servers, wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
