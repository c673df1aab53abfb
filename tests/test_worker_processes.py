"""Real worker processes: SIGKILL and restart, two workers side by side, SIGTERM drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from orderflow import PROJECT_ROOT
from orderflow.orders import LineRequest, create_order
from tests.helpers import ADDRESS
from tests.sandbox_client import SETTLED, check_invariants, states

LOG_DIR = Path(tempfile.gettempdir()) / "orderflow-test-workers"


def _start_worker(db_url: str, sandbox: Any, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": db_url, **sandbox.env()}
    env.pop("ORDERFLOW_FAILPOINTS", None)
    LOG_DIR.mkdir(exist_ok=True)
    # The worker logs a JSON line per step: a file, never a pipe nobody drains.
    log = (LOG_DIR / f"worker-{time.time_ns()}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "orderflow.cli", "worker", "--lease", "2", "--grace", "5", *extra],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )


def _stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def _place_many(conn: psycopg.Connection[Any], n: int, sku: str = "NOTE-A5") -> list[str]:
    conn.execute("UPDATE products SET available = available + %s WHERE sku = %s", (n * 2, sku))
    conn.execute(
        "INSERT INTO stock_ledger (sku, kind, delta) VALUES (%s, 'adjust', %s)", (sku, n * 2)
    )
    import uuid

    return [
        create_order(
            conn,
            user_id=uuid.uuid4(),
            lines=[LineRequest(sku, 1)],
            shipping_address=ADDRESS,
            email="buyer@example.com",
            payment_method_id="pm_card_chargeDeclined" if i % 10 == 9 else "pm_card_visa",
            idempotency_key=f"k-{i}",
            ttl_seconds=900,
        ).id
        for i in range(n)
    ]


def _wait_settled(conn: psycopg.Connection[Any], ids: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        current = states(conn)
        waiting = [i for i in ids if current[i] not in SETTLED]
        if not waiting:
            return
        assert time.monotonic() < deadline, f"{len(waiting)} orders not settled: {waiting[:3]}"
        time.sleep(0.1)


def _one_of_each(effects: list[dict[str, Any]], ids: list[str], conn: Any) -> None:
    per_order = Counter((e["order_id"], e["kind"]) for e in effects)
    assert all(n == 1 for n in per_order.values()), [k for k, n in per_order.items() if n > 1]
    final = states(conn)
    for order_id in ids:
        if final[order_id] == "confirmed":
            assert per_order[(order_id, "charge")] == 1
            assert per_order[(order_id, "shipment")] == 1
            assert per_order[(order_id, "email")] == 1
        else:
            assert final[order_id] == "cancelled"
            assert per_order[(order_id, "charge")] == 0


def test_sigkill_mid_batch_then_restart(db_url: str, conn: Any, sandbox: Any) -> None:
    ids = _place_many(conn, 40)
    sandbox.faults(
        {"endpoint": "charge", "mode": "latency", "latency_ms": 150},
        {"endpoint": "shipment", "mode": "latency", "latency_ms": 150},
    )
    first = _start_worker(db_url, sandbox)
    deadline = time.monotonic() + 20
    while not sandbox.effects(kind="charge"):  # kill it mid-flight, after some effects
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    in_flight = conn.execute(
        "SELECT count(*) AS n FROM outbox WHERE status = 'in_flight'"
    ).fetchone()
    second = _start_worker(db_url, sandbox)
    try:
        _wait_settled(conn, ids, 90)
    finally:
        assert _stop(second) == 0
    effects = sandbox.effects()
    _one_of_each(effects, ids, conn)
    check_invariants(conn, effects)
    print(f"killed with {in_flight['n']} rows in flight")


def test_two_workers_on_500_orders(db_url: str, conn: Any, sandbox: Any) -> None:
    ids = _place_many(conn, 500)
    workers = [_start_worker(db_url, sandbox, "--concurrency", "8") for _ in range(2)]
    try:
        _wait_settled(conn, ids, 180)
    finally:
        codes = [_stop(w) for w in workers]
    assert codes == [0, 0]
    effects = sandbox.effects()
    _one_of_each(effects, ids, conn)
    check_invariants(conn, effects)
    final = Counter(states(conn).values())
    assert final == {"confirmed": 450, "cancelled": 50}


def test_sigterm_drains_cleanly(db_url: str, conn: Any, sandbox: Any) -> None:
    ids = _place_many(conn, 12)
    sandbox.faults({"endpoint": "charge", "mode": "latency", "latency_ms": 800})
    proc = _start_worker(db_url, sandbox, "--concurrency", "4")
    deadline = time.monotonic() + 20
    while True:
        row = conn.execute("SELECT count(*) AS n FROM outbox WHERE status = 'in_flight'").fetchone()
        if row["n"] > 0:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    started = time.monotonic()
    assert _stop(proc, timeout=15) == 0
    assert time.monotonic() - started < 10
    left = conn.execute("SELECT count(*) AS n FROM outbox WHERE status = 'in_flight'").fetchone()
    assert left["n"] == 0  # finished or given back, never left leased
    sandbox.faults()
    again = _start_worker(db_url, sandbox)
    try:
        _wait_settled(conn, ids, 60)
    finally:
        assert _stop(again) == 0
    _one_of_each(sandbox.effects(), ids, conn)
