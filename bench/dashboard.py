"""`orderflow bench dashboard`: the dashboard's pages timed over HTTP on a large history.

A scratch database gets N synthetic orders (as `bench reports` loads them) with
their history and outbox rows, some parked in needs_attention with a dead
letter; the snapshots are refreshed as a worker would; then each page is
fetched through uvicorn, the same way a browser does, and timed.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import httpx

from bench.common import QUERIES, emit, scratch_database
from bench.reports import refresh_all, seed
from orderflow.app.serving import free_port, serve
from orderflow.dashboard.security import Access
from orderflow.dashboard.web import create_dashboard
from orderflow.sql.db import connect

TARGET_MS = 200.0


def _time(http: httpx.Client, path: str, repeat: int) -> list[float]:
    http.get(path).raise_for_status()  # warm: prepared statements, caches
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = http.get(path)
        runs.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return runs


def run(orders: int, dead_letters: int, repeat: int) -> dict[str, Any]:
    with scratch_database("orderflow_bench_dashboard") as url:
        counts = seed(url, orders)
        with connect(url) as conn:
            conn.execute(QUERIES["bench_seed_dead_letters"], {"n": dead_letters})
            sample = conn.execute(QUERIES["bench_sample_order"], {"offset": orders // 2}).fetchone()
        assert sample is not None
        refresh_all(url)
        port = free_port()
        access, _ = Access.for_bind("127.0.0.1", port, password=None, secret=None)
        pages = {
            "overview": "/",
            "overview_live": "/overview/live",
            "order_page": f"/orders/{sample['id']}",
            "search_order_id": f"/orders?q={sample['id']}",
            "search_user_id": f"/orders?q={sample['user_id']}",
            "search_idempotency_key": f"/orders?q={sample['idempotency_key']}",
        }
        timings: dict[str, list[float]] = {}
        with (
            serve(create_dashboard(url, access), port) as base,
            httpx.Client(base_url=base, timeout=30, follow_redirects=True) as http,
        ):
            for name, path in pages.items():
                timings[name] = _time(http, path, repeat)
    result: dict[str, Any] = {"orders": counts["orders"], "dead_letters": dead_letters}
    for name, runs in timings.items():
        p50, worst = statistics.median(runs), max(runs)
        print(f"{name:>24}: p50 {p50:7.1f} ms   max {worst:7.1f} ms   ({repeat} requests)")
        result[f"{name}_p50_ms"] = round(p50, 1)
        result[f"{name}_max_ms"] = round(worst, 1)
    over = [n for n, runs in timings.items() if statistics.median(runs) > TARGET_MS]
    print(f"target: every page p50 <= {TARGET_MS:.0f} ms; over: {', '.join(over) or 'none'}")
    return result


def main(orders: int, dead_letters: int, repeat: int) -> int:
    emit(run(orders, dead_letters, repeat))
    return 0
