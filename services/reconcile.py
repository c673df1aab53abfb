"""`orderflow reconcile`: our orders against Stripe's PaymentIntents and refunds.

For every PaymentIntent Stripe created in the window (its list API, which is
strongly consistent) and every refund of the captured ones, compare with what
the order recorded.  Fix what the state machine allows: a capture we missed is
recorded (and, on an order that is cancelled or compensating, that means its
refund runs); an intent that waits on an order awaiting payment moves it as a
webhook would; an open intent no order recorded is cancelled (it never took
money).  Everything else is reported for a person; the command exits 1 if
anything is left for one.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg.rows import dict_row

from orderflow.services import payments
from orderflow.services.payments import IntentMismatch, IntentView
from orderflow.sql import QUERIES
from orderflow.statemachine.definition import OrderState
from orderflow.statemachine.errors import IllegalTransition, InvalidEventDetail


class Reply(Protocol):
    body: dict[str, Any]


class StripeReads(Protocol):
    """The calls reconcile makes (outbox_worker.providers.StripeApi has them)."""

    def list_intents(self, created_gte: int, starting_after: str | None = None) -> Any: ...
    def list_refunds(self, intent_id: str) -> Any: ...
    def retrieve_intent(self, intent_id: str) -> Any: ...
    def cancel_intent(self, intent_id: str, key: str) -> Any: ...


@dataclass(frozen=True)
class Finding:
    order_id: str | None
    intent_id: str | None
    what: str
    action: str  # "fixed: …", "in progress", or "for a person"

    @property
    def for_a_person(self) -> bool:
        return self.action == "for a person"


class StripeUnavailable(Exception):
    pass


def _ok_body(reply: Any) -> dict[str, Any]:
    body = getattr(reply, "body", None)
    if type(reply).__name__ != "Ok" or not isinstance(body, dict):
        raise StripeUnavailable(f"Stripe did not answer: {reply}")
    return body


def list_intents(stripe: StripeReads, since_epoch: int, max_pages: int = 1000) -> list[IntentView]:
    """Every PaymentIntent created since `since_epoch` (newest first), of every page."""
    found: list[IntentView] = []
    after: str | None = None
    for _ in range(max_pages):
        body = _ok_body(stripe.list_intents(since_epoch, after))
        data = body.get("data")
        if not isinstance(data, list):
            raise StripeUnavailable("unreadable list of PaymentIntents")
        found += [i for i in map(IntentView.parse, data) if i is not None]
        if not body.get("has_more") or not data:
            return found
        after = str(data[-1].get("id"))
    raise StripeUnavailable("too many PaymentIntents in the window")


def refunded_cents(stripe: StripeReads, intent_id: str) -> int:
    data = _ok_body(stripe.list_refunds(intent_id)).get("data")
    return sum(
        int(r.get("amount") or 0)
        for r in data or []
        if isinstance(r, dict) and r.get("status") == "succeeded"
    )


def _orders(
    conn: psycopg.Connection[Any], intents: Iterable[IntentView]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    intents = list(intents)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            QUERIES["reconcile_orders"],
            {
                "order_ids": [i.order_id for i in intents if i.order_id],
                "intent_ids": [i.id for i in intents],
                "states": None,
            },
        ).fetchall()
    return {r["order_id"]: r for r in rows}, {r["intent_id"]: r for r in rows if r["intent_id"]}


def reconcile(
    conn: psycopg.Connection[Any],
    stripe: StripeReads,
    since_s: float,
    *,
    fix: bool = True,
    processing_hold_s: int = 14 * 24 * 3600,
) -> list[Finding]:
    intents = list_intents(stripe, int(time.time() - since_s))
    by_order, by_intent = _orders(conn, intents)
    findings: list[Finding] = []
    for intent in intents:
        if not intent.order_id:
            continue  # not one of ours
        order = by_order.get(intent.order_id)
        if order is None:
            if intent.captured:
                findings.append(
                    Finding(
                        intent.order_id,
                        intent.id,
                        "money on a PaymentIntent for an order we do not have",
                        "for a person",
                    )
                )
            continue
        if order.get("intent_id") != intent.id:
            if order["payment_step_open"] and not order.get("intent_id"):
                # The charge step may still be using it (a create whose answer was lost).
                findings.append(Finding(intent.order_id, intent.id,
                                        "a PaymentIntent the charge step has not noted yet",
                                        "in progress"))  # fmt: skip
                continue
            findings += _orphan(stripe, intent, fix)
            continue
        findings += _compare(conn, stripe, intent, by_intent[intent.id], fix, processing_hold_s)
    return findings


def _orphan(stripe: StripeReads, intent: IntentView, fix: bool) -> list[Finding]:
    """An intent the order never recorded: it was never confirmed by us."""
    what = f"a PaymentIntent the order did not record ({intent.status})"
    if intent.captured or intent.status == "processing":
        return [Finding(intent.order_id, intent.id, f"money on {what}", "for a person")]
    if intent.status == "canceled":
        return []
    if not fix:
        return [Finding(intent.order_id, intent.id, what, "to cancel")]
    reply = stripe.cancel_intent(intent.id, f"{intent.order_id}:reconcile:cancel:{intent.id}")
    cancelled = IntentView.parse(getattr(reply, "body", None))
    if cancelled is not None and cancelled.status == "canceled":
        return [Finding(intent.order_id, intent.id, what, "fixed: cancelled at Stripe")]
    return [Finding(intent.order_id, intent.id, what, "for a person")]


def _release_hold(
    conn: psycopg.Connection[Any],
    stripe: StripeReads,
    order: dict[str, Any],
    intent: IntentView,
    fix: bool,
) -> Finding:
    """A cancelled order whose card is still held at Stripe: release the hold, and
    record the intent as Stripe then shows it."""
    order_id = str(order["order_id"])
    what = f"a cancelled order still holds {intent.amount_capturable} cents"
    if not fix:
        return Finding(order_id, intent.id, what, "to release")
    reply = stripe.cancel_intent(intent.id, f"{order_id}:reconcile:release:{intent.id}")
    cancelled = IntentView.parse(getattr(reply, "body", None))
    if cancelled is None or cancelled.status != "canceled":
        return Finding(order_id, intent.id, what, "for a person")
    with contextlib.suppress(IntentMismatch):
        payments.record_intent(
            conn,
            order_id,
            cancelled,
            total_cents=order["total_cents"],
            currency=order["currency"],
        )
    return Finding(order_id, intent.id, what, "fixed: hold released at Stripe")


def _compare(
    conn: psycopg.Connection[Any],
    stripe: StripeReads,
    intent: IntentView,
    order: dict[str, Any],
    fix: bool,
    hold_s: int,
) -> list[Finding]:
    order_id, state = str(order["order_id"]), str(order["state"])
    findings: list[Finding] = []
    if intent.captured and order["captured_cents"] == 0:
        if order["payment_step_open"] and state == OrderState.RESERVED:
            findings.append(Finding(order_id, intent.id, "capture not recorded yet", "in progress"))
        else:
            # Recording the capture is what makes the machine owe its refund.
            return [_apply(conn, order_id, intent, order, "a capture we missed", fix, hold_s)]
    elif not intent.captured and order["captured_cents"] > 0:
        findings.append(
            Finding(
                order_id,
                intent.id,
                f"we recorded a capture Stripe shows {intent.status}",
                "for a person",
            )
        )
    elif (
        state == OrderState.AWAITING_PAYMENT
        and intent.status != order["intent_status"]
        and (intent.event() != "payment_pending" or intent.status == "processing")
    ):
        findings.append(_apply(conn, order_id, intent, order, "a status we missed", fix, hold_s))
    if intent.held and state == OrderState.CANCELLED and not order["payment_step_open"]:
        findings.append(_release_hold(conn, stripe, order, intent, fix))
    elif intent.held and state == OrderState.CONFIRMED:
        findings.append(
            Finding(order_id, intent.id, "a confirmed order whose hold was never captured",
                    "for a person")
        )  # fmt: skip
    if intent.captured and state in (OrderState.CANCELLED, OrderState.RETURNED):
        kept = intent.amount_received - refunded_cents(stripe, intent.id)
        if kept > 0 and not order["payment_step_open"]:
            findings.append(
                Finding(
                    order_id, intent.id, f"{kept} cents kept on a {state} order", "for a person"
                )
            )
    if order["refunded_cents"] > 0 and (
        not intent.captured or refunded_cents(stripe, intent.id) < order["refunded_cents"]
    ):
        findings.append(
            Finding(
                order_id, intent.id, "we recorded a refund Stripe does not show", "for a person"
            )
        )
    return findings


def _apply(
    conn: psycopg.Connection[Any],
    order_id: str,
    intent: IntentView,
    order: dict[str, Any],
    what: str,
    fix: bool,
    hold_s: int,
) -> Finding:
    if not fix:
        return Finding(order_id, intent.id, what, "to fix")
    step = "await_payment" if order["state"] == OrderState.AWAITING_PAYMENT else "charge_payment"
    try:
        with conn.transaction():
            result = payments.apply_intent(
                conn,
                order_id,
                intent,
                source="reconcile",
                step=step,
                total_cents=order["total_cents"],
                currency=order["currency"],
                processing_hold_s=hold_s,
            )
    except (IllegalTransition, InvalidEventDetail, IntentMismatch) as exc:
        if intent.captured and order["state"] not in (OrderState.RESERVED,):
            # The order is past payment (paid, shipped...): record the money only.
            with conn.transaction():
                payments.record_payment_outcome(
                    conn,
                    order_id,
                    intent,
                    total_cents=order["total_cents"],
                    currency=order["currency"],
                    idempotency_key=f"{order_id}:reconcile",
                )
            return Finding(order_id, intent.id, what, "fixed: capture recorded")
        return Finding(order_id, intent.id, f"{what}: {exc}", "for a person")
    return Finding(order_id, intent.id, what, f"fixed: {intent.event()} ({result.dest.value})")


def render(findings: list[Finding]) -> str:
    if not findings:
        return "reconcile: orders and Stripe agree"
    lines = [f"{'order':<26}  {'payment intent':<30}  {'action':<24}  what"]
    for f in findings:
        lines.append(f"{f.order_id or '-':<26}  {f.intent_id or '-':<30}  {f.action:<24}  {f.what}")
    left = sum(f.for_a_person for f in findings)
    lines.append(f"{len(findings)} findings, {left} for a person")
    return "\n".join(lines)
