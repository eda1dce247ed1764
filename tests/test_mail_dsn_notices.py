"""Delay notices, postmaster copies of bounces and the Remote-MTA field (issue 7, M-5).

The runner and the real BounceWriter run on a fake clock over a real spool;
the reports they queue are delivered by the same runner into the local
mailbox of the sender (alice), where they are read back with Python's email
package.  A "restart" is a new runner over the same directory, as after a
SIGKILL.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import replace
from email.message import Message
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred

from appliance import config
from appliance.mail.dsn import _date
from appliance.mail.interfaces import Reply
from appliance.mail.outbound import BounceWriter
from appliance.mail.queue import DEFERRED, FAILED, QueuedMessage, RecipientState, Spool
from appliance.mail.runner import RemoteReply
from tests.test_config import MINIMAL, write
from tests.test_mail_dsn import parse, status_groups
from tests.test_mail_queue_support import envelope, result
from tests.test_mail_runner import Env

ALICE = "alice@example.test"
POSTMASTER = "postmaster@example.test"
ORIGINAL = (
    b"Received: from client by mail.example.test; Mon, 1 Jan 2026 00:00:00 +0000\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <orig-1@example.test>\r\n"
    b"\r\n"
    b"the secret body text\r\n"
)


class Remote:
    """A ``remote_delivery`` hook answering each recipient from a script (last answer repeats)."""

    def __init__(self, **script: list[Reply]) -> None:
        self.script = {k.replace("_", "@", 1) + ".test": v for k, v in script.items()}
        self.calls = 0

    def __call__(
        self, message: QueuedMessage, rcpts: Sequence[RecipientState]
    ) -> Deferred[Mapping[str, Reply]]:
        self.calls += 1
        out = {}
        for r in rcpts:
            answers = self.script[r.address]
            out[r.address] = answers.pop(0) if len(answers) > 1 else answers[0]
        return defer.succeed(out)


BUSY = RemoteReply(451, "4.2.0", "mx.remote.test said: mailbox busy", remote_mta="mx.remote.test")
GONE = RemoteReply(550, "5.1.1", "mx.remote.test said: no such user", remote_mta="mx.remote.test")


def wire(
    env: Env,
    remote: Remote,
    delay_warning: float = 0.0,
    copy_to_postmaster: bool = False,
) -> BounceWriter:
    """Give ``env``'s runner the real report writer and the remote hook, as the service does."""
    writer = BounceWriter(env.spool, "mail.example.test", POSTMASTER, env.clock, copy_to_postmaster)
    env.runner.bounce = writer
    env.runner.delay_notice = writer.delay_notice
    env.runner.delay_warning = delay_warning
    env.runner.remote_delivery = remote
    return writer


def make_env(tmp_path: Path, **kw: Any) -> Env:
    kw.setdefault("retry_intervals", (600.0,))
    kw.setdefault("poll_interval", 60.0)
    kw.setdefault("lifetime", 5 * 86400.0)
    return Env(tmp_path, **kw)


def submit(env: Env, *rcpts: str, sender: str = ALICE, body: bytes = ORIGINAL) -> str:
    incoming = env.spool.begin()
    incoming.write(body)
    return result(incoming.commit(envelope(*rcpts, sender=sender, at=env.clock.seconds())))


def reports(env: Env, subject: str = "") -> list[Message]:
    """The reports in alice's mailbox (postmaster is an alias of alice in these tests)."""
    out = [parse(m) for m in env.box("alice")]
    return [m for m in out if subject in (m["Subject"] or "")]


def advance(env: Env, seconds: float, step: float = 60.0) -> None:
    while seconds > 0:
        env.clock.advance(min(step, seconds))
        seconds -= step


# -- delay notices --------------------------------------------------------------------------


def test_delay_notice_is_sent_once_after_the_delay_and_is_a_valid_report(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    remote = Remote(carol_remote=[BUSY])
    wire(env, remote, delay_warning=1800.0)
    env.runner.start()
    arrival = env.clock.seconds()
    qid = submit(env, "carol@remote.test")
    assert remote.calls == 1
    advance(env, 1200)  # two more attempts (at +600, +1200), still younger than 30 minutes
    assert remote.calls == 3
    assert env.box("alice") == []
    advance(env, 600)  # the attempt at +1800 is the first one past delay_warning
    (notice,) = reports(env)
    advance(env, 3600)  # six more attempts: no second notice
    assert remote.calls == 10
    assert len(reports(env)) == 1
    state = env.spool.load(qid).recipient("carol@remote.test")
    assert state.status == DEFERRED and state.delay_notified

    assert notice.get_content_type() == "multipart/report"
    assert notice.get_param("report-type") == "delivery-status"
    assert notice["Subject"] == "Delayed Mail (still being retried)"
    assert notice["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.test>"
    assert notice["To"] == f"<{ALICE}>"
    assert notice["Return-Path"] == "<>"  # the null envelope sender (RFC 3464 2)
    parts = notice.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert "only a warning" in parts[0].get_payload()
    per_message, per_recipient = status_groups(notice)
    assert per_message["Reporting-MTA"] == "dns; mail.example.test"
    assert per_message["Arrival-Date"] == _date(arrival)
    assert per_recipient["Final-Recipient"] == "rfc822; carol@remote.test"
    assert per_recipient["Action"] == "delayed"
    assert per_recipient["Status"] == "4.2.0"
    assert per_recipient["Remote-MTA"] == "dns; mx.remote.test"
    assert per_recipient["Diagnostic-Code"] == "smtp; 451 4.2.0 mx.remote.test said: mailbox busy"
    # RFC 3464 2.3.8: when the retrying stops, here arrival + the 5-day lifetime.
    assert per_recipient["Will-Retry-Until"] == _date(arrival + 5 * 86400)
    assert b"the secret body text" not in b"".join(env.box("alice"))


def test_delay_notice_survives_a_restart_without_being_sent_again(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    wire(env, Remote(carol_remote=[BUSY]), delay_warning=600.0)
    env.runner.start()
    qid = submit(env, "carol@remote.test")
    advance(env, 600)
    assert len(reports(env)) == 1
    on_disk = json.loads((env.spool.queue_dir / qid / "envelope.json").read_text())
    (entry,) = on_disk["recipients"]
    assert entry["delay_notified"] is True
    assert entry["remote_mta"] == "mx.remote.test"
    now = env.clock.seconds()

    # SIGKILL and a new process over the same spool: recovery reloads the state.
    env2 = env.restart(retry_intervals=(600.0,), poll_interval=60.0)
    env2.clock.advance(now - env2.clock.seconds())
    remote2 = Remote(carol_remote=[BUSY])
    wire(env2, remote2, delay_warning=600.0)
    env2.runner.start()
    advance(env2, 1800)
    assert remote2.calls >= 3
    assert len(reports(env2)) == 1
    assert env2.spool.load(qid).recipient("carol@remote.test").delay_notified


def test_no_delay_notice_for_a_message_from_the_null_sender(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    wire(env, Remote(carol_remote=[BUSY]), delay_warning=600.0)
    calls: list[list[str]] = []
    real = env.runner.delay_notice
    assert real is not None

    def spy(message: QueuedMessage, rcpts: Sequence[RecipientState], until: float) -> Any:
        calls.append([r.address for r in rcpts])
        return real(message, rcpts, until)

    env.runner.delay_notice = spy
    env.runner.start()
    qid = submit(env, "carol@remote.test", sender="")
    advance(env, 3600)
    assert calls == []
    assert env.spool.messages() == [qid]  # no report was queued
    assert env.box("alice") == []
    # The writer refuses too, should it ever be asked (RFC 5321 4.5.5).
    message = env.spool.load(qid)
    result(real(message, message.recipients, 0.0))
    assert env.spool.messages() == [qid]


def test_delay_warning_off_by_default_and_expired_mail_bounces_without_notice(
    tmp_path: Path,
) -> None:
    env = make_env(tmp_path, lifetime=3600.0)
    wire(env, Remote(carol_remote=[BUSY]))
    env.runner.start()
    qid = submit(env, "carol@remote.test")
    advance(env, 3600)
    (bounce,) = reports(env)
    assert bounce["Subject"] == "Undelivered Mail Returned to Sender"
    assert status_groups(bounce)[1]["Action"] == "failed"
    assert qid not in env.spool.messages()


def test_only_the_deferred_recipients_are_in_the_notice(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    ok = Reply(250, "2.0.0", "ok")
    wire(env, Remote(carol_remote=[BUSY], dave_remote=[ok]), delay_warning=600.0)
    env.runner.start()
    submit(env, "carol@remote.test", "dave@remote.test", "alice@example.test")
    advance(env, 600)
    (notice,) = reports(env, "Delayed")
    groups = status_groups(notice)
    assert [g["Final-Recipient"] for g in groups[1:]] == ["rfc822; carol@remote.test"]


def test_a_failing_delay_notice_is_tried_again(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    wire(env, Remote(carol_remote=[BUSY]), delay_warning=600.0)
    real = env.runner.delay_notice
    assert real is not None
    outcomes: list[Exception | None] = [OSError("spool full"), None]

    def flaky(message: QueuedMessage, rcpts: Sequence[RecipientState], until: float) -> Any:
        error = outcomes.pop(0)
        return defer.fail(error) if error else real(message, rcpts, until)

    env.runner.delay_notice = flaky
    env.runner.start()
    qid = submit(env, "carol@remote.test")
    advance(env, 600)
    assert not env.spool.load(qid).recipient("carol@remote.test").delay_notified
    assert reports(env) == []
    advance(env, 600)
    assert outcomes == []
    assert len(reports(env)) == 1
    assert env.spool.load(qid).recipient("carol@remote.test").delay_notified


# -- postmaster copies -------------------------------------------------------------------------


def queued_reports(spool: Spool, skip: str) -> list[tuple[QueuedMessage, Message, bytes]]:
    out = []
    for qid in spool.messages():
        if qid == skip:
            continue
        message = spool.load(qid)
        raw = message.data_path.read_bytes()
        out.append((message, parse(raw), raw))
    return out


def failed_message(tmp_path: Path, sender: str, copy: bool, rcpt: str = "bob@remote.test") -> Any:
    """A spool with one message whose ``rcpt`` failed at a remote server, and a writer."""
    env = make_env(tmp_path)
    writer = BounceWriter(env.spool, "mail.example.test", POSTMASTER, env.clock, copy)
    qid = submit(env, rcpt, sender=sender)
    state = RecipientState(
        rcpt, FAILED, 1, 0.0, GONE, env.clock.seconds(), remote_mta="mx.remote.test"
    )
    message = result(env.spool.update_recipient(qid, state))
    return env, writer, message


def test_postmaster_copy_has_the_headers_only(tmp_path: Path) -> None:
    env, writer, message = failed_message(tmp_path, ALICE, copy=True)
    result(writer(message, message.recipients))
    queued = queued_reports(env.spool, message.queue_id)
    by_rcpt = {m.envelope.recipients: (m, parsed, raw) for m, parsed, raw in queued}
    assert set(by_rcpt) == {(ALICE,), (POSTMASTER,)}
    copy, parsed, raw = by_rcpt[(POSTMASTER,)]
    assert copy.envelope.sender == ""
    assert parsed["To"] == f"<{POSTMASTER}>"
    assert parsed["Subject"] == "Postmaster Copy: Undelivered Mail"
    parts = parsed.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert "message/rfc822" not in raw.decode()
    assert "Subject: lunch" in parts[2].get_payload()
    assert b"the secret body text" not in raw
    assert f"sent by <{ALICE}>" in parts[0].get_payload()
    assert status_groups(parsed)[1]["Action"] == "failed"
    # The sender's own report is the usual one.
    _, to_sender, _ = by_rcpt[(ALICE,)]
    assert to_sender["Subject"] == "Undelivered Mail Returned to Sender"


def test_no_postmaster_copy_by_default(tmp_path: Path) -> None:
    env, writer, message = failed_message(tmp_path, ALICE, copy=False)
    result(writer(message, message.recipients))
    queued = queued_reports(env.spool, message.queue_id)
    assert [m.envelope.recipients for m, _, _ in queued] == [(ALICE,)]


def test_double_bounce_to_postmaster_gets_no_extra_copy(tmp_path: Path) -> None:
    env, writer, message = failed_message(tmp_path, "", copy=True)
    result(writer(message, message.recipients))
    queued = queued_reports(env.spool, message.queue_id)
    assert [m.envelope.recipients for m, _, _ in queued] == [(POSTMASTER,)]
    assert queued[0][1]["Subject"] == "Undelivered Mail Returned to Sender"


def test_delay_notices_get_no_postmaster_copy(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    wire(env, Remote(carol_remote=[BUSY]), delay_warning=600.0, copy_to_postmaster=True)
    env.runner.start()
    qid = submit(env, "carol@remote.test")
    advance(env, 600)
    # postmaster is alice here: a copy would be a second message in her box.
    (notice,) = reports(env)
    assert notice["To"] == f"<{ALICE}>"
    assert env.spool.messages() == [qid]


def test_postmaster_copy_through_the_runner(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    wire(env, Remote(bob_remote=[GONE]), copy_to_postmaster=True)
    env.runner.start()
    submit(env, "bob@remote.test")
    subjects = sorted(m["Subject"] for m in reports(env))
    assert subjects == ["Postmaster Copy: Undelivered Mail", "Undelivered Mail Returned to Sender"]
    assert env.spool.messages() == []


# -- Remote-MTA --------------------------------------------------------------------------------


def test_remote_mta_is_kept_and_reported_for_remote_failures_only(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    wire(env, Remote(bob_remote=[GONE]))
    env.runner.start()
    submit(env, "bob@remote.test", "nobody@example.test")
    (bounce,) = reports(env)
    _, *groups = status_groups(bounce)
    by_rcpt = {g["Final-Recipient"]: g for g in groups}
    remote = by_rcpt["rfc822; bob@remote.test"]
    assert remote["Remote-MTA"] == "dns; mx.remote.test"
    # The reply as recorded (the host also in its text, as mailq shows it; RFC 3464 2.3.6).
    assert remote["Diagnostic-Code"] == "smtp; 550 5.1.1 mx.remote.test said: no such user"
    assert remote["Status"] == "5.1.1"
    local = by_rcpt["rfc822; nobody@example.test"]
    assert local["Remote-MTA"] is None
    assert local["Status"] == "5.1.1"
    assert "(remote host mx.remote.test said)" in bounce.get_payload()[0].get_payload()


def test_remote_mta_is_stored_plain_and_cleared_by_a_local_outcome(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    wire(env, Remote(carol_remote=[BUSY, Reply(451, "4.4.1", "connection refused")]))
    env.runner.start()
    qid = submit(env, "carol@remote.test")
    state = env.spool.load(qid).recipient("carol@remote.test")
    assert state.remote_mta == "mx.remote.test"
    # The reply itself is a plain Reply: mailq and the state file keep the host in its text.
    assert type(state.last_reply) is Reply
    assert state.last_reply == Reply(451, "4.2.0", "mx.remote.test said: mailbox busy")
    advance(env, 600)
    state = env.spool.load(qid).recipient("carol@remote.test")
    assert state.attempts == 2 and state.remote_mta is None


def test_old_state_files_without_the_new_fields_still_load(tmp_path: Path) -> None:
    old = {
        "address": "carol@remote.test",
        "status": "deferred",
        "attempts": 2,
        "next_attempt": 5.0,
        "last_reply": {"code": 451, "enhanced": "4.0.0", "text": "later"},
        "updated_at": 4.0,
        "original": None,
        "dsn_sent": False,
    }
    state = RecipientState.from_json(old)
    assert state.remote_mta is None and state.delay_notified is False
    changed = replace(state, remote_mta="mx.a", delay_notified=True)
    new = RecipientState.from_json(json.loads(json.dumps(changed.to_json())))
    assert new == changed
    assert new.remote_mta == "mx.a" and new.delay_notified is True


# -- configuration -----------------------------------------------------------------------------


def test_delivery_report_settings(tmp_path: Path) -> None:
    c = config.load(write(tmp_path, MINIMAL))
    assert c.delivery.delay_warning == 0
    assert c.delivery.bounce_copy_to_postmaster is False
    c = config.load(
        write(
            tmp_path,
            MINIMAL
            + textwrap.dedent(
                """
                [delivery]
                delay_warning = "4h"
                bounce_copy_to_postmaster = true
                """
            ),
        )
    )
    assert c.delivery.delay_warning == 4 * 3600
    assert c.delivery.bounce_copy_to_postmaster is True


def test_delivery_report_setting_mistakes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL
        + textwrap.dedent(
            """
            [delivery]
            delay_warning = "soon"
            bounce_copy_to_postmaster = "yes"
            """
        ),
    )
    problems = config.check(path)
    reasons = {p.key: p.reason for p in problems}
    assert set(reasons) == {"delivery.delay_warning", "delivery.bounce_copy_to_postmaster"}
    assert "duration" in reasons["delivery.delay_warning"]
    assert "true or false" in reasons["delivery.bounce_copy_to_postmaster"]
    assert all(p.file == str(path) for p in problems)
