"""The steps' plain, sequential code on an event loop.

Each claimed row's step runs in its own greenlet (`run_bridged`).  When it makes
a provider call, the call's coroutine is handed to the event loop (`await_io`)
and the greenlet is parked until it completes, so thousands of calls can wait
on one thread at once — the hiding of provider latency that asyncio workers
(Temporal's, pgqueuer's) get — while each step keeps reading top to bottom, the
same code the threaded worker runs.  Database work from inside a greenlet
(`offload`) goes to a small thread pool, so a commit never blocks the loop.
Outside a bridged greenlet every helper here simply calls through, which is
how the threaded worker and the tests use the same steps.  (SQLAlchemy's
asyncio layer drives its synchronous core the same way.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import greenlet

T = TypeVar("T")


class _Bridged(greenlet.greenlet):  # type: ignore[misc]
    """A greenlet started by run_bridged: its parent awaits what it hands over."""


async def run_bridged(fn: Callable[..., T], *args: Any) -> T:
    """Run fn(*args) in a new greenlet; await every coroutine it hands over with
    await_io, and send back the result (or throw in the exception)."""
    child = _Bridged(fn)
    handed = child.switch(*args)
    while not child.dead:
        try:
            result = await handed
        except BaseException as exc:  # every outcome, cancellation included, goes to the step
            handed = child.throw(exc)
        else:
            handed = child.switch(result)
    return handed  # type: ignore[no-any-return]


def in_bridge() -> bool:
    return isinstance(greenlet.getcurrent(), _Bridged)


def await_io(awaitable: Awaitable[T]) -> T:
    """From bridged code: park until `awaitable` completes on the loop; its result."""
    current = greenlet.getcurrent()
    if not isinstance(current, _Bridged):
        raise RuntimeError("await_io outside a bridged greenlet")
    return current.parent.switch(awaitable)  # type: ignore[no-any-return]


def call_io(sync: Callable[[], T], asynchronous: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """A provider call: awaited on the loop when bridged, made directly otherwise."""
    if in_bridge():
        return await_io(asynchronous())
    return sync()


def offload(fn: Callable[..., T], *args: Any) -> T:
    """Database work: on the loop's thread pool when bridged (a commit or a lock
    wait never stalls the other calls), directly otherwise."""
    if in_bridge():
        return await_io(asyncio.to_thread(fn, *args))
    return fn(*args)


def wait_for(future: Future[T]) -> T:
    """A concurrent Future's result (the committer's): awaited when bridged."""
    if in_bridge():
        return await_io(asyncio.wrap_future(future))
    return future.result()
