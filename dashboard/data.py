"""What the dashboard shows, read from Postgres (no web framework here).

Every figure comes from the `reporting` views or a named statement, so the
page agrees with what an analyst gets from plain SQL.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import psycopg

from orderflow.sql import QUERIES
from orderflow.statemachine.definition import OrderState
from orderflow.statemachine.graph import mermaid

LIST_LIMIT = 50
FUNNEL_DAYS = 14
MAX_QUERY_LENGTH = 255


@dataclass(frozen=True)
class Overview:
    counts: dict[str, int]
    oldest: dict[str, Any]
    diagram: str
    backlog: list[dict[str, Any]]
    dead_letters: list[dict[str, Any]]
    dead_total: int
    needs_attention: list[dict[str, Any]]
    stuck: list[dict[str, Any]]
    funnel: list[dict[str, Any]]
    funnel_as_of: Any
    money: list[dict[str, Any]]  # held vs captured, per currency
    holds_near_expiry: list[dict[str, Any]]
    cancellations: list[dict[str, Any]]
    events: dict[str, Any]  # the relay's lag (reporting.event_backlog)

    @property
    def total_orders(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class OrderDetail:
    order: dict[str, Any]
    lines: list[dict[str, Any]]
    history: list[dict[str, Any]]
    outbox: list[dict[str, Any]]
    payments: list[dict[str, Any]]
    shipments: list[dict[str, Any]]
    intent: dict[str, Any] | None = None  # the PaymentIntent as last seen


# Holds this close to Stripe's capture_before are flagged (the worker acts at
# ORDERFLOW_HOLD_MARGIN_S, 24 h by default): two days shows them coming.
HOLD_WARNING_S = 2 * 24 * 3600


def overview(conn: psycopg.Connection[Any]) -> Overview:
    """Everything on the overview, read in one snapshot so its figures agree with each other."""
    with conn.transaction():
        conn.execute(QUERIES["dashboard_snapshot"])
        states = conn.execute(QUERIES["report_order_states"]).fetchall()
        backlog = conn.execute(QUERIES["report_outbox_backlog"]).fetchall()
        funnel = conn.execute(QUERIES["dashboard_funnel"], {"days": FUNNEL_DAYS}).fetchall()
        dead_letters = conn.execute(
            QUERIES["dashboard_dead_letters"], {"limit": LIST_LIMIT}
        ).fetchall()
        needs_attention = conn.execute(
            QUERIES["dashboard_needs_attention"], {"limit": LIST_LIMIT}
        ).fetchall()
        stuck = conn.execute(QUERIES["dashboard_stuck_orders"], {"limit": LIST_LIMIT}).fetchall()
        money = conn.execute(QUERIES["dashboard_money"]).fetchall()
        holds = conn.execute(
            QUERIES["dashboard_holds_near_expiry"],
            {"margin_s": HOLD_WARNING_S, "limit": LIST_LIMIT},
        ).fetchall()
        cancellations = conn.execute(QUERIES["dashboard_cancellations"]).fetchall()
        events = conn.execute(QUERIES["report_event_backlog"]).fetchone() or {}
    counts = {row["state"]: int(row["orders"]) for row in states}
    return Overview(
        counts=counts,
        oldest={row["state"]: row["oldest_age"] for row in states if row["orders"]},
        diagram=mermaid(counts),
        backlog=backlog,
        dead_letters=dead_letters,
        dead_total=sum(int(row["dead"]) for row in backlog),
        needs_attention=needs_attention,
        stuck=stuck,
        funnel=funnel,  # oldest day first, as a chart reads
        funnel_as_of=funnel[0]["as_of"] if funnel else None,
        money=money,
        holds_near_expiry=holds,
        cancellations=cancellations,
        events=events,
    )


def valid_text(value: str) -> bool:
    """What may reach Postgres as a search or an id: bounded, no NUL (text cannot hold one)."""
    return 0 < len(value) <= MAX_QUERY_LENGTH and "\x00" not in value


def find_orders(conn: psycopg.Connection[Any], query: str) -> list[dict[str, Any]]:
    """Orders whose id, idempotency key or (for a UUID) user id equals `query`."""
    query = query.strip()
    if not valid_text(query):
        return []
    user_id: uuid.UUID | None
    try:
        user_id = uuid.UUID(query)
    except ValueError:
        user_id = None
    return conn.execute(
        QUERIES["dashboard_find_orders"],
        {"q": query, "user_id": user_id, "limit": LIST_LIMIT},
    ).fetchall()


def order_detail(conn: psycopg.Connection[Any], order_id: str) -> OrderDetail | None:
    if not valid_text(order_id):
        return None
    order = conn.execute(QUERIES["dashboard_order"], {"order_id": order_id}).fetchone()
    if order is None:
        return None
    params = {"order_id": order_id}
    return OrderDetail(
        order=order,
        lines=conn.execute(QUERIES["dashboard_order_lines"], params).fetchall(),
        history=conn.execute(QUERIES["order_history"], params).fetchall(),
        outbox=conn.execute(QUERIES["order_outbox"], params).fetchall(),
        payments=conn.execute(QUERIES["dashboard_order_payments"], params).fetchall(),
        shipments=conn.execute(QUERIES["dashboard_order_shipments"], params).fetchall(),
        intent=conn.execute(QUERIES["dashboard_order_intent"], params).fetchone(),
    )


STATES: tuple[str, ...] = tuple(s.value for s in OrderState)
