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

from sql import QUERIES
from statemachine.definition import FORWARD_ACTIONS, TRANSITIONS, OrderState

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
        elif event == "payment_captured" and entered:
            late_capture = True
        elif event == "compensation_done" and step in COMPENSATION_ORDER:
            if late_capture and step == "refund_payment":
                continue
            position = COMPENSATION_ORDER.index(step)
            if position < last:
                return True
            last = position
    return False


def run_checks(
    conn: psycopg.Connection[Any], effects: list[dict[str, Any]] | None = None
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
