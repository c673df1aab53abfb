"""The order saga as data: states, steps and transitions.

Everything that runs (the `transitions` Machine, the SQL CHECK lists, the Mermaid
diagram, the workflow-file check) is derived from the tables in this module, so
there is one place to change the saga.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class OrderState(StrEnum):
    RESERVED = "reserved"
    PAID = "paid"
    SHIPPED = "shipped"
    CONFIRMED = "confirmed"
    RETURN_REQUESTED = "return_requested"
    AWAITING_RETURN = "awaiting_return"
    RETURNED = "returned"
    COMPENSATING = "compensating"
    CANCELLED = "cancelled"
    NEEDS_ATTENTION = "needs_attention"


# States where the saga has settled: nothing runs unless a person or a late
# provider answer acts.  `needs_attention` is operator-visible, not settled.
SETTLED_STATES: frozenset[OrderState] = frozenset(
    {OrderState.CONFIRMED, OrderState.RETURNED, OrderState.CANCELLED}
)
OPERATOR_STATES: frozenset[OrderState] = frozenset({OrderState.NEEDS_ATTENTION})


class StepKind(StrEnum):
    LOCAL = "local"  # plain SQL in our own database
    PAYMENT = "payment"  # Stripe
    CARRIER = "carrier"  # shipping carrier API
    EMAIL = "email"  # e-mail provider API


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base_delay_s: float
    max_delay_s: float


# The seed workflow's policy for charge_payment: 3 attempts, exponential backoff.
FORWARD_RETRY = RetryPolicy(max_attempts=3, base_delay_s=1.0, max_delay_s=30.0)
# Compensations must eventually succeed; after this many tries an operator looks.
COMPENSATION_RETRY = RetryPolicy(max_attempts=8, base_delay_s=1.0, max_delay_s=300.0)
# Steps with no failure edge retry longer, then dead-letter.
PATIENT_RETRY = RetryPolicy(max_attempts=8, base_delay_s=2.0, max_delay_s=600.0)


@dataclass(frozen=True)
class Step:
    """One unit of work that an outbox row asks the worker to do."""

    name: str
    kind: StepKind
    runs_in: OrderState  # the order's state while the row is pending
    on_success: str | None  # event fired when the step succeeds
    on_failure: str  # event fired when the step fails for good
    retry: RetryPolicy
    compensation: str | None = None  # step that undoes this one
    compensates: str | None = None  # for a compensation: the step it undoes


STEPS: tuple[Step, ...] = (
    # Forward steps, in saga order.  `reserve_inventory` runs inside the order's
    # creating transaction, so it has no outbox row; it is listed for its
    # compensation and its place in the order of compensations.
    Step(
        "charge_payment",
        StepKind.PAYMENT,
        OrderState.RESERVED,
        on_success="payment_captured",
        on_failure="payment_failed",
        retry=FORWARD_RETRY,
        compensation="refund_payment",
    ),
    Step(
        "ship_order",
        StepKind.CARRIER,
        OrderState.PAID,
        on_success="shipment_created",
        on_failure="shipment_failed",
        retry=FORWARD_RETRY,
        compensation="cancel_shipment",
    ),
    Step(
        "send_confirmation",
        StepKind.EMAIL,
        OrderState.SHIPPED,
        on_success="confirmation_sent",
        on_failure="step_dead_lettered",
        retry=PATIENT_RETRY,
    ),
    # The human return flow.
    Step(
        "create_return_label",
        StepKind.CARRIER,
        OrderState.RETURN_REQUESTED,
        on_success="return_label_created",
        on_failure="step_dead_lettered",
        retry=PATIENT_RETRY,
    ),
    Step(
        "refund_return",
        StepKind.PAYMENT,
        OrderState.RETURNED,
        on_success=None,
        on_failure="step_dead_lettered",
        retry=PATIENT_RETRY,
    ),
    Step(
        "restock_inventory",
        StepKind.LOCAL,
        OrderState.RETURNED,
        on_success=None,
        on_failure="step_dead_lettered",
        retry=PATIENT_RETRY,
    ),
    # Compensations.  They run one at a time, newest first; each one's success
    # fires `compensation_done`, which emits the next.
    Step(
        "cancel_shipment",
        StepKind.CARRIER,
        OrderState.COMPENSATING,
        on_success="compensation_done",
        on_failure="step_dead_lettered",
        retry=COMPENSATION_RETRY,
        compensates="ship_order",
    ),
    Step(
        "refund_payment",
        StepKind.PAYMENT,
        OrderState.COMPENSATING,
        on_success="compensation_done",
        on_failure="step_dead_lettered",
        retry=COMPENSATION_RETRY,
        compensates="charge_payment",
    ),
    Step(
        "release_inventory",
        StepKind.LOCAL,
        OrderState.COMPENSATING,
        on_success="compensation_done",
        on_failure="step_dead_lettered",
        retry=COMPENSATION_RETRY,
        compensates="reserve_inventory",
    ),
)
STEPS_BY_NAME: dict[str, Step] = {s.name: s for s in STEPS}
STEP_NAMES: tuple[str, ...] = tuple(s.name for s in STEPS)


@dataclass(frozen=True)
class ForwardAction:
    """A forward action of the saga that may need undoing, in saga order.

    It counts as done when the order's history holds `done_by_event`, or when a
    history row's detail lists it under `effects_done` (a step that failed
    after part of its effect happened, e.g. a label bought but no pickup).
    """

    name: str
    done_by_event: str  # the event whose history row proves it happened
    compensation: str


# Saga order matters: compensations run in the reverse of this order.
FORWARD_ACTIONS: tuple[ForwardAction, ...] = (
    ForwardAction("reserve_inventory", "place", "release_inventory"),
    ForwardAction("charge_payment", "payment_captured", "refund_payment"),
    ForwardAction("ship_order", "shipment_created", "cancel_shipment"),
)

# Marker in `Transition.emits`: "the next compensation the order still owes".
NEXT_COMPENSATION = "<next compensation>"

# The event that creates an order; it has no source state.
PLACE_EVENT = "place"


@dataclass(frozen=True)
class Transition:
    event: str
    source: OrderState | None  # None: the order does not exist yet
    dest: OrderState
    emits: tuple[str, ...] = ()
    conditions: tuple[str, ...] = ()  # names in statemachine.machine.CONDITIONS
    note: str = ""


S = OrderState

TRANSITIONS: tuple[Transition, ...] = (
    Transition(PLACE_EVENT, None, S.RESERVED, ("charge_payment",), note="reserve_inventory"),
    # charge_payment
    Transition("payment_captured", S.RESERVED, S.PAID, ("ship_order",)),
    Transition("payment_failed", S.RESERVED, S.COMPENSATING, (NEXT_COMPENSATION,)),
    Transition("reservation_expired", S.RESERVED, S.COMPENSATING, (NEXT_COMPENSATION,)),
    # A capture that lands after the order left `reserved` (the reservation
    # expired while the charge was in flight) must be refunded, never kept.
    # While a compensation is pending the capture is only recorded: the next
    # `compensation_done` picks up the refund.
    Transition(
        "payment_captured",
        S.COMPENSATING,
        S.COMPENSATING,
        conditions=("not_captured_yet",),
        note="late capture",
    ),
    Transition(
        "payment_captured",
        S.CANCELLED,
        S.COMPENSATING,
        (NEXT_COMPENSATION,),
        conditions=("not_captured_yet",),
        note="late capture",
    ),
    Transition(
        "payment_captured",
        S.NEEDS_ATTENTION,
        S.NEEDS_ATTENTION,
        conditions=("not_captured_yet",),
        note="late capture",
    ),
    # ship_order
    Transition("shipment_created", S.PAID, S.SHIPPED, ("send_confirmation",)),
    Transition("shipment_failed", S.PAID, S.COMPENSATING, (NEXT_COMPENSATION,)),
    # send_confirmation: no error edge; a dead letter goes to an operator.
    Transition("confirmation_sent", S.SHIPPED, S.CONFIRMED),
    # handle_return (human)
    Transition("return_requested", S.CONFIRMED, S.RETURN_REQUESTED, ("create_return_label",)),
    Transition("return_label_created", S.RETURN_REQUESTED, S.AWAITING_RETURN),
    Transition(
        "return_received",
        S.AWAITING_RETURN,
        S.RETURNED,
        ("refund_return", "restock_inventory"),
    ),
    # compensation_handler: one compensation at a time, newest first.
    Transition(
        "compensation_done",
        S.COMPENSATING,
        S.COMPENSATING,
        (NEXT_COMPENSATION,),
        conditions=("compensations_remain",),
    ),
    Transition(
        "compensation_done",
        S.COMPENSATING,
        S.CANCELLED,
        conditions=("no_compensations_remain",),
    ),
    # Dead letters: the order waits for an operator, who re-drives the row
    # (`orderflow outbox retry`); the order goes back where it was.
    *(
        Transition("step_dead_lettered", state, S.NEEDS_ATTENTION)
        for state in (S.SHIPPED, S.RETURN_REQUESTED, S.RETURNED, S.COMPENSATING)
    ),
    *(
        Transition(
            "redrive",
            S.NEEDS_ATTENTION,
            state,
            conditions=(f"resumes_{state.value}",),
        )
        for state in (S.SHIPPED, S.RETURN_REQUESTED, S.RETURNED, S.COMPENSATING)
    ),
)

EVENTS: tuple[str, ...] = tuple(dict.fromkeys(t.event for t in TRANSITIONS))


@dataclass(frozen=True)
class WorkflowNode:
    """How a node of the seed workflow (workflows/order-fulfillment.osop.yaml) runs here."""

    id: str
    runs_as: str  # "request" | "transition" | "step" | "human" | "state"
    step: str | None = None  # outbox step that does the work
    success_event: str | None = None  # for "transition" nodes: the event that is the node
    failure_event: str | None = None  # for "transition" nodes: the event of its error edge
    human_event: str | None = None  # for "human" nodes
    state: OrderState | None = None  # for "state" nodes
    timeout_minutes: int | None = None


WORKFLOW_NODES: tuple[WorkflowNode, ...] = (
    # Runs in the HTTP create path before anything is written; failure is a 4xx.
    WorkflowNode("validate_order", "request"),
    # The stock UPDATE runs in the transaction that creates the order (`place`).
    WorkflowNode(
        "reserve_inventory",
        "transition",
        success_event=PLACE_EVENT,
        failure_event="reservation_expired",
        timeout_minutes=30,
    ),
    WorkflowNode("charge_payment", "step", step="charge_payment"),
    WorkflowNode("ship_order", "step", step="ship_order"),
    WorkflowNode("send_confirmation", "step", step="send_confirmation"),
    WorkflowNode(
        "handle_return", "human", step="create_return_label", human_event="return_requested"
    ),
    WorkflowNode("compensation_handler", "state", state=OrderState.COMPENSATING),
)

# How long an order may sit in a state before it counts as stuck.  The seed
# gives the reservation step 30 minutes; the others are ours.
STATE_TIMEOUT_MINUTES: dict[OrderState, int] = {
    OrderState.RESERVED: 30,
    OrderState.PAID: 30,
    OrderState.SHIPPED: 60,
    OrderState.RETURN_REQUESTED: 60,
    OrderState.COMPENSATING: 60,
}
