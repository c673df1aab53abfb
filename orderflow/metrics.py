"""Prometheus metrics shared by the API and the worker (prometheus-client).

Counters and histograms are observed where things happen; the order and
outbox gauges are read from the database by a collector, cached for a few
seconds so a scrape storm costs at most one query pair per interval.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from orderflow.sql import QUERIES

REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_LATENCY = Histogram(
    "orderflow_http_request_duration_seconds",
    "HTTP request latency by route template, method and status",
    ["route", "method", "status"],
    registry=REGISTRY,
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
STEP_LATENCY = Histogram(
    "orderflow_step_duration_seconds",
    "Outbox step latency (call and commit) by step and outcome",
    ["step", "outcome"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
STEP_RETRIES = Counter(
    "orderflow_step_retries_total", "Outbox steps scheduled for another attempt", ["step"],
    registry=REGISTRY,
)  # fmt: skip
COMPENSATIONS = Counter(
    "orderflow_compensations_total", "Compensation steps completed", ["step"], registry=REGISTRY
)
DEAD_LETTERS = Counter(
    "orderflow_dead_letters_total", "Outbox rows dead-lettered", ["step"], registry=REGISTRY
)


class DatabaseGauges(Collector):
    """Orders by state and the outbox backlog, read from the database at most every ttl_s."""

    def __init__(self, connect: Callable[[], Any], ttl_s: float = 5.0) -> None:
        self._connect = connect
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._at = 0.0
        self._orders: list[dict[str, Any]] = []
        self._outbox: list[dict[str, Any]] = []
        self._up = 0.0

    def _refresh(self) -> None:
        with self._lock:
            if time.monotonic() - self._at < self._ttl_s:
                return
            try:
                with self._connect() as conn:
                    self._orders = list(conn.execute(QUERIES["metrics_orders_by_state"]))
                    self._outbox = list(conn.execute(QUERIES["metrics_outbox"]))
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


def serve_metrics(host: str, port: int, token: str | None) -> None:
    """The worker's /metrics in a background thread; with a token, only
    `Authorization: Bearer <token>` gets them (the same rule as the API's)."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app

    metrics_app = make_wsgi_app(REGISTRY)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        given = str(environ.get("HTTP_AUTHORIZATION", ""))
        if token is not None and not hmac.compare_digest(
            given.encode(), f"Bearer {token}".encode()
        ):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")],
            )
            return [b"metrics need the metrics token\n"]
        return metrics_app(environ, start_response)

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
            pass

    server = make_server(host, port, app, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
