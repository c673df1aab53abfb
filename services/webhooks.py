"""Stripe's webhook events: stored once, applied in the transaction of the state change.

Stripe delivers each event at least once, in any order, and retries for days.
The event's id is the inbox's key, so a redelivery finds its row and changes
nothing; an event that no longer applies (the order moved on, an older status
arriving after a newer one) is recorded with why it was ignored, and never
forces a transition the machine does not allow.  Types we do not handle are
acknowledged and ignored.  (Verifying the signature is the HTTP layer's job.)

What the events do:
- payment_intent.succeeded / .payment_failed / .canceled / .processing /
  .requires_action: for an order in `awaiting_payment` whose recorded
  PaymentIntent this is, the same transition the worker's poll would make
  (`paid`, `compensating`, or a status change); otherwise recorded only.
  An order still `reserved` belongs to its charge step, which reads Stripe
  itself; an order already compensating belongs to its refund step, which
  reads Stripe before it cancels or refunds anything.
- With capture at shipment: payment_intent.amount_capturable_updated is the
  hold (an order awaiting payment goes to `paid`, as the poll would);
  payment_intent.canceled for a `paid` order whose hold it was is `hold_lost`
  (the order is undone: nothing is left to capture); charge.captured, and a
  canceled or succeeded intent of a `shipped` order, make its pending capture
  step due at once, so it reads the intent now.
- charge.refunded, refund.created / .updated / .failed: the order's pending
  refund step is made due at once, so it reads the refund's status now.
- charge.dispute.created: history and `needs_attention` for a settled order
  (recorded on one still working); no automatic action.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from orderflow.services import payments
from orderflow.services.payments import IntentMismatch, IntentView
from orderflow.sql import QUERIES, atomic
from orderflow.statemachine.definition import OrderState
from orderflow.statemachine.engine import advance
from orderflow.statemachine.errors import IllegalTransition, InvalidEventDetail

INTENT_EVENTS = frozenset(
    {
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "payment_intent.canceled",
        "payment_intent.processing",
        "payment_intent.requires_action",
        "payment_intent.amount_capturable_updated",
    }
)
REFUND_EVENTS = frozenset(
    {
        "charge.refunded",
        "refund.created",
        "refund.updated",
        "refund.failed",
        "charge.refund.updated",
    }
)
DISPUTE_EVENTS = frozenset({"charge.dispute.created"})
CAPTURE_EVENTS = frozenset({"charge.captured"})


class BadEvent(ValueError):
    """A verified payload that is not a Stripe event we can read."""


def receive(
    conn: psycopg.Connection[Any],
    event: Mapping[str, Any],
    *,
    processing_hold_s: int = 14 * 24 * 3600,
) -> dict[str, Any]:
    """Store the event once and apply it, in one transaction; returns what it did."""
    event_id, kind = event.get("id"), event.get("type")
    data = event.get("data")
    obj = data.get("object") if isinstance(data, Mapping) else None
    if not isinstance(event_id, str) or not isinstance(kind, str) or not isinstance(obj, Mapping):
        raise BadEvent("not a Stripe event: id, type and data.object are required")
    created = event.get("created")
    with atomic(conn), conn.cursor(row_factory=dict_row) as cur:
        stored = cur.execute(
            QUERIES["insert_stripe_event"],
            {
                "id": event_id,
                "type": kind,
                "object_id": obj.get("id") if isinstance(obj.get("id"), str) else None,
                "order_id": None,
                "created": created if isinstance(created, int) else None,
                # The client secret lets its holder pay: it is not kept here.
                "data": Jsonb({k: v for k, v in obj.items() if k != "client_secret"}),
            },
        ).fetchone()
        if stored is None:
            return {"id": event_id, "duplicate": True}
        try:
            with conn.transaction():  # a savepoint: an event that does not apply writes nothing
                order_id, outcome = _apply(conn, kind, obj, processing_hold_s)
        except _Ignored as ignored:
            order_id, outcome = ignored.order_id, ignored.outcome
        cur.execute(
            QUERIES["finish_stripe_event"],
            {"id": event_id, "outcome": outcome, "order_id": order_id},
        )
    return {"id": event_id, "outcome": outcome}


def _apply(
    conn: psycopg.Connection[Any], kind: str, obj: Mapping[str, Any], processing_hold_s: int
) -> tuple[str | None, str]:
    if kind in INTENT_EVENTS:
        return _intent_event(conn, obj, processing_hold_s)
    if kind in REFUND_EVENTS:
        return _refund_event(conn, obj)
    if kind in DISPUTE_EVENTS:
        return _dispute_event(conn, obj)
    if kind in CAPTURE_EVENTS:
        return _nudge_capture(conn, _order_of_intent(conn, obj.get("payment_intent")))
    return None, "ignored: type not handled"


def _order_of_intent(conn: psycopg.Connection[Any], intent_id: Any) -> dict[str, Any] | None:
    if not isinstance(intent_id, str):
        return None
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(QUERIES["order_payment_intent"], {"intent_id": intent_id}).fetchone()


def _intent_event(
    conn: psycopg.Connection[Any], obj: Mapping[str, Any], processing_hold_s: int
) -> tuple[str | None, str]:
    intent = IntentView.parse(obj)
    if intent is None:
        return None, "ignored: not a PaymentIntent we can read"
    known = _order_of_intent(conn, intent.id)
    if known is None:
        # Not the PaymentIntent any order recorded (an orphan, or an order we do not
        # know): `orderflow reconcile` reports money on it.
        return intent.order_id, "ignored: no order recorded this PaymentIntent"
    order_id = str(known["order_id"])
    if known["state"] == OrderState.SHIPPED and intent.status in ("canceled", "succeeded"):
        return _nudge_capture(conn, known)
    if (
        known["state"] == OrderState.PAID
        and intent.status == "canceled"
        and known["status"] == "requires_capture"
    ):
        return _hold_lost(conn, order_id, intent)
    if known["state"] != OrderState.AWAITING_PAYMENT:
        return order_id, f"ignored: the order is {known['state']}"
    with conn.cursor(row_factory=dict_row) as cur:
        order = cur.execute(QUERIES["order_money"], {"order_id": order_id}).fetchone()
    assert order is not None
    event = intent.event()
    if event == "payment_pending" and intent.status == known["status"]:
        return order_id, f"ignored: already {intent.status}"
    try:
        payments.apply_intent(
            conn,
            order_id,
            intent,
            source="webhook",
            total_cents=order["total_cents"],
            currency=order["currency"],
            processing_hold_s=processing_hold_s,
        )
    except (IllegalTransition, InvalidEventDetail, IntentMismatch) as exc:
        raise _Ignored(order_id, f"ignored: {exc}") from exc
    return order_id, f"applied: {event}"


def _nudge_capture(
    conn: psycopg.Connection[Any], known: Mapping[str, Any] | None
) -> tuple[str | None, str]:
    if known is None:
        return None, "ignored: no order recorded this PaymentIntent"
    order_id = str(known["order_id"])
    nudged = conn.execute(
        QUERIES["nudge_outbox_rows"], {"order_id": order_id, "steps": ["capture_payment"]}
    ).fetchall()
    return order_id, "nudged the capture step" if nudged else "ignored: no capture step waiting"


def _hold_lost(
    conn: psycopg.Connection[Any], order_id: str, intent: IntentView
) -> tuple[str | None, str]:
    """The hold of an order not shipped yet was released at Stripe (it lapsed, or
    someone cancelled it in the dashboard): nothing is left to capture."""
    with conn.cursor(row_factory=dict_row) as cur:
        order = cur.execute(QUERIES["order_money"], {"order_id": order_id}).fetchone()
    assert order is not None
    try:
        payments.record_intent(
            conn, order_id, intent, total_cents=order["total_cents"], currency=order["currency"]
        )
        advance(
            conn,
            order_id,
            "hold_lost",
            {"source": "webhook", "payment_intent_id": intent.id, "intent_status": intent.status},
        )
    except (IllegalTransition, InvalidEventDetail, IntentMismatch) as exc:
        raise _Ignored(order_id, f"ignored: {exc}") from exc
    return order_id, "applied: hold_lost"


def _refund_event(conn: psycopg.Connection[Any], obj: Mapping[str, Any]) -> tuple[str | None, str]:
    intent_id = obj.get("payment_intent")
    known = _order_of_intent(conn, intent_id)
    if known is None:
        return None, "ignored: no order recorded this PaymentIntent"
    order_id = str(known["order_id"])
    nudged = conn.execute(
        QUERIES["nudge_outbox_rows"],
        {"order_id": order_id, "steps": ["refund_payment", "refund_return"]},
    ).fetchall()
    return order_id, "nudged the refund step" if nudged else "ignored: no refund step waiting"


def _dispute_event(conn: psycopg.Connection[Any], obj: Mapping[str, Any]) -> tuple[str | None, str]:
    known = _order_of_intent(conn, obj.get("payment_intent"))
    if known is None:
        return None, "ignored: no order recorded this PaymentIntent"
    order_id = str(known["order_id"])
    detail = {
        "dispute_id": obj.get("id"),
        "reason": obj.get("reason"),
        "amount_cents": obj.get("amount"),
        "source": "webhook",
    }
    try:
        result = advance(conn, order_id, "dispute_opened", detail)
    except IllegalTransition as exc:
        raise _Ignored(order_id, f"ignored: {exc}") from exc
    return order_id, f"applied: dispute_opened ({result.dest.value})"


class _Ignored(Exception):
    def __init__(self, order_id: str, outcome: str) -> None:
        super().__init__(outcome)
        self.order_id = order_id
        self.outcome = outcome
