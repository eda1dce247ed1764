#!/usr/bin/env python3
"""Local-delivery throughput: the appliance against a private Postfix instance, side by side.

``smtp-source`` (Debian's postfix package) sends N messages of a given size
to a local mailbox over S parallel sessions; the clock stops when the last
file is in the mailbox's ``Maildir/new``.  Each server is pinned to CPU 0,
the client (and this script, which polls the Maildir) to CPU 1.  Both servers
keep their durability promises: fsync before the 250 and on delivery.

Postfix runs as its own instance: config_directory, queue_directory,
data_directory and the Maildirs all live in a temporary directory, it listens
on 127.0.0.30 and delivers with virtual(8); the system's Postfix
configuration is neither read nor touched.  Needs root (Postfix drops to its
``postfix`` user; the Maildirs belong to ``nobody``).

    sudo .venv/bin/python bench/smtp/run.py [--messages 5000] [--size 4096] [--sessions 10]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.common import free_port, tree_cpu  # noqa: E402

DEMO = ROOT / "etc" / "demo"
APPLIANCE_ADDRESS = "127.0.0.10"
POSTFIX_ADDRESS = "127.0.0.30"
SERVER_CPU, CLIENT_CPU = "0", "1"
RECIPIENT = "bob@example.test"
SENDER = "sender@remote.test"




def count_new(new: Path) -> int:
    try:
        with os.scandir(new) as entries:
            return sum(1 for _ in entries)
    except FileNotFoundError:
        return 0






def drive(
    address: str, port: int, new: Path, args: argparse.Namespace, server: int
) -> dict[str, float]:
    """Run smtp-source on the client CPU; time until ``new`` holds every message.

    ``server`` is the server's top process: its CPU time (with every
    descendant's) is measured over the run.
    """
    command = [
        "taskset", "-c", CLIENT_CPU, "smtp-source",
        "-s", str(args.sessions), "-m", str(args.messages), "-l", str(args.size),
        "-f", SENDER, "-t", RECIPIENT, f"{address}:{port}",
    ]  # fmt: skip
    already = count_new(new)
    cpu = tree_cpu(server)
    start = time.monotonic()
    client = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    sent_at = None
    while True:
        done = count_new(new) - already
        if sent_at is None and client.poll() is not None:
            sent_at = time.monotonic()
            if client.returncode != 0:
                _, errors = client.communicate()
                raise SystemExit(f"smtp-source failed ({client.returncode}): {errors}")
        if done >= args.messages:
            break
        if time.monotonic() - start > args.timeout:
            raise SystemExit(
                f"only {done} of {args.messages} messages delivered in {args.timeout}s"
            )
        time.sleep(0.02)
    end = time.monotonic()
    cpu = tree_cpu(server) - cpu
    if sent_at is None:
        client.wait()
        sent_at = time.monotonic()
    return {
        "seconds": end - start,
        "rate": args.messages / (end - start),
        "accept_seconds": sent_at - start,
        "cpu_seconds": cpu,
    }


# ------------------------------------------------------------------ the appliance


def appliance_config(tmp: Path) -> tuple[Path, int]:
    target = tmp / "demo"
    shutil.copytree(DEMO, target)
    path = target / "appliance.toml"
    text = path.read_text().replace(
        'state_dir = "../../var/demo"', f'state_dir = "{tmp / "state"}"'
    )
    ports: dict[str, int] = {}

    def renumber(match: re.Match[str]) -> str:
        ports.setdefault(match.group(1), free_port(APPLIANCE_ADDRESS))
        return f"port = {ports[match.group(1)]}"

    path.write_text(re.sub(r"port = (\d+)", renumber, text))
    return path, ports["10025"]


def run_appliance(tmp: Path, args: argparse.Namespace) -> dict[str, float]:
    config, port = appliance_config(tmp)
    log = tmp / "appliance.log"
    twistd = [str(Path(sys.executable).parent / "twistd")]
    shim = []
    if args.switch_interval is not None:
        # Experiment: the GIL hand-off interval of the server process (default 5 ms).
        shim.append(f"import sys; sys.setswitchinterval({args.switch_interval})")
    if args.pool_size is not None:
        # Experiment: the size of the appliance's blocking-I/O thread pool (default 16).
        shim.append(
            "import appliance.service as s; "
            f"s.ThreadPoolService.__init__.__defaults__ = ({args.pool_size},)"
        )
    if args.no_fsync:
        # Analysis only, breaks the durability promise: what the fsyncs cost.
        shim.append(
            "import appliance.mail.queue as q, appliance.mail.runner as r, "
            "appliance.mail.direct as d; "
            "q.Spool.__init__.__kwdefaults__['sync'] = False; "
            "r.QueueRunner.__init__.__kwdefaults__['sync'] = False; "
            "d.DirectDelivery.__init__.__kwdefaults__['sync'] = False"
        )
    if args.cpu_profile:
        # cProfile timed by the reactor thread's CPU clock: neither waiting in
        # epoll nor being preempted by other processes counts, unlike --profile.
        shim.append(
            "import cProfile, time; from twisted.internet import reactor; "
            "_prof = cProfile.Profile(time.thread_time); "
            f"reactor.addSystemEventTrigger('after', 'shutdown', _prof.dump_stats, {str(args.cpu_profile)!r}); "
            "_prof.enable()"
        )
    if shim:
        shim += [
            "import sys; sys.argv[0] = 'twistd'",
            "from twisted.scripts.twistd import run; run()",
        ]
        twistd = [sys.executable, "-c", "\n".join(shim)]
    command = ["taskset", "-c", SERVER_CPU, *twistd, "--nodaemon", "--pidfile="]
    if args.profile:
        command += [f"--profile={args.profile}", "--profiler=cprofile", "--savestats"]
    # As the Debian unit runs it: the fast observer, on stdout, into the log file.
    command += ["--logger=appliance.logs.observer", "appliance", "--config", str(config)]
    with log.open("ab") as out:
        process = subprocess.Popen(command, cwd=config.parent, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "appliance started" not in (log.read_text() if log.exists() else ""):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the appliance did not start; see {log}")
            time.sleep(0.1)
        new = tmp / "state" / "mail" / "example.test" / "bob" / "new"
        return drive(APPLIANCE_ADDRESS, port, new, args, process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


# ------------------------------------------------------------------ Postfix

#: The main.cf lines of a private Postfix instance in ``{tmp}`` (bench/queue uses them too).
POSTFIX_BASE_CF = """\
compatibility_level = 3.6
queue_directory = {tmp}/spool
data_directory = {tmp}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.bench.test
mydomain = bench.test
mydestination =
inet_interfaces = all
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
biff = no
maillog_file = {tmp}/maillog
maillog_file_prefixes = {tmp}
"""
MAIN_CF = (
    POSTFIX_BASE_CF
    + """\
virtual_mailbox_domains = example.test
virtual_mailbox_base = {tmp}/mail
virtual_mailbox_maps = inline:{{ {recipient}=example.test/bob/ }}
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
"""
)

# Stock services without chroot; smtpd bound to our own address and port.
MASTER_CF = """\
{address}:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
smtp      unix  -       -       n       -       -       smtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix(etc: Path, *verb: str) -> subprocess.CompletedProcess[str]:
    # Postfix reports to syslog unless stderr is a terminal: give it one with script(1).
    line = " ".join(["postfix", "-c", str(etc), *verb])
    return subprocess.run(
        ["taskset", "-c", SERVER_CPU, "script", "-qec", line, "/dev/null"],
        capture_output=True,
        text=True,
    )


def run_postfix(tmp: Path, args: argparse.Namespace) -> dict[str, float]:
    if shutil.which("postfix") is None:
        raise SystemExit("Postfix is not installed (apt install postfix)")
    etc, mail, data = tmp / "etc", tmp / "mail", tmp / "data"
    for d in (etc, tmp / "spool", mail, data):
        d.mkdir(parents=True)
    shutil.chown(data, "postfix")
    nobody = 65534
    os.chown(mail, nobody, nobody)
    port = free_port(POSTFIX_ADDRESS)
    (etc / "main.cf").write_text(
        MAIN_CF.format(tmp=tmp, recipient=RECIPIENT, uid=nobody, gid=nobody)
    )
    (etc / "master.cf").write_text(MASTER_CF.format(address=POSTFIX_ADDRESS, port=port))
    started = postfix(etc, "start")
    if started.returncode != 0:
        raise SystemExit(f"postfix start failed: {started.stdout}{started.stderr}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((POSTFIX_ADDRESS, port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        master = int((tmp / "spool" / "pid" / "master.pid").read_text().split()[0])
        return drive(POSTFIX_ADDRESS, port, mail / "example.test" / "bob" / "new", args, master)
    finally:
        postfix(etc, "stop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--only", choices=("appliance", "postfix"))
    parser.add_argument(
        "--profile", help="cProfile the appliance into this file (twistd --profile)"
    )
    parser.add_argument(
        "--cpu-profile", help="cProfile the reactor thread's CPU time into this file"
    )
    parser.add_argument(
        "--switch-interval", type=float, help="sys.setswitchinterval() in the appliance process"
    )
    parser.add_argument(
        "--pool-size", type=int, help="size of the appliance's I/O thread pool (experiment)"
    )
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="analysis only: run the appliance without fsync (breaks its durability promise)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternate the servers N times")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two CPUs (server on 0, client on 1)")
    os.sched_setaffinity(0, {int(CLIENT_CPU)})
    tmp = Path(tempfile.mkdtemp(prefix="smtp-bench-"))
    os.chmod(tmp, 0o755)
    results: dict[str, list[dict[str, float]]] = {}
    try:
        for round_ in range(args.rounds):
            for name, run in (("appliance", run_appliance), ("postfix", run_postfix)):
                if args.only not in (None, name):
                    continue
                workdir = tmp / f"{name}-{round_}"
                workdir.mkdir()
                r = run(workdir, args)
                results.setdefault(name, []).append(r)
                print(
                    f"{name:9s}: {args.messages} x {args.size} B over {args.sessions} sessions: "
                    f"{r['rate']:7.1f} msg/s delivered ({r['seconds']:.2f} s; "
                    f"client done after {r['accept_seconds']:.2f} s; "
                    f"server CPU {r['cpu_seconds']:.2f} s)",
                    flush=True,
                )
                if not args.keep:
                    shutil.rmtree(workdir, ignore_errors=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    medians = {name: statistics.median(r["rate"] for r in runs) for name, runs in results.items()}
    for name, runs in results.items():
        rates = ", ".join(f"{r['rate']:.1f}" for r in runs)
        print(f"{name:9s}: median {medians[name]:.1f} msg/s ({rates})")
    if len(medians) == 2:
        print(f"ratio appliance/postfix (medians): {medians['appliance'] / medians['postfix']:.2f}")


if __name__ == "__main__":
    main()
