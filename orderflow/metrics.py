"""Prometheus metrics shared by the API and the worker (prometheus-client).

Counters and histograms are observed where things happen; the order and
outbox gauges are read from the database by a collector, cached for a few
seconds so a scrape storm costs at most one query pair per interval.
"""

from __future__ import annotations

import hmac
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

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
