"""appliance.logs: the observer writes exactly Twisted's classic lines, only cheaper."""

from __future__ import annotations

import io

import pytest
from twisted.logger import LogLevel, formatEventAsClassicLogText, formatTime
from twisted.python.failure import Failure

from appliance.logs import LineFormatter, observer


def _failure() -> Failure:
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        return Failure()


def events() -> list[dict[str, object]]:
    base = {"log_namespace": "appliance.mail.queue", "log_level": LogLevel.info}
    return [
        {**base, "log_format": "{line}", "line": "0A: removed", "log_time": 1700000000.0},
        {**base, "log_format": "{line}", "line": "0A: removed", "log_time": 1700000000.999},
        {**base, "log_format": "{line}", "line": "0B: to=<a@b>", "log_time": 1700000001.001},
        {**base, "log_format": "{line}", "line": "two\nlines", "log_time": 1700000001.5},
        {**base, "log_format": "{line}", "line": "", "log_time": 1700000002.0},
        {**base, "log_format": "{line}", "line": 42, "log_time": 1700000002.0},
        {**base, "log_format": "{line}", "line": "x", "log_system": "custom", "log_time": 1.0},
        {**base, "log_format": "{line}", "line": "no time"},
        {**base, "log_format": "{qid}: {n} messages", "qid": "0C", "n": 3, "log_time": 5.0},
        {**base, "log_format": "{a!r}", "a": {"x": 1}, "log_time": 1700000003.2},
        {"log_format": "{line}", "line": "no namespace, no level", "log_time": 1700000003.2},
        {**base, "log_level": LogLevel.warn, "log_format": "{line}", "line": "w", "log_time": 9.0},
        {
            **base,
            "log_level": LogLevel.critical,
            "log_format": "{line}",
            "line": "failed",
            "log_failure": _failure(),
            "log_time": 1700000004.0,
        },
        {**base, "log_format": None, "log_time": 1700000004.0},
        {**base, "log_format": "{missing}", "log_time": 1700000004.0},
    ]


@pytest.mark.parametrize("event", events())
def test_same_text_as_twisted(event: dict[str, object]) -> None:
    formatter = LineFormatter()
    # Twice: the cached stamp and system give the same text as the first time.
    assert formatter(event) == formatEventAsClassicLogText(event)
    assert formatter(event) == formatEventAsClassicLogText(event)


def test_one_formatter_for_every_event() -> None:
    """The caches (stamp per second, system per namespace and level) never leak between events."""
    formatter = LineFormatter()
    for event in events() + events()[::-1]:
        assert formatter(event) == formatEventAsClassicLogText(event)


def test_stamp_changes_with_the_second_and_back() -> None:
    formatter = LineFormatter()
    for when in (10.2, 10.9, 11.0, 10.5, 3600.0, 3599.99, 1700000000.0):
        assert formatter.stamp(when) == formatTime(when)
    assert formatter.stamp(None) == formatTime(None)


def test_observer_writes_and_flushes() -> None:
    out = io.StringIO()
    watch = observer(out)
    watch(events()[0])
    watch({"log_format": "{line}", "line": "", "log_time": 1.0})  # nothing to write
    assert out.getvalue() == formatEventAsClassicLogText(events()[0])
