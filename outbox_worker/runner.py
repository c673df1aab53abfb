"""The worker daemon: claim, run concurrently, commit; LISTEN/NOTIFY wake-ups; housekeeping.

`Worker.run_once()` processes what is ready and returns how many rows it
handled; the daemon (`run_forever`) is a loop around the same pieces that keeps
`concurrency` calls in flight, wakes on NOTIFY (polling at most every second
as a fallback), heartbeats the leases of long calls and drains on SIGTERM.

The daemon runs its steps on one asyncio event loop by default (each row's
step in a greenlet, its provider calls awaited: outbox_worker.bridge), so
`concurrency` can be thousands of calls in flight on one thread; its database
work goes to a small thread pool.  With `asyncio_steps=False` each row takes a
thread instead (the design before; kept to compare and as a fallback).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from orderflow.outbox_worker.bridge import offload, run_bridged, wait_for
from orderflow.outbox_worker.core import (
    ClaimedRow,
    StaleLease,
    Success,
    WorkerConfig,
    batchable,
    call_step,
    claim,
    commit_blocked,
    commit_crash,
    commit_step,
    commit_successes,
    committed,
)
from orderflow.outbox_worker.outcomes import StepOutcome
from orderflow.outbox_worker.steps import ProviderCalls, StepSettings
from orderflow.sql import QUERIES
from orderflow.sql.reports import refresh
from orderflow.statemachine.definition import OrderState
from orderflow.statemachine.engine import advance
from orderflow.statemachine.errors import IllegalTransition

log = logging.getLogger("orderflow.worker")

# Rows claimed per statement by the asyncio daemon (it claims again at once
# while it has room): a claim stays short however many calls are in flight.
CLAIM_BATCH = 256


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(
        self,
        url: str,
        providers: ProviderCalls,
        *,
        concurrency: int = 4,
        lease_s: float = 30.0,
        poll_s: float = 1.0,
        backoff_scale: float = 1.0,
        housekeeping_s: float = 5.0,
        idempotency_retention_h: int = 72,
        report_refresh_s: float = 60.0,
        outbox_retention_days: int = 7,
        events_retention_h: int = 168,
        events_relayed: bool = False,
        owner: str | None = None,
        steps: StepSettings | None = None,
        connection_options: str = "",
        refresh_timeout_ms: int = 120_000,
        asyncio_steps: bool = False,
    ) -> None:
        self.url = url
        self.providers = providers
        self.concurrency = max(1, concurrency)
        self.poll_s = min(poll_s, 1.0)
        self.housekeeping_s = housekeeping_s
        self.idempotency_retention_h = idempotency_retention_h
        self.outbox_retention_days = outbox_retention_days
        self.events_retention_h = events_retention_h
        # With a broker, an event is purged only once the relay published it.
        self.events_relayed = events_relayed
        self.report_refresh_s = report_refresh_s
        self.refresh_timeout_ms = refresh_timeout_ms
        self.asyncio_steps = asyncio_steps
        # Database work of the steps (commits, checkpoints) when they run on the loop.
        self.db_threads = min(self.concurrency, 16)
        self.config = WorkerConfig(
            owner=owner or default_owner(),
            lease_s=lease_s,
            backoff_scale=backoff_scale,
            steps=steps or StepSettings(),
        )
        self.pool = ConnectionPool(
            url,
            min_size=1,
            # Step threads hold a connection only to commit one row alone; the
            # batched successes share the committer's.  Bounded: 128 calls in
            # flight must not mean 128 Postgres sessions.
            max_size=min(self.concurrency, 16) + 3,
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                **({"options": connection_options} if connection_options else {}),
            },
            open=True,
            name="orderflow-worker",
        )
        self.stop = threading.Event()
        self._wake = threading.Event()
        self._inflight: dict[int, ClaimedRow] = {}
        self._lock = threading.Lock()
        self._last_housekeeping = 0.0
        self._committer: Committer | None = None  # the daemon's; run_once commits per row
        self._loop: asyncio.AbstractEventLoop | None = None  # the asyncio daemon's
        self._loop_wake: asyncio.Event | None = None

    def close(self) -> None:
        self.pool.close()

    # ------------------------------------------------------------ one pass

    def run_once(self) -> int:
        """Expire due reservations, act on holds near expiry, then claim and process
        every ready row once."""
        self.expire_reservations()
        self.act_on_expiring_holds()
        with self.pool.connection() as conn:
            rows = claim(conn, self.config, self.concurrency)
        if not rows:
            return 0
        with ThreadPoolExecutor(self.concurrency) as executor:
            list(executor.map(self._process, rows))
        return len(rows)

    def _process(self, row: ClaimedRow) -> str:
        with self._lock:
            self._inflight[row.id] = row
        started = time.monotonic()
        outcome: StepOutcome | None = None
        try:
            # Holds no connection during the calls (a checkpoint borrows one briefly).
            outcome = call_step(row, self.providers, self.config, self.pool.connection)
            committer = self._committer
            if committer is not None and batchable(row, outcome):
                return committed(row, committer.submit(Success(row, outcome)), started)
            return offload(self._commit_alone, row, outcome, started)
        except StaleLease:
            return "stale"
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
            # A lock held past lock_timeout (an operator's open transaction, say):
            # the row backs off as unknown, and is not handed back at once, which
            # would call the provider again every lock_timeout while the lock stays.
            log.warning(
                "step blocked: %s",
                type(exc).__name__,
                extra={"order_id": row.order_id, "step": row.step},
            )
            try:
                memory = outcome.memory if outcome is not None else {}
                return offload(self._commit_blocked, row, type(exc).__name__, memory)
            except Exception:
                offload(self._release, row)
                return "crashed"
        except psycopg.OperationalError as exc:
            # The database went away: the row goes back at once, its outcome unknown
            # (the next attempt asks the provider first); if the database is gone
            # for good the lease expires instead.
            log.warning(
                "step crashed: the database is unavailable (%s)",
                type(exc).__name__,
                extra={"order_id": row.order_id, "step": row.step},
            )
            offload(self._release, row)
            return "crashed"
        except Exception as exc:
            log.exception("step crashed", extra={"order_id": row.order_id, "step": row.step})
            return offload(self._crashed, row, exc)
        finally:
            with self._lock:
                self._inflight.pop(row.id, None)
            if not self.asyncio_steps:  # a thread is free: claim for it (the loop's own below)
                self._signal()

    def _commit_alone(self, row: ClaimedRow, outcome: StepOutcome, started: float) -> str:
        with self.pool.connection() as conn:
            return commit_step(conn, row, outcome, self.config, started)

    def _commit_blocked(self, row: ClaimedRow, error: str, memory: dict[str, Any]) -> str:
        with self.pool.connection(timeout=1.0) as conn:
            return commit_blocked(conn, row, self.config, error, memory)

    def _signal(self) -> None:
        """Wake the daemon's loop (from a step, the listener or a signal handler)."""
        self._wake.set()
        loop, event = self._loop, self._loop_wake
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(event.set)

    def _release(self, row: ClaimedRow) -> None:
        with contextlib.suppress(Exception), self.pool.connection(timeout=1.0) as conn:
            conn.execute(
                QUERIES["release_outbox_rows"], {"ids": [row.id], "owner": self.config.owner}
            )

    def _crashed(self, row: ClaimedRow, exc: Exception) -> str:
        """Count the crash against the row (it backs off, then goes to an operator)."""
        try:
            with self.pool.connection() as conn:
                return commit_crash(conn, row, self.config, f"{type(exc).__name__}: {exc}")
        except Exception:
            log.exception("could not record the crash", extra={"order_id": row.order_id})
            return "crashed"  # the lease expires; the next claim counts it as lost

    # ------------------------------------------------------------ housekeeping

    def expire_reservations(self, limit: int = 100) -> int:
        """reservation_expired for reserved orders past their hold; payment racing it
        is settled by the order's row lock and the guarded UPDATE."""
        expired = 0
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            while True:
                with conn.transaction():
                    cur.execute(QUERIES["expired_reservations"], {"limit": limit})
                    ids = [r["id"] for r in cur.fetchall()]
                    for order_id in ids:
                        try:
                            advance(conn, order_id, "reservation_expired", {})
                            expired += 1
                        except IllegalTransition:
                            pass
                if len(ids) < limit:
                    return expired

    def act_on_expiring_holds(self, limit: int = 100) -> int:
        """A card hold close to its capture_before is never left to lapse: a shipped
        order's capture is made due now; an order not shipped yet goes to an
        operator (`hold_expiring`), who cancels it (only the customer can
        authorize again)."""
        acted = 0
        margin_s = self.config.steps.hold_margin_s
        after: tuple[Any, str] = ("-infinity", "")
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            while True:  # every due hold, a batch per transaction
                with conn.transaction():
                    cur.execute(
                        QUERIES["holds_near_expiry"],
                        {
                            "margin_s": margin_s,
                            "limit": limit,
                            "after_before": after[0],
                            "after_id": after[1],
                        },
                    )
                    rows = cur.fetchall()
                    for row in rows:
                        acted += self._act_on_hold(conn, row)
                if len(rows) < limit:
                    return acted
                after = (rows[-1]["capture_before"], rows[-1]["id"])

    def _act_on_hold(self, conn: psycopg.Connection[Any], row: dict[str, Any]) -> int:
        if row["state"] == OrderState.SHIPPED:
            return len(conn.execute(QUERIES["hurry_capture"], {"order_id": row["id"]}).fetchall())
        detail = {"capture_before": row["capture_before"].isoformat()}
        try:
            advance(conn, row["id"], "hold_expiring", detail)
        except IllegalTransition:
            return 0
        return 1

    def housekeeping(self) -> None:
        self.expire_reservations()
        self.act_on_expiring_holds()
        with self.pool.connection() as conn:
            conn.execute(
                QUERIES["purge_idempotency_keys"],
                {"hours": self.idempotency_retention_h, "limit": 1000},
            )
            conn.execute(
                QUERIES["purge_done_outbox"], {"days": self.outbox_retention_days, "limit": 1000}
            )
            conn.execute(
                QUERIES["purge_events"],
                {
                    "hours": self.events_retention_h,
                    "published_only": self.events_relayed,
                    "limit": 1000,
                },
            )
        with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            refresh(cur.connection, self.report_refresh_s, self.refresh_timeout_ms)
        self._last_housekeeping = time.monotonic()

    # ------------------------------------------------------------ the daemon

    def run_forever(self, grace_s: float = 10.0) -> None:
        if self.asyncio_steps:
            asyncio.run(self._run_forever_async(grace_s))
            return
        listener = threading.Thread(target=self._listen, name="listen", daemon=True)
        listener.start()
        heart = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        heart.start()
        futures: set[Future[str]] = set()
        self._committer = Committer(self.pool, self.config)
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="step") as executor:
            while not self.stop.is_set():
                if time.monotonic() - self._last_housekeeping > self.housekeeping_s:
                    self._guard(self.housekeeping)
                futures = {f for f in futures if not f.done()}
                free = self.concurrency - len(futures)
                rows: list[ClaimedRow] = []
                if free > 0:
                    rows = self._guard(lambda free=free: self._claim(free)) or []
                    for row in rows:
                        futures.add(executor.submit(self._process, row))
                if not rows or len(futures) >= self.concurrency:
                    self._wake.wait(self.poll_s)
                    self._wake.clear()
            self._drain(futures, grace_s)
        self._committer.close()  # every step thread is done: nothing more comes
        self._committer = None
        log.info("worker stopped", extra={"outcome": "stopped"})

    async def _run_forever_async(self, grace_s: float) -> None:
        """The daemon on one event loop: every claimed row's step is a task (a
        greenlet parked while its provider call is awaited); claims, housekeeping
        and commits run on the database thread pool."""
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(self.db_threads, thread_name_prefix="db"))
        self._loop, self._loop_wake = loop, asyncio.Event()
        threading.Thread(target=self._listen, name="listen", daemon=True).start()
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        self._committer = Committer(self.pool, self.config)
        tasks: set[asyncio.Task[str]] = set()

        def finished(task: asyncio.Task[str]) -> None:
            # A freed slot matters only to a loop waiting at capacity; new rows wake
            # it through NOTIFY.  (A claim per finished row was most of the claims,
            # each a round trip and a plan, nearly all of them empty.)
            full = len(tasks) >= self.concurrency
            tasks.discard(task)
            if full and self._loop_wake is not None:
                self._loop_wake.set()

        try:
            while not self.stop.is_set():
                if time.monotonic() - self._last_housekeeping > self.housekeeping_s:
                    await asyncio.to_thread(self._guard, self.housekeeping)
                free = self.concurrency - len(tasks)
                rows: list[ClaimedRow] = []
                if free > 0:
                    batch = min(free, CLAIM_BATCH)
                    claimed = await asyncio.to_thread(self._guard, lambda b=batch: self._claim(b))
                    rows = claimed or []
                    for row in rows:
                        task = asyncio.create_task(run_bridged(self._process, row))
                        tasks.add(task)
                        task.add_done_callback(finished)
                if not rows or len(tasks) >= self.concurrency:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._loop_wake.wait(), self.poll_s)
                    self._loop_wake.clear()
            if tasks:
                await asyncio.wait(set(tasks), timeout=grace_s)
            with self._lock:
                leftover = list(self._inflight)
            if leftover:  # still in flight after the grace: back to the claim, now
                await asyncio.to_thread(self._release_ids, leftover)
        finally:
            self._loop = self._loop_wake = None
            committer, self._committer = self._committer, None
            await asyncio.to_thread(committer.close)
            aclose = getattr(self.providers, "aclose", None)  # test doubles may have none
            if aclose is not None:
                await aclose()
        log.info("worker stopped", extra={"outcome": "stopped"})

    def _release_ids(self, ids: list[int]) -> None:
        with self.pool.connection() as conn:
            conn.execute(QUERIES["release_outbox_rows"], {"ids": ids, "owner": self.config.owner})

    def _claim(self, limit: int) -> list[ClaimedRow]:
        with self.pool.connection() as conn:
            return claim(conn, self.config, limit)

    def _guard(self, fn: Any) -> Any:
        try:
            return fn()
        except psycopg.Error as exc:
            log.warning("database error: %s", type(exc).__name__)
            time.sleep(self.poll_s)
            return None

    def _drain(self, futures: set[Future[str]], grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        for future in futures:
            # timed out or crashed: its row is released below
            with contextlib.suppress(Exception):
                future.result(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            leftover = list(self._inflight)
        if leftover:
            self._release_ids(leftover)

    def _listen(self) -> None:
        while not self.stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True) as conn:
                    conn.execute(QUERIES["listen_outbox"])
                    while not self.stop.is_set():
                        for _ in conn.notifies(timeout=self.poll_s, stop_after=1):
                            self._signal()
            except psycopg.Error:
                time.sleep(self.poll_s)

    def _heartbeat(self) -> None:
        interval = self.config.lease_s / 3
        while not self.stop.wait(interval):
            with self._lock:
                ids = list(self._inflight)
            if ids:
                self._guard(lambda ids=ids: self._extend(ids))

    def _extend(self, ids: list[int]) -> None:
        with self.pool.connection() as conn:
            conn.execute(
                QUERIES["extend_leases"],
                {"ids": ids, "owner": self.config.owner, "lease_s": self.config.lease_s},
            )

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            log.info("signal %s: draining", signum)
            self.stop.set()
            self._signal()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


class Committer:
    """Commits the daemon's successful steps in batches (group commit).

    Step threads hand over their success and wait; this thread takes whatever
    has queued up (up to `max_batch`) and commits it in one transaction, so
    under load many rows share one commit, and when idle a lone row commits at
    once.  A step thread's slot stays taken until its row is committed."""

    def __init__(
        self, pool: ConnectionPool, config: WorkerConfig, max_batch: int = 128, threads: int = 1
    ) -> None:
        self.pool = pool
        self.config = config
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Success, Future[str]]] = queue.SimpleQueue()
        self._closing = threading.Event()
        # Two, so one batch gathers while the other waits for its COMMIT to flush;
        # their orders never overlap (a row per order is in flight at most).
        self._threads = [
            threading.Thread(target=self._run, name=f"committer-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, item: Success) -> str:
        future: Future[str] = Future()
        self._queue.put((item, future))
        return wait_for(future)  # awaited on the loop when the step runs bridged

    def close(self) -> None:
        self._closing.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self) -> None:
        while True:
            try:
                batch = [self._queue.get(timeout=0.1)]
            except queue.Empty:
                if self._closing.is_set():
                    return
                continue
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            results: list[str | BaseException]
            try:
                with self.pool.connection() as conn:
                    results = commit_successes(conn, [item for item, _ in batch], self.config)
            except Exception as exc:  # the database is gone: every row's lease expires
                results = [exc] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
