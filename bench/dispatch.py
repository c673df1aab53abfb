"""`orderflow bench dispatch`: how fast one worker process drains ready outbox rows.

N orders are placed through the real create path and moved to `paid` with a
`ship_order` row each, held back; then one worker process with no-op
providers (no HTTP, no provider latency) is started and the rows released.
Each `ship_order` row still runs the whole commit path: the guarded row
update, the shipment row, the state transition with its history and the next
outbox row (`send_confirmation`), which the worker then drains too.  The
figure is rows finished per second, first claim to last finish (database
clocks).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from typing import Any

from bench.common import (
    CHECKOUT,
    QUERIES,
    count_statements,
    cpu_seconds,
    emit,
    peak_rss_mb,
    print_top_statements,
    scratch_database,
    statements_since_reset,
)
from orderflow.outbox_worker.providers import Ok, Reply
from orderflow.services.orders import LineRequest
from orderflow.services.service import create_order
from orderflow.sql.db import connect

ADDRESS = {"name": "B", "line1": "1 Bench St", "city": "Berlin", "postal_code": "10115",
           "country": "DE"}  # fmt: skip


class _NoopStripe:
    def create_intent(self, params: Mapping[str, Any], key: str) -> Reply:
        return Ok({"id": f"pi_{key}", "status": "requires_confirmation", "amount": 1})

    def confirm_intent(self, intent_id: str, params: Mapping[str, Any], key: str) -> Reply:
        return Ok({"id": intent_id, "status": "succeeded", "amount": 1, "amount_received": 1})

    def retrieve_intent(self, intent_id: str) -> Reply:
        return self.confirm_intent(intent_id, {}, "")

    def cancel_intent(self, intent_id: str, key: str) -> Reply:
        return Ok({"id": intent_id, "status": "canceled", "amount": 1})

    def capture_intent(self, intent_id: str, key: str) -> Reply:
        return Ok({"id": intent_id, "status": "succeeded", "amount": 1, "amount_received": 1})

    def search_intents(self, order_id: str) -> Reply:
        return Ok({"data": []})

    def list_intents(self, created_gte: int, starting_after: str | None = None) -> Reply:
        return Ok({"data": [], "has_more": False})

    def create_refund(self, params: Mapping[str, Any], key: str) -> Reply:
        return Ok({"id": f"re_{key}", "status": "succeeded", "amount": 1})

    def retrieve_refund(self, refund_id: str) -> Reply:
        return Ok({"id": refund_id, "status": "succeeded", "amount": 1})

    def list_refunds(self, intent_id: str) -> Reply:
        return Ok({"data": []})


class _NoopCarrier:
    def create_shipment(self, body: Mapping[str, Any], key: str) -> Reply:
        return Ok({"id": f"shp_{key}", "tracking_number": "T0"})

    def find_shipments(self, order_id: str) -> Reply:
        return Ok({"data": []})

    def retrieve_shipment(self, shipment_id: str) -> Reply:
        return Ok({"id": shipment_id, "status": "created"})

    def cancel_shipment(self, shipment_id: str, key: str) -> Reply:
        return Ok({"id": shipment_id, "status": "cancelled"})

    def create_return(self, body: Mapping[str, Any], key: str) -> Reply:
        return Ok({"id": f"ret_{key}"})

    def find_returns(self, order_id: str) -> Reply:
        return Ok({"data": []})


class _NoopEmail:
    def send(self, body: Mapping[str, Any], key: str) -> Reply:
        return Ok({"id": f"msg_{key}"})

    def find_messages(self, key: str) -> Reply:
        return Ok({"data": []})


class NoopProviders:
    """Every provider call succeeds at once (the ProviderCalls protocol)."""

    stripe = _NoopStripe()
    carrier = _NoopCarrier()
    email = _NoopEmail()


def worker_main(url: str, concurrency: int, asyncio_steps: bool = True) -> None:
    """The worker process: the real Worker loop with no-op providers (the asyncio
    daemon, as `orderflow worker` runs, or the threaded one)."""
    from orderflow.outbox_worker.runner import Worker

    worker = Worker(
        url,
        NoopProviders(),
        concurrency=concurrency,
        housekeeping_s=3600,
        asyncio_steps=asyncio_steps,
    )
    worker.install_signal_handlers()
    try:
        worker.run_forever(grace_s=5)
    finally:
        worker.close()


def _seed(url: str, rows: int) -> None:
    with connect(url) as conn:
        conn.execute(QUERIES["bench_restock"], {"extra": rows})
        for i in range(rows):
            create_order(
                conn,
                user_id=uuid.uuid4(),
                lines=[LineRequest("NOTE-A5", 1)],
                shipping_address=ADDRESS,
                email=None,
                payment_method_id="pm_card_visa",
                idempotency_key=f"dispatch-{i}",
                ttl_seconds=3600,
            )
        conn.execute(QUERIES["bench_dispatch_ready"])
        conn.execute("VACUUM ANALYZE outbox")
        conn.execute("VACUUM ANALYZE orders")


def run(
    rows: int, concurrency: int, preload: int = 0, backlog: int = 0, threads: bool = False
) -> dict[str, Any]:
    with scratch_database("orderflow_bench_dispatch") as url:
        if preload:  # finished orders with their history and outbox rows, for the flat-cost run
            from bench.reports import seed

            seed(url, preload)
        with connect(url) as conn:
            mark = conn.execute(QUERIES["bench_max_outbox_id"]).fetchone()["id"]  # type: ignore[index]
        if backlog:  # rows due before the measured ones once released, drained in the same mix
            with connect(url) as conn:
                conn.execute(QUERIES["bench_seed_backlog"], {"n": backlog})
                conn.execute("VACUUM ANALYZE outbox")
        _seed(url, rows)
        proc = subprocess.Popen(
            [sys.executable, "-c",
             f"from bench.dispatch import worker_main;"
             f" worker_main({url!r}, {concurrency}, asyncio_steps={not threads})"],
            cwd=CHECKOUT,
        )  # fmt: skip
        try:
            time.sleep(2.0)  # imports and the first claim (of nothing) before the clock runs
            counting = count_statements(url)
            with connect(url) as conn:
                machine_cpu0, worker_cpu0 = cpu_seconds(), cpu_seconds(proc.pid)
                conn.execute(QUERIES["bench_dispatch_release"])
                deadline = time.monotonic() + 600
                while True:
                    # The first 2 x rows finishes (any row: with a backlog, mostly its
                    # own, while the rest of it still waits in the table).
                    done: dict[str, Any] | None = conn.execute(
                        QUERIES["bench_dispatch_window"], {"after_id": mark, "n": 2 * rows}
                    ).fetchone()
                    assert done is not None
                    if done["seconds"] is not None:
                        break
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"only {done['rows']} of {2 * rows} rows finished")
                    time.sleep(0.2)
            machine_cpu1, worker_cpu1 = cpu_seconds(), cpu_seconds(proc.pid)
            worker_rss_mb = peak_rss_mb(proc.pid)
            statements = statements_since_reset(url, 2 * rows) if counting else {}
        finally:
            proc.terminate()
            proc.wait(30)
    seconds = float(str(done["seconds"]))
    finished = 2 * rows
    cpu: dict[str, float | None] = {"worker_cpu_ms_per_row": None, "other_cpu_ms_per_row": None}
    if None not in (machine_cpu0, machine_cpu1, worker_cpu0, worker_cpu1):
        worker_cpu = worker_cpu1 - worker_cpu0  # type: ignore[operator]
        machine_cpu = machine_cpu1 - machine_cpu0  # type: ignore[operator]
        cpu = {
            "worker_cpu_ms_per_row": round(worker_cpu * 1000 / finished, 3),
            # Postgres, mostly (this process only polls every 200 ms)
            "other_cpu_ms_per_row": round((machine_cpu - worker_cpu) * 1000 / finished, 3),
        }
    return {
        "preloaded_orders": preload,
        "ready_backlog": backlog,
        **cpu,
        "rows": finished,
        "concurrency": concurrency,
        "daemon": "threads" if threads else "asyncio",
        "seconds": round(seconds, 3),
        "rows_per_s": round(finished / seconds, 1),
        "worker_peak_rss_mb": worker_rss_mb,
        # pg_stat_statements where the server preloads it (the bench's polls, 5/s, included)
        "statements_per_row": statements.get("statements_per_unit"),
        "begin_commit_per_row": statements.get("transaction_controls_per_unit"),
        "top_statements": statements.get("top_statements"),
    }


def main(
    rows: int,
    concurrency: int,
    preload: int = 0,
    backlog: int = 0,
    threads: bool = False,
    peers: bool = False,
) -> int:
    result = run(rows, concurrency, preload, backlog, threads)
    behind = f", {backlog:,} more ready rows in the table" if backlog else ""
    print(
        f"one worker ({result['daemon']}) x {concurrency} drained {result['rows']} rows"
        f" (ship_order and send_confirmation, no-op providers{behind}) in {result['seconds']} s:"
        f" {result['rows_per_s']} rows/s; worker peak RSS {result['worker_peak_rss_mb']} MB;"
        f" CPU per row: worker {result['worker_cpu_ms_per_row']} ms, the rest (Postgres)"
        f" {result['other_cpu_ms_per_row']} ms"
    )
    print_top_statements(result["top_statements"], "row")
    if peers:  # the same number of jobs through pgqueuer, right after, on the same server
        from bench.peers import pgqueuer_drain

        for driver in ("psy", "apg"):
            peer = pgqueuer_drain(result["rows"], driver)
            result[f"pgqueuer_{driver}_jobs_per_s"] = peer["jobs_per_s"]
            result[f"ratio_to_pgqueuer_{driver}"] = round(
                result["rows_per_s"] / peer["jobs_per_s"], 3
            )
            print(
                f"pgqueuer {peer['pgqueuer_version']} ({driver}, {peer['dequeuers']} dequeuers x"
                f" batch {peer['batch_size']}) drained {peer['jobs']} no-op jobs:"
                f" {peer['jobs_per_s']} jobs/s; ours {result[f'ratio_to_pgqueuer_{driver}']}x that"
            )
    emit(result)
    return 0
