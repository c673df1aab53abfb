"""Processing one claimed outbox row: call the provider, then commit the outcome.

The outcome commits in ONE transaction: the row (done, retried or dead, fenced
by owner and fence so a worker whose lease was taken over cannot commit), the
facts learned (payments, shipments, stock) and the state-machine event, which
writes the next outbox rows.  No transaction is open during a provider call.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from orderflow import failpoints
from orderflow.metrics import COMPENSATIONS, DEAD_LETTERS, STEP_LATENCY, STEP_RETRIES
from orderflow.orders import consume_reservation, release_inventory, restock_order
from outbox_worker.outcomes import Kind, StepOutcome, backoff_s
from sql import QUERIES
from statemachine.definition import STEPS_BY_NAME, OrderState, Step
from statemachine.engine import advance, advance_many
from statemachine.errors import IllegalTransition, InvalidEventDetail, OrderNotFound, StaleState

log = logging.getLogger("orderflow.worker")


class ProviderCalls(Protocol):
    def charge(self, ctx: Mapping[str, Any], key: str) -> StepOutcome: ...
    def refund(self, ctx: Mapping[str, Any], key: str) -> StepOutcome: ...
    def ship(self, ctx: Mapping[str, Any], key: str) -> StepOutcome: ...
    def cancel_shipment(self, ctx: Mapping[str, Any], key: str) -> StepOutcome: ...
    def return_label(self, ctx: Mapping[str, Any], key: str) -> StepOutcome: ...
    def send_confirmation(self, ctx: Mapping[str, Any], key: str) -> StepOutcome: ...


@dataclass(frozen=True)
class ClaimedRow:
    id: int
    order_id: str
    step: str
    idempotency_key: str
    fence: int
    attempts: int
    payload: dict[str, Any]
    # What the step needs to know about its order, read by the claim itself
    # (state, money, address, lines, payment and shipment references).
    context: dict[str, Any]


# Which provider call runs each external step (local steps have none).
CALLS: dict[str, Callable[[ProviderCalls, Mapping[str, Any], str], StepOutcome]] = {
    "charge_payment": lambda p, c, k: p.charge(c, k),
    "refund_payment": lambda p, c, k: p.refund(c, k),
    "refund_return": lambda p, c, k: p.refund(c, k),
    "ship_order": lambda p, c, k: p.ship(c, k),
    "cancel_shipment": lambda p, c, k: p.cancel_shipment(c, k),
    "create_return_label": lambda p, c, k: p.return_label(c, k),
    "send_confirmation": lambda p, c, k: p.send_confirmation(c, k),
}
LOCAL_STEPS = frozenset({"release_inventory", "restock_inventory"})

# A forward step whose order has moved on must not start its effect at all.
ONLY_IN_STATE: dict[str, OrderState] = {
    "charge_payment": OrderState.RESERVED,
    "ship_order": OrderState.PAID,
}


@dataclass(frozen=True)
class WorkerConfig:
    owner: str
    lease_s: float = 30.0
    backoff_scale: float = 1.0  # tests shrink the seed's backoff; never below 0


def claim(conn: psycopg.Connection[Any], config: WorkerConfig, limit: int) -> list[ClaimedRow]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            QUERIES["claim_outbox"],
            {"limit": limit, "owner": config.owner, "lease_s": config.lease_s},
        ).fetchall()
    return [
        ClaimedRow(
            id=r["id"],
            order_id=r["order_id"],
            step=r["step"],
            idempotency_key=r["idempotency_key"],
            fence=r["fence"],
            attempts=r["attempts"],
            payload=r["payload"] or {},
            context=r["context"],
        )
        for r in rows
    ]


def process(
    conn: psycopg.Connection[Any],
    row: ClaimedRow,
    providers: ProviderCalls,
    config: WorkerConfig,
) -> str:
    """Run one claimed row to its committed outcome; returns a label for the logs."""
    started = time.monotonic()
    return commit_step(conn, row, call_step(row, providers), config, started)


def call_step(row: ClaimedRow, providers: ProviderCalls) -> StepOutcome | None:
    """The step's provider call (no database: the claim read the context).

    None means "skip": a forward step whose order moved on, and no earlier
    attempt of which can have reached the provider."""
    required = ONLY_IN_STATE.get(row.step)
    if required is not None and row.context["state"] != required and not _may_have_called(row):
        return None
    if row.step in LOCAL_STEPS:
        return StepOutcome.success()
    failpoints.hit(f"{row.step}.before_call")
    outcome = CALLS[row.step](providers, row.context, row.idempotency_key)
    failpoints.hit(f"{row.step}.after_call")
    return outcome


def commit_step(
    conn: psycopg.Connection[Any],
    row: ClaimedRow,
    outcome: StepOutcome | None,
    config: WorkerConfig,
    started: float,
) -> str:
    """Commit what `call_step` came to, in one transaction; returns the log label."""
    ctx = row.context
    if outcome is None:
        try:
            with conn.transaction():
                _finish_row(conn, row, config, note=f"skipped: order is {ctx['state']}")
        except StaleLease:
            return _logged(row, "stale", started)
        return _logged(row, "skipped", started)
    spec = STEPS_BY_NAME[row.step]
    if outcome.kind == Kind.SUCCESS:
        label = _commit_success(conn, row, spec, ctx, outcome, config)
    elif outcome.kind == Kind.PERMANENT:
        label = _commit_failure(conn, row, spec, ctx, outcome, config)
    else:
        label = _retry_or_give_up(conn, row, spec, ctx, outcome, config)
    return committed(row, label, started, outcome.error)


def committed(row: ClaimedRow, label: str, started: float, error: str | None = None) -> str:
    """After a step's commit: its failpoint, its metrics and its log line."""
    failpoints.hit(f"{row.step}.after_commit")
    return _logged(row, label, started, error)


def _may_have_called(row: ClaimedRow) -> bool:
    """Could an earlier attempt of this row have reached the provider?  Then
    skipping would keep whatever it did (money taken, a parcel booked); only a
    replay with the same key can tell.  An attempt is known not to have reached
    it when its failure was committed as definite (5xx, refused: `not_done`)."""
    if row.payload.get("unknown_outcome") or row.payload.get("maybe_called"):
        return True
    return row.attempts - 1 > int(row.payload.get("not_done", 0))


def _logged(row: ClaimedRow, outcome: str, started: float, error: str | None = None) -> str:
    STEP_LATENCY.labels(row.step, outcome).observe(time.monotonic() - started)
    if outcome in ("retry", "replay", "throttled"):
        STEP_RETRIES.labels(row.step).inc()
    elif outcome == "dead":
        DEAD_LETTERS.labels(row.step).inc()
    elif outcome == "done" and STEPS_BY_NAME[row.step].compensates:
        COMPENSATIONS.labels(row.step).inc()
    log.info(
        "step %s",
        outcome,
        extra={
            "order_id": row.order_id,
            "step": row.step,
            "attempt": row.attempts,
            "outcome": outcome,
            "duration_ms": round((time.monotonic() - started) * 1000, 2),
            **({"error": error} if error else {}),
        },
    )
    return outcome


class StaleLease(Exception):
    """Our lease was taken over; the result must not be committed."""


def _finish_row(
    conn: psycopg.Connection[Any], row: ClaimedRow, config: WorkerConfig, note: str | None = None
) -> None:
    if len(_finish_rows(conn, [(row, note)], config)) != 1:
        raise StaleLease(row.id)


def _finish_rows(
    conn: psycopg.Connection[Any],
    rows: Sequence[tuple[ClaimedRow, str | None]],
    config: WorkerConfig,
) -> list[Any]:
    """Mark rows done (with a note each) where our lease holds; returns those it marked."""
    return conn.execute(
        QUERIES["finish_outbox_rows"],
        {
            "owner": config.owner,
            "rows": Jsonb([{"id": r.id, "fence": r.fence, "note": note} for r, note in rows]),
        },
    ).fetchall()


def _shipment(row: ClaimedRow, facts: Mapping[str, Any]) -> dict[str, Any]:
    """The shipments row a ship_order or create_return_label success records."""
    return {
        "order_id": row.order_id,
        "kind": "outbound" if row.step == "ship_order" else "return",
        "carrier_ref": facts["shipment_id"],
        "tracking_number": facts.get("tracking_number"),
        "label_url": facts.get("label_url"),
        "idempotency_key": row.idempotency_key,
    }


def _commit_success(
    conn: psycopg.Connection[Any],
    row: ClaimedRow,
    spec: Step,
    ctx: Mapping[str, Any],
    outcome: StepOutcome,
    config: WorkerConfig,
) -> str:
    try:
        with conn.transaction():
            _finish_row(conn, row, config, note=outcome.facts.get("note"))
            detail = _record_success(conn, row, ctx, outcome)
            failpoints.hit(f"{row.step}.before_commit")
            if spec.on_success is not None:
                result = advance(conn, row.order_id, spec.on_success, detail)
                if row.step == "charge_payment" and result.dest == OrderState.PAID:
                    consume_reservation(conn, row.order_id)
    except StaleLease:
        return "stale"
    except (IllegalTransition, InvalidEventDetail) as exc:
        return _dead_letter(conn, row, config, f"cannot apply success: {exc}")
    return "done"


def _record_success(
    conn: psycopg.Connection[Any], row: ClaimedRow, ctx: Mapping[str, Any], outcome: StepOutcome
) -> dict[str, Any]:
    """Write what the step did; return the detail of its history row."""
    facts = outcome.facts
    detail = _success_detail(row.step, facts)
    if row.step == "charge_payment":
        _payment(conn, row, ctx, "charge", "succeeded", facts["payment_intent_id"], facts)
    elif row.step in ("refund_payment", "refund_return"):
        _payment(conn, row, ctx, "refund", "succeeded", facts["refund_id"], facts)
    elif row.step in ("ship_order", "create_return_label"):
        conn.execute(QUERIES["insert_shipments"], {"shipments": Jsonb([_shipment(row, facts)])})
    elif row.step == "cancel_shipment":
        conn.execute(QUERIES["cancel_shipment_row"], {"order_id": row.order_id})
    elif row.step == "release_inventory":
        release_inventory(conn, row.order_id)
    elif row.step == "restock_inventory":
        restock_order(conn, row.order_id)
    return detail


def _success_detail(step: str, facts: Mapping[str, Any]) -> dict[str, Any]:
    """The detail of the history row a successful step writes."""
    detail: dict[str, Any] = {"step": step}
    if step == "charge_payment":
        detail["payment_intent_id"] = facts["payment_intent_id"]
    elif step in ("refund_payment", "refund_return"):
        detail["refund_id"] = facts["refund_id"]
    elif step in ("ship_order", "create_return_label"):
        detail["tracking_number"] = facts.get("tracking_number")
    return detail


def _payment(
    conn: psycopg.Connection[Any],
    row: ClaimedRow,
    ctx: Mapping[str, Any],
    kind: str,
    status: str,
    ref: str | None,
    facts: Mapping[str, Any],
) -> None:
    conn.execute(
        QUERIES["insert_payment"],
        {
            "order_id": row.order_id,
            "kind": kind,
            "status": status,
            "provider_ref": ref,
            "amount_cents": facts.get("amount_cents") or ctx["total_cents"],
            "currency": ctx["currency"],
            "idempotency_key": row.idempotency_key,
            "failure_code": facts.get("decline_code") or facts.get("code"),
        },
    )


def _commit_failure(
    conn: psycopg.Connection[Any],
    row: ClaimedRow,
    spec: Step,
    ctx: Mapping[str, Any],
    outcome: StepOutcome,
    config: WorkerConfig,
) -> str:
    """A definite failure: compensate (error edge) or dead-letter (no error edge)."""
    if spec.on_failure == "step_dead_lettered":
        return _dead_letter(conn, row, config, outcome.error or "failed")
    try:
        with conn.transaction():
            _finish_row(conn, row, config, note=outcome.error)
            if row.step == "charge_payment" and ctx["total_cents"] > 0:
                _payment(conn, row, ctx, "charge", "failed", None, outcome.facts)
            detail = {"step": row.step, "error": outcome.error}
            if outcome.facts.get("effects_done"):
                detail["effects_done"] = outcome.facts["effects_done"]
            advance(conn, row.order_id, spec.on_failure, detail)
    except StaleLease:
        return "stale"
    except (IllegalTransition, InvalidEventDetail):
        # The order moved on (e.g. its reservation expired meanwhile): the
        # failure changes nothing; the row is done.
        with conn.transaction():
            try:
                _finish_row(conn, row, config, note=outcome.error)
            except StaleLease:
                return "stale"
    return "failed"


def _dead_letter(
    conn: psycopg.Connection[Any], row: ClaimedRow, config: WorkerConfig, error: str
) -> str:
    with conn.transaction():
        dead = conn.execute(
            QUERIES["dead_outbox_row"],
            {"id": row.id, "owner": config.owner, "fence": row.fence, "error": error},
        ).fetchone()
        if dead is None:
            return "stale"
        with contextlib.suppress(IllegalTransition):  # already waiting for an operator
            advance(conn, row.order_id, "step_dead_lettered", {"step": row.step, "error": error})
    return "dead"


def _retry_or_give_up(
    conn: psycopg.Connection[Any],
    row: ClaimedRow,
    spec: Step,
    ctx: Mapping[str, Any],
    outcome: StepOutcome,
    config: WorkerConfig,
) -> str:
    unknown = outcome.kind == Kind.UNKNOWN or bool(row.payload.get("unknown_outcome"))
    throttled = outcome.kind == Kind.THROTTLED
    exhausted = row.attempts >= spec.retry.max_attempts and not throttled
    if exhausted and not (unknown and spec.on_failure != "step_dead_lettered"):
        # Out of attempts, and the effect is known not to have happened (or an
        # operator will re-drive it with the same key): fail for good.
        return _commit_failure(conn, row, spec, ctx, outcome, config)
    # Retry.  A step whose outcome is unknown and whose failure would compensate
    # is replayed (same key) until it answers: compensating blind could keep
    # money that was taken, or refund money that never was.
    # Throttled tries give their attempt back but still stretch the backoff.
    throttles = int(row.payload.get("throttled", 0)) + (1 if throttled else 0)
    attempt = min(row.attempts, spec.retry.max_attempts) + throttles
    delay = backoff_s(spec.retry, attempt, config.backoff_scale)
    if outcome.retry_after_s is not None:
        delay = max(delay, outcome.retry_after_s)
    with conn.transaction():
        updated = conn.execute(
            QUERIES["retry_outbox_row"],
            {
                "id": row.id,
                "owner": config.owner,
                "fence": row.fence,
                "delay_s": delay,
                "error": outcome.error,
                "payload": Jsonb(
                    {
                        **({"unknown_outcome": True} if unknown else {}),
                        "throttled": throttles,
                        # a definite "not done" (5xx, refused): this attempt did nothing
                        "not_done": int(row.payload.get("not_done", 0))
                        + (0 if unknown or throttled else 1),
                    }
                ),
                "give_back_attempt": throttled,
            },
        ).fetchone()
    if updated is None:
        return "stale"
    return "throttled" if throttled else "replay" if unknown else "retry"


# Steps whose successes the daemon commits in batches: the shipping path, where
# the facts are one shipment row (or none).  The others commit one by one.
BATCHED_STEPS = frozenset({"ship_order", "send_confirmation"})


@dataclass(frozen=True)
class Success:
    """A successful provider call waiting for its commit."""

    row: ClaimedRow
    outcome: StepOutcome


class BatchNotApplied(Exception):
    """Some row of the batch cannot commit with the others (a lost lease)."""


def commit_successes(
    conn: psycopg.Connection[Any], items: Sequence[Success], config: WorkerConfig
) -> list[str | BaseException]:
    """Commit many successes in ONE transaction: the rows, the shipments, the
    transitions (one statement each).  If any of them cannot (a lost lease, an
    order that moved on), the transaction rolls back whole and each is
    committed alone, with the single-row path's handling of its case."""
    try:
        _commit_batch(conn, items, config)
        return ["done"] * len(items)
    except (
        BatchNotApplied,
        IllegalTransition,
        InvalidEventDetail,
        StaleState,
        OrderNotFound,
        psycopg.errors.IntegrityError,
        psycopg.errors.DeadlockDetected,
    ):
        pass
    results: list[str | BaseException] = []
    for item in items:
        try:
            spec = STEPS_BY_NAME[item.row.step]
            results.append(
                _commit_success(conn, item.row, spec, item.row.context, item.outcome, config)
            )
        except Exception as exc:  # this row's; the others go on
            results.append(exc)
    return results


def _commit_batch(
    conn: psycopg.Connection[Any], items: Sequence[Success], config: WorkerConfig
) -> None:
    with conn.transaction():
        finished = _finish_rows(conn, [(i.row, i.outcome.facts.get("note")) for i in items], config)
        if len(finished) != len(items):
            raise BatchNotApplied("a lease was lost")
        shipments = [_shipment(i.row, i.outcome.facts) for i in items if i.row.step == "ship_order"]
        if shipments:
            conn.execute(QUERIES["insert_shipments"], {"shipments": Jsonb(shipments)})
        for item in items:
            failpoints.hit(f"{item.row.step}.before_commit")
        advance_many(
            conn,
            [
                (
                    i.row.order_id,
                    str(STEPS_BY_NAME[i.row.step].on_success),
                    _success_detail(i.row.step, i.outcome.facts),
                )
                for i in items
            ],
        )
