"""`orderflow relay` against the machine's real NATS JetStream: every event of every
order arrives, in order per order, each id once after dedup, through SIGKILLs and
a broker outage.  Skips, saying why, where no NATS with JetStream answers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.helpers import place
from tests.support.paths import PROJECT_ROOT
from tests.support.processes import add_stock
from tests.support.sandbox_client import drain
from tests.support.tcp_proxy import TcpProxy

nats = pytest.importorskip("nats")

NATS_HOST, NATS_PORT = "127.0.0.1", int(os.environ.get("ORDERFLOW_TEST_NATS_PORT", "4222"))


def _jetstream_answers() -> str | None:
    try:
        socket.create_connection((NATS_HOST, NATS_PORT), timeout=1).close()
    except OSError as exc:
        return f"no NATS on {NATS_HOST}:{NATS_PORT} ({exc})"

    async def probe() -> str | None:
        nc = await nats.connect(f"nats://{NATS_HOST}:{NATS_PORT}", connect_timeout=2)
        try:
            await nc.jetstream().account_info()
        except Exception as exc:
            return f"NATS on {NATS_HOST}:{NATS_PORT} has no JetStream ({exc!r})"
        finally:
            await nc.close()
        return None

    return asyncio.run(probe())


_why = _jetstream_answers()
pytestmark = pytest.mark.skipif(_why is not None, reason=_why or "")


class Stream:
    """A stream of the test's own (its own subjects), read back in full at the end."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:10]
        self.name = f"T{tag}"
        self.prefix = f"t{tag}"

    def url(self, port: int = NATS_PORT) -> str:
        return f"nats://{NATS_HOST}:{port}?stream={self.name}&prefix={self.prefix}"

    def create(self) -> None:
        async def go() -> None:
            nc = await nats.connect(f"nats://{NATS_HOST}:{NATS_PORT}")
            await nc.jetstream().add_stream(
                name=self.name, subjects=[f"{self.prefix}.orderflow.order.>"]
            )
            await nc.close()

        asyncio.run(go())

    def read_all(self) -> list[dict[str, Any]]:
        async def go() -> list[dict[str, Any]]:
            nc = await nats.connect(f"nats://{NATS_HOST}:{NATS_PORT}")
            js = nc.jetstream()
            info = await js.stream_info(self.name)
            got: list[dict[str, Any]] = []
            sub = await js.pull_subscribe(f"{self.prefix}.orderflow.order.>", stream=self.name)
            while len(got) < info.state.messages:
                for msg in await sub.fetch(500, timeout=5):
                    got.append({"subject": msg.subject, **json.loads(msg.data)})
                    await msg.ack()
            await nc.close()
            return got

        return asyncio.run(go())

    def delete(self) -> None:
        async def go() -> None:
            nc = await nats.connect(f"nats://{NATS_HOST}:{NATS_PORT}")
            try:
                await nc.jetstream().delete_stream(self.name)
            finally:
                await nc.close()

        asyncio.run(go())


class LiveConsumer:
    """A plain NATS subscriber on the stream's subjects, started before the orders."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.messages: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LiveConsumer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        async def go() -> None:
            self._stop = asyncio.Event()
            nc = await nats.connect(f"nats://{NATS_HOST}:{NATS_PORT}")

            async def on_message(msg: Any) -> None:
                self.messages.append(json.loads(msg.data))

            await nc.subscribe(f"{self.stream.prefix}.orderflow.order.>", cb=on_message)
            await nc.flush()
            self._ready.set()
            await self._stop.wait()
            await nc.close()

        self._loop.run_until_complete(go())


@pytest.fixture(autouse=True)
def plenty_of_mugs(conn: Any) -> None:
    add_stock(conn, "MUG-01", 100_000)


@pytest.fixture()
def stream() -> Iterator[Stream]:
    s = Stream()
    s.create()
    yield s
    s.delete()


def start_relay(db_url: str, events_url: str, log_dir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": db_url, "ORDERFLOW_EVENTS_URL": events_url}
    log_dir.mkdir(parents=True, exist_ok=True)
    log = (log_dir / f"relay-{time.time_ns()}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "orderflow.app.cli", "relay"],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def published(conn: Any) -> tuple[int, int]:
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE published_at IS NOT NULL) AS done, count(*) AS n"
        "  FROM order_events"
    ).fetchone()
    return int(row["done"]), int(row["n"])


def wait_all_published(conn: Any, timeout_s: float = 90) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        done, n = published(conn)
        if done == n:
            return n
        assert time.monotonic() < deadline, f"only {done} of {n} events published"
        time.sleep(0.1)


def check_in_order(conn: Any, messages: list[dict[str, Any]]) -> None:
    """Every stored event arrived; per order in sequence; each id once after dedup."""
    expected = {
        r["id"]: (r["order_id"], r["sequence"], r["type"])
        for r in conn.execute("SELECT id, order_id, sequence, type FROM order_events")
    }
    seen: set[str] = set()
    last: dict[str, int] = defaultdict(int)
    for m in messages:
        if m["id"] in seen:
            continue  # the consumer's dedup by id
        seen.add(m["id"])
        order_id, sequence, type_ = expected[m["id"]]
        assert m["subject"] == order_id and m["type"] == type_
        assert m["data"]["sequence"] == sequence
        assert sequence == last[order_id] + 1, f"{order_id}: {sequence} after {last[order_id]}"
        last[order_id] = sequence
    assert seen == set(expected), f"{len(set(expected) - seen)} events never arrived"


def test_a_consumer_gets_every_event_of_500_sagas_in_order(
    db_url: str, conn: Any, worker: Any, stream: Stream, tmp_path: Path
) -> None:
    relay = None
    try:
        with LiveConsumer(stream) as consumer:
            # half the sagas run before the relay starts: it finds a backlog with
            # several events per order in one batch; the other half run live
            ids = [place(conn).id for _ in range(250)]
            drain(worker, conn, timeout_s=300)
            relay = start_relay(db_url, stream.url(), tmp_path)
            ids += [place(conn).id for _ in range(250)]
            drain(worker, conn, timeout_s=300)
            total = wait_all_published(conn)
            deadline = time.monotonic() + 30
            while len({m["id"] for m in consumer.messages}) < total:
                assert time.monotonic() < deadline, "the live consumer missed events"
                time.sleep(0.1)
        assert total >= 500 * 5
        check_in_order(conn, consumer.messages)
        stored = stream.read_all()
        assert len(stored) == total, "the stream holds a duplicate"
        check_in_order(conn, [{**m, "subject": m["subject"]} for m in _as_events(stored)])
        assert {m["subject"] for m in consumer.messages} == set(ids)
    finally:
        if relay is not None:
            stop(relay)


def _as_events(stored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # the NATS subject is the type (with the test's prefix); the envelope's subject
    # is the order id
    return [{k: v for k, v in m.items()} | {"subject": m["data"]["order_id"]} for m in stored]


def test_sigkill_the_relay_20_times_loses_nothing(
    db_url: str, conn: Any, stream: Stream, tmp_path: Path
) -> None:
    stop_placing = threading.Event()

    def keep_placing() -> None:
        from orderflow.sql.db import connect

        with connect(db_url) as own:
            while not stop_placing.is_set():
                place(own)
                time.sleep(0.002)

    placer = threading.Thread(target=keep_placing, daemon=True)
    placer.start()
    kills = 0
    try:
        while kills < 20:
            relay = start_relay(db_url, stream.url(), tmp_path)
            before = published(conn)[0]
            deadline = time.monotonic() + 30
            while published(conn)[0] <= before:  # mid-stream: it has published some
                assert relay.poll() is None, "the relay died"
                assert time.monotonic() < deadline, "the relay published nothing"
                time.sleep(0.01)
            time.sleep(0.05 * (kills % 4))
            relay.send_signal(signal.SIGKILL)
            relay.wait()
            kills += 1
    finally:
        stop_placing.set()
        placer.join(10)
    relay = start_relay(db_url, stream.url(), tmp_path)
    try:
        total = wait_all_published(conn)
    finally:
        stop(relay)
    stored = _as_events(stream.read_all())
    counts = Counter(m["id"] for m in stored)
    # all within JetStream's 2-minute duplicate window: not even one copy is stored
    assert not [i for i, n in counts.items() if n > 1]
    assert len(stored) == total
    check_in_order(conn, stored)


def test_broker_outage_piles_up_then_everything_arrives_in_order(
    db_url: str, conn: Any, stream: Stream, tmp_path: Path
) -> None:
    with TcpProxy(NATS_HOST, NATS_PORT) as proxy:
        relay = start_relay(db_url, stream.url(proxy.port), tmp_path)
        try:
            first = [place(conn).id for _ in range(20)]
            wait_all_published(conn)
            proxy.cut()
            during = [place(conn).id for _ in range(200)]
            time.sleep(3)
            done, n = published(conn)
            assert n - done >= 150, "events were published while the broker was cut off"
            backlog = conn.execute("SELECT * FROM reporting.event_backlog").fetchone()
            assert backlog["pending"] == n - done
            assert backlog["oldest_pending_age"].total_seconds() > 2
            proxy.restore()
            total = wait_all_published(conn, timeout_s=120)
        finally:
            stop(relay)
    stored = _as_events(stream.read_all())
    assert len(stored) == total == len(first) + len(during)
    check_in_order(conn, stored)
