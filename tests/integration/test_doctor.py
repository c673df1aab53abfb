"""orderflow doctor: clean after real sagas, and each check catches its own corruption."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from orderflow.outbox_worker.runner import Worker
from orderflow.services.doctor import out_of_order_compensations, run_checks
from orderflow.statemachine.engine import advance
from tests.support.helpers import place
from tests.support.paths import PROJECT_ROOT
from tests.support.sandbox_client import drain

# The refund checks below need captured money: the immediate capture.
CAPTURE = "immediate"


def _failing(conn: Any, effects: list[dict[str, Any]] | None = None) -> dict[str, list[str]]:
    return {c.name: c.offenders for c in run_checks(conn, effects) if not c.ok}


def _sagas(conn: Any, worker: Worker, sandbox: Any) -> dict[str, str]:
    ok = place(conn, [("MUG-01", 2)])
    declined = place(conn, [("CAP-01", 1)], payment_method="pm_card_chargeDeclined")
    drain(worker, conn)
    sandbox.faults({"endpoint": "shipment", "mode": "error", "status": 422, "count": 1})
    refused = place(conn, [("LAMP-01", 1)])
    drain(worker, conn)
    returned = place(conn, [("PEN-05", 1)])
    drain(worker, conn)
    advance(conn, returned.id, "return_requested", {"reason": "no"})
    drain(worker, conn)
    advance(conn, returned.id, "return_received", {})
    drain(worker, conn)
    return {"ok": ok.id, "declined": declined.id, "refused": refused.id, "returned": returned.id}


def test_clean_after_real_sagas_and_each_check_can_fail(
    db_url: str, conn: Any, worker: Worker, sandbox: Any
) -> None:
    ids = _sagas(conn, worker, sandbox)
    effects = sandbox.effects()
    assert _failing(conn, effects) == {}

    env = {**os.environ, "DATABASE_URL": db_url}
    cli = [sys.executable, "-m", "orderflow.app.cli", "doctor", "--sandbox", sandbox.url]
    result = subprocess.run(cli, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("[pass]") == 13

    # a plain UPDATE of the stock is an adjustment the database records itself...
    conn.execute("UPDATE products SET available = available + 1 WHERE sku = 'MUG-01'")
    assert _failing(conn) == {}
    # ... so only a writer that switches the triggers off (a superuser) can make a
    # unit appear from nowhere, and the doctor sees it
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute("UPDATE products SET available = available + 1 WHERE sku = 'MUG-01'")
    assert list(_failing(conn)) == [
        "stock conserved per SKU (initial = available + reserved + sold - restocked)"
    ]
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute("UPDATE products SET available = available - 1 WHERE sku = 'MUG-01'")

    # the refund of the refused parcel is lost
    conn.execute("UPDATE payments SET status = 'failed' WHERE order_id = %s AND kind = 'refund'",
                 (ids["refused"],))  # fmt: skip
    assert _failing(conn)["every captured payment shipped or refunded"] == [ids["refused"]]
    # ... unless its refund is still being made (a late capture's refund row is open)
    conn.execute("UPDATE outbox SET status = 'pending', done_at = NULL"
                 " WHERE order_id = %s AND step = 'refund_payment'", (ids["refused"],))  # fmt: skip
    assert "every captured payment shipped or refunded" not in _failing(conn)
    conn.execute("UPDATE outbox SET status = 'done', done_at = now()"
                 " WHERE order_id = %s AND step = 'refund_payment'", (ids["refused"],))  # fmt: skip
    conn.execute("UPDATE payments SET status = 'succeeded' WHERE order_id = %s AND kind = 'refund'",
                 (ids["refused"],))  # fmt: skip

    # a history row that is no edge of the machine
    conn.execute(
        "INSERT INTO order_history (order_id, from_state, to_state, event)"
        " VALUES (%s, 'confirmed', 'paid', 'payment_captured')",
        (ids["ok"],),
    )
    assert list(_failing(conn)) == ["every history row an edge of the machine, in a path"]
    conn.execute(
        "DELETE FROM order_history WHERE order_id = %s AND from_state = 'confirmed'"
        " AND to_state = 'paid'",
        (ids["ok"],),
    )
    # ... its event stayed: a published fact with no state change behind it
    assert list(_failing(conn)) == [
        "every state change has its event, every event its state change"
    ]
    conn.execute(
        "DELETE FROM order_events e"
        " WHERE NOT EXISTS (SELECT 1 FROM order_history h WHERE h.id = e.history_id)"
    )

    # an order left waiting too long
    waiting = place(conn)
    conn.execute(
        "UPDATE orders SET updated_at = now() - interval '2 hours' WHERE id = %s", (waiting.id,)
    )
    assert list(_failing(conn)) == ["nothing in a working state past its timeout"]
    conn.execute("UPDATE orders SET updated_at = now() WHERE id = %s", (waiting.id,))

    # the provider saw one key twice, and a charge the database never recorded
    doubled = [*effects, effects[0], {**effects[0], "idempotency_key": "x", "order_id": "y"}]
    failing = _failing(conn, doubled)
    assert failing["each provider effect once per idempotency key"] == [
        effects[0]["idempotency_key"]
    ]
    assert "y" in failing["provider charges match recorded payments"]
    # the refund of the refused parcel never reached the provider: money kept at Stripe
    unrefunded = [e for e in effects if (e["kind"], e["order_id"]) != ("refund", ids["refused"])]
    kept = _failing(conn, unrefunded)["no cancelled or returned order keeps money at the provider"]
    assert [k.split()[0] for k in kept] == [ids["refused"]]
    assert _failing(conn, effects) == {}


def test_compensation_order() -> None:
    done = "compensation_done"
    assert not out_of_order_compensations(
        ["place", "payment_captured", "shipment_failed", done, done],
        ["", "charge_payment", "ship_order", "refund_payment", "release_inventory"],
    )
    assert out_of_order_compensations(
        ["place", "payment_captured", "shipment_failed", done, done],
        ["", "charge_payment", "ship_order", "release_inventory", "refund_payment"],
    )
    # a capture after expiry: its refund may follow the release, wherever the capture landed
    assert not out_of_order_compensations(
        ["place", "reservation_expired", done, "payment_captured", done],
        ["", "", "release_inventory", "", "refund_payment"],
    )
    assert not out_of_order_compensations(
        ["place", "reservation_expired", "payment_captured", done, done],
        ["", "", "", "release_inventory", "refund_payment"],
    )
