"""The order's payment as Stripe reports it: reading a PaymentIntent, what its
status means for the saga, and recording it (shared by the worker's payment
steps and the webhook receiver, so both write exactly the same facts)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from orderflow.services.orders import consume_reservation
from orderflow.sql import QUERIES
from orderflow.statemachine.definition import OrderState
from orderflow.statemachine.engine import advance
from orderflow.statemachine.machine import Outcome

# Stripe's PaymentIntent statuses and what each means for the order.
CAPTURED = frozenset({"succeeded"})
# Capture at shipment: the card's funds are held until we capture them.
HELD = frozenset({"requires_capture"})
WAITING = frozenset({"requires_action", "processing", "requires_confirmation"})
FAILED = frozenset({"requires_payment_method", "canceled"})
KNOWN_STATUSES = CAPTURED | HELD | WAITING | FAILED


class IntentMismatch(Exception):
    """The order already recorded another PaymentIntent: we never take money twice."""


@dataclass(frozen=True)
class IntentView:
    """A PaymentIntent as Stripe documents it; optional fields may be absent."""

    id: str
    status: str
    amount: int | None
    amount_received: int
    amount_capturable: int
    currency: str | None
    client_secret: str | None
    next_action: dict[str, Any] | None
    error_code: str | None
    order_id: str | None  # metadata.order_id
    # A held card payment must be captured before this (epoch seconds): the
    # charge's payment_method_details.card.capture_before, when the charge was
    # expanded (`latest_charge`).
    capture_before: int | None = None

    @classmethod
    def parse(cls, obj: Any) -> IntentView | None:
        """None when the object lacks what we cannot do without (its id, a known status)."""
        if not isinstance(obj, Mapping):
            return None
        intent_id, status = obj.get("id"), obj.get("status")
        if not isinstance(intent_id, str) or not intent_id or status not in KNOWN_STATUSES:
            return None
        error = obj.get("last_payment_error")
        error = error if isinstance(error, Mapping) else {}
        metadata = obj.get("metadata")
        metadata = metadata if isinstance(metadata, Mapping) else {}
        next_action = obj.get("next_action")
        return cls(
            capture_before=_capture_before(obj.get("latest_charge")),
            id=intent_id,
            status=str(status),
            amount=_int_or_none(obj.get("amount")),
            amount_received=_int_or_none(obj.get("amount_received")) or 0,
            amount_capturable=_int_or_none(obj.get("amount_capturable")) or 0,
            currency=str(obj["currency"]).upper() if obj.get("currency") else None,
            client_secret=obj.get("client_secret")
            if isinstance(obj.get("client_secret"), str)
            else None,
            next_action=dict(next_action) if isinstance(next_action, Mapping) else None,
            error_code=(error.get("decline_code") or error.get("code")) or None,
            order_id=str(metadata["order_id"]) if metadata.get("order_id") else None,
        )

    @property
    def captured(self) -> bool:
        return self.status in CAPTURED

    @property
    def held(self) -> bool:
        return self.status in HELD

    def event(self) -> str:
        """The saga event this status means."""
        if self.status in CAPTURED:
            return "payment_captured"
        if self.status in HELD:
            return "payment_authorized"
        if self.status in FAILED:
            return "payment_failed"
        return "payment_pending"

    def as_facts(self) -> dict[str, Any]:
        return {
            "payment_intent_id": self.id,
            "intent_status": self.status,
            "amount_cents": self.amount_received or self.amount,
            "held_cents": self.amount_capturable,
            "captured_cents": self.amount_received,
            "intent": {
                "id": self.id,
                "status": self.status,
                "amount": self.amount,
                "amount_received": self.amount_received,
                "amount_capturable": self.amount_capturable,
                "currency": self.currency,
                "client_secret": self.client_secret,
                "next_action": self.next_action,
                "error_code": self.error_code,
                "capture_before": self.capture_before,
            },
        }

    @classmethod
    def from_facts(cls, facts: Mapping[str, Any]) -> IntentView | None:
        raw = facts.get("intent")
        if not isinstance(raw, Mapping):
            return None
        return cls(
            id=str(raw["id"]),
            status=str(raw["status"]),
            amount=raw.get("amount"),
            amount_received=int(raw.get("amount_received") or 0),
            amount_capturable=int(raw.get("amount_capturable") or 0),
            currency=raw.get("currency"),
            client_secret=raw.get("client_secret"),
            next_action=raw.get("next_action"),
            error_code=raw.get("error_code"),
            order_id=None,
            capture_before=raw.get("capture_before"),
        )


def _capture_before(charge: Any) -> int | None:
    """From an expanded charge: when its hold must be captured by."""
    if not isinstance(charge, Mapping):
        return None
    details = charge.get("payment_method_details")
    card = details.get("card") if isinstance(details, Mapping) else None
    return _int_or_none(card.get("capture_before")) if isinstance(card, Mapping) else None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def record_intent(
    conn: psycopg.Connection[Any],
    order_id: str,
    intent: IntentView,
    *,
    total_cents: int,
    currency: str,
) -> None:
    """Keep the PaymentIntent as last seen.  Raises IntentMismatch if the order
    recorded another one."""
    row = conn.execute(
        QUERIES["record_payment_intent"],
        {
            "order_id": order_id,
            "id": intent.id,
            "status": intent.status,
            "amount_cents": intent.amount or total_cents,
            "amount_received_cents": intent.amount_received,
            "amount_capturable_cents": intent.amount_capturable,
            "currency": (intent.currency or currency).upper(),
            "client_secret": intent.client_secret,
            "next_action": Jsonb(intent.next_action) if intent.next_action else None,
            "last_error_code": intent.error_code,
            "capture_before": intent.capture_before,
        },
    ).fetchone()
    if row is None:
        raise IntentMismatch(f"order {order_id} already has another PaymentIntent than {intent.id}")


def record_charge(
    conn: psycopg.Connection[Any],
    order_id: str,
    *,
    status: str,
    provider_ref: str | None,
    amount_cents: int,
    currency: str,
    idempotency_key: str,
    failure_code: str | None = None,
) -> None:
    """A captured (or failed) charge in the payments ledger; one success per order."""
    conn.execute(
        QUERIES["insert_payment"],
        {
            "order_id": order_id,
            "kind": "charge",
            "status": status,
            "provider_ref": provider_ref,
            "amount_cents": amount_cents,
            "currency": currency,
            "idempotency_key": idempotency_key,
            "failure_code": failure_code,
        },
    )


def record_refund(
    conn: psycopg.Connection[Any],
    order_id: str,
    *,
    refund: Mapping[str, Any],
    currency: str,
    idempotency_key: str,
) -> None:
    """A refund as Stripe reports it: pending, then succeeded (money back) or failed."""
    status = {"succeeded": "succeeded", "failed": "failed", "canceled": "failed"}.get(
        str(refund.get("status")), "pending"
    )
    conn.execute(
        QUERIES["record_refund"],
        {
            "order_id": order_id,
            "status": status,
            "provider_ref": refund["id"],
            "amount_cents": refund.get("amount") or 1,
            "currency": str(refund.get("currency") or currency).upper(),
            "idempotency_key": idempotency_key,
            "failure_code": refund.get("failure_reason"),
        },
    )


def record_payment_outcome(
    conn: psycopg.Connection[Any],
    order_id: str,
    intent: IntentView,
    *,
    total_cents: int,
    currency: str,
    idempotency_key: str,
) -> None:
    """Everything an answer about the PaymentIntent teaches: its status, and a
    capture (or a final failure) in the payments ledger."""
    record_intent(conn, order_id, intent, total_cents=total_cents, currency=currency)
    if intent.captured:
        record_charge(
            conn,
            order_id,
            status="succeeded",
            provider_ref=intent.id,
            amount_cents=intent.amount_received or intent.amount or total_cents,
            currency=currency,
            idempotency_key=idempotency_key,
        )
    elif intent.status in FAILED and total_cents > 0:
        record_charge(
            conn,
            order_id,
            status="failed",
            provider_ref=intent.id,
            amount_cents=total_cents,
            currency=currency,
            idempotency_key=idempotency_key,
            failure_code=intent.error_code or intent.status,
        )


def after_transition(
    conn: psycopg.Connection[Any],
    order_id: str,
    outcome: Outcome,
    intent: IntentView | None,
    processing_hold_s: int,
) -> None:
    """What a payment transition does to the stock: a capture sells the reserved
    units; a processing bank debit keeps them held (ORDERFLOW_PROCESSING_HOLD_S)
    while it settles, days for a SEPA debit."""
    if outcome.dest == OrderState.PAID:
        consume_reservation(conn, order_id)
    elif (
        outcome.dest == OrderState.AWAITING_PAYMENT
        and intent is not None
        and intent.status == "processing"
    ):
        conn.execute(
            QUERIES["extend_reservation"], {"order_id": order_id, "seconds": processing_hold_s}
        )


def apply_intent(
    conn: psycopg.Connection[Any],
    order_id: str,
    intent: IntentView,
    *,
    source: str,
    total_cents: int,
    currency: str,
    processing_hold_s: int,
    step: str = "await_payment",
) -> Outcome:
    """Apply what Stripe says of the order's PaymentIntent outside the worker (a
    webhook, a reconciliation): record it and fire the event its status means,
    in the caller's transaction.  Raises IllegalTransition (nothing applies) or
    IntentMismatch."""
    event = intent.event()
    record_payment_outcome(
        conn,
        order_id,
        intent,
        total_cents=total_cents,
        currency=currency,
        idempotency_key=f"{order_id}:{source}",
    )
    detail = {
        "step": step,
        "source": source,
        "payment_intent_id": intent.id,
        "intent_status": intent.status,
    }
    result = advance(conn, order_id, event, detail)
    after_transition(conn, order_id, result, intent, processing_hold_s)
    if result.dest != OrderState.AWAITING_PAYMENT:
        # The poll has nothing left to ask.
        conn.execute(
            QUERIES["finish_pending_step"], {"order_id": order_id, "step": "await_payment"}
        )
    return result
