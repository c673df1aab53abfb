"""The asyncio daemon in this process: provider calls made through the real
clients' async paths are in flight together (counted by the sandbox), and the
daemon takes orders through the whole saga with exactly one effect each."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx

from orderflow.outbox_worker.bridge import run_bridged
from orderflow.outbox_worker.providers import Ok, Providers
from orderflow.outbox_worker.runner import Worker
from tests.support.processes import place_many


def _peak(sandbox: Any) -> int:
    return int(httpx.get(f"{sandbox.url}/_sandbox/health").json()["peak_calls_in_flight"])


def test_bridged_calls_of_every_client_are_in_flight_together(
    sandbox: Any, providers: Providers
) -> None:
    sandbox.faults({"endpoint": "*", "mode": "latency", "latency_ms": 400})

    async def main() -> list[Any]:
        calls = [
            *(run_bridged(providers.stripe.search_intents, f"o-{i}") for i in range(30)),
            *(run_bridged(providers.carrier.find_shipments, f"o-{i}") for i in range(30)),
            *(run_bridged(providers.email.find_messages, f"k-{i}") for i in range(30)),
        ]
        return await asyncio.gather(*calls)

    replies = asyncio.run(main())
    assert all(isinstance(r, Ok) for r in replies), [r for r in replies if not isinstance(r, Ok)]
    # One thread, yet all 90 waited at the sandbox at once: the async paths were taken.
    assert _peak(sandbox) >= 90


def test_the_asyncio_daemon_runs_the_saga(db_url: str, conn: Any, sandbox: Any,
                                          providers: Providers) -> None:  # fmt: skip
    ids = place_many(conn, 40, decline_every=8)
    sandbox.faults({"endpoint": "*", "mode": "latency", "latency_ms": 100})
    worker = Worker(db_url, providers, concurrency=200, lease_s=5, backoff_scale=0.01,
                    asyncio_steps=True)  # fmt: skip
    daemon = threading.Thread(target=worker.run_forever, kwargs={"grace_s": 5})
    daemon.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            open_orders = conn.execute(
                "SELECT count(*) AS n FROM orders WHERE id = ANY(%s)"
                " AND state NOT IN ('confirmed', 'cancelled')",
                (ids,),
            ).fetchone()["n"]
            if open_orders == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert open_orders == 0
    finally:
        worker.stop.set()
        worker._signal()
        daemon.join(30)
        worker.close()
    assert not daemon.is_alive()
    rows = conn.execute(
        "SELECT state, count(*) AS n FROM orders WHERE id = ANY(%s) GROUP BY state", (ids,)
    ).fetchall()
    states = {r["state"]: r["n"] for r in rows}
    assert states == {"confirmed": 35, "cancelled": 5}
    charges = [e["order_id"] for e in sandbox.effects(kind="charge")]
    assert sorted(charges) == sorted(set(charges))  # never twice
    assert len(charges) == 35
    assert len(sandbox.effects(kind="shipment")) == 35
    assert _peak(sandbox) > 10  # the calls overlapped
    leftover = conn.execute(
        "SELECT count(*) AS n FROM outbox WHERE status = 'in_flight'"
    ).fetchone()["n"]
    assert leftover == 0
