"""`orderflow bench events`: the relay's events/s to NATS JetStream (a backlog drained),
then commit → publish latency at half that rate, beside `bench dispatch` in the same run.

Throughput: synthetic orders with their history are seeded (their events come from the
history trigger), then one relay drains them.  Latency: one history row per
transaction is committed on a fixed schedule at half the measured rate; a plain NATS
subscriber on the stream's subjects notes when each event arrives; latency = arrival minus
the committing client's return from COMMIT (one machine, one clock).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench.common import QUERIES, emit, pct_ms, scratch_database
from bench.reports import seed
from orderflow.outbox_worker.brokers import JetStreamPublisher
from orderflow.outbox_worker.relay import BATCH, Relay
from orderflow.sql import QUERIES as PRODUCTION_QUERIES
from orderflow.sql.db import connect

NATS = "nats://127.0.0.1:4222"
LATENCY_SECONDS = 5.0
MAX_TX_PER_S = 300


async def _drain(url: str, events_url: str, total: int) -> float:
    relay = Relay(url, JetStreamPublisher(events_url))
    task = asyncio.create_task(relay.run())
    started = time.perf_counter()
    while relay.published < total:
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    relay.stop.set()
    await task
    return elapsed


def _commit_notes(url: str, rate: float, count: int, per_tx: int) -> tuple[dict[str, float], float]:
    """`count` events, `per_tx` to a transaction (distinct orders), the transactions on
    a fixed schedule making `rate` events/s; each event's commit time and the rate
    achieved."""
    commits: dict[str, float] = {}
    with connect(url) as conn:
        ids = [r["id"] for r in conn.execute(QUERIES["bench_events_orders"])]
        chunks = [ids[i : i + per_tx] for i in range(0, len(ids) - per_tx + 1, per_tx)]
        started = time.perf_counter()
        for n in range(count // per_tx):
            time.sleep(max(0.0, started + n * per_tx / rate - time.perf_counter()))
            chunk = chunks[n % len(chunks)]
            with conn.transaction():
                conn.execute(QUERIES["bench_events_note"], {"order_ids": chunk})
                rows = conn.execute(
                    QUERIES["bench_events_last_sequences"], {"order_ids": chunk}
                ).fetchall()
            committed = time.time()
            for row in rows:
                commits[f"{row['order_id']}:{row['sequence']}"] = committed
        achieved = len(commits) / (time.perf_counter() - started)
    return commits, achieved


async def _latency(
    url: str, events_url: str, prefix: str, rate: float, count: int, per_tx: int
) -> tuple[list[float], float]:
    import nats

    arrivals: dict[str, float] = {}

    async def on_msg(msg: Any) -> None:
        data = json.loads(msg.data)["data"]
        arrivals[f"{data['order_id']}:{data['sequence']}"] = time.time()

    nc = await nats.connect(NATS)
    await nc.subscribe(f"{prefix}.orderflow.order.>", cb=on_msg)
    relay = Relay(url, JetStreamPublisher(events_url))
    task = asyncio.create_task(relay.run())
    await asyncio.sleep(1.0)  # the relay leads and listens
    commits, achieved = await asyncio.to_thread(_commit_notes, url, rate, count, per_tx)
    deadline = time.monotonic() + 30
    while any(k not in arrivals for k in commits) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    relay.stop.set()
    await task
    await nc.close()
    return [(arrivals[k] - commits[k]) * 1000 for k in commits if k in arrivals], achieved


async def _bare_publish(url: str, events_url: str) -> tuple[int, float]:
    """The ceiling: the same envelopes published straight from memory, a relay's batch
    at a time, with no database around them."""
    async with await psycopg.AsyncConnection.connect(url, row_factory=dict_row) as conn:
        rows = await (
            await conn.execute(PRODUCTION_QUERIES["unpublished_events"], {"limit": 10**9})
        ).fetchall()
    publisher = JetStreamPublisher(events_url)
    await publisher.connect()
    started = time.perf_counter()
    for i in range(0, len(rows), BATCH):
        await asyncio.gather(
            *(
                publisher.publish(r["id"], r["type"], r["envelope"].encode())
                for r in rows[i : i + BATCH]
            )
        )
    elapsed = time.perf_counter() - started
    await publisher.close()
    return len(rows), elapsed


async def _delete_stream(name: str) -> None:
    import nats

    nc = await nats.connect(NATS)
    await nc.jetstream().delete_stream(name)
    await nc.close()


def _stream_url(name: str) -> tuple[str, str, str]:
    tag = uuid.uuid4().hex[:8]
    stream, prefix = f"BENCH{name.upper()}{tag}", f"bench{name}{tag}"
    return stream, prefix, f"{NATS}?stream={stream}&prefix={prefix}"


def run(events: int, saga_orders: int) -> dict[str, Any]:
    stream, prefix, events_url = _stream_url("relay")
    ceiling_stream, _, ceiling_url = _stream_url("bare")
    with scratch_database("orderflow_bench_events") as url:
        # the seed writes a history of about five transitions per order
        seed(url, max(1, events // 5))
        with connect(url) as conn:
            total = int(conn.execute(QUERIES["bench_events_count"]).fetchone()["n"])  # type: ignore[index,arg-type]
        bare_n, bare_s = asyncio.run(_bare_publish(url, ceiling_url))
        bare_rate = bare_n / bare_s
        print(f"ceiling: the same {bare_n} envelopes straight to JetStream: {bare_rate:.0f}/s")
        elapsed = asyncio.run(_drain(url, events_url, total))
        rate = total / elapsed
        print(f"relayed a backlog of {total} events in {elapsed:.2f} s: {rate:.0f} events/s")
        target = rate / 2
        # one client commits a few hundred transactions a second here: at a higher
        # rate several events share a transaction (as in a bulk import)
        per_tx = max(1, math.ceil(target / MAX_TX_PER_S))
        count = per_tx * max(1, int(target * LATENCY_SECONDS) // per_tx)
        latencies, achieved = asyncio.run(_latency(url, events_url, prefix, target, count, per_tx))
        p50, p99 = pct_ms(latencies, 50), pct_ms(latencies, 99)
        print(
            f"commit → publish, {len(latencies)} of {count} events at {achieved:.0f}/s"
            f" (target {target:.0f}/s, {per_tx} a transaction): p50 {p50} ms, p99 {p99} ms"
        )
    asyncio.run(_delete_stream(stream))
    asyncio.run(_delete_stream(ceiling_stream))
    from bench import dispatch, saga

    beside = dispatch.run(2000, 64)
    print(f"beside: bench dispatch drains {beside['rows_per_s']} outbox rows/s")
    sagas: dict[str, float] = {}
    published = None
    if saga_orders:
        # bench saga without, then with, a relay publishing every transition's event
        saga_stream, _, saga_events_url = _stream_url("saga")
        for label, relay_url in (("without", None), ("with", saga_events_url)):
            result = saga.run(saga_orders, 1, 256, 1, backlog=True, relay_events_url=relay_url)
            sagas[label] = result["sagas_per_s"]
            published = result["events_published"] if relay_url else published
        asyncio.run(_delete_stream(saga_stream))
        print(
            f"bench saga --orders {saga_orders} --concurrency 256 --backlog-first:"
            f" {sagas['without']} sagas/s without a relay, {sagas['with']} with one"
            f" ({sagas['with'] / sagas['without']:.0%}), which published {published} events"
        )
    return {
        "events": total,
        "events_per_s": round(rate, 1),
        "latency_events": len(latencies),
        "latency_missing": count - len(latencies),
        "latency_target_per_s": round(target, 1),
        "latency_achieved_per_s": round(achieved, 1),
        "latency_events_per_transaction": per_tx,
        "commit_to_publish_p50_ms": p50,
        "commit_to_publish_p99_ms": p99,
        "bare_jetstream_per_s": round(bare_rate, 1),
        "ratio_to_bare_jetstream": round(rate / bare_rate, 3),
        "dispatch_rows_per_s": beside["rows_per_s"],
        "saga_orders": saga_orders,
        "sagas_per_s_without_relay": sagas.get("without"),
        "sagas_per_s_with_relay": sagas.get("with"),
        "saga_events_published": published,
        "saga_ratio_with_relay": (round(sagas["with"] / sagas["without"], 3) if sagas else None),
    }


def main(events: int, saga_orders: int) -> int:
    emit(run(events, saga_orders))
    return 0
