"""Real worker processes for the process-level tests: start, stop, place work, wait, check."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from orderflow.services.orders import LineRequest
from orderflow.services.service import create_order
from tests.support.helpers import ADDRESS, mandate_for
from tests.support.paths import PROJECT_ROOT
from tests.support.sandbox_client import SETTLED, check_invariants, states

DECLINED_CARD = "pm_card_chargeDeclined"


def start_worker(
    db_url: str,
    sandbox: Any,
    log_dir: Path,
    *extra: str,
    failpoints: str | None = None,
    env_extra: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": db_url, **sandbox.env(), **(env_extra or {})}
    env.pop("ORDERFLOW_FAILPOINTS", None)
    if failpoints:
        env["ORDERFLOW_FAILPOINTS"] = failpoints
    log_dir.mkdir(parents=True, exist_ok=True)
    # The worker logs a JSON line per step: a file (scanned for secrets later),
    # never a pipe nobody drains.
    log = (log_dir / f"worker-{time.time_ns()}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "orderflow.app.cli", "worker", *WORKER_ARGS, *extra],
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )


WORKER_ARGS = ("--lease", "2", "--grace", "5")


def stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def add_stock(conn: psycopg.Connection[Any], sku: str, units: int) -> None:
    """More units, as a warehouse would add them: the products trigger records the
    adjustment in the stock ledger."""
    conn.execute("UPDATE products SET available = available + %s WHERE sku = %s", (units, sku))


def place_many(
    conn: psycopg.Connection[Any],
    n: int,
    sku: str = "NOTE-A5",
    *,
    decline_every: int = 10,
    start: int = 0,
    waiting_methods: tuple[str, ...] = (),
) -> list[str]:
    """n orders of one unit each, every `decline_every`-th with a card that is declined;
    with `waiting_methods`, the ones after a declined one pay with those in turn
    (a 3-D Secure card, a bank debit): they wait for the customer or the bank."""

    def method(i: int) -> str:
        if i % decline_every == decline_every - 1:
            return DECLINED_CARD
        if waiting_methods and i % decline_every == 0:
            return waiting_methods[(i // decline_every) % len(waiting_methods)]
        return "pm_card_visa"

    add_stock(conn, sku, n * 2)
    return [
        create_order(
            conn,
            user_id=uuid.uuid4(),
            lines=[LineRequest(sku, 1)],
            shipping_address=ADDRESS,
            email="buyer@example.com",
            payment_method_id=method(i),
            idempotency_key=f"k-{i}",
            ttl_seconds=900,
            payment_mandate=mandate_for(method(i)),
        ).id
        for i in range(start, start + n)
    ]


class Customers:
    """Customers at the bank's 3-D Secure page: each order waiting for them is
    authenticated (one in `fail_every` fails) by a background thread."""

    def __init__(self, url: str, sandbox: Any, fail_every: int = 5) -> None:
        self.url, self.sandbox, self.fail_every = url, sandbox, fail_every
        self.handled: set[str] = set()
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Customers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.wait(0.1):
                rows = conn.execute(
                    "SELECT pi.id FROM payment_intents pi JOIN orders o ON o.id = pi.order_id"
                    " WHERE o.state = 'awaiting_payment' AND pi.status = 'requires_action'"
                ).fetchall()
                for (intent_id,) in rows:
                    if intent_id in self.handled:
                        continue
                    self.handled.add(intent_id)
                    fail = len(self.handled) % self.fail_every == 0
                    self.failed += fail
                    try:
                        self.sandbox.authenticate(intent_id, "fail" if fail else "complete")
                    except Exception:  # the sandbox is busy with a storm: try again later
                        self.handled.discard(intent_id)


def wait_settled(conn: psycopg.Connection[Any], ids: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        current = states(conn)
        waiting = [i for i in ids if current[i] not in SETTLED]
        if not waiting:
            return
        assert time.monotonic() < deadline, f"{len(waiting)} orders not settled: {waiting[:3]}"
        time.sleep(0.1)


def one_of_each(effects: list[dict[str, Any]], ids: list[str], conn: Any) -> None:
    """Each provider saw each effect at most once; confirmed orders saw all three,
    cancelled ones no charge that was kept."""
    per_order = Counter((e["order_id"], e["kind"]) for e in effects)
    assert all(n == 1 for n in per_order.values()), [k for k, n in per_order.items() if n > 1]
    final = states(conn)
    for order_id in ids:
        if final[order_id] == "confirmed":
            assert per_order[(order_id, "charge")] == 1
            assert per_order[(order_id, "shipment")] == 1
            assert per_order[(order_id, "email")] == 1
        else:
            assert final[order_id] == "cancelled", (order_id, final[order_id])
            assert per_order[(order_id, "charge")] == per_order[(order_id, "refund")]


def settle_and_check(
    conn: psycopg.Connection[Any],
    ids: list[str],
    workers: list[subprocess.Popen[bytes]],
    sandbox: Any,
    timeout_s: float,
) -> list[dict[str, Any]]:
    """Wait until every order settled and stop the workers (each must drain and exit
    0); then each provider effect happened once and the doctor is clean.  Returns
    the sandbox's effects."""
    try:
        wait_settled(conn, ids, timeout_s)
    finally:
        codes = [stop(w) for w in workers]
    assert codes == [0] * len(workers)
    effects = sandbox.effects()
    one_of_each(effects, ids, conn)
    check_invariants(conn, effects)
    return effects
