"""The mail service as build_service wires it: the runner's hook and the stop order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock

from appliance import config
from appliance.assembly import build_service
from tests.test_mail_queue_memory import Trips
from tests.test_mail_queue_support import envelope, result
from tests.test_submission import write_config


def mail_service(tmp_path: Path) -> Any:
    root = build_service(config.load(write_config(tmp_path, "")), MemoryReactorClock())
    return root.components.mail  # type: ignore[attr-defined]


def test_runner_awaits_the_masquerading_coroutine_hook(tmp_path: Path) -> None:
    mail = mail_service(tmp_path)
    assert mail.masquerading is not None and mail.remote is not None
    assert mail.runner.remote_delivery == mail.masquerading.deliver
    assert mail.masquerading.inner == mail.remote.deliver


def test_stop_waits_for_removals_still_on_their_way_to_the_disk(tmp_path: Path) -> None:
    mail = mail_service(tmp_path)
    trips = Trips()
    spool = mail.spool
    spool._blocking = trips
    committed = spool.begin().commit(envelope("a@example.test"))
    trips.run()
    qid = result(committed)
    result(spool.remove(qid, force=True))
    done: list[object] = []
    mail.stopService().addBoth(done.append)
    assert done == []  # the rename out of queue/ has not run yet
    assert (spool.queue_dir / qid).is_dir()
    trips.run()
    assert done == [None] and not (spool.queue_dir / qid).exists()
