"""`advance`: the one way an existing order changes state.

In one transaction it locks the order, asks the Machine where the event leads,
moves the order with a guarded UPDATE, appends the history row, inserts the
outbox rows the transition emits and NOTIFYs the worker channel.  Called inside
an open transaction (the worker finishing an outbox row) it joins it, so the
caller's row update and the transition commit or roll back together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from orderflow import failpoints
from sql import QUERIES, atomic
from statemachine.errors import OrderNotFound, StaleState
from statemachine.machine import HistoryEntry, Outcome, decide, facts_from_history


def advance(
    conn: psycopg.Connection[Any],
    order_id: str,
    event: str,
    detail: Mapping[str, Any] | None = None,
) -> Outcome:
    """Fire `event` on the order; commit its effects atomically or raise and write nothing.

    Raises OrderNotFound, IllegalTransition, InvalidEventDetail or StaleState.
    """
    detail = dict(detail or {})
    with atomic(conn), conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(QUERIES["lock_order"], {"order_id": order_id}).fetchone()
        if row is None:
            raise OrderNotFound(order_id)
        facts = facts_from_history(
            (
                HistoryEntry(h["from_state"], h["to_state"], h["event"], h["detail"] or {})
                for h in row["history"]
            ),
            emitted_steps=row["steps"],
        )
        outcome = decide(row["state"], event, facts, detail, order_id=order_id)
        result = cur.execute(
            QUERIES["transition_order"],
            {
                "order_id": order_id,
                "from_state": outcome.source.value,
                "to_state": outcome.dest.value,
                "event": event,
                "detail": Jsonb(detail),
                "steps": list(outcome.emits),
            },
        ).fetchone()
        if result is None or result["moved"] != 1:
            # Cannot happen while we hold the row lock, but the guard is the
            # database's word, not ours: never write on a stale read.
            raise StaleState(order_id, outcome.source.value)
        failpoints.hit("advance.after_write")
    return outcome
