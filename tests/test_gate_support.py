"""A fake MailResolver for the gate tests: a dict of records, plus names that fail or hang."""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from appliance.dns.lookup import NoSuchDomain, TemporaryFailure


class FakeResolver:
    """Records by (type, name); a name with no record of any type is NXDOMAIN.

    ``servfail`` names fail with TemporaryFailure, ``hang`` names never
    answer (``txt:name`` for one query type only) (the Deferred can be cancelled); ``queries`` counts lookups.
    """

    def __init__(self) -> None:
        self.a: dict[str, list[str]] = {}
        self.mxs: dict[str, list[tuple[int, str]]] = {}
        self.txts: dict[str, list[bytes]] = {}
        self.ptrs: dict[str, list[str]] = {}
        self.servfail: set[str] = set()
        self.hang: set[str] = set()
        self.queries: Counter[tuple[str, str]] = Counter()
        self.pending: list[Deferred[Any]] = []

    # set-up helpers
    def add_a(self, name: str, *addresses: str) -> FakeResolver:
        self.a.setdefault(name.lower(), []).extend(addresses)
        return self

    def add_mx(self, name: str, *records: tuple[int, str]) -> FakeResolver:
        self.mxs.setdefault(name.lower(), []).extend(records)
        return self

    def add_txt(self, name: str, *records: str | bytes) -> FakeResolver:
        self.txts.setdefault(name.lower(), []).extend(
            r if isinstance(r, bytes) else r.encode() for r in records
        )
        return self

    def add_ptr(self, address: str, *names: str) -> FakeResolver:
        self.ptrs.setdefault(address, []).extend(names)
        return self

    def _exists(self, name: str) -> bool:
        return (
            name in self.a
            or name in self.mxs
            or name in self.txts
            or any(key.endswith("." + name) for key in (*self.a, *self.mxs, *self.txts))
        )

    def _answer(self, kind: str, name: str, table: dict[str, Any]) -> Deferred[Any]:
        name = name.lower().rstrip(".")
        self.queries[(kind, name)] += 1
        if name in self.servfail or f"{kind}:{name}" in self.servfail:
            return fail(TemporaryFailure(f"SERVFAIL for {name}"))
        if name in self.hang or f"{kind}:{name}" in self.hang:
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            return d
        if name in table:
            return succeed(list(table[name]))
        if kind == "ptr" or self._exists(name):
            return succeed([])
        return fail(NoSuchDomain(name))

    # MailResolver
    def mx(self, domain: str) -> Deferred[list[tuple[int, str]]]:
        return self._answer("mx", domain, self.mxs)

    def addresses(self, host: str) -> Deferred[list[str]]:
        return self._answer("a", host, self.a)

    def txt(self, name: str) -> Deferred[list[bytes]]:
        return self._answer("txt", name, self.txts)

    def ptr(self, address: str) -> Deferred[list[str]]:
        if address in self.servfail:
            self.queries[("ptr", address)] += 1
            return fail(TemporaryFailure("SERVFAIL"))
        return self._answer("ptr", address, self.ptrs)


def result_of(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has already fired (fails the test otherwise)."""
    results: list[Any] = []
    failures: list[Any] = []
    d.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert results, "Deferred has not fired"
    return results[0]


def new_clock() -> Clock:
    clock = Clock()
    clock.advance(1_700_000_000)
    return clock


class LogCapture:
    """Collects twisted.logger events emitted while it is installed (a context manager)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def __enter__(self) -> LogCapture:
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(self)

    def errors(self) -> list[str]:
        from twisted.logger import LogLevel, formatEvent

        return [
            formatEvent(e)
            for e in self.events
            if e.get("log_level") in (LogLevel.error, LogLevel.critical)
        ]

    def texts(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events]
