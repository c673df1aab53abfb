"""Operator actions on the outbox (the CLI and, later, the dashboard share them)."""

from __future__ import annotations

from typing import Any

import psycopg

from orderflow.sql import QUERIES, atomic
from orderflow.statemachine.definition import OrderState
from orderflow.statemachine.engine import advance
from orderflow.statemachine.errors import IllegalTransition, OrderflowError


class RedriveError(OrderflowError):
    pass


def redrive(conn: psycopg.Connection[Any], outbox_id: int) -> str:
    """A dead row goes back to pending, and its order back to where it was, in one transaction."""
    with atomic(conn):
        row = conn.execute(QUERIES["redrive_outbox_row"], {"id": outbox_id}).fetchone()
        if row is None:
            raise RedriveError(f"outbox row {outbox_id} is not a dead letter")
        state = conn.execute(QUERIES["get_order"], {"order_id": row["order_id"]}).fetchone()
        if state is not None and state["state"] == OrderState.NEEDS_ATTENTION:
            try:
                advance(
                    conn, row["order_id"], "redrive", {"step": row["step"], "outbox_id": outbox_id}
                )
            except IllegalTransition as exc:
                raise RedriveError(str(exc)) from exc
    return f"outbox row {outbox_id} ({row['step']} of order {row['order_id']}) is pending again"
