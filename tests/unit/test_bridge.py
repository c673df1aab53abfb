"""The bridge that runs the steps' sequential code on an event loop: what a
greenlet hands over is awaited, results and exceptions travel both ways, and
outside a bridged greenlet every helper calls straight through."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import pytest

from orderflow.outbox_worker.bridge import (
    await_io,
    call_io,
    in_bridge,
    offload,
    run_bridged,
    wait_for,
)


def test_thousands_of_bridged_steps_wait_at_once_on_one_thread() -> None:
    in_flight = peak = 0
    loop_thread: list[int] = []

    async def call() -> str:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return "ok"

    def step(i: int) -> tuple[int, str]:
        assert in_bridge()
        loop_thread.append(threading.get_ident())
        return i, call_io(lambda: "blocking", call)

    async def main() -> list[tuple[int, str]]:
        return await asyncio.gather(*(run_bridged(step, i) for i in range(2000)))

    results = asyncio.run(main())
    assert results == [(i, "ok") for i in range(2000)]
    assert peak == 2000  # every call was in flight at once
    assert len(set(loop_thread)) == 1


def test_exceptions_travel_both_ways() -> None:
    async def refused() -> None:
        raise ConnectionResetError("peer reset")

    def step() -> str:
        try:
            await_io(refused())
        except ConnectionResetError as exc:  # the step reads the failure like a blocking call's
            return f"handled {exc}"
        return "not raised"

    def crashing_step() -> None:
        await_io(asyncio.sleep(0))
        raise ValueError("a bug in the step")

    assert asyncio.run(run_bridged(step)) == "handled peer reset"
    with pytest.raises(ValueError, match="a bug"):
        asyncio.run(run_bridged(crashing_step))


def test_database_work_leaves_the_loop_thread_when_bridged() -> None:
    where: dict[str, int] = {}

    def commit(name: str) -> str:
        where[name] = threading.get_ident()
        return name

    def step() -> str:
        where["step"] = threading.get_ident()
        return offload(commit, "bridged")

    assert asyncio.run(run_bridged(step)) == "bridged"
    assert where["bridged"] != where["step"]
    assert offload(commit, "direct") == "direct"  # no loop: called where we are
    assert where["direct"] == threading.get_ident()


def test_outside_a_bridge_everything_calls_through() -> None:
    assert not in_bridge()
    assert call_io(lambda: "blocking", lambda: asyncio.sleep(0, "never made")) == "blocking"
    future: Future[str] = Future()
    future.set_result("committed")
    assert wait_for(future) == "committed"
    pending = asyncio.sleep(0)
    with pytest.raises(RuntimeError):
        await_io(pending)
    pending.close()


def test_a_committers_future_is_awaited_when_bridged() -> None:
    future: Future[str] = Future()
    threading.Timer(0.05, lambda: future.set_result("done")).start()
    assert asyncio.run(run_bridged(wait_for, future)) == "done"
