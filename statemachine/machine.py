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

from orderflow.statemachine.definition import (
    FORWARD_ACTIONS,
    NEXT_COMPENSATION,
    PLACE_EVENT,
    TRANSITIONS,
    OrderState,
    Transition,
)
from orderflow.statemachine.errors import IllegalTransition, InvalidEventDetail


@dataclass(frozen=True)
class HistoryEntry:
    from_state: str | None
    to_state: str
    event: str
    detail: Mapping[str, Any]


@dataclass
class OrderFacts:
    """What the order has done so far, read from its history (and its outbox)."""

    done_actions: set[str] = field(default_factory=set)
    done_compensations: list[str] = field(default_factory=list)
    resume_state: str | None = None  # where a re-drive takes it back to
    parked_by: str | None = None  # the event that sent it to an operator
    captured: bool = False  # a payment_captured is recorded
    authorized: bool = False  # a payment_authorized (a hold) is recorded
    emitted_steps: frozenset[str] = frozenset()  # steps that already have an outbox row
    # Effectful steps whose outcome is still unknown (a call in flight, or an
    # answer lost): no compensation starts until each has settled.
    unsettled_steps: frozenset[str] = frozenset()

    def owed_compensations(self) -> list[str]:
        """Compensations still owed, newest forward action first."""
        return [
            action.compensation
            for action in reversed(FORWARD_ACTIONS)
            if action.name in self.done_actions
            and action.compensation not in self.done_compensations
        ]

    def running_compensations(self) -> list[str]:
        """Owed compensations whose outbox row exists: started, not done."""
        return [c for c in self.owed_compensations() if c in self.emitted_steps]

    def copy(self) -> OrderFacts:
        return OrderFacts(
            set(self.done_actions),
            list(self.done_compensations),
            self.resume_state,
            self.parked_by,
            self.captured,
            self.authorized,
            self.emitted_steps,
            self.unsettled_steps,
        )


_DONE_BY_EVENT = {
    event: action.name for action in FORWARD_ACTIONS for event in action.done_by_events
}
_FORWARD_NAMES = frozenset(a.name for a in FORWARD_ACTIONS)
# Events that send an order to an operator, remembering where it was.
_TO_OPERATOR = frozenset({"step_dead_lettered", "dispute_opened", "hold_expiring"})


def facts_from_history(
    history: Iterable[HistoryEntry],
    emitted_steps: Iterable[str] = (),
    unsettled_steps: Iterable[str] = (),
) -> OrderFacts:
    facts = OrderFacts(
        emitted_steps=frozenset(emitted_steps), unsettled_steps=frozenset(unsettled_steps)
    )
    for entry in history:
        _apply_to_facts(facts, entry)
    return facts


def _apply_to_facts(facts: OrderFacts, entry: HistoryEntry) -> None:
    if entry.event in _DONE_BY_EVENT:
        facts.done_actions.add(_DONE_BY_EVENT[entry.event])
    # A capture is recorded by its own event, or found and refunded by the
    # compensation that undoes the payment (detail `captured`).
    if entry.event == "payment_captured" or (
        entry.event == "compensation_done" and entry.detail.get("captured")
    ):
        facts.captured = True
    if entry.event == "payment_authorized":
        facts.authorized = True
    for partial in entry.detail.get("effects_done", ()):
        if partial in _FORWARD_NAMES:
            facts.done_actions.add(partial)
    if entry.event == "compensation_done" and "step" in entry.detail:
        facts.done_compensations.append(str(entry.detail["step"]))
    if entry.event in _TO_OPERATOR and entry.to_state != entry.from_state:
        facts.resume_state = entry.from_state
        facts.parked_by = entry.event


class _OrderModel:
    """What the Machine sees of one order for the length of one event."""

    def __init__(self, facts: OrderFacts, next_compensation: str | None, work_after: bool) -> None:
        self.facts = facts
        # the compensation to start once this event is recorded, if any may start
        self.next_compensation = next_compensation
        # anything owed, running or unknown once this event is recorded
        self.work_after = work_after
        self.matched: Transition | None = None
        self.state: str
        self.trigger: Callable[[str], bool]  # added by Machine.add_model


def _model(ev: EventData) -> _OrderModel:
    return cast(_OrderModel, ev.model)


# Conditions referenced by name from the transition table.
def _not_captured_yet(ev: EventData) -> bool:
    return not _model(ev).facts.captured


def _not_authorized_yet(ev: EventData) -> bool:
    return not _model(ev).facts.authorized


def _payment_held(ev: EventData) -> bool:
    """The funds are held (authorized), not yet taken: the capture comes next."""
    facts = _model(ev).facts
    return facts.authorized and not facts.captured


def _payment_taken(ev: EventData) -> bool:
    return not _payment_held(ev)


def _parked_for_its_hold(ev: EventData) -> bool:
    """Sent to an operator because its hold nears expiry before shipment: every
    step is still alive, so it may be cancelled like an order not shipped yet."""
    facts = _model(ev).facts
    return facts.parked_by == "hold_expiring" and facts.resume_state == OrderState.PAID.value


def _a_compensation_may_start(ev: EventData) -> bool:
    return _model(ev).next_compensation is not None


def _work_remains(ev: EventData) -> bool:
    """Something is still owed, running or unknown once this event is recorded."""
    return _model(ev).work_after


def _no_work_remains(ev: EventData) -> bool:
    return not _model(ev).work_after


def _resumes(state: OrderState) -> Callable[[EventData], bool]:
    def check(ev: EventData) -> bool:
        return bool(_model(ev).facts.resume_state == state.value)

    check.__name__ = f"resumes_{state.value}"
    return check


CONDITIONS: dict[str, Callable[[EventData], bool]] = {
    "not_captured_yet": _not_captured_yet,
    "not_authorized_yet": _not_authorized_yet,
    "payment_held": _payment_held,
    "payment_taken": _payment_taken,
    "parked_for_its_hold": _parked_for_its_hold,
    "a_compensation_may_start": _a_compensation_may_start,
    "work_remains": _work_remains,
    "no_work_remains": _no_work_remains,
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
# One model, added to the machine once (add_model binds a trigger per event, which
# cost a tenth of the worker's CPU when done per decision): each decision sets
# its state and facts, fires, and reads the row it matched, one at a time.
_MODEL = _OrderModel(OrderFacts(), None, False)
MACHINE.add_model(_MODEL, initial=OrderState.RESERVED.value)
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
        in_flight = facts.running_compensations()
        if detail.get("step") not in in_flight:
            raise InvalidEventDetail(
                order_id, event, f"step {detail.get('step')!r} is not running; running: {in_flight}"
            )
    after = facts.copy()
    _apply_to_facts(after, HistoryEntry(state, "", event, detail))
    owed = after.owed_compensations()
    running = [c for c in owed if c in facts.emitted_steps]
    waiting = [c for c in owed if c not in facts.emitted_steps]
    # One compensation at a time, and none while a step's effect is unknown:
    # compensating blind could keep money that was taken or release stock sold.
    may_start = not running and not after.unsettled_steps
    next_compensation = waiting[0] if waiting and may_start else None
    work_after = bool(owed) or bool(after.unsettled_steps)
    with _MACHINE_LOCK:
        model = _MODEL
        model.facts, model.next_compensation = facts, next_compensation
        model.work_after, model.matched = work_after, None
        try:
            MACHINE.set_state(state, model)
            fired = model.trigger(event)
        except (MachineError, AttributeError, ValueError) as exc:
            raise IllegalTransition(order_id, state, event) from exc
        row = model.matched
    if not fired or row is None:
        raise IllegalTransition(order_id, state, event)
    emits = tuple(_expand_emits(row.emits, next_compensation))
    return Outcome(OrderState(state), row.dest, emits, row)


def already_recorded(facts: OrderFacts, event: str) -> bool:
    """Does the order's history already hold what `event` reports?  (A webhook, a
    reconciliation or a poll may have recorded a capture before the step that
    found it again commits.)"""
    if event == "payment_captured":
        return facts.captured
    if event == "payment_authorized":
        return facts.authorized
    action = _DONE_BY_EVENT.get(event)
    return action is not None and action in facts.done_actions


def _expand_emits(emits: Iterable[str], next_compensation: str | None) -> Iterable[str]:
    for step in emits:
        if step == NEXT_COMPENSATION:
            if next_compensation is not None:
                yield next_compensation
        else:
            yield step
