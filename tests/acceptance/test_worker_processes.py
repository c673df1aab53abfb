"""Real worker processes: SIGKILL and restart, two workers side by side, SIGTERM drain."""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.support.processes import (
    one_of_each,
    place_many,
    settle_and_check,
    start_worker,
    stop,
    wait_settled,
)
from tests.support.sandbox_client import check_invariants, states


def test_sigkill_mid_batch_then_restart(
    db_url: str, conn: Any, sandbox: Any, tmp_path: Path
) -> None:
    ids = place_many(conn, 40)
    sandbox.faults(
        {"endpoint": "charge", "mode": "latency", "latency_ms": 150},
        {"endpoint": "shipment", "mode": "latency", "latency_ms": 150},
    )
    first = start_worker(db_url, sandbox, tmp_path)
    deadline = time.monotonic() + 20
    # kill it mid-flight, after some effects (a hold is the first one, capture at shipment)
    while not sandbox.effects(kind="authorization"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    in_flight = conn.execute(
        "SELECT count(*) AS n FROM outbox WHERE status = 'in_flight'"
    ).fetchone()
    second = start_worker(db_url, sandbox, tmp_path)
    try:
        wait_settled(conn, ids, 90)
    finally:
        assert stop(second) == 0
    effects = sandbox.effects()
    one_of_each(effects, ids, conn)
    check_invariants(conn, effects)
    print(f"killed with {in_flight['n']} rows in flight")


def test_two_workers_on_500_orders(db_url: str, conn: Any, sandbox: Any, tmp_path: Path) -> None:
    ids = place_many(conn, 500)
    workers = [start_worker(db_url, sandbox, tmp_path, "--concurrency", "8") for _ in range(2)]
    settle_and_check(conn, ids, workers, sandbox, 180)
    final = Counter(states(conn).values())
    assert final == {"confirmed": 450, "cancelled": 50}


def test_sigterm_drains_cleanly(db_url: str, conn: Any, sandbox: Any, tmp_path: Path) -> None:
    ids = place_many(conn, 12)
    sandbox.faults({"endpoint": "charge", "mode": "latency", "latency_ms": 800})
    proc = start_worker(db_url, sandbox, tmp_path, "--concurrency", "4")
    deadline = time.monotonic() + 20
    while True:
        row = conn.execute("SELECT count(*) AS n FROM outbox WHERE status = 'in_flight'").fetchone()
        if row["n"] > 0:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    assert stop(proc, timeout=15) == 0
    assert time.monotonic() - started < 10
    left = conn.execute("SELECT count(*) AS n FROM outbox WHERE status = 'in_flight'").fetchone()
    assert left["n"] == 0  # finished or given back, never left leased
    sandbox.faults()
    again = start_worker(db_url, sandbox, tmp_path)
    try:
        wait_settled(conn, ids, 60)
    finally:
        assert stop(again) == 0
    one_of_each(sandbox.effects(), ids, conn)
