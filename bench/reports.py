"""`orderflow bench seed` and `orderflow bench reports`: every reporting view timed on
a large synthetic history (1,000,000 orders by default), generated in the server
by INSERT ... SELECT generate_series in batches (no rows cross the network)."""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.common import QUERIES, emit, scratch_database
from orderflow.sql.db import connect
from orderflow.sql.reports import VIEWS, refresh

BATCH = 100_000


def seed(url: str, orders: int, start: int = 1) -> dict[str, int]:
    """Synthetic orders (ids S000…), their history, payments and finished outbox rows."""
    began = time.monotonic()
    with connect(url) as conn:
        for n0 in range(start, start + orders, BATCH):
            n1 = min(n0 + BATCH - 1, start + orders - 1)
            ids = {"first_id": "S" + str(n0).zfill(25), "last_id": "S" + str(n1).zfill(25)}
            with conn.transaction():
                conn.execute(QUERIES["bench_seed_orders"], {"n0": n0, "n1": n1})
                conn.execute(QUERIES["bench_seed_history"], ids)
                conn.execute(QUERIES["bench_seed_payments"], ids)
                conn.execute(QUERIES["bench_seed_outbox"], ids)
            conn.execute(QUERIES["bench_analyze"])  # keep plans right as the tables grow
            print(f"seeded orders {n0}..{n1} ({time.monotonic() - began:.0f} s)", flush=True)
        conn.execute(QUERIES["bench_vacuum"])
        counts = {
            name: int(str(conn.execute(QUERIES[f"bench_count_{name}"]).fetchone()["n"]))  # type: ignore[index]
            for name in ("orders", "order_history", "payments", "outbox")
        }
    print(f"seeded in {time.monotonic() - began:.0f} s: {counts}")
    return counts


def time_views(url: str, repeat: int = 3) -> dict[str, float]:
    timings: dict[str, float] = {}
    with connect(url) as conn:
        for view in VIEWS:
            runs = []
            for _ in range(repeat):
                started = time.perf_counter()
                rows = conn.execute(QUERIES[f"report_{view}"]).fetchall()
                runs.append((time.perf_counter() - started) * 1000)
            timings[view] = statistics.median(runs)
            print(f"{view:>16}: {timings[view]:9.1f} ms  ({len(rows)} rows, median of {repeat})")
    return timings


def refresh_all(url: str) -> dict[str, float]:
    """Refresh every snapshot; return how long each took (the worker's background cost)."""
    with connect(url) as conn:
        refresh(conn)
        rows = conn.execute(QUERIES["refresh_durations"]).fetchall()
    durations = {str(r["view"]): float(str(r["duration_ms"])) for r in rows}
    for view, ms in durations.items():
        print(f"refresh {view:>16}: {ms:9.1f} ms (background, by the worker)")
    return durations


def run(orders: int) -> dict[str, Any]:
    with scratch_database("orderflow_bench_reports") as url:
        counts = seed(url, orders)
        refreshes = refresh_all(url)
        timings = time_views(url)
    over = [v for v, ms in timings.items() if ms > 200]
    print(f"target: every view <= 200 ms; over: {', '.join(over) or 'none'}")
    return {
        **{f"{view}_ms": round(ms, 1) for view, ms in timings.items()},
        **{f"refresh_{view}_ms": round(ms, 1) for view, ms in refreshes.items()},
        "orders": counts["orders"],
        "history_rows": counts["order_history"],
    }


def main_reports(orders: int) -> int:
    emit(run(orders))
    return 0


def main_seed(url: str, orders: int) -> int:
    emit(seed(url, orders))
    return 0
