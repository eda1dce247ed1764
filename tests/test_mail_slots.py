"""appliance.mail.slots: a counting semaphore for coroutines, free while a slot is free."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred

from appliance.mail.slots import Slots


async def hold(slots: Slots, name: str, log: list[str], until: Deferred[None] | None) -> None:
    wait = slots.take()
    if wait is not None:
        await wait
    try:
        log.append(f"start {name}")
        if until is not None:
            await until
        log.append(f"end {name}")
    finally:
        slots.release()


def test_free_slots_need_no_deferred() -> None:
    slots = Slots(2)
    assert slots.take() is None
    assert slots.take() is None
    assert not slots.idle
    waiting = slots.take()
    assert isinstance(waiting, Deferred) and not waiting.called
    slots.release()
    assert waiting.called  # the slot went to the waiter, not back to the pool
    slots.release()
    slots.release()
    assert slots.idle


def test_waiters_run_in_order_and_never_more_than_the_limit() -> None:
    slots = Slots(2)
    log: list[str] = []
    gates = [Deferred[None]() for _ in range(5)]
    done = [Deferred.fromCoroutine(hold(slots, str(i), log, gates[i])) for i in range(5)]
    assert log == ["start 0", "start 1"]
    gates[1].callback(None)
    assert log == ["start 0", "start 1", "end 1", "start 2"]
    for gate in (gates[0], gates[2], gates[3], gates[4]):
        gate.callback(None)
    assert [line for line in log if line.startswith("start")] == [f"start {i}" for i in range(5)]
    assert all(d.called for d in done) and slots.idle


def test_many_waiters_finishing_at_once_do_not_recurse() -> None:
    """Thousands queued behind a busy slot, each done without I/O: a loop, not a deep stack."""
    slots = Slots(1)
    log: list[str] = []
    gate: Deferred[None] = Deferred()
    first = Deferred.fromCoroutine(hold(slots, "first", log, gate))
    rest = [Deferred.fromCoroutine(hold(slots, str(i), log, None)) for i in range(5000)]
    gate.callback(None)  # would raise RecursionError if each hand-off nested the next
    assert first.called and all(d.called for d in rest)
    assert log[-1] == "end 4999" and slots.idle


def test_a_cancelled_wait_is_skipped() -> None:
    slots = Slots(1)
    assert slots.take() is None
    cancelled = slots.take()
    assert cancelled is not None
    cancelled.addErrback(lambda f: f.trap(CancelledError))
    cancelled.cancel()
    later = slots.take()
    assert later is not None
    slots.release()
    assert later.called
    slots.release()
    assert slots.idle
