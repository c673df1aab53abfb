"""Processing one claimed outbox row: run its step (outbox_worker/steps.py), then
commit what it came to.

The outcome commits in ONE transaction: the row (done, retried or dead, fenced
by owner and fence so a worker whose lease was taken over cannot commit), the
facts learned (payments, shipments, stock) and the state-machine event, which
writes the next outbox rows.  No transaction is open during a provider call;
the only write before one is a step's checkpoint (a PaymentIntent's id noted
before it is confirmed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from orderflow import failpoints
from orderflow.metrics import COMPENSATIONS, DEAD_LETTERS, STEP_LATENCY, STEP_RETRIES
from orderflow.outbox_worker.bridge import offload
from orderflow.outbox_worker.outcomes import (
    Action,
    AttemptHistory,
    Kind,
    RetryDecision,
    StepOutcome,
    decide_crash,
    decide_retry,
)
from orderflow.outbox_worker.steps import (
    STEP_IMPLEMENTATIONS,
    OrderMoved,
    ProviderCalls,
    RecordCall,
    StepCall,
    StepSettings,
    settled_nothing,
)
from orderflow.services.payments import IntentMismatch
from orderflow.sql import QUERIES
from orderflow.statemachine.definition import (
    DEAD_LETTER_EVENT,
    STEP_SETTLED,
    STEPS_BY_NAME,
    OnFailure,
    OrderState,
    Step,
)
from orderflow.statemachine.engine import advance, advance_many, settle
from orderflow.statemachine.errors import (
    IllegalTransition,
    InvalidEventDetail,
    OrderNotFound,
    StaleState,
)
from orderflow.statemachine.machine import Outcome

log = logging.getLogger("orderflow.worker")

Connect = Callable[[], AbstractContextManager[psycopg.Connection[Any]]]


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

    @property
    def lost_attempts(self) -> int:
        """Claims of this row that ended without any commit (a worker died)."""
        return max(0, self.attempts - 1 - int(self.payload.get("last_attempt", 0)))

    @property
    def unsettled(self) -> bool:
        """Could an earlier attempt have had an effect we do not know of?"""
        return bool(self.payload.get("unsettled")) or self.lost_attempts > 0


@dataclass(frozen=True)
class WorkerConfig:
    owner: str
    lease_s: float = 30.0
    backoff_scale: float = 1.0  # tests shrink the seed's backoff; never below 0
    steps: StepSettings = field(default_factory=StepSettings)


def claim(conn: psycopg.Connection[Any], config: WorkerConfig, limit: int) -> list[ClaimedRow]:
    with conn.cursor(row_factory=dict_row) as cur:
        # Planned afresh each time, never server-prepared: a prepared claim's generic
        # plan, made while `shipments` was nearly empty, joined it by a Seq Scan per
        # claimed row; as the table grew that became most of a claim (12 ms at 13,000
        # shipments against 0.9 ms).  Planning costs ~0.3 ms, once per batch.
        rows = cur.execute(
            QUERIES["claim_outbox"],
            {"limit": limit, "owner": config.owner, "lease_s": config.lease_s},
            prepare=False,
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


class StaleLease(Exception):
    """Our lease was taken over; the result must not be committed."""


def process(
    conn: psycopg.Connection[Any],
    row: ClaimedRow,
    providers: ProviderCalls,
    config: WorkerConfig,
) -> str:
    """Run one claimed row to its committed outcome; returns a label for the logs."""
    started = time.monotonic()
    try:
        outcome = call_step(row, providers, config, lambda: contextlib.nullcontext(conn))
    except StaleLease:
        return _logged(row, "stale", started)
    return commit_step(conn, row, outcome, config, started)


def _settles(spec: Step, row: ClaimedRow) -> bool:
    """Has the order left the state the step works in?  An effectful step then only
    finds out what its earlier attempts did; a poll has nothing left to do."""
    return spec.reports_what_it_finds and row.context["state"] != spec.runs_in.value


def call_step(
    row: ClaimedRow, providers: ProviderCalls, config: WorkerConfig, connect: Connect
) -> StepOutcome:
    """The step's provider calls (no transaction held; the claim read the context).

    Raises StaleLease if a checkpoint finds the lease taken over."""
    spec = STEPS_BY_NAME[row.step]
    if row.lost_attempts >= spec.retry.max_unreadable:
        # The process died on this row again and again: a poison row, for a person.
        return StepOutcome.operator(f"{row.lost_attempts} attempts ended without a result")
    if row.context["state"] == OrderState.NEEDS_ATTENTION:
        # The order waits for a person, who may send it back: so does the row.
        return StepOutcome(
            Kind.WAIT, facts={"note": "waiting: the order needs attention"}, asked=False
        )
    settle = _settles(spec, row)
    if settle and not row.unsettled:
        # Every earlier attempt ended in a definite "not done": nothing to find out,
        # and nothing may start now.  A compensation that waited for this row (it was
        # in flight when the order moved on) may start.
        note = f"skipped: the order is {row.context['state']}"
        if spec.effectful:
            return settled_nothing(note)
        return StepOutcome(Kind.DONE, facts={"note": note}, silent=True)
    step = STEP_IMPLEMENTATIONS[row.step]
    call = StepCall(
        order_id=row.order_id,
        step=row.step,
        base_key=f"{row.order_id}:{row.step}",
        order=row.context,
        memory=dict(row.payload),
        settle=settle,
        unsettled=row.unsettled,
        providers=providers,
        settings=config.steps,
        checkpoint=_checkpointer(row, config, connect),
    )
    failpoints.hit(f"{row.step}.before_call")
    outcome = step.run(call)
    failpoints.hit(f"{row.step}.after_call")
    # What the step learned during the attempt (a new key, an intent's id) stays.
    return outcome.remember(**{**call.memory, **outcome.memory})


def _checkpointer(row: ClaimedRow, config: WorkerConfig, connect: Connect) -> Callable[..., None]:
    def checkpoint(
        memory: dict[str, Any],
        states: tuple[OrderState, ...] | None,
        record: Callable[[psycopg.Connection[Any]], None] | None = None,
    ) -> None:
        offload(_checkpoint, memory, states, record)  # off the event loop when bridged
        failpoints.hit(f"{row.step}.after_checkpoint")

    def _checkpoint(
        memory: dict[str, Any],
        states: tuple[OrderState, ...] | None,
        record: Callable[[psycopg.Connection[Any]], None] | None,
    ) -> None:
        with connect() as conn, conn.transaction():
            result = conn.execute(
                QUERIES["checkpoint_outbox_row"],
                {
                    "id": row.id,
                    "order_id": row.order_id,
                    "owner": config.owner,
                    "fence": row.fence,
                    "memory": Jsonb(memory),
                    "states": [s.value for s in states] if states else None,
                },
            ).fetchone()
            assert result is not None
            if not result["leased"]:
                raise StaleLease(row.id)
            if not result["in_state"]:
                raise OrderMoved(row.order_id)
            if record is not None:
                record(conn)

    return checkpoint


def _history(row: ClaimedRow, outcome: StepOutcome) -> AttemptHistory:
    """What earlier attempts came to, with this attempt's keys (a key it retired
    or first sent changes the key's age)."""
    payload = row.payload
    if "sent_at" in outcome.memory:
        payload = {**payload, "sent_at": outcome.memory["sent_at"]}
    return AttemptHistory.from_payload(payload)


def _record_call(row: ClaimedRow, config: WorkerConfig) -> RecordCall:
    return RecordCall(row.order_id, row.step, row.idempotency_key, row.context, config.steps)


def still_unsettled(row: ClaimedRow, outcome: StepOutcome) -> bool:
    """Is the row's outcome unknown after this attempt?  It is if this attempt's is,
    and it stays so until an attempt proves what the earlier ones did: a lookup
    that met a 429 or a refused connection proved nothing."""
    if not outcome.asked:
        return row.unsettled
    if outcome.kind == Kind.UNKNOWN:
        return True
    if outcome.kind in (Kind.DONE, Kind.FAILED, Kind.WAIT) or outcome.proven:
        return False
    return row.unsettled


def _payload(row: ClaimedRow, outcome: StepOutcome, **more: Any) -> dict[str, Any]:
    """The row's payload after this attempt: what the step remembers, whether its
    outcome is unknown, and which attempt this was."""
    return {
        **outcome.memory,
        "unsettled": still_unsettled(row, outcome),
        "last_attempt": row.attempts,
        **more,
    }


def commit_step(
    conn: psycopg.Connection[Any],
    row: ClaimedRow,
    outcome: StepOutcome,
    config: WorkerConfig,
    started: float,
) -> str:
    """Commit what `call_step` came to, in one transaction; returns the log label."""
    spec = STEPS_BY_NAME[row.step]
    if outcome.kind == Kind.DONE:
        label = _commit_done(conn, row, spec, outcome, config)
    elif outcome.kind == Kind.FAILED:
        label = _commit_failed(conn, row, spec, outcome, config)
    elif outcome.kind == Kind.OPERATOR:
        label = _dead_letter(conn, row, config, outcome.error or "needs a person", outcome)
    elif outcome.kind == Kind.WAIT:
        label = _commit_wait(conn, row, spec, outcome, config)
    else:
        label = _retry(conn, row, spec, outcome, config)
    return committed(row, label, started, outcome.error)


def commit_crash(
    conn: psycopg.Connection[Any], row: ClaimedRow, config: WorkerConfig, error: str
) -> str:
    """The step raised (a bug, an answer we could not read): its call may have
    reached the provider, so the row backs off as unknown and, past its attempt
    limit, goes to an operator; it is never compensated."""
    spec = STEPS_BY_NAME[row.step]
    decision = decide_crash(
        spec.retry, AttemptHistory.from_payload(row.payload), scale=config.backoff_scale
    )
    outcome = StepOutcome.unknown(f"crashed: {error}"[:500], **{**row.payload, **decision.counters})
    if decision.action == Action.DEAD_LETTER:
        return _dead_letter(conn, row, config, outcome.error or "crashed", outcome)
    return _reschedule(conn, row, outcome, config, decision)


def commit_blocked(
    conn: psycopg.Connection[Any],
    row: ClaimedRow,
    config: WorkerConfig,
    error: str,
    memory: dict[str, Any],
) -> str:
    """The step's commit (or checkpoint) waited past lock_timeout: nobody knows now
    what its call did, so the row backs off as an unknown outcome, as in an outage
    (the next attempt asks the provider first), and the attempt counts."""
    spec = STEPS_BY_NAME[row.step]
    outcome = StepOutcome.unknown(f"commit blocked: {error}", **{**row.payload, **memory})
    decision = decide_retry(
        spec.retry, _history(row, outcome), outcome, time.time(),
        key_window_s=config.steps.key_window_s, scale=config.backoff_scale,
    )  # fmt: skip
    return _reschedule(conn, row, outcome, config, decision)


def committed(row: ClaimedRow, label: str, started: float, error: str | None = None) -> str:
    """After a step's commit: its failpoint, its metrics and its log line."""
    failpoints.hit(f"{row.step}.after_commit")
    return _logged(row, label, started, error)


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


def _note(outcome: StepOutcome) -> str | None:
    note = outcome.facts.get("note")
    return str(note) if note is not None else outcome.error


def _event_of(spec: Step, outcome: StepOutcome) -> str | None:
    if outcome.silent:
        return None
    return outcome.event or spec.on_success


def _commit_done(
    conn: psycopg.Connection[Any],
    row: ClaimedRow,
    spec: Step,
    outcome: StepOutcome,
    config: WorkerConfig,
) -> str:
    step = STEP_IMPLEMENTATIONS[row.step]
    event = _event_of(spec, outcome)
    try:
        with conn.transaction():
            _finish_row(conn, row, config, note=_note(outcome))
            step.record(conn, _record_call(row, config), outcome)
            failpoints.hit(f"{row.step}.before_commit")
            if event is not None:
                result = _move(row, spec, conn, event, step.detail(outcome))
                if result is not None:
                    step.after_transition(conn, _record_call(row, config), outcome, result)
    except StaleLease:
        return "stale"
    except IntentMismatch as exc:
        return _dead_letter(conn, row, config, str(exc), outcome)
    except (IllegalTransition, InvalidEventDetail) as exc:
        if outcome.quiet:
            # Nothing happened, and the order has moved on: the row simply ends.
            return _finish_alone(conn, row, config, _note(outcome))
        return _dead_letter(conn, row, config, f"cannot apply {event}: {exc}", outcome)
    return "done"


def _move(
    row: ClaimedRow, spec: Step, conn: psycopg.Connection[Any], event: str, detail: dict[str, Any]
) -> Outcome | None:
    """Fire the step's event.  A step that reports what it found at a provider
    (a payment, a label) may find it already recorded by a webhook, a poll or a
    reconciliation: that is no error (engine.settle)."""
    if spec.reports_what_it_finds:
        return settle(conn, row.order_id, event, detail)
    return advance(conn, row.order_id, event, detail)


def _finish_alone(
    conn: psycopg.Connection[Any], row: ClaimedRow, config: WorkerConfig, note: str | None
) -> str:
    with conn.transaction():
        try:
            _finish_row(conn, row, config, note=note)
        except StaleLease:
            return "stale"
    return "done"


def _commit_failed(
    conn: psycopg.Connection[Any],
    row: ClaimedRow,
    spec: Step,
    outcome: StepOutcome,
    config: WorkerConfig,
) -> str:
    """A definite failure: the error edge (compensate), or an operator if there is none."""
    if spec.on_failure == OnFailure.DEAD_LETTER:
        return _dead_letter(conn, row, config, outcome.error or "failed", outcome)
    step = STEP_IMPLEMENTATIONS[row.step]
    detail = step.detail(outcome)
    if outcome.facts.get("effects_done"):
        detail["effects_done"] = outcome.facts["effects_done"]
    try:
        with conn.transaction():
            _finish_row(conn, row, config, note=outcome.error)
            step.record(conn, _record_call(row, config), outcome)
            advance(conn, row.order_id, spec.failure_edge, detail)
    except StaleLease:
        return "stale"
    except (IllegalTransition, InvalidEventDetail):
        # The order moved on (its reservation expired during the call, say): the
        # failure itself changes nothing, but a compensation that waited for this
        # row to settle may now start.
        try:
            with conn.transaction():
                _finish_row(conn, row, config, note=outcome.error)
                step.record(conn, _record_call(row, config), outcome)
                if spec.effectful:
                    settle(conn, row.order_id, STEP_SETTLED, detail)
        except StaleLease:
            return "stale"
    return "failed"


def _dead_letter(
    conn: psycopg.Connection[Any],
    row: ClaimedRow,
    config: WorkerConfig,
    error: str,
    outcome: StepOutcome | None = None,
) -> str:
    payload = _payload(row, outcome) if outcome is not None else {}
    with conn.transaction():
        dead = conn.execute(
            QUERIES["dead_outbox_row"],
            {
                "id": row.id,
                "owner": config.owner,
                "fence": row.fence,
                "error": error[:1000],
                "payload": Jsonb(payload),
            },
        ).fetchone()
        if dead is None:
            return "stale"
        if outcome is not None and outcome.kind == Kind.OPERATOR and outcome.facts:
            # What the provider said is recorded for the person (a refund that failed).
            STEP_IMPLEMENTATIONS[row.step].record(conn, _record_call(row, config), outcome)
        with contextlib.suppress(IllegalTransition):  # already with an operator, or settled
            advance(conn, row.order_id, DEAD_LETTER_EVENT, {"step": row.step, "error": error})
    return "dead"


def _retry(
    conn: psycopg.Connection[Any],
    row: ClaimedRow,
    spec: Step,
    outcome: StepOutcome,
    config: WorkerConfig,
) -> str:
    judged = outcome
    if outcome.kind == Kind.TRANSIENT and (_settles(spec, row) or still_unsettled(row, outcome)):
        # Finding out is never given up as a failure: that would compensate blind.
        judged = dataclasses.replace(outcome, kind=Kind.UNKNOWN)
    decision = decide_retry(
        spec.retry, _history(row, outcome), judged, time.time(),
        key_window_s=config.steps.key_window_s, scale=config.backoff_scale,
    )  # fmt: skip
    if decision.action == Action.FAIL:
        failed = StepOutcome(Kind.FAILED, None, outcome.facts, outcome.memory, outcome.error)
        return _commit_failed(conn, row, spec, failed, config)
    if decision.action == Action.DEAD_LETTER:
        error = f"unreadable after {decision.counters['unreadable']} tries: {outcome.error}"
        return _dead_letter(conn, row, config, error, outcome.remember(**decision.counters))
    return _reschedule(conn, row, outcome, config, decision)


def _reschedule(
    conn: psycopg.Connection[Any],
    row: ClaimedRow,
    outcome: StepOutcome,
    config: WorkerConfig,
    decision: RetryDecision,
    then: Callable[[], None] | None = None,
) -> str:
    attempt = row.attempts - (1 if decision.give_back_attempt else 0)
    with conn.transaction():
        updated = conn.execute(
            QUERIES["retry_outbox_row"],
            {
                "id": row.id,
                "owner": config.owner,
                "fence": row.fence,
                "delay_s": decision.delay_s,
                "error": outcome.error,
                "payload": Jsonb(_payload(row, outcome, last_attempt=attempt, **decision.counters)),
                "give_back_attempt": decision.give_back_attempt,
            },
        ).fetchone()
        if updated is None:
            return "stale"
        if then is not None:
            then()
    if outcome.kind == Kind.WAIT:
        return "waiting"
    if outcome.kind == Kind.THROTTLED:
        return "throttled"
    return "replay" if outcome.kind == Kind.UNKNOWN else "retry"


def _commit_wait(
    conn: psycopg.Connection[Any],
    row: ClaimedRow,
    spec: Step,
    outcome: StepOutcome,
    config: WorkerConfig,
) -> str:
    """The provider is still at work (3-D Secure, a bank debit, a pending refund):
    poll again later, not counted as an attempt; record what changed meanwhile."""
    step = STEP_IMPLEMENTATIONS[row.step]
    decision = decide_retry(
        spec.retry, _history(row, outcome), outcome, time.time(),
        key_window_s=config.steps.key_window_s, scale=config.backoff_scale,
    )  # fmt: skip

    def record_and_move() -> None:
        step.record(conn, _record_call(row, config), outcome)
        if outcome.event is not None:
            with contextlib.suppress(IllegalTransition, InvalidEventDetail):
                result = advance(conn, row.order_id, outcome.event, step.detail(outcome))
                step.after_transition(conn, _record_call(row, config), outcome, result)

    try:
        return _reschedule(conn, row, outcome, config, decision, then=record_and_move)
    except IntentMismatch as exc:
        return _dead_letter(conn, row, config, str(exc), outcome)


def batchable(row: ClaimedRow, outcome: StepOutcome) -> bool:
    """A plain success of a shipping-path step: it can share a commit."""
    return (
        STEP_IMPLEMENTATIONS[row.step].batches
        and outcome.kind == Kind.DONE
        and not outcome.quiet
        and not outcome.silent
        and outcome.event in (None, STEPS_BY_NAME[row.step].on_success)
    )


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
            results.append(_commit_done(conn, item.row, spec, item.outcome, config))
        except Exception as exc:  # this row's; the others go on
            results.append(exc)
    return results


def _commit_batch(
    conn: psycopg.Connection[Any], items: Sequence[Success], config: WorkerConfig
) -> None:
    with conn.transaction():
        finished = _finish_rows(conn, [(i.row, _note(i.outcome)) for i in items], config)
        if len(finished) != len(items):
            raise BatchNotApplied("a lease was lost")
        by_step: dict[str, list[tuple[RecordCall, StepOutcome]]] = {}
        for i in items:
            by_step.setdefault(i.row.step, []).append((_record_call(i.row, config), i.outcome))
        for step, calls in by_step.items():
            STEP_IMPLEMENTATIONS[step].record_many(conn, calls)
        for item in items:
            failpoints.hit(f"{item.row.step}.before_commit")
        advance_many(
            conn,
            [
                (
                    i.row.order_id,
                    str(STEPS_BY_NAME[i.row.step].on_success),
                    STEP_IMPLEMENTATIONS[i.row.step].detail(i.outcome),
                )
                for i in items
            ],
        )
