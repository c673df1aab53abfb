"""The database gauges of /metrics: outbox rows and their age by step and status,
card holds not captured yet, order events not yet published, read at most once a
second from the process's own pool."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from orderflow.metrics import REGISTRY
from orderflow.sql import QUERIES


class DatabaseGauges(Collector):
    """Orders by state and the outbox backlog, read from the database at most every ttl_s."""

    def __init__(self, connect: Callable[[], Any], ttl_s: float = 5.0) -> None:
        self._connect = connect
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._at = 0.0
        self._orders: list[dict[str, Any]] = []
        self._outbox: list[dict[str, Any]] = []
        self._holds: list[dict[str, Any]] = []
        self._events: dict[str, Any] = {"pending": 0, "oldest_s": 0.0}
        self._up = 0.0

    def _refresh(self) -> None:
        with self._lock:
            if time.monotonic() - self._at < self._ttl_s:
                return
            try:
                with self._connect() as conn:
                    self._orders = list(conn.execute(QUERIES["metrics_orders_by_state"]))
                    self._outbox = list(conn.execute(QUERIES["metrics_outbox"]))
                    self._holds = list(conn.execute(QUERIES["metrics_holds"]))
                    self._events = conn.execute(QUERIES["metrics_events"]).fetchone()
                self._up = 1.0
                self._at = time.monotonic()  # only a good read is cached
            except Exception:
                self._up = 0.0

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # no database read when the registry registers the collector

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self._refresh()
        up = GaugeMetricFamily("orderflow_database_up", "1 if the last gauge read succeeded")
        up.add_metric([], self._up)
        yield up
        orders = GaugeMetricFamily("orderflow_orders", "Orders per state", labels=["state"])
        for row in self._orders:
            orders.add_metric([row["state"]], float(row["orders"]))
        yield orders
        rows = GaugeMetricFamily(
            "orderflow_outbox_rows", "Open and dead outbox rows", labels=["step", "status"]
        )
        oldest = GaugeMetricFamily(
            "orderflow_outbox_oldest_age_seconds",
            "Age of the oldest outbox row per step and status",
            labels=["step", "status"],
        )
        for row in self._outbox:
            rows.add_metric([row["step"], row["status"]], float(row["n"]))
            oldest.add_metric([row["step"], row["status"]], float(row["oldest_s"] or 0))
        yield rows
        yield oldest
        # Capture at shipment: money held, and how close the soonest hold is to its
        # deadline (alert well before ORDERFLOW_HOLD_MARGIN_S, when the worker acts).
        holds = GaugeMetricFamily(
            "orderflow_payment_holds", "Card payments held, not captured yet", labels=["currency"]
        )
        held = GaugeMetricFamily(
            "orderflow_payment_held_cents", "Money held, not captured yet", labels=["currency"]
        )
        soonest = GaugeMetricFamily(
            "orderflow_payment_hold_soonest_expiry_seconds",
            "Seconds before the soonest hold must be captured (capture_before)",
            labels=["currency"],
        )
        for row in self._holds:
            holds.add_metric([row["currency"]], float(row["n"]))
            held.add_metric([row["currency"]], float(row["held_cents"] or 0))
            soonest.add_metric([row["currency"]], float(row["soonest_s"] or 0))
        yield holds
        yield held
        yield soonest
        # The events relay's backlog: with a broker it should stay near zero.
        pending = GaugeMetricFamily(
            "orderflow_events_pending", "Order events not yet published to the broker"
        )
        pending.add_metric([], float(self._events["pending"]))
        yield pending
        pending_age = GaugeMetricFamily(
            "orderflow_events_oldest_pending_age_seconds",
            "Age of the oldest order event not yet published",
        )
        pending_age.add_metric([], float(self._events["oldest_s"] or 0))
        yield pending_age


_gauges: DatabaseGauges | None = None


def install_database_gauges(connect: Callable[[], Any]) -> None:
    """Register the database gauges once per process (the API and a worker each have one)."""
    global _gauges
    if _gauges is None:
        _gauges = DatabaseGauges(connect)
        REGISTRY.register(_gauges)
    else:  # a new app in the same process (tests): read afresh from its database
        _gauges._connect = connect
        _gauges._at = 0.0
