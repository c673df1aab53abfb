"""The one `transitions` Machine, built once from `definition.TRANSITIONS`.

This module is pure: it decides where an event takes an order and which outbox
steps that emits.  Writing the outcome is `statemachine.engine`'s job.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from transitions import EventData, Machine, MachineError

from statemachine.definition import (
    FORWARD_ACTIONS,
    NEXT_COMPENSATION,
    PLACE_EVENT,
    TRANSITIONS,
    OrderState,
    Transition,
)
from statemachine.errors import IllegalTransition, InvalidEventDetail


@dataclass(frozen=True)
class HistoryEntry:
    from_state: str | None
    to_state: str
    event: str
    detail: Mapping[str, Any]


@dataclass
class OrderFacts:
    """What the order has done so far, read from its history."""

    done_actions: set[str] = field(default_factory=set)
    done_compensations: list[str] = field(default_factory=list)
    resume_state: str | None = None  # where a re-drive takes it back to
    emitted_steps: frozenset[str] = frozenset()  # steps that already have an outbox row

    @property
    def captured(self) -> bool:
        return "charge_payment" in self.done_actions

    def owed_compensations(self) -> list[str]:
        """Compensations still owed, newest forward action first."""
        return [
            action.compensation
            for action in reversed(FORWARD_ACTIONS)
            if action.name in self.done_actions
            and action.compensation not in self.done_compensations
        ]


_DONE_BY_EVENT = {action.done_by_event: action.name for action in FORWARD_ACTIONS}


def facts_from_history(
    history: Iterable[HistoryEntry], emitted_steps: Iterable[str] = ()
) -> OrderFacts:
    facts = OrderFacts(emitted_steps=frozenset(emitted_steps))
    for entry in history:
        _apply_to_facts(facts, entry)
    return facts


def _apply_to_facts(facts: OrderFacts, entry: HistoryEntry) -> None:
    if entry.event in _DONE_BY_EVENT:
        facts.done_actions.add(_DONE_BY_EVENT[entry.event])
    for partial in entry.detail.get("effects_done", ()):
        if partial in {a.name for a in FORWARD_ACTIONS}:
            facts.done_actions.add(partial)
    if entry.event == "compensation_done" and "step" in entry.detail:
        facts.done_compensations.append(str(entry.detail["step"]))
    if entry.event == "step_dead_lettered":
        facts.resume_state = entry.from_state


class _OrderModel:
    """What the Machine sees of one order for the length of one event."""

    def __init__(self, facts: OrderFacts, owed_after: list[str]) -> None:
        self.facts = facts
        # compensations owed once this event is recorded, not yet started
        self.owed_after = owed_after
        self.matched: Transition | None = None
        self.state: str
        self.trigger: Callable[[str], bool]  # added by Machine.add_model


def _model(ev: EventData) -> _OrderModel:
    return cast(_OrderModel, ev.model)


# Conditions referenced by name from the transition table.
def _not_captured_yet(ev: EventData) -> bool:
    return not _model(ev).facts.captured


def _compensations_remain(ev: EventData) -> bool:
    return bool(_model(ev).owed_after)


def _no_compensations_remain(ev: EventData) -> bool:
    return not _model(ev).owed_after


def _resumes(state: OrderState) -> Callable[[EventData], bool]:
    def check(ev: EventData) -> bool:
        return bool(_model(ev).facts.resume_state == state.value)

    check.__name__ = f"resumes_{state.value}"
    return check


CONDITIONS: dict[str, Callable[[EventData], bool]] = {
    "not_captured_yet": _not_captured_yet,
    "compensations_remain": _compensations_remain,
    "no_compensations_remain": _no_compensations_remain,
    **{f"resumes_{s.value}": _resumes(s) for s in OrderState},
}


def _remember(row: Transition) -> Callable[[EventData], None]:
    def after(ev: EventData) -> None:
        _model(ev).matched = row

    return after


def _build_machine() -> Machine:
    machine = Machine(
        model=None,
        states=[s.value for s in OrderState],
        initial=OrderState.RESERVED.value,
        auto_transitions=False,
        send_event=True,
        ignore_invalid_triggers=False,
    )
    for row in TRANSITIONS:
        if row.source is None:  # creation is not a transition between states
            continue
        machine.add_transition(
            trigger=row.event,
            source=row.source.value,
            dest=row.dest.value,
            conditions=[CONDITIONS[name] for name in row.conditions],
            after=[_remember(row)],
        )
    return machine


MACHINE: Machine = _build_machine()
# add_model/remove_model mutate the shared Machine; keep them single-file.
_MACHINE_LOCK = threading.Lock()

PLACE_TRANSITION: Transition = next(t for t in TRANSITIONS if t.event == PLACE_EVENT)


@dataclass(frozen=True)
class Outcome:
    source: OrderState
    dest: OrderState
    emits: tuple[str, ...]
    transition: Transition


def decide(
    state: str,
    event: str,
    facts: OrderFacts,
    detail: Mapping[str, Any] | None = None,
    *,
    order_id: str = "",
) -> Outcome:
    """Where `event` takes an order in `state`, and the outbox steps it emits.

    Raises IllegalTransition if the event is not allowed from `state` (or its
    conditions do not hold) and InvalidEventDetail for a malformed detail.
    """
    detail = detail or {}
    if event == "compensation_done" and state == OrderState.COMPENSATING:
        # Only the compensation whose outbox row is in flight can have finished.
        in_flight = [c for c in facts.owed_compensations() if c in facts.emitted_steps]
        if detail.get("step") not in in_flight:
            raise InvalidEventDetail(
                order_id, event, f"step {detail.get('step')!r} is not running; running: {in_flight}"
            )
    after = OrderFacts(set(facts.done_actions), list(facts.done_compensations), facts.resume_state)
    _apply_to_facts(after, HistoryEntry(state, "", event, detail))
    owed_after = [c for c in after.owed_compensations() if c not in facts.emitted_steps]
    model = _OrderModel(facts, owed_after)
    with _MACHINE_LOCK:
        MACHINE.add_model(model, initial=state)
        try:
            fired = model.trigger(event)
        except (MachineError, AttributeError) as exc:
            raise IllegalTransition(order_id, state, event) from exc
        finally:
            MACHINE.remove_model(model)
    if not fired or model.matched is None:
        raise IllegalTransition(order_id, state, event)
    row = model.matched
    emits = tuple(_expand_emits(row.emits, model.owed_after))
    return Outcome(OrderState(state), row.dest, emits, row)


def _expand_emits(emits: Iterable[str], owed_after: list[str]) -> Iterable[str]:
    for step in emits:
        if step == NEXT_COMPENSATION:
            if owed_after:
                yield owed_after[0]
        else:
            yield step
