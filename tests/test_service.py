"""The service tree: ordered start and stop, bind early but accept late, reload keeps a bad config out."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.testing import MemoryReactor

from appliance import config as config_module
from appliance.config import Config
from appliance.service import ApplianceService, ListenerService, OrderedMultiService

DEMO = Path(__file__).resolve().parent.parent / "etc" / "demo"


class Step(service.Service):
    def __init__(self, name: str, journal: list[str], gate: defer.Deferred[None] | None = None) -> None:
        self.setName(name)
        self.journal = journal
        self.gate = gate

    def startService(self) -> defer.Deferred[None] | None:  # type: ignore[override]
        service.Service.startService(self)
        self.journal.append(f"start {self.name}")
        if self.gate is not None:
            return self.gate.addCallback(lambda _: self.journal.append(f"ready {self.name}"))
        return None

    def stopService(self) -> None:
        service.Service.stopService(self)
        self.journal.append(f"stop {self.name}")


def test_children_start_in_order_waiting_on_each() -> None:
    journal: list[str] = []
    gate: defer.Deferred[None] = defer.Deferred()
    root = OrderedMultiService()
    Step("spool", journal, gate).setServiceParent(root)
    Step("listener", journal).setServiceParent(root)
    done = root.startService()
    assert journal == ["start spool"]
    gate.callback(None)
    assert journal == ["start spool", "ready spool", "start listener"]
    assert done.called
    root.stopService()
    assert journal[-2:] == ["stop listener", "stop spool"]


class FakePort:
    def __init__(self) -> None:
        self.reading = True
        self.listening = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True

    def stopListening(self) -> None:
        self.listening = False


def test_listener_binds_when_privileged_but_reads_only_once_started() -> None:
    ports: list[FakePort] = []

    def listen() -> Any:
        ports.append(FakePort())
        return ports[-1]

    listener = ListenerService("smtp/outside", "smtp/outside tcp 127.0.0.10:10025", listen)
    listener.privilegedStartService()
    assert len(ports) == 1 and not ports[0].reading
    listener.startService()
    assert len(ports) == 1 and ports[0].reading
    listener.stopService()
    assert not ports[0].listening


def test_listener_binds_at_start_without_privileged_phase() -> None:
    ports: list[FakePort] = []
    listener = ListenerService("x", "x", lambda: ports.append(FakePort()) or ports[-1])  # type: ignore[func-returns-value]
    listener.startService()
    assert len(ports) == 1 and ports[0].reading


class Recorder(service.Service):
    def __init__(self) -> None:
        self.setName("recorder")
        self.seen: list[Config] = []

    def reconfigure(self, config: Config) -> None:
        self.seen.append(config)


def copy_demo(tmp_path: Path) -> Path:
    shutil.copytree(DEMO, tmp_path / "demo")
    path = tmp_path / "demo" / "appliance.toml"
    path.write_text(path.read_text().replace('state_dir = "../../var/demo"', f'state_dir = "{tmp_path}/state"'))
    return path


def test_reload_applies_a_valid_config_and_refuses_a_broken_one(tmp_path: Path) -> None:
    path = copy_demo(tmp_path)
    root = ApplianceService(config_module.load(path), MemoryReactor())
    recorder = Recorder()
    recorder.setServiceParent(root)

    path.write_text(path.read_text().replace("max_recipients", "max_recipients").replace(
        'local_domains = ["example.test"]', 'local_domains = ["example.test", "example.org"]'
    ))
    assert root.reload()
    assert recorder.seen[-1].mail.local_domains == ("example.test", "example.org")
    good = root.config

    path.write_text(path.read_text() + "\n[mail.oops]\n")
    assert not root.reload()
    assert root.config is good
    assert len(recorder.seen) == 1
