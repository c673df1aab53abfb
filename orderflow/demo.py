"""`orderflow demo`: the saga end to end on the embedded database.

Until the outbox worker lands, the demo plays the providers' answers itself:
for each pending outbox row it fires the event the step's outcome would fire,
in the same transaction that marks the row done, exactly as the worker will.
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from orderflow import PROJECT_ROOT
from orderflow.catalog import load_catalog
from orderflow.orders import (
    LineRequest,
    consume_reservation,
    create_order,
    release_inventory,
    restock_order,
)
from sql import QUERIES
from statemachine.definition import STEPS_BY_NAME
from statemachine.engine import advance
from statemachine.errors import OrderflowError, OutOfStock

ADDRESS = {
    "name": "Ada Lovelace",
    "line1": "12 St James's Square",
    "city": "London",
    "postal_code": "SW1Y 4JH",
    "country": "GB",
}

# (label, lines, provider answers per step: "ok" or "fail")
SCENARIOS: list[tuple[str, list[LineRequest], dict[str, str]]] = [
    ("happy path", [LineRequest("MUG-01", 2), LineRequest("TEE-M", 1)], {}),
    ("card declined", [LineRequest("CAP-01", 1)], {"charge_payment": "fail"}),
    ("carrier refuses the parcel", [LineRequest("LAMP-01", 1)], {"ship_order": "fail"}),
    ("returned by the customer", [LineRequest("PEN-05", 1)], {"return": "yes"}),
    ("waiting for the worker", [LineRequest("NOTE-A5", 3)], {"stop": "yes"}),
]


def finish_step(
    conn: psycopg.Connection[Any], order_id: str, step: str, ok: bool, detail: dict[str, Any]
) -> None:
    """Mark the step's row done and fire its outcome event, in one transaction."""
    spec = STEPS_BY_NAME[step]
    with conn.transaction():
        conn.execute(QUERIES["finish_pending_step"], {"order_id": order_id, "step": step})
        # local effects that the worker's step adapters will own
        if step == "release_inventory":
            release_inventory(conn, order_id)
        elif step == "restock_inventory":
            restock_order(conn, order_id)
        elif step == "charge_payment" and ok:
            consume_reservation(conn, order_id)
        event = spec.on_success if ok else spec.on_failure
        if event is not None:
            advance(conn, order_id, event, {"step": step, **detail})


def _pending_steps(conn: psycopg.Connection[Any], order_id: str) -> list[str]:
    rows = conn.execute(QUERIES["order_outbox"], {"order_id": order_id}).fetchall()
    return [r["step"] for r in rows if r["status"] == "pending"]


def run_scenario(conn: psycopg.Connection[Any], order_id: str, answers: dict[str, str]) -> None:
    if answers.get("stop"):
        return
    for _ in range(20):
        pending = _pending_steps(conn, order_id)
        if not pending:
            break
        for step in pending:
            finish_step(conn, order_id, step, answers.get(step) != "fail", {})
        state = conn.execute(QUERIES["get_order"], {"order_id": order_id}).fetchone()
        if state and state["state"] == "confirmed" and answers.pop("return", None):
            advance(conn, order_id, "return_requested", {"reason": "too small"})
        if state and state["state"] == "awaiting_return":
            advance(conn, order_id, "return_received", {})


def run_demo(conn: psycopg.Connection[Any], ttl_seconds: int) -> list[str]:
    count = load_catalog(conn, PROJECT_ROOT / "catalog" / "sample.csv")
    print(f"catalog: {count} products loaded")
    user = uuid.uuid4()
    order_ids: list[str] = []
    for label, lines, answers in SCENARIOS:
        order = create_order(
            conn,
            user_id=user,
            lines=lines,
            shipping_address=ADDRESS,
            email="ada@example.com",
            payment_method_id="pm_card_visa",
            idempotency_key=str(uuid.uuid4()),
            ttl_seconds=ttl_seconds,
        )
        run_scenario(conn, order.id, dict(answers))
        order_ids.append(order.id)
        print(f"placed {order.id} ({label}): {order.total_cents / 100:.2f} {order.currency}")
    try:
        create_order(
            conn,
            user_id=user,
            lines=[LineRequest("LAMP-01", 1000)],
            shipping_address=ADDRESS,
            email=None,
            payment_method_id="pm_card_visa",
            idempotency_key=str(uuid.uuid4()),
            ttl_seconds=ttl_seconds,
        )
    except OutOfStock as exc:
        print(f"refused an order for 1000 desk lamps: {exc} (nothing written)")
    except OrderflowError as exc:  # pragma: no cover - the demo should not get here
        print(f"refused: {exc}")
    print()
    for order_id in order_ids:
        print_order(conn, order_id)
    return order_ids


def print_order(conn: psycopg.Connection[Any], order_id: str) -> None:
    state = conn.execute(QUERIES["get_order"], {"order_id": order_id}).fetchone()
    assert state is not None
    print(f"order {order_id}: {state['state']}")
    for h in conn.execute(QUERIES["order_history"], {"order_id": order_id}):
        source = h["from_state"] or "(new)"
        step = f"  [{h['detail']['step']}]" if "step" in h["detail"] else ""
        print(f"    {h['at']:%H:%M:%S.%f}  {source:>16} -> {h['to_state']:<16} {h['event']}{step}")
    outbox = conn.execute(QUERIES["order_outbox"], {"order_id": order_id}).fetchall()
    steps = ", ".join(f"{r['step']}={r['status']}" for r in outbox)
    print(f"    outbox: {steps}")
    print()
