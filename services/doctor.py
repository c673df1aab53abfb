"""`orderflow doctor`: SPEC.md's invariants, checked on a live database (and sandbox).

Each check prints pass or FAIL with the offending ids; the command exits 1 on
any failure.  The reliability tests use it as their oracle.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from orderflow.services.payments import IntentView
from orderflow.services.reconcile import StripeReads, refunded_cents
from orderflow.sql import QUERIES
from orderflow.statemachine.definition import FORWARD_ACTIONS, TRANSITIONS, OrderState

# newest forward action first: the order compensations must run in
COMPENSATION_ORDER = [a.compensation for a in reversed(FORWARD_ACTIONS)]


@dataclass
class Check:
    name: str
    offenders: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.offenders


def _ids(conn: psycopg.Connection[Any], query: str, render: Callable[[Any], str]) -> list[str]:
    return [render(row) for row in conn.execute(QUERIES[query], _params(query))]


def _params(query: str) -> dict[str, Any]:
    if query != "doctor_bad_edges":
        return {}
    return {
        "sources": [t.source.value if t.source else None for t in TRANSITIONS],
        "events": [t.event for t in TRANSITIONS],
        "dests": [t.dest.value for t in TRANSITIONS],
    }


# events that start compensating an order from a forward state
ENTERING_COMPENSATION = {
    t.event
    for t in TRANSITIONS
    if t.dest == OrderState.COMPENSATING
    and t.source in (OrderState.RESERVED, OrderState.PAID, OrderState.SHIPPED)
}


def out_of_order_compensations(events: list[str], steps: list[str]) -> bool:
    """Compensations run newest first.  The one exception: a capture that lands after
    compensation began (its reservation expired meanwhile) owes a refund, which then
    runs whenever it can, possibly after the release."""
    entered = late_capture = False
    last = -1
    for event, step in zip(events, steps, strict=True):
        if event in ENTERING_COMPENSATION:
            entered = True
        elif event in ("payment_captured", "payment_authorized") and entered:
            late_capture = True  # a late capture, or a late hold (released the same way)
        elif event == "compensation_done" and step in COMPENSATION_ORDER:
            if late_capture and step == "refund_payment":
                continue
            position = COMPENSATION_ORDER.index(step)
            if position < last:
                return True
            last = position
    return False


def money_kept_at_provider(
    conn: psycopg.Connection[Any], effects: list[dict[str, Any]]
) -> list[str]:
    """Cancelled or returned orders for which the provider's effects show money
    taken and not given back, or a hold neither captured nor released (a refund
    or release still being worked on excepted)."""
    kept: Counter[str] = Counter()
    held: Counter[str] = Counter()
    for e in effects:
        amount = int(e.get("amount") or 0)
        if e["kind"] == "charge":
            kept[e["order_id"]] += amount
            held[e["order_id"]] -= amount  # a capture ends its hold
        elif e["kind"] == "refund":
            kept[e["order_id"]] -= amount
        elif e["kind"] == "authorization":
            held[e["order_id"]] += amount
        elif e["kind"] == "authorization_release":
            held[e["order_id"]] -= amount
    settled = {r["order_id"]: r["state"] for r in conn.execute(QUERIES["doctor_settled_orders"])}
    working = {r["order_id"] for r in conn.execute(QUERIES["doctor_refunds_open"])}
    offenders = [
        f"{o} ({settled[o]}: {n} cents kept)"
        for o, n in kept.items()
        if n > 0 and o in settled and o not in working
    ]
    offenders += [
        f"{o} ({settled[o]}: {n} cents still held)"
        for o, n in held.items()
        if n > 0 and o in settled and o not in working
    ]
    return sorted(offenders)


def money_kept_at_stripe(conn: psycopg.Connection[Any], stripe: StripeReads) -> list[str]:
    """The same check against Stripe's API: each cancelled or returned order's
    PaymentIntent and its refunds."""
    with conn.cursor() as cur:
        rows = cur.execute(
            QUERIES["reconcile_orders"],
            {"order_ids": [], "intent_ids": [], "states": ["cancelled", "returned"]},
        ).fetchall()
    offenders = []
    for row in rows:
        if row["payment_step_open"]:
            continue
        intent = IntentView.parse(getattr(stripe.retrieve_intent(row["intent_id"]), "body", None))
        if intent is None:
            offenders.append(f"{row['order_id']} (Stripe did not answer for {row['intent_id']})")
            continue
        if intent.captured:
            kept = intent.amount_received - refunded_cents(stripe, intent.id)
            if kept > 0:
                offenders.append(f"{row['order_id']} ({row['state']}: {kept} cents kept)")
        elif intent.held:
            offenders.append(
                f"{row['order_id']} ({row['state']}: {intent.amount_capturable} cents held)"
            )
    return offenders


def run_checks(
    conn: psycopg.Connection[Any],
    effects: list[dict[str, Any]] | None = None,
    stripe: StripeReads | None = None,
) -> list[Check]:
    checks = [
        Check(
            "at most one captured payment per order",
            _ids(conn, "doctor_double_charges", lambda r: r["order_id"]),
        ),
        Check(
            "every captured payment shipped or refunded",
            _ids(conn, "doctor_kept_money", lambda r: r["order_id"]),
        ),
        Check(
            "stock conserved per SKU (initial = available + reserved + sold - restocked)",
            _ids(
                conn,
                "doctor_stock",
                lambda r: (
                    f"{r['sku']} (available {r['available']}, ledger {r['ledger_balance']},"
                    f" initial {r['initial']}, live {r['live']}, sold {r['sold']},"
                    f" restocked {r['restocked']})"
                ),
            ),
        ),
        Check(
            "one order per (user, idempotency key)",
            _ids(conn, "doctor_duplicate_keys", lambda r: f"{r['user_id']}/{r['idempotency_key']}"),
        ),
        Check(
            "every history row an edge of the machine, in a path",
            _ids(
                conn,
                "doctor_bad_edges",
                lambda r: (
                    f"{r['order_id']}#{r['id']} {r['from_state']} -{r['event']}-> {r['to_state']}"
                ),
            ),
        ),
        Check(
            "compensations newest first",
            [
                r["order_id"]
                for r in conn.execute(QUERIES["doctor_compensation_sequences"])
                if out_of_order_compensations(r["events"], r["steps"])
            ],
        ),
        Check(
            "nothing in a working state past its timeout",
            _ids(conn, "doctor_stuck", lambda r: f"{r['order_id']} ({r['state']})"),
        ),
        Check(
            "no cancelled order holds uncaptured funds",
            _ids(conn, "doctor_cancelled_holds", lambda r: r["order_id"]),
        ),
        Check(
            "no confirmed order has an uncaptured hold",
            _ids(conn, "doctor_confirmed_holds", lambda r: r["order_id"]),
        ),
        Check(
            "every state change has its event, every event its state change",
            _ids(
                conn,
                "doctor_events_match_history",
                lambda r: f"{r['order_id']}#{r['history_id']} ({r['problem']})",
            ),
        ),
    ]
    if effects is not None:
        keys = Counter(e["idempotency_key"] for e in effects)
        checks.append(
            Check(
                "each provider effect once per idempotency key",
                [k for k, n in keys.items() if n > 1],
            )
        )
        charged = Counter(e["order_id"] for e in effects if e["kind"] == "charge")
        recorded = {r["order_id"]: r["n"] for r in conn.execute(QUERIES["doctor_payment_charges"])}
        # A charge whose answer was lost is replayed with its key; until then
        # the provider knows of it and we do not yet.
        in_flight = {r["order_id"] for r in conn.execute(QUERIES["doctor_charges_in_flight"])}
        checks.append(
            Check(
                "provider charges match recorded payments",
                sorted(
                    o
                    for o in set(charged) | set(recorded)
                    if charged.get(o, 0) != recorded.get(o, 0) and o not in in_flight
                ),
            )
        )
        checks.append(
            Check(
                "no cancelled or returned order keeps money at the provider",
                money_kept_at_provider(conn, effects),
            )
        )
    elif stripe is not None:
        checks.append(
            Check(
                "no cancelled or returned order keeps money at Stripe",
                money_kept_at_stripe(conn, stripe),
            )
        )
    return checks


def report(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        mark = "pass" if check.ok else "FAIL"
        lines.append(f"[{mark}] {check.name}")
        for offender in check.offenders[:20]:
            lines.append(f"         {offender}")
        if len(check.offenders) > 20:
            lines.append(f"         ... and {len(check.offenders) - 20} more")
    return "\n".join(lines)
