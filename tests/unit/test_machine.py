"""The machine's `decide`, with no database: every row of the transitions table
is reachable with facts that satisfy its conditions and lands where the row says;
no (state, event) pair outside the table is ever allowed; facts come from history."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from orderflow.statemachine.definition import (
    DEAD_LETTER_EVENT,
    FORWARD_ACTIONS,
    NEXT_COMPENSATION,
    STEP_NAMES,
    STEPS,
    TRANSITIONS,
    OnFailure,
    OrderState,
    Transition,
)
from orderflow.statemachine.errors import IllegalTransition, InvalidEventDetail
from orderflow.statemachine.machine import (
    HistoryEntry,
    OrderFacts,
    already_recorded,
    decide,
    facts_from_history,
)

ACTIONS = [a.name for a in FORWARD_ACTIONS]
DETAILS: list[dict[str, Any]] = [{}, *({"step": name} for name in STEP_NAMES)]


def facts_to_try(resume_states: tuple[str | None, ...] = (None,)) -> Iterator[OrderFacts]:
    """Every shape of history the saga can reach, small enough to enumerate:
    a prefix of the forward actions done, some compensations done (newest
    first), the next one running or not, a step unsettled or not, captured or not."""
    for done_count in range(len(ACTIONS) + 1):
        done = FORWARD_ACTIONS[:done_count]
        owed = [a.compensation for a in reversed(done)]
        for undone in range(len(owed) + 1):
            remaining = owed[undone:]
            for running, unsettled, captured, authorized, resume, parked_by in itertools.product(
                (False, True),
                (False, True),
                (False, True),
                (False, True),
                resume_states,
                (None, "hold_expiring"),
            ):
                yield OrderFacts(
                    done_actions={a.name for a in done},
                    done_compensations=list(owed[:undone]),
                    resume_state=resume,
                    parked_by=parked_by if resume is not None else None,
                    captured=captured,
                    authorized=authorized,
                    emitted_steps=frozenset(remaining[:1] if running else ()),
                    unsettled_steps=frozenset({"charge_payment"} if unsettled else ()),
                )


def _resume_states(row: Transition) -> tuple[str | None, ...]:
    named = tuple(c.removeprefix("resumes_") for c in row.conditions if c.startswith("resumes_"))
    if "parked_for_its_hold" in row.conditions:
        named = (*named, "paid")
    return (None, *named)


ROWS = [row for row in TRANSITIONS if row.source is not None]


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.source}-{r.event}-{r.dest}" for r in ROWS])
def test_every_row_of_the_table_is_reachable_and_lands_where_it_says(row: Transition) -> None:
    assert row.source is not None
    landed = []
    for facts, detail in itertools.product(facts_to_try(_resume_states(row)), DETAILS):
        try:
            outcome = decide(row.source.value, row.event, facts, detail)
        except (IllegalTransition, InvalidEventDetail):
            continue
        # Whatever the facts, the event from this state only ever takes a row of the table.
        assert outcome.transition in TRANSITIONS
        assert (outcome.transition.source, outcome.transition.event) == (row.source, row.event)
        assert outcome.dest == outcome.transition.dest
        fixed = [s for s in outcome.transition.emits if s != NEXT_COMPENSATION]
        assert list(outcome.emits[: len(fixed)]) == fixed
        assert set(outcome.emits) <= set(STEP_NAMES)
        assert len(outcome.emits) <= len(fixed) + 1  # at most one compensation at a time
        if outcome.transition is row:
            landed.append(outcome)
    assert landed, f"no facts reach {row}"
    assert all(o.dest == row.dest for o in landed)


def test_no_event_outside_the_table_is_allowed() -> None:
    allowed = {(r.source, r.event) for r in ROWS}
    events = {r.event for r in ROWS}
    for state, event in itertools.product(OrderState, sorted(events)):
        if (state, event) in allowed:
            continue
        for facts in facts_to_try((None, state.value)):
            with pytest.raises(IllegalTransition):
                decide(state.value, event, facts, {})


def test_a_compensation_only_finishes_if_it_runs() -> None:
    facts = OrderFacts(done_actions={"reserve_inventory"}, emitted_steps=frozenset())
    with pytest.raises(InvalidEventDetail):
        decide("compensating", "compensation_done", facts, {"step": "release_inventory"})
    running = OrderFacts(
        done_actions={"reserve_inventory"}, emitted_steps=frozenset({"release_inventory"})
    )
    last = decide("compensating", "compensation_done", running, {"step": "release_inventory"})
    assert last.dest == OrderState.CANCELLED


def test_no_compensation_starts_while_a_step_is_unsettled() -> None:
    done = {"reserve_inventory", "charge_payment"}
    settled = decide("reserved", "reservation_expired", OrderFacts(done_actions=done))
    assert settled.emits == ("refund_payment",)
    unsettled = OrderFacts(done_actions=done, unsettled_steps=frozenset({"charge_payment"}))
    assert decide("reserved", "reservation_expired", unsettled).emits == ()


def test_compensations_run_newest_first() -> None:
    facts = OrderFacts(done_actions=set(ACTIONS))
    assert decide("paid", "shipment_failed", facts).emits == ("cancel_shipment",)
    facts.done_compensations.append("cancel_shipment")
    assert facts.owed_compensations() == ["refund_payment", "release_inventory"]


def test_facts_from_history() -> None:
    history = [
        HistoryEntry(None, "reserved", "place", {}),
        HistoryEntry("reserved", "paid", "payment_captured", {"step": "charge_payment"}),
        HistoryEntry("paid", "needs_attention", DEAD_LETTER_EVENT, {"step": "ship_order"}),
        HistoryEntry("needs_attention", "paid", "redrive", {}),
        HistoryEntry("paid", "compensating", "shipment_failed", {"effects_done": ["ship_order"]}),
        HistoryEntry("compensating", "compensating", "compensation_done",
                     {"step": "cancel_shipment"}),
    ]  # fmt: skip
    facts = facts_from_history(history, emitted_steps=["refund_payment"])
    assert facts.done_actions == set(ACTIONS)
    assert facts.captured
    assert facts.resume_state == "paid"
    assert facts.done_compensations == ["cancel_shipment"]
    assert facts.owed_compensations() == ["refund_payment", "release_inventory"]
    assert facts.running_compensations() == ["refund_payment"]
    assert already_recorded(facts, "payment_captured")
    assert already_recorded(facts, "shipment_created")
    # A capture found and refunded by the compensation counts as captured.
    refunded = facts_from_history(
        [HistoryEntry("compensating", "compensating", "compensation_done",
                      {"step": "refund_payment", "captured": True})]
    )  # fmt: skip
    assert refunded.captured and not already_recorded(refunded, "shipment_created")


def test_each_step_fails_by_its_policy() -> None:
    for step in STEPS:
        if step.on_failure == OnFailure.COMPENSATE:
            assert step.failure_event is not None and step.failure_edge == step.failure_event
            assert any(r.event == step.failure_event and r.source == step.runs_in for r in ROWS)
        else:
            assert step.failure_event is None and step.failure_edge == DEAD_LETTER_EVENT
            assert any(r.event == DEAD_LETTER_EVENT and r.source == step.runs_in for r in ROWS)


def _guard_holds(name: str, facts: OrderFacts) -> bool | None:
    """The guards that read the facts as they are (None: one that reads the
    facts after the event, checked by the rows' own outcomes above)."""
    if name == "not_captured_yet":
        return not facts.captured
    if name.startswith("resumes_"):
        return facts.resume_state == name.removeprefix("resumes_")
    return None


GUARDED = [row for row in ROWS if row.conditions]


@pytest.mark.parametrize("row", GUARDED, ids=[f"{r.source}-{r.event}-{r.dest}" for r in GUARDED])
def test_a_guarded_row_matches_only_when_its_guard_holds(row: Transition) -> None:
    assert row.source is not None
    resume_states = (None, *(s.value for s in OrderState))
    for facts, detail in itertools.product(facts_to_try(resume_states), DETAILS[:2]):
        try:
            outcome = decide(row.source.value, row.event, facts, detail)
        except (IllegalTransition, InvalidEventDetail):
            continue
        if outcome.transition is row:
            for name in row.conditions:
                assert _guard_holds(name, facts) in (True, None), (name, facts)
