"""Small helpers shared by the tests."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from orderflow.services.orders import LineRequest, PlacedOrder
from orderflow.services.service import create_order

ADDRESS = {
    "name": "Grace Hopper",
    "line1": "1 Navy Yard",
    "city": "Arlington",
    "postal_code": "22202",
    "country": "US",
}


# What a storefront sends with a bank debit: the customer's acceptance of the mandate.
MANDATE = {"customer_acceptance": {"ip_address": "192.0.2.10", "user_agent": "Mozilla/5.0 (test)"}}


def mandate_for(payment_method: str) -> dict[str, Any] | None:
    return MANDATE if payment_method.startswith("pm_sepa") else None


def place(
    conn: psycopg.Connection[Any],
    lines: list[tuple[str, int]] | None = None,
    *,
    user_id: uuid.UUID | None = None,
    key: str | None = None,
    payment_method: str = "pm_card_visa",
    ttl_seconds: int = 900,
) -> PlacedOrder:
    return create_order(
        conn,
        user_id=user_id or uuid.uuid4(),
        lines=[LineRequest(sku, qty) for sku, qty in (lines or [("MUG-01", 1)])],
        shipping_address=ADDRESS,
        email="grace@example.com",
        payment_method_id=payment_method,
        idempotency_key=key or str(uuid.uuid4()),
        ttl_seconds=ttl_seconds,
        payment_mandate=mandate_for(payment_method),
    )


def snapshot(conn: psycopg.Connection[Any], order_id: str) -> dict[str, Any]:
    """Everything the state machine writes for one order."""
    state = conn.execute("SELECT state FROM orders WHERE id = %s", (order_id,)).fetchone()
    history = conn.execute(
        "SELECT from_state, to_state, event, detail FROM order_history"
        " WHERE order_id = %s ORDER BY id",
        (order_id,),
    ).fetchall()
    outbox = conn.execute(
        "SELECT step, idempotency_key, status FROM outbox WHERE order_id = %s ORDER BY id",
        (order_id,),
    ).fetchall()
    return {"state": state, "history": history, "outbox": outbox}


def outbox_steps(conn: psycopg.Connection[Any], order_id: str) -> list[str]:
    rows = conn.execute(
        "SELECT step FROM outbox WHERE order_id = %s ORDER BY id", (order_id,)
    ).fetchall()
    return [r["step"] for r in rows]


def state_of(conn: psycopg.Connection[Any], order_id: str) -> str:
    row = conn.execute("SELECT state FROM orders WHERE id = %s", (order_id,)).fetchone()
    assert row is not None
    return str(row["state"])


def new_worker(db_url: str, providers: Any, capture: str = "at_shipment") -> Any:
    """The tests' in-process worker: 4 calls in flight, short leases, fast backoff."""
    from orderflow.outbox_worker.runner import Worker
    from orderflow.outbox_worker.steps import StepSettings

    return Worker(
        db_url,
        providers,
        concurrency=4,
        lease_s=5,
        backoff_scale=0.01,
        steps=StepSettings(capture=capture),
    )
