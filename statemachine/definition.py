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
    # Stripe needs the customer (3-D Secure: `requires_action`) or the bank (a
    # debit `processing`) before the payment settles.
    AWAITING_PAYMENT = "awaiting_payment"
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
    max_attempts: int  # definite failures ("not done") before the step fails for good
    base_delay_s: float
    max_delay_s: float
    # Outcomes that leave the truth unknown are asked about and replayed, never
    # failed: an outage (5xx, timeouts, a key in flight) for as long as it lasts;
    # answers we cannot read (or a worker dying on the row) this many times, then
    # the row goes to an operator instead of looping for ever.
    max_unreadable: int = 20


# The seed workflow's policy for charge_payment: 3 attempts, exponential backoff.
FORWARD_RETRY = RetryPolicy(max_attempts=3, base_delay_s=1.0, max_delay_s=30.0)
# Compensations must eventually succeed; after this many tries an operator looks.
COMPENSATION_RETRY = RetryPolicy(max_attempts=8, base_delay_s=1.0, max_delay_s=300.0)
# Steps with no failure edge retry longer, then dead-letter.
PATIENT_RETRY = RetryPolicy(max_attempts=8, base_delay_s=2.0, max_delay_s=600.0)
# Polling a PaymentIntent that waits for the customer or the bank: the webhook
# usually answers first; this is the fallback.  Polls are not failures.
POLL_RETRY = RetryPolicy(max_attempts=8, base_delay_s=2.0, max_delay_s=300.0, max_unreadable=200)


class OnFailure(StrEnum):
    """What a step's definite failure does to the order."""

    COMPENSATE = "compensate"  # fire the step's failure event: the saga compensates
    DEAD_LETTER = "dead_letter"  # nothing to undo automatically: an operator decides


# The event that hands an order to an operator (a dead-lettered row).
DEAD_LETTER_EVENT = "step_dead_lettered"


@dataclass(frozen=True)
class Step:
    """One unit of work that an outbox row asks the worker to do."""

    name: str
    kind: StepKind
    runs_in: OrderState  # the order's state while the row is pending
    on_success: str | None  # event fired when the step succeeds
    on_failure: OnFailure
    retry: RetryPolicy
    failure_event: str | None = None  # with OnFailure.COMPENSATE: the error edge
    compensation: str | None = None  # step that undoes this one
    compensates: str | None = None  # for a compensation: the step it undoes
    # A forward step whose effect can exist at the provider without our
    # knowing (a lost answer): while its outcome is unknown, no compensation of
    # the order starts; once the order has moved on, the step only finds out
    # what happened and reports it ("settles"), it never starts its effect.
    effectful: bool = False
    # A step that waits on the provider (polls): once the order has moved on,
    # it too only reports what it finds.
    polls: bool = False

    def __post_init__(self) -> None:
        if (self.on_failure == OnFailure.COMPENSATE) != (self.failure_event is not None):
            raise ValueError(f"{self.name}: a failure event goes with OnFailure.COMPENSATE only")

    @property
    def failure_edge(self) -> str:
        """The event a definite failure fires."""
        return self.failure_event or DEAD_LETTER_EVENT

    @property
    def reports_what_it_finds(self) -> bool:
        """Once the order has left `runs_in`, does the step still settle what its
        earlier attempts did (instead of simply ending)?"""
        return self.effectful or self.polls


STEPS: tuple[Step, ...] = (
    # Forward steps, in saga order.  `reserve_inventory` runs inside the order's
    # creating transaction, so it has no outbox row; it is listed for its
    # compensation and its place in the order of compensations.
    Step(
        "charge_payment",
        StepKind.PAYMENT,
        OrderState.RESERVED,
        on_success="payment_captured",
        on_failure=OnFailure.COMPENSATE,
        failure_event="payment_failed",
        retry=FORWARD_RETRY,
        compensation="refund_payment",
        effectful=True,
    ),
    # The PaymentIntent waits for the customer (3-D Secure) or the bank: poll it
    # until Stripe says how it ended (webhooks usually say it first).
    Step(
        "await_payment",
        StepKind.PAYMENT,
        OrderState.AWAITING_PAYMENT,
        on_success="payment_captured",
        on_failure=OnFailure.COMPENSATE,
        failure_event="payment_failed",
        retry=POLL_RETRY,
        polls=True,
    ),
    Step(
        "ship_order",
        StepKind.CARRIER,
        OrderState.PAID,
        on_success="shipment_created",
        on_failure=OnFailure.COMPENSATE,
        failure_event="shipment_failed",
        retry=FORWARD_RETRY,
        compensation="cancel_shipment",
        effectful=True,
    ),
    # Capture at shipment: the hold placed by charge_payment is taken once the
    # carrier has created the shipment, before the customer is told it ships.
    # Its compensation is refund_payment's (it undoes whatever the intent came to).
    Step(
        "capture_payment",
        StepKind.PAYMENT,
        OrderState.SHIPPED,
        on_success="payment_captured",
        on_failure=OnFailure.COMPENSATE,
        failure_event="capture_failed",
        # The parcel exists: a Stripe outage must not cancel it after three tries.
        # A refusal (the hold gone) fails at once; the hold's deadline is watched.
        retry=PATIENT_RETRY,
        effectful=True,
    ),
    Step(
        "send_confirmation",
        StepKind.EMAIL,
        OrderState.SHIPPED,
        on_success="confirmation_sent",
        on_failure=OnFailure.DEAD_LETTER,
        retry=PATIENT_RETRY,
    ),
    # The human return flow.
    Step(
        "create_return_label",
        StepKind.CARRIER,
        OrderState.RETURN_REQUESTED,
        on_success="return_label_created",
        on_failure=OnFailure.DEAD_LETTER,
        retry=PATIENT_RETRY,
    ),
    Step(
        "refund_return",
        StepKind.PAYMENT,
        OrderState.RETURNED,
        on_success=None,
        on_failure=OnFailure.DEAD_LETTER,
        retry=PATIENT_RETRY,
    ),
    Step(
        "restock_inventory",
        StepKind.LOCAL,
        OrderState.RETURNED,
        on_success=None,
        on_failure=OnFailure.DEAD_LETTER,
        retry=PATIENT_RETRY,
    ),
    # Compensations.  They run one at a time, newest first; each one's success
    # fires `compensation_done`, which emits the next.
    Step(
        "cancel_shipment",
        StepKind.CARRIER,
        OrderState.COMPENSATING,
        on_success="compensation_done",
        on_failure=OnFailure.DEAD_LETTER,
        retry=COMPENSATION_RETRY,
        compensates="ship_order",
    ),
    # Undoes whatever the PaymentIntent came to: cancels it if nothing was
    # taken (no money moves), refunds what was taken, waits while it processes.
    Step(
        "refund_payment",
        StepKind.PAYMENT,
        OrderState.COMPENSATING,
        on_success="compensation_done",
        on_failure=OnFailure.DEAD_LETTER,
        retry=COMPENSATION_RETRY,
        compensates="charge_payment",
    ),
    Step(
        "release_inventory",
        StepKind.LOCAL,
        OrderState.COMPENSATING,
        on_success="compensation_done",
        on_failure=OnFailure.DEAD_LETTER,
        retry=COMPENSATION_RETRY,
        compensates="reserve_inventory",
    ),
)
STEPS_BY_NAME: dict[str, Step] = {s.name: s for s in STEPS}
STEP_NAMES: tuple[str, ...] = tuple(s.name for s in STEPS)
EFFECTFUL_STEPS: tuple[str, ...] = tuple(s.name for s in STEPS if s.effectful)


@dataclass(frozen=True)
class ForwardAction:
    """A forward action of the saga that may need undoing, in saga order.

    It counts as done when the order's history holds one of `done_by_events`,
    or when a history row's detail lists it under `effects_done`.
    """

    name: str
    done_by_events: tuple[str, ...]  # events whose history row proves it happened
    compensation: str


# Saga order matters: compensations run in the reverse of this order.
FORWARD_ACTIONS: tuple[ForwardAction, ...] = (
    ForwardAction("reserve_inventory", ("place",), "release_inventory"),
    # A PaymentIntent that waits for the customer or the bank can still take
    # the money: it needs undoing (cancelling) as much as a capture (refunding).
    ForwardAction(
        "charge_payment",
        ("payment_captured", "payment_pending", "payment_authorized"),
        "refund_payment",
    ),
    ForwardAction("ship_order", ("shipment_created",), "cancel_shipment"),
)

# Marker in `Transition.emits`: "the next compensation the order still owes"
# (none while a compensation runs or a step's outcome is still unknown).
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

# What an effectful forward step reports once the order has moved on: the effect
# it found.  `step_settled` says it found nothing new (nothing happened, or what
# happened is already recorded): it only lets a compensation that waited for the
# step start (or ends the order, if the last one finished meanwhile), so it is
# legal only when one of those follows.
SETTLE_EVENTS: tuple[str, ...] = (
    "payment_captured",
    "payment_authorized",
    "payment_pending",
    "shipment_created",
)
STEP_SETTLED = "step_settled"

# States a dead letter can stop an order in, and where a dispute takes a settled
# order to an operator; `redrive` takes it back.
DEAD_LETTER_STATES: tuple[OrderState, ...] = (
    S.RESERVED,
    S.AWAITING_PAYMENT,
    S.PAID,
    S.SHIPPED,
    S.RETURN_REQUESTED,
    S.RETURNED,
    S.COMPENSATING,
)
DISPUTE_TO_OPERATOR_STATES: tuple[OrderState, ...] = (
    S.CONFIRMED,
    S.AWAITING_RETURN,
    S.RETURNED,
    S.CANCELLED,
)

# The cancel requests (reason `customer_cancelled` or `operator_cancelled`) and
# the states they are allowed from: until the carrier has the shipment.
CANCEL_EVENTS: tuple[str, ...] = ("customer_cancelled", "operator_cancelled")
CANCELLABLE_STATES: tuple[OrderState, ...] = (S.RESERVED, S.AWAITING_PAYMENT, S.PAID)

TRANSITIONS: tuple[Transition, ...] = (
    Transition(PLACE_EVENT, None, S.RESERVED, ("charge_payment",), note="reserve_inventory"),
    # charge_payment
    Transition("payment_captured", S.RESERVED, S.PAID, ("ship_order",)),
    # Capture at shipment: the card's funds are held (`requires_capture`).
    Transition("payment_authorized", S.RESERVED, S.PAID, ("ship_order",)),
    Transition("payment_pending", S.RESERVED, S.AWAITING_PAYMENT, ("await_payment",)),
    Transition("payment_failed", S.RESERVED, S.COMPENSATING, (NEXT_COMPENSATION,)),
    Transition("reservation_expired", S.RESERVED, S.COMPENSATING, (NEXT_COMPENSATION,)),
    # 3-D Secure or a bank debit: Stripe says how it ends (webhook or poll).
    Transition("payment_captured", S.AWAITING_PAYMENT, S.PAID, ("ship_order",)),
    Transition("payment_authorized", S.AWAITING_PAYMENT, S.PAID, ("ship_order",)),
    Transition("payment_pending", S.AWAITING_PAYMENT, S.AWAITING_PAYMENT, note="status changed"),
    Transition("payment_failed", S.AWAITING_PAYMENT, S.COMPENSATING, (NEXT_COMPENSATION,)),
    # The reservation bounds the wait for the customer: the PaymentIntent is
    # cancelled at Stripe (refund_payment) before the stock is released.
    Transition("reservation_expired", S.AWAITING_PAYMENT, S.COMPENSATING, (NEXT_COMPENSATION,)),
    # An effectful step settling after the order moved on (its reservation
    # expired while the call's answer was lost, say): what it found is owed and
    # the compensation that waited for it starts.  A capture is recorded once.
    *(
        Transition(
            event,
            S.COMPENSATING,
            S.COMPENSATING,
            (NEXT_COMPENSATION,),
            conditions=("not_captured_yet",) if event == "payment_captured" else (),
            note="settled late",
        )
        for event in SETTLE_EVENTS
    ),
    Transition(
        STEP_SETTLED,
        S.COMPENSATING,
        S.COMPENSATING,
        (NEXT_COMPENSATION,),
        conditions=("a_compensation_may_start",),
        note="settled late: nothing new",
    ),
    # ... or the last compensation finished while the step was still in flight.
    Transition(
        STEP_SETTLED,
        S.COMPENSATING,
        S.CANCELLED,
        conditions=("no_work_remains",),
        note="settled late: nothing new",
    ),
    # Money that arrives for a cancelled order is given back, never kept.
    Transition(
        "payment_captured",
        S.CANCELLED,
        S.COMPENSATING,
        (NEXT_COMPENSATION,),
        conditions=("not_captured_yet",),
        note="late capture",
    ),
    # ... and a hold that appears for a cancelled order is released.
    Transition(
        "payment_authorized",
        S.CANCELLED,
        S.COMPENSATING,
        (NEXT_COMPENSATION,),
        conditions=("not_authorized_yet",),
        note="late hold",
    ),
    Transition(
        "payment_captured",
        S.NEEDS_ATTENTION,
        S.NEEDS_ATTENTION,
        conditions=("not_captured_yet",),
        note="late capture",
    ),
    Transition(
        "payment_authorized",
        S.NEEDS_ATTENTION,
        S.NEEDS_ATTENTION,
        conditions=("not_authorized_yet",),
        note="late hold",
    ),
    # The customer's (or an operator's) cancel, allowed until the shipment exists.
    *(
        Transition(event, state, S.COMPENSATING, (NEXT_COMPENSATION,))
        for event in CANCEL_EVENTS
        for state in CANCELLABLE_STATES
    ),
    # ... and from an operator's desk, when the saga parked it only because its
    # hold nears expiry (no step dead, no shipment): the way out besides re-driving.
    *(
        Transition(
            event,
            S.NEEDS_ATTENTION,
            S.COMPENSATING,
            (NEXT_COMPENSATION,),
            conditions=("parked_for_its_hold",),
        )
        for event in CANCEL_EVENTS
    ),
    # ship_order: a held payment is captured next, a captured one goes to the e-mail.
    Transition(
        "shipment_created",
        S.PAID,
        S.SHIPPED,
        ("capture_payment",),
        conditions=("payment_held",),
    ),
    Transition(
        "shipment_created",
        S.PAID,
        S.SHIPPED,
        ("send_confirmation",),
        conditions=("payment_taken",),
    ),
    Transition("shipment_failed", S.PAID, S.COMPENSATING, (NEXT_COMPENSATION,)),
    # The ship step's call was in flight when the order was parked for its hold:
    # the parcel exists, so the order goes on and its hold is captured at once.
    Transition(
        "shipment_created",
        S.NEEDS_ATTENTION,
        S.SHIPPED,
        ("capture_payment",),
        conditions=("parked_for_its_hold",),
        note="shipped while parked for its hold",
    ),
    # The hold was released at Stripe (cancelled, or it lapsed) before the parcel
    # shipped: nothing is left to take, so the order is undone.
    Transition("hold_lost", S.PAID, S.COMPENSATING, (NEXT_COMPENSATION,)),
    # A hold near its expiry with no shipment yet: an operator decides
    # (re-drive, or cancel) before it lapses; never silently.
    Transition("hold_expiring", S.PAID, S.NEEDS_ATTENTION),
    # capture_payment: the money is taken, then the e-mail; a capture that fails
    # (the hold expired, the card) undoes the shipment, the hold and the stock.
    Transition(
        "payment_captured",
        S.SHIPPED,
        S.SHIPPED,
        ("send_confirmation",),
        conditions=("not_captured_yet",),
        note="captured at shipment",
    ),
    Transition("capture_failed", S.SHIPPED, S.COMPENSATING, (NEXT_COMPENSATION,)),
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
        conditions=("work_remains",),
    ),
    Transition(
        "compensation_done",
        S.COMPENSATING,
        S.CANCELLED,
        conditions=("no_work_remains",),
    ),
    # Dead letters: the order waits for an operator, who re-drives the row
    # (`orderflow outbox retry`); the order goes back where it was.
    *(Transition(DEAD_LETTER_EVENT, state, S.NEEDS_ATTENTION) for state in DEAD_LETTER_STATES),
    # A dispute (Stripe `charge.dispute.created`) is a person's matter: a settled
    # order goes to an operator; one still working records it and carries on.
    *(
        Transition("dispute_opened", state, S.NEEDS_ATTENTION)
        for state in DISPUTE_TO_OPERATOR_STATES
    ),
    *(
        Transition("dispute_opened", state, state, note="recorded")
        for state in OrderState
        if state not in DISPUTE_TO_OPERATOR_STATES
    ),
    *(
        Transition(
            "redrive",
            S.NEEDS_ATTENTION,
            state,
            conditions=(f"resumes_{state.value}",),
        )
        for state in dict.fromkeys((*DEAD_LETTER_STATES, *DISPUTE_TO_OPERATOR_STATES))
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
# `awaiting_payment` has none: the customer's 3-D Secure is bounded by the
# reservation, and a bank debit takes days.
STATE_TIMEOUT_MINUTES: dict[OrderState, int] = {
    OrderState.RESERVED: 30,
    OrderState.PAID: 30,
    OrderState.SHIPPED: 60,
    OrderState.RETURN_REQUESTED: 60,
    OrderState.COMPENSATING: 60,
}
