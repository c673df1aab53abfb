"""The relay's pause after a broker failure: it grows while the broker stays away and
starts small again once the broker confirms (an outage long ago must not make every
later hiccup a 30-second stall).  The broker here is a store in this process that
refuses its first connections; the real broker's behaviour is in
tests/acceptance/test_events_relay.py."""

from __future__ import annotations

import asyncio
from typing import Any

from orderflow.outbox_worker.brokers import BrokerUnavailable
from orderflow.outbox_worker.relay import MIN_BACKOFF_S, Relay
from tests.support.helpers import place


class RefusesAtFirst:
    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.stored: list[str] = []

    async def connect(self) -> None:
        if self.refusals:
            self.refusals -= 1
            raise BrokerUnavailable("connection refused")

    async def publish(self, event_id: str, event_type: str, body: bytes) -> None:
        self.stored.append(event_id)

    async def close(self) -> None:
        pass


def test_the_pause_starts_small_again_once_the_broker_confirms(db_url: str, conn: Any) -> None:
    orders = [place(conn) for _ in range(3)]
    broker = RefusesAtFirst(refusals=3)
    relay = Relay(db_url, broker, idle_s=0.1)
    seen_backoff: list[float] = []

    async def main() -> None:
        task = asyncio.create_task(relay.run())
        while len(broker.stored) < len(orders):
            seen_backoff.append(relay.backoff_s)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        relay.stop.set()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())
    ids = [r["id"] for r in conn.execute("SELECT id FROM order_events ORDER BY position")]
    assert broker.stored == ids
    assert max(seen_backoff) >= MIN_BACKOFF_S * 4  # the refusals doubled it
    assert relay.backoff_s == MIN_BACKOFF_S
