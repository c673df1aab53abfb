"""`orderflow relay`: publish order events from Postgres to the broker, at least once,
in order per order.

One relay leads at a time (a session advisory lock: a killed relay's lock goes
with its connection, and a standby takes over).  The leader reads the oldest
unpublished events, and publishes them in rounds: round k sends the k-th pending
event of every order in the batch, concurrently across orders, and only orders
whose previous event the broker confirmed take part in the next round, so an
order's event n+1 is never sent before event n is stored.  Confirmed events are
marked published; a crash between the broker's confirm and the mark re-sends
them, and the broker's deduplication by event id drops the copy.  With the
broker down, events pile up in Postgres and the relay backs off and resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections import defaultdict
from typing import Any

import psycopg
from psycopg.rows import dict_row

from orderflow.outbox_worker.brokers import BrokerUnavailable, Publisher, publisher_for
from orderflow.sql import QUERIES

log = logging.getLogger("orderflow.relay")

EVENTS_CHANNEL = "orderflow_events"
MIN_BACKOFF_S = 0.1
BATCH = 500  # events read and published per round-trip


def publish_rounds(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The batch as rounds: round k holds each order's k-th event (by sequence)."""
    by_order: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in sorted(rows, key=lambda r: (r["order_id"], r["sequence"])):
        by_order[row["order_id"]].append(row)
    depth = max((len(v) for v in by_order.values()), default=0)
    return [[v[k] for v in by_order.values() if len(v) > k] for k in range(depth)]


class Relay:
    def __init__(
        self,
        db_url: str,
        publisher: Publisher,
        *,
        batch: int = BATCH,
        idle_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.db_url = db_url
        self.publisher = publisher
        self.batch = batch
        self.idle_s = idle_s
        self.max_backoff_s = max_backoff_s
        self.stop = asyncio.Event()
        self.published = 0
        # the next pause after a failure; back to the minimum once the broker confirms
        self.backoff_s = MIN_BACKOFF_S

    async def run(self) -> None:
        """Lead (or wait to), then relay until stopped; the database or the broker
        going away only pauses it."""
        while not self.stop.is_set():
            try:
                await self._lead_and_relay()
            except (BrokerUnavailable, psycopg.OperationalError) as exc:
                pause = self.backoff_s * (0.5 + random.random())
                log.warning("relay paused: %s (again in %.1f s)", exc, pause)
                await self._sleep(pause)
                self.backoff_s = min(self.backoff_s * 2, self.max_backoff_s)
            finally:
                await self.publisher.close()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    async def _lead_and_relay(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            self.db_url, autocommit=True, row_factory=dict_row
        ) as conn:
            while not self.stop.is_set():
                row = await (await conn.execute(QUERIES["relay_try_lead"])).fetchone()
                if row and row["leading"]:
                    break
                await self._sleep(1.0)  # a standby: another relay leads
            if self.stop.is_set():
                return
            await conn.execute(QUERIES["listen_events"])
            await self.publisher.connect()
            log.info("relay leading")
            while not self.stop.is_set():
                sent = await self.relay_once(conn)
                if sent < self.batch:
                    await self._wait_for_events(conn)

    async def _wait_for_events(self, conn: psycopg.AsyncConnection[Any]) -> None:
        gen = conn.notifies(timeout=self.idle_s, stop_after=1)
        async for _ in gen:
            pass

    async def relay_once(self, conn: psycopg.AsyncConnection[Any]) -> int:
        """Publish one batch; the number of events the broker confirmed."""
        rows = await (
            await conn.execute(QUERIES["unpublished_events"], {"limit": self.batch})
        ).fetchall()
        if not rows:
            return 0
        confirmed: list[int] = []
        blocked: set[str] = set()
        failure: BaseException | None = None
        for round_rows in publish_rounds(rows):
            sending = [r for r in round_rows if r["order_id"] not in blocked]
            results = await asyncio.gather(
                *(
                    self.publisher.publish(r["id"], r["type"], r["envelope"].encode())
                    for r in sending
                ),
                return_exceptions=True,
            )
            for r, result in zip(sending, results, strict=True):
                if isinstance(result, BaseException):
                    blocked.add(r["order_id"])
                    failure = result
                else:
                    confirmed.append(r["position"])
        if confirmed:
            await conn.execute(QUERIES["mark_events_published"], {"positions": confirmed})
            self.published += len(confirmed)
            self.backoff_s = MIN_BACKOFF_S
        if failure is not None:
            raise (
                failure
                if isinstance(failure, BrokerUnavailable)
                else BrokerUnavailable(repr(failure))
            )
        return len(confirmed)


def run_relay(db_url: str, events_url: str) -> None:
    """The `orderflow relay` command: relay until SIGTERM or SIGINT."""
    relay = Relay(db_url, publisher_for(events_url))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, relay.stop.set)
        started = time.monotonic()
        await relay.run()
        log.info(
            "relay stopped: %d events published in %.0f s",
            relay.published,
            time.monotonic() - started,
        )

    asyncio.run(main())
