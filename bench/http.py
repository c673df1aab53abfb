"""`orderflow bench http`: POST /v1/orders against a bare INSERT endpoint, same server, same run.

Both endpoints run in one uvicorn process on the same connection pool; a
separate load-generating process drives each for the same time at the same
concurrency.  Orders use fresh carts (made beforehand with COPY) and fresh keys.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from ulid import ULID

from bench.common import CHECKOUT, QUERIES, emit, pct_ms, peak_rss_mb, scratch_database
from bench.loadgen import Phase, drive
from orderflow.app.auth import mint_token
from orderflow.app.serving import free_port, wait_until_up
from orderflow.sql.db import connect

SECRET = "bench-secret-bench-secret-bench-secret!"
ADDRESS = {
    "name": "B",
    "line1": "1 Bench St",
    "city": "Paris",
    "postal_code": "75001",
    "country": "FR",
}


BENCH_SKUS = 1000  # spread the load: one hot SKU would measure its row lock, not the API


def _make_carts(url: str, users: list[uuid.UUID], per_user: int) -> dict[uuid.UUID, list[str]]:
    carts: dict[uuid.UUID, list[str]] = {u: [str(ULID()) for _ in range(per_user)] for u in users}
    address = json.dumps(ADDRESS)
    cart_rows, line_rows, products = io.StringIO(), io.StringIO(), io.StringIO()
    for n in range(BENCH_SKUS):
        products.write(f"BENCH-{n:04d}\tbench item {n}\t{100 + n}\tEUR\t0\n")
    k = 0
    for user, ids in carts.items():
        for cart_id in ids:
            cart_rows.write(f"{cart_id}\t{user}\t{address}\n")
            line_rows.write(f"{cart_id}\tBENCH-{k % BENCH_SKUS:04d}\t1\n")
            line_rows.write(f"{cart_id}\tBENCH-{(k * 7 + 3) % BENCH_SKUS:04d}\t2\n")
            k += 1
    with connect(url) as conn, conn.transaction(), conn.cursor() as cur:
        with cur.copy(
            "COPY products (sku, name, price_cents, currency, available) FROM STDIN"
        ) as copy:
            copy.write(products.getvalue())
        with cur.copy("COPY carts (id, user_id, shipping_address) FROM STDIN") as copy:
            copy.write(cart_rows.getvalue())
        with cur.copy("COPY cart_lines (cart_id, sku, qty) FROM STDIN") as copy:
            copy.write(line_rows.getvalue())
        cur.execute(QUERIES["bench_restock"], {"extra": 100_000_000})
        cur.execute(QUERIES["bench_create_table"])
    with connect(url) as conn:
        conn.execute(QUERIES["bench_analyze"])  # fresh statistics, as autovacuum would give
    return carts


def run(seconds: float = 10.0, concurrency: int = 16, workers: int = 1) -> dict[str, Any]:
    with scratch_database("orderflow_bench_http") as url:
        users = [uuid.uuid4() for _ in range(concurrency)]
        carts = _make_carts(url, users, per_user=int(seconds * 400) + 200)
        tokens = [mint_token(u, secret=SECRET, audience="orderflow", ttl_s=3600) for u in users]
        port = free_port()
        env = {**os.environ, "JWT_SECRET": SECRET, "JWT_AUDIENCE": "orderflow"}
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.http_server",
                "--db-url",
                url,
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            env=env,
            cwd=CHECKOUT,  # bench/ is importable from the checkout only
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(f"{base}/healthz")
            bare = Phase("bare INSERT")

            def insert(n: int, i: int) -> tuple[str, str, dict[str, str], Any]:
                return "POST", "/_bench/insert", {}, {"n": n, "i": i}

            asyncio.run(drive(bare, "127.0.0.1", port, concurrency, seconds, insert))

            orders = Phase("POST /v1/orders")

            def place(n: int, i: int) -> tuple[str, str, dict[str, str], Any]:
                headers = {"Authorization": f"Bearer {tokens[n]}", "Idempotency-Key": f"b-{n}-{i}"}
                body = {"cart_id": carts[users[n]][i], "payment_method_id": "pm_card_visa"}
                return "POST", "/v1/orders", headers, body

            asyncio.run(drive(orders, "127.0.0.1", port, concurrency, seconds, place))
            api_rss_mb = _peak_rss_of_tree(server.pid)
        finally:
            server.terminate()
            server.wait(10)
    for phase in (bare, orders):
        p50, p99 = pct_ms(phase.latencies_ms, 50), pct_ms(phase.latencies_ms, 99)
        print(
            f"{phase.name:>18}: {phase.rate:8.1f} req/s   p50 {p50} ms   p99 {p99} ms"
            f"   errors {phase.errors or 0}"
        )
    ratio = orders.rate / bare.rate if bare.rate else 0.0
    setup = f"concurrency {concurrency}, {seconds:g} s each, {workers} API process(es)"
    print(f"ratio orders/bare: {ratio:.2f} (target >= 0.5), {setup}")
    print(f"API process peak RSS: {api_rss_mb} MB (target <= 150)")
    return {
        "orders_per_s": round(orders.rate, 1),
        "p50_ms": pct_ms(orders.latencies_ms, 50),
        "p99_ms": pct_ms(orders.latencies_ms, 99),
        "bare_insert_per_s": round(bare.rate, 1),
        "bare_p50_ms": pct_ms(bare.latencies_ms, 50),
        "bare_p99_ms": pct_ms(bare.latencies_ms, 99),
        "ratio": round(ratio, 3),
        "concurrency": concurrency,
        "api_workers": workers,
        "seconds": seconds,
        "errors": sum(orders.errors.values()) + sum(bare.errors.values()),
        "api_peak_rss_mb": api_rss_mb,
    }


def _peak_rss_of_tree(pid: int) -> float | None:
    """The largest peak RSS of the server and its worker processes (uvicorn --workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    pids = [pid, *(int(c) for c in children.read_text().split())] if children.exists() else [pid]
    peaks = [r for r in (peak_rss_mb(p) for p in pids) if r is not None]
    return max(peaks, default=None)


def main(seconds: float, concurrency: int, workers: int = 1) -> int:
    emit(run(seconds, concurrency, workers))
    return 0
