"""`advance`: the one way an existing order changes state.

In one transaction it locks the order, asks the Machine where the event leads,
moves the order with a guarded UPDATE, appends the history row, inserts the
outbox rows the transition emits and NOTIFYs the worker channel.  Called inside
an open transaction (the worker finishing an outbox row) it joins it, so the
caller's row update and the transition commit or roll back together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from orderflow import failpoints
from orderflow.sql import QUERIES, atomic
from orderflow.statemachine.definition import EFFECTFUL_STEPS, STEP_SETTLED
from orderflow.statemachine.errors import (
    IllegalTransition,
    InvalidEventDetail,
    OrderNotFound,
    StaleState,
)
from orderflow.statemachine.machine import (
    HistoryEntry,
    OrderFacts,
    Outcome,
    already_recorded,
    decide,
    facts_from_history,
)


def advance(
    conn: psycopg.Connection[Any],
    order_id: str,
    event: str,
    detail: Mapping[str, Any] | None = None,
) -> Outcome:
    """Fire `event` on the order; commit its effects atomically or raise and write nothing.

    Raises OrderNotFound, IllegalTransition, InvalidEventDetail or StaleState.
    """
    [outcome] = advance_many(conn, [(order_id, event, dict(detail or {}))])
    return outcome


def settle(
    conn: psycopg.Connection[Any],
    order_id: str,
    event: str,
    detail: Mapping[str, Any] | None = None,
) -> Outcome | None:
    """What a step reports it found: fire `event`; if the order cannot take it because
    its history already holds it (a webhook, a reconciliation or a poll got there
    first), fire `step_settled` instead, so that a compensation waiting for the
    step can start; None (nothing written) when neither applies."""
    detail = dict(detail or {})
    with atomic(conn), conn.cursor(row_factory=dict_row) as cur:
        row = _lock_and_read(cur, [order_id])
        if order_id not in row:
            raise OrderNotFound(order_id)
        facts = _facts(row[order_id])
        try:
            outcome = decide(row[order_id]["state"], event, facts, detail, order_id=order_id)
        except (IllegalTransition, InvalidEventDetail):
            if event != STEP_SETTLED and not already_recorded(facts, event):
                raise
            try:
                event = STEP_SETTLED
                outcome = decide(row[order_id]["state"], event, facts, detail, order_id=order_id)
            except IllegalTransition:
                return None
        _write(cur, [(order_id, event, detail)], [outcome])
    return outcome


def advance_many(
    conn: psycopg.Connection[Any], moves: Sequence[tuple[str, str, Mapping[str, Any]]]
) -> list[Outcome]:
    """`advance` for a batch of (order id, event, detail), one order at most once
    (`advance` is a batch of one): one statement locks them all, one reads their
    facts, one moves them all.  All or nothing: any order that cannot move raises
    and nothing is written."""
    order_ids = [order_id for order_id, _, _ in moves]
    if len(set(order_ids)) != len(order_ids):
        raise ValueError("advance_many: an order appears twice in one batch")
    with atomic(conn), conn.cursor(row_factory=dict_row) as cur:
        locked = _lock_and_read(cur, order_ids)
        outcomes = []
        for order_id, event, detail in moves:
            if order_id not in locked:
                raise OrderNotFound(order_id)
            outcomes.append(_decide_locked(locked[order_id], event, detail))
        _write(cur, moves, outcomes)
    return outcomes


def _lock_and_read(cur: psycopg.Cursor[Any], order_ids: list[str]) -> dict[str, Any]:
    # Lock first, then read: a statement that had to wait for a lock still
    # sees the snapshot it started with, and would decide on stale history.
    cur.execute(QUERIES["lock_orders"], {"order_ids": order_ids})
    return {
        r["id"]: r
        for r in cur.execute(
            QUERIES["order_facts"],
            {"order_ids": order_ids, "effectful": list(EFFECTFUL_STEPS)},
        ).fetchall()
    }


def _write(
    cur: psycopg.Cursor[Any],
    moves: Sequence[tuple[str, str, Mapping[str, Any]]],
    outcomes: Sequence[Outcome],
) -> None:
    payload = [
        {
            "order_id": order_id,
            "from_state": outcome.source.value,
            "to_state": outcome.dest.value,
            "event": event,
            "detail": dict(detail),
            "steps": list(outcome.emits),
        }
        for (order_id, event, detail), outcome in zip(moves, outcomes, strict=True)
    ]
    result = cur.execute(QUERIES["transition_orders"], {"moves": Jsonb(payload)}).fetchone()
    if result is None or result["moved"] != len(moves):
        # Cannot happen while we hold the row locks, but the guard is the
        # database's word, not ours: never write on a stale read.
        raise StaleState(",".join(m[0] for m in moves), ",".join(o.source.value for o in outcomes))
    failpoints.hit("advance.after_write")


def _facts(row: Mapping[str, Any]) -> OrderFacts:
    return facts_from_history(
        (
            HistoryEntry(h["from_state"], h["to_state"], h["event"], h["detail"] or {})
            for h in row["history"]
        ),
        emitted_steps=row["steps"],
        unsettled_steps=row["unsettled"],
    )


def _decide_locked(row: Mapping[str, Any], event: str, detail: Mapping[str, Any]) -> Outcome:
    """Decide `event` for an order row read by order_facts (state, history, steps)."""
    return decide(row["state"], event, _facts(row), detail, order_id=row["id"])
