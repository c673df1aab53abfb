"""The outbox worker against real Postgres and the sandbox over HTTP."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from orderflow import failpoints
from orderflow.outbox_worker.core import Success, WorkerConfig, claim, commit_successes, process
from orderflow.outbox_worker.outcomes import StepOutcome
from orderflow.outbox_worker.runner import Worker
from orderflow.outbox_worker.steps import StepSettings
from orderflow.sql.db import connect
from orderflow.statemachine.engine import advance
from tests.support.helpers import place
from tests.support.sandbox_client import check_invariants, drain, states

# These tests pin the immediate capture (money taken at confirmation: today's
# behaviour, unchanged); tests/integration/test_capture.py covers at_shipment.
CAPTURE = "immediate"


def _history(conn: psycopg.Connection[Any], order_id: str) -> list[tuple[str, str | None]]:
    rows = conn.execute(
        "SELECT event, detail->>'step' AS step FROM order_history WHERE order_id = %s ORDER BY id",
        (order_id,),
    ).fetchall()
    return [(r["event"], r["step"]) for r in rows]


def _available(conn: psycopg.Connection[Any], sku: str) -> int:
    row = conn.execute("SELECT available FROM products WHERE sku = %s", (sku,)).fetchone()
    assert row is not None
    return int(row["available"])


def _kinds(effects: list[dict[str, Any]]) -> list[str]:
    return [e["kind"] for e in effects]


def test_happy_path(conn: Any, worker: Worker, sandbox: Any) -> None:
    stock = _available(conn, "TEE-M")
    order = place(conn, [("TEE-M", 2)])
    drain(worker, conn)
    assert states(conn)[order.id] == "confirmed"
    assert _kinds(sandbox.effects(order_id=order.id)) == ["charge", "shipment", "email"]
    charge = sandbox.effects(kind="charge")[0]
    assert charge["amount"] == order.total_cents
    assert charge["idempotency_key"] == f"{order.id}:charge_payment"
    payment = conn.execute("SELECT * FROM payments WHERE order_id = %s", (order.id,)).fetchone()
    assert payment["status"] == "succeeded" and payment["provider_ref"].startswith("pi_")
    shipment = conn.execute("SELECT * FROM shipments WHERE order_id = %s", (order.id,)).fetchone()
    assert shipment["tracking_number"].startswith("1Z")
    reservation = conn.execute(
        "SELECT consumed_at, released_at FROM reservations WHERE order_id = %s", (order.id,)
    ).fetchone()
    assert reservation["consumed_at"] is not None and reservation["released_at"] is None
    assert _available(conn, "TEE-M") == stock - 2  # sold
    check_invariants(conn, sandbox.effects())


@pytest.mark.parametrize(
    "card", ["pm_card_chargeDeclined", "pm_card_chargeDeclinedInsufficientFunds"]
)
def test_declined_card_cancels_and_puts_stock_back(
    conn: Any, worker: Worker, sandbox: Any, card: str
) -> None:
    stock = _available(conn, "CAP-01")
    order = place(conn, [("CAP-01", 3)], payment_method=card)
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    assert sandbox.effects(order_id=order.id) == []
    assert _available(conn, "CAP-01") == stock
    assert _history(conn, order.id) == [
        ("place", None),
        ("payment_failed", "charge_payment"),
        ("compensation_done", "release_inventory"),
    ]
    failed = conn.execute(
        "SELECT failure_code FROM payments WHERE order_id = %s", (order.id,)
    ).fetchone()
    assert failed["failure_code"] in ("generic_decline", "insufficient_funds")
    check_invariants(conn, sandbox.effects())


def test_two_server_errors_then_success_charge_once(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    sandbox.faults({"endpoint": "charge", "mode": "error", "status": 500, "count": 2})
    order = place(conn)
    drain(worker, conn)
    assert states(conn)[order.id] == "confirmed"
    assert _kinds(sandbox.effects(order_id=order.id)) == ["charge", "shipment", "email"]
    attempts = conn.execute(
        "SELECT attempts FROM outbox WHERE order_id = %s AND step = 'charge_payment'", (order.id,)
    ).fetchone()
    assert attempts["attempts"] == 3


def test_three_server_errors_compensate(conn: Any, worker: Worker, sandbox: Any) -> None:
    sandbox.faults({"endpoint": "charge", "mode": "error", "status": 503})
    order = place(conn)
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    assert sandbox.effects() == []


def test_rate_limit_retry_after_is_honoured(conn: Any, worker: Worker, sandbox: Any) -> None:
    sandbox.faults({"endpoint": "charge", "mode": "rate_limit", "retry_after": 1, "count": 1})
    order = place(conn)
    started = time.monotonic()
    assert worker.run_once() == 1
    row = conn.execute(
        "SELECT status, available_at - now() AS wait FROM outbox WHERE order_id = %s", (order.id,)
    ).fetchone()
    assert row["status"] == "pending"
    assert row["wait"].total_seconds() > 0.8  # backoff scale is 0.01: this is Retry-After
    drain(worker, conn)
    assert time.monotonic() - started >= 1.0
    assert states(conn)[order.id] == "confirmed"
    assert len(sandbox.effects(kind="charge")) == 1


def test_rate_limits_do_not_use_up_attempts(conn: Any, worker: Worker, sandbox: Any) -> None:
    """Five 429s in a row (the charge step has 3 attempts): the order still confirms."""
    sandbox.faults({"endpoint": "charge", "mode": "rate_limit", "retry_after": 0.01, "count": 5})
    order = place(conn)
    drain(worker, conn)
    assert states(conn)[order.id] == "confirmed"
    row = conn.execute(
        "SELECT attempts, payload FROM outbox WHERE order_id = %s AND step = 'charge_payment'",
        (order.id,),
    ).fetchone()
    assert row["attempts"] == 1 and row["payload"]["throttled"] == 5
    assert len(sandbox.effects(kind="charge")) == 1


def test_shipping_fails_after_charge_refund_then_release(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    stock = _available(conn, "LAMP-01")
    sandbox.faults({"endpoint": "shipment", "mode": "error", "status": 422})
    order = place(conn, [("LAMP-01", 1)])
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    assert _history(conn, order.id) == [
        ("place", None),
        ("payment_captured", "charge_payment"),
        ("shipment_failed", "ship_order"),
        ("compensation_done", "refund_payment"),
        ("compensation_done", "release_inventory"),
    ]
    effects = sandbox.effects(order_id=order.id)
    assert _kinds(effects) == ["charge", "refund"]
    assert effects[1]["amount"] == order.total_cents
    assert _available(conn, "LAMP-01") == stock
    check_invariants(conn, sandbox.effects())


@pytest.mark.parametrize("endpoint", ["charge", "shipment"])
def test_timeout_after_success_has_exactly_one_effect(
    conn: Any, worker: Worker, sandbox: Any, endpoint: str
) -> None:
    sandbox.faults({"endpoint": endpoint, "mode": "timeout_after_success", "count": 1, "hang_s": 3})
    order = place(conn)
    drain(worker, conn, timeout_s=60)
    assert states(conn)[order.id] == "confirmed"
    assert _kinds(sandbox.effects(order_id=order.id)) == ["charge", "shipment", "email"]
    check_invariants(conn, sandbox.effects())


def test_unknown_outcome_is_never_compensated_blind(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    """Charge times out (after charging), then the provider errors past the attempt limit:
    the worker keeps replaying the key instead of cancelling an order that was paid."""
    sandbox.faults({"endpoint": "charge", "mode": "timeout_after_success", "count": 1, "hang_s": 3})
    order = place(conn)
    worker.run_once()  # times out: unknown
    sandbox.faults({"endpoint": "charge", "mode": "error", "status": 500, "count": 5})
    drain(worker, conn, timeout_s=60)
    assert states(conn)[order.id] == "confirmed"
    assert len(sandbox.effects(kind="charge")) == 1
    assert sandbox.effects(kind="refund") == []


def test_stale_lease_cannot_commit(db_url: str, conn: Any, providers: Any, sandbox: Any) -> None:
    order = place(conn)
    immediate = StepSettings(capture=CAPTURE)
    slow = WorkerConfig(owner="slow", lease_s=30, backoff_scale=0.01, steps=immediate)
    fast = WorkerConfig(owner="fast", lease_s=30, backoff_scale=0.01, steps=immediate)
    with connect(db_url) as c1, connect(db_url) as c2:
        [row_slow] = claim(c1, slow, 10)
        conn.execute("UPDATE outbox SET lease_until = now() - interval '1 second'")
        [row_fast] = claim(c2, fast, 10)
        assert row_fast.fence == row_slow.fence + 1
        # the slow one calls the provider, then finds its lease taken at commit
        assert process(c1, row_slow, providers, slow) == "stale"
        assert process(c2, row_fast, providers, fast) == "done"
    assert states(conn)[order.id] == "paid"
    history = [e for e, _ in _history(conn, order.id)]
    assert history == ["place", "payment_captured"]  # once, not twice
    assert len(sandbox.effects(kind="charge")) == 1  # the replay was answered from the record


def test_expiry_before_the_charge_runs_skips_it(conn: Any, worker: Worker, sandbox: Any) -> None:
    stock = _available(conn, "BAG-01")
    order = place(conn, [("BAG-01", 2)])
    conn.execute(
        "UPDATE reservations SET expires_at = now() - interval '1 second', created_at ="
        " now() - interval '1 hour' WHERE order_id = %s",
        (order.id,),
    )
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    assert sandbox.effects() == []
    assert _available(conn, "BAG-01") == stock
    events = [e for e, _ in _history(conn, order.id)]
    assert events == ["place", "reservation_expired", "compensation_done"]


def test_capture_after_expiry_is_refunded(conn: Any, worker: Worker, sandbox: Any) -> None:
    """The charge is in flight when the reservation expires: exactly one of the two wins
    the order's row; the capture that lands after expiry is refunded, never kept."""
    stock = _available(conn, "BAG-01")
    sandbox.faults({"endpoint": "charge", "mode": "latency", "latency_ms": 600})
    order = place(conn, [("BAG-01", 1)])

    def expire_during_the_call() -> None:
        time.sleep(0.2)
        with connect(worker.url) as c:
            c.execute(
                "UPDATE reservations SET expires_at = now() - interval '1 second', created_at ="
                " now() - interval '1 hour' WHERE order_id = %s",
                (order.id,),
            )
        worker.expire_reservations()

    expiring = threading.Thread(target=expire_during_the_call)
    expiring.start()
    worker.run_once()
    expiring.join()
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    assert _kinds(sandbox.effects(order_id=order.id)) == ["charge", "refund"]
    assert _available(conn, "BAG-01") == stock
    events = [e for e, _ in _history(conn, order.id)]
    assert events[:3] == ["place", "reservation_expired", "payment_captured"]
    check_invariants(conn, sandbox.effects())


def test_return_flow(conn: Any, worker: Worker, sandbox: Any) -> None:
    from orderflow.statemachine.engine import advance

    stock = _available(conn, "PEN-05")
    order = place(conn, [("PEN-05", 1)])
    drain(worker, conn)
    advance(conn, order.id, "return_requested", {"reason": "scratched"})
    drain(worker, conn)
    assert states(conn)[order.id] == "awaiting_return"
    advance(conn, order.id, "return_received", {})
    drain(worker, conn)
    assert states(conn)[order.id] == "returned"
    assert _kinds(sandbox.effects(order_id=order.id)) == [
        "charge",
        "shipment",
        "email",
        "return_label",
        "refund",
    ]
    assert _available(conn, "PEN-05") == stock  # restocked once
    restocks = conn.execute(
        "SELECT count(*) AS n FROM stock_ledger WHERE order_id = %s AND kind = 'restock'",
        (order.id,),
    ).fetchone()
    assert restocks["n"] == 1
    check_invariants(conn, sandbox.effects())


def test_dead_letter_and_redrive(conn: Any, worker: Worker, sandbox: Any) -> None:
    from orderflow.outbox_worker.operations import redrive

    sandbox.faults({"endpoint": "email", "mode": "error", "status": 500})
    order = place(conn)
    drain(worker, conn, timeout_s=60)
    assert states(conn)[order.id] == "needs_attention"
    dead = conn.execute("SELECT id, step, last_error FROM outbox WHERE status = 'dead'").fetchall()
    assert [(d["step"]) for d in dead] == ["send_confirmation"]
    assert "500" in dead[0]["last_error"]
    sandbox.faults()
    print(redrive(conn, dead[0]["id"]))
    assert states(conn)[order.id] == "shipped"
    drain(worker, conn)
    assert states(conn)[order.id] == "confirmed"
    assert len(sandbox.effects(kind="email")) == 1


def test_worker_metrics_count_retries_compensations_and_dead_letters(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    from prometheus_client import generate_latest

    from orderflow.metrics import REGISTRY

    def sample(name: str, step: str) -> float:
        value = REGISTRY.get_sample_value(name, {"step": step})
        return value or 0.0

    before = (
        sample("orderflow_step_retries_total", "charge_payment"),
        sample("orderflow_compensations_total", "refund_payment"),
        sample("orderflow_dead_letters_total", "send_confirmation"),
    )
    sandbox.faults({"endpoint": "charge", "mode": "error", "status": 500, "count": 1})
    place(conn)
    drain(worker, conn)
    sandbox.faults({"endpoint": "shipment", "mode": "error", "status": 422})
    place(conn)
    drain(worker, conn)
    sandbox.faults({"endpoint": "email", "mode": "error", "status": 400})
    place(conn)
    drain(worker, conn)
    after = (
        sample("orderflow_step_retries_total", "charge_payment"),
        sample("orderflow_compensations_total", "refund_payment"),
        sample("orderflow_dead_letters_total", "send_confirmation"),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]
    assert b"orderflow_step_duration_seconds_bucket" in generate_latest(REGISTRY)


def _paid_and_claimed(conn: Any, n: int, config: WorkerConfig) -> list[Any]:
    """n paid orders whose ship_order rows are claimed by `config.owner`."""
    ids = [place(conn).id for _ in range(n)]
    for order_id in ids:
        advance(conn, order_id, "payment_captured",
                {"step": "charge_payment", "payment_intent_id": f"pi_{order_id}"})  # fmt: skip
    conn.execute("UPDATE outbox SET status = 'done', done_at = now() WHERE step = 'charge_payment'")
    rows = claim(conn, config, 100)
    assert sorted(r.order_id for r in rows) == sorted(ids)
    return [
        Success(row, StepOutcome.done(shipment_id=f"shp_{row.order_id}", tracking_number="T1"))
        for row in rows
    ]


def test_batched_successes_commit_together(conn: Any) -> None:
    config = WorkerConfig(owner="batch-test")
    items = _paid_and_claimed(conn, 5, config)
    commits = conn.execute(
        "SELECT xact_commit AS n FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()["n"]
    with connect(conn.info.dsn) as other:
        assert commit_successes(other, items, config) == ["done"] * 5
    assert set(states(conn).values()) == {"shipped"}
    shipped = conn.execute(
        "SELECT count(*) AS n FROM shipments WHERE kind = 'outbound'"
    ).fetchone()["n"]
    nexts = conn.execute(
        "SELECT count(*) AS n FROM outbox WHERE step = 'send_confirmation' AND status = 'pending'"
    ).fetchone()["n"]
    assert shipped == 5 and nexts == 5
    time.sleep(0.6)  # pg_stat_database is flushed every 500 ms
    after = conn.execute(
        "SELECT xact_commit AS n FROM pg_stat_database WHERE datname = current_database()"
    ).fetchone()["n"]
    assert after - commits <= 3  # one for the batch (plus this test's own reads)
    check_invariants(conn, [])


def test_a_lost_lease_in_a_batch_commits_the_others_alone(conn: Any) -> None:
    config = WorkerConfig(owner="batch-test")
    items = _paid_and_claimed(conn, 3, config)
    lost = items[1].row
    conn.execute("UPDATE outbox SET fence = fence + 1 WHERE id = %s", (lost.id,))  # taken over
    with connect(conn.info.dsn) as other:
        assert commit_successes(other, items, config) == ["done", "stale", "done"]
    final = states(conn)
    assert [final[i.row.order_id] for i in items] == ["shipped", "paid", "shipped"]
    assert (
        conn.execute(
            "SELECT count(*) AS n FROM shipments WHERE order_id = %s", (lost.order_id,)
        ).fetchone()["n"]
        == 0
    )


def test_a_charge_that_may_have_happened_is_replayed_not_skipped(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    """The worker dies after Stripe charged (nothing committed); before the row is
    retried the reservation expires and the order is cancelled.  The retry must
    not skip the charge as "order moved on": it replays the key, learns the money
    was taken, records the late capture and refunds it.  (Found by the stateful test.)"""
    order = place(conn)
    with failpoints.armed("charge_payment.after_call", "raise"):
        worker.run_once()  # charged at Stripe; the worker "dies" before its commit
    assert len(sandbox.effects(kind="charge")) == 1
    conn.execute("UPDATE outbox SET lease_until = now() - interval '1 second'")
    conn.execute("UPDATE reservations SET expires_at = created_at + interval '1 microsecond'")
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    assert len(sandbox.effects(kind="refund")) == 1  # the money went back
    check_invariants(conn, sandbox.effects())


def test_a_charge_never_attempted_is_skipped_once_the_order_moved_on(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    order = place(conn)
    conn.execute("UPDATE reservations SET expires_at = created_at + interval '1 microsecond'")
    worker.expire_reservations()
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    assert sandbox.effects() == []  # first attempt, order already gone: no charge at all


def test_a_held_lock_fails_the_commit_instead_of_hanging_the_worker(
    db_url: str, conn: Any, providers: Any, sandbox: Any
) -> None:
    """Every worker connection has a lock_timeout: an order locked by someone else
    (an operator's open transaction) fails the step's commit, which goes back to
    be retried, instead of hanging a worker whose heartbeat would keep the lease."""
    from orderflow.config import load_settings
    from orderflow.sql.db import connection_options

    settings = load_settings(ORDERFLOW_LOCK_TIMEOUT_MS=200)
    worker = Worker(db_url, providers, concurrency=1, lease_s=30, backoff_scale=0.01,
                    connection_options=connection_options(settings))  # fmt: skip
    try:
        order = place(conn)
        with connect(db_url) as holder, holder.transaction():
            holder.execute("SELECT 1 FROM orders WHERE id = %s FOR UPDATE", (order.id,))
            done = threading.Thread(target=worker.run_once)
            done.start()
            done.join(20)
            assert not done.is_alive(), "the worker hung behind the lock"
            row = conn.execute(
                "SELECT status, payload, attempts, last_error FROM outbox WHERE order_id = %s",
                (order.id,),
            ).fetchone()
            assert row["status"] == "pending" and row["payload"]["unsettled"] is True
            # backed off as an unknown outcome (the attempt counts), not handed back at once
            assert row["attempts"] == 1 and row["payload"]["unknowns"] == 1
            assert "blocked" in row["last_error"]
        drain(worker, conn)  # the lock is gone: the retry asks Stripe and finds the charge
        assert states(conn)[order.id] == "confirmed"
        assert len(sandbox.effects(kind="charge")) == 1
    finally:
        worker.close()
