"""Each outbox step in one place: its provider calls, how it reads the answers,
how it settles an unknown outcome by asking the provider, and what it records.

A step's `run` makes provider calls only (no database, except `checkpoint`,
which durably notes what it learned before a call that moves money); it
returns a StepOutcome.  Its `record` writes what the outcome teaches, inside
the transaction that finishes the row and fires the state-machine event.

Unknown is not failure.  An answer that does not say what happened (a timeout,
a 5xx that Stripe stores and replays for the key, a key in flight, a body we
cannot read) leaves the row `unsettled`: the next attempt first asks the
provider what exists for this order (retrieve by id, list, lookup by order
id); only once the provider proves no effect exists does a retry use a new key
(`{order_id}:{step}:{n}`), noted in the row before it is sent.  A key older
than the provider's key window (Stripe keeps them about 24 h) is never
replayed blindly.  Once the order has moved on, an effectful step only finds
out what happened and reports it ("settle"); it never starts its effect.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg.types.json import Jsonb

from orderflow.config import Settings
from orderflow.outbox_worker.outcomes import Kind, StepOutcome
from orderflow.outbox_worker.providers import (
    Misconfigured,
    NotSent,
    Ok,
    Refused,
    Reply,
    Throttled,
    Unknown,
    unreadable,
)
from orderflow.services import payments
from orderflow.services.orders import release_inventory, restock_order
from orderflow.services.payments import IntentView
from orderflow.sql import QUERIES
from orderflow.statemachine.definition import STEP_SETTLED, STEPS_BY_NAME, OrderState
from orderflow.statemachine.definition import Step as StepSpec
from orderflow.statemachine.machine import Outcome


class StripeCalls(Protocol):
    def create_intent(self, params: Mapping[str, Any], key: str) -> Reply: ...
    def confirm_intent(self, intent_id: str, params: Mapping[str, Any], key: str) -> Reply: ...
    def retrieve_intent(self, intent_id: str) -> Reply: ...
    def cancel_intent(self, intent_id: str, key: str) -> Reply: ...
    def capture_intent(self, intent_id: str, key: str) -> Reply: ...
    def search_intents(self, order_id: str) -> Reply: ...
    def list_intents(self, created_gte: int, starting_after: str | None = None) -> Reply: ...
    def create_refund(self, params: Mapping[str, Any], key: str) -> Reply: ...
    def retrieve_refund(self, refund_id: str) -> Reply: ...
    def list_refunds(self, intent_id: str) -> Reply: ...


class CarrierCalls(Protocol):
    def create_shipment(self, body: Mapping[str, Any], key: str) -> Reply: ...
    def find_shipments(self, order_id: str) -> Reply: ...
    def retrieve_shipment(self, shipment_id: str) -> Reply: ...
    def cancel_shipment(self, shipment_id: str, key: str) -> Reply: ...
    def create_return(self, body: Mapping[str, Any], key: str) -> Reply: ...
    def find_returns(self, order_id: str) -> Reply: ...


class EmailCalls(Protocol):
    def send(self, body: Mapping[str, Any], key: str) -> Reply: ...
    def find_messages(self, key: str) -> Reply: ...


class ProviderCalls(Protocol):
    @property
    def stripe(self) -> StripeCalls: ...
    @property
    def carrier(self) -> CarrierCalls: ...
    @property
    def email(self) -> EmailCalls: ...


@dataclass(frozen=True)
class StepSettings:
    # Stripe keeps idempotency keys about 24 h; past this an unknown call is
    # reconciled, never replayed blindly.
    key_window_s: float = 23 * 3600
    payment_method_types: tuple[str, ...] = ("card", "sepa_debit")
    return_url: str | None = None  # where the bank's 3-D Secure page sends the customer
    list_pages: int = 20  # how far a list may page to prove a PaymentIntent absent

    processing_hold_s: int = 14 * 24 * 3600  # a processing bank debit keeps the stock held
    # ORDERFLOW_CAPTURE: `at_shipment` holds a card payment (manual capture) and
    # takes it once the shipment exists; `immediate` takes it at confirmation.
    capture: str = "at_shipment"
    # How long before a hold's capture_before the worker acts on it.
    hold_margin_s: int = 24 * 3600

    @classmethod
    def from_settings(cls, settings: Settings) -> StepSettings:
        return cls(
            key_window_s=settings.provider_key_window_s,
            payment_method_types=settings.payment_method_type_list,
            return_url=settings.payment_return_url,
            processing_hold_s=settings.processing_hold_s,
            capture=settings.capture,
            hold_margin_s=settings.hold_margin_s,
        )


class OrderMoved(Exception):
    """The order left the state the step needs before the step's next call."""


@dataclass
class StepCall:
    """What a step sees of its claimed row."""

    order_id: str
    step: str
    base_key: str  # `{order_id}:{step}`
    order: Mapping[str, Any]  # the claim's context: state, money, address, references
    memory: dict[str, Any]  # the row's payload: what earlier attempts learned
    settle: bool  # the order moved on: find out what happened, start nothing
    unsettled: bool  # an earlier attempt's outcome is unknown
    providers: ProviderCalls
    settings: StepSettings
    # checkpoint(memory, states, record=None): durably merge `memory` into the
    # row's payload (fenced by the lease) and run `record(conn)` in the same
    # transaction; with states, only while the order is in one of them.
    # Raises OrderMoved, or StaleLease if the lease was taken over.
    checkpoint: Callable[..., None]
    now: Callable[[], float] = time.time

    # ---- keys: `{order_id}:{step}[:{call}][:{n}]`, n only once a key was proven spent

    def key(self, call: str = "") -> str:
        gen = int(self.memory.get("gen", {}).get(call, 0))
        base = f"{self.base_key}:{call}" if call else self.base_key
        return f"{base}:{gen}" if gen else base

    def next_key(self, call: str = "") -> dict[str, Any]:
        """The memory that retires this call's key (the provider proved it did nothing)."""
        gens = dict(self.memory.get("gen", {}))
        gens[call] = int(gens.get(call, 0)) + 1
        sent = dict(self.memory.get("sent_at", {}))
        sent.pop(call, None)
        ended = dict(self.memory.get("ended", {}))
        ended.pop(call, None)
        return {"gen": gens, "sent_at": sent, "ended": ended}

    def sent(self, call: str = "") -> dict[str, Any]:
        """The memory noting when this call's current key was first sent."""
        sent = dict(self.memory.get("sent_at", {}))
        sent.setdefault(call, self.now())
        return {"sent_at": sent}

    def key_expired(self, call: str = "") -> bool:
        sent = self.memory.get("sent_at", {}).get(call)
        return sent is not None and self.now() - float(sent) > self.settings.key_window_s

    def ended(self, call: str = "") -> bool:
        """Did the last unknown answer of this call end its request (a 5xx, not a timeout)?"""
        return bool(self.memory.get("ended", {}).get(call))

    def unknown(self, reply: Unknown | Any, call: str = "", **memory: Any) -> StepOutcome:
        ended = dict(self.memory.get("ended", {}))
        ended[call] = bool(getattr(reply, "ended", False))
        reason = getattr(reply, "reason", str(reply))
        outcome = StepOutcome.unknown(reason, ended=ended, **self.sent(call), **memory)
        if getattr(reply, "poison", False):
            outcome = dataclasses.replace(outcome, unreadable=True)
        return outcome


def no_object(c: StepCall, reply: Reply, call: str, what: str) -> StepOutcome:
    """The outcome of a reply that should have carried `what` and did not."""
    if isinstance(reply, Ok):
        return c.unknown(unreadable(f"unreadable {what}"), call)
    return not_an_answer(c, reply, call)


def not_an_answer(c: StepCall, reply: Reply, call: str = "") -> StepOutcome:
    """The outcome of a reply that carries no object: throttled, never sent, unknown."""
    if isinstance(reply, Throttled):
        return StepOutcome.throttled(reply.retry_after_s)
    if isinstance(reply, NotSent):
        return StepOutcome.transient(reply.reason)
    if isinstance(reply, Misconfigured):
        return StepOutcome.operator(reply.reason)
    if isinstance(reply, Unknown):
        return c.unknown(reply, call)
    if isinstance(reply, Refused):
        return StepOutcome.operator(f"refused ({reply.status} {reply.code}): {reply.message}")
    return c.unknown(unreadable("unexpected answer"), call)


def settled_nothing(note: str, **facts: Any) -> StepOutcome:
    """An effectful step whose order moved on found that nothing (new) happened:
    `step_settled` lets a compensation that waited for it start; if none waited,
    the row simply ends."""
    return StepOutcome(Kind.DONE, STEP_SETTLED, {**facts, "note": note}, quiet=True)


class Step:
    """The behaviour of one outbox step; `spec` is its row of the saga table
    (when it runs, its events, its compensation, its retry policy)."""

    name: str = ""
    # Its plain successes may share one commit with other rows' (the daemon
    # batches them): steps whose facts are at most one row.
    batches: bool = False

    @property
    def spec(self) -> StepSpec:
        return STEPS_BY_NAME[self.name]

    def run(self, c: StepCall) -> StepOutcome:
        raise NotImplementedError

    def record(self, conn: psycopg.Connection[Any], c: RecordCall, outcome: StepOutcome) -> None:
        """Write what the outcome teaches (in the row's finishing transaction)."""

    def record_many(
        self, conn: psycopg.Connection[Any], calls: Sequence[tuple[RecordCall, StepOutcome]]
    ) -> None:
        """`record` for several rows' successes sharing one commit (a batch)."""
        for c, outcome in calls:
            self.record(conn, c, outcome)

    def after_transition(
        self, conn: psycopg.Connection[Any], c: RecordCall, outcome: StepOutcome, moved: Outcome
    ) -> None:
        """The local effects of the transition the outcome fired (same transaction)."""

    def detail(self, outcome: StepOutcome) -> dict[str, Any]:
        """The detail of the history row the outcome's event writes."""
        detail: dict[str, Any] = {"step": self.name}
        for key in (
            "payment_intent_id",
            "intent_status",
            "refund_id",
            "tracking_number",
            "captured",
            "held_cents",
            "captured_cents",
            "voided",
            "note",
        ):
            if key in outcome.facts and outcome.facts[key] is not None:
                detail[key] = outcome.facts[key]
        if outcome.error:
            detail["error"] = outcome.error
        return detail


@dataclass(frozen=True)
class RecordCall:
    """What `record` needs of the row: its order, key and context."""

    order_id: str
    step: str
    idempotency_key: str
    order: Mapping[str, Any]
    settings: StepSettings = StepSettings()


# ---------------------------------------------------------------- Stripe helpers


def _intent(reply: Reply) -> IntentView | None:
    return IntentView.parse(reply.body) if isinstance(reply, Ok) else None


def find_intent(c: StepCall) -> IntentView | StepOutcome | None:
    """Ask Stripe which PaymentIntent exists for this order: search first (a hit
    is proof), then the list (strongly consistent: an empty answer is proof of
    absence).  Returns the intent, None if none exists, or an outcome if Stripe
    could not say."""
    stripe = c.providers.stripe
    found: list[IntentView] = []
    reply = stripe.search_intents(c.order_id)
    if isinstance(reply, Ok) and isinstance(reply.body.get("data"), list):
        found = [i for i in map(IntentView.parse, reply.body["data"]) if i is not None]
    if not found:
        # The intent was created after the order (allow a minute of clock skew).
        since = int(c.order.get("created_epoch") or 0) - 60
        after: str | None = None
        for _ in range(c.settings.list_pages):
            page = stripe.list_intents(since, after)
            if not isinstance(page, Ok) or not isinstance(page.body.get("data"), list):
                return no_object(c, page, "list", "list of PaymentIntents")
            data = page.body["data"]
            for raw in data:
                intent = IntentView.parse(raw)
                if intent is not None and intent.order_id == c.order_id:
                    found.append(intent)
            if not page.body.get("has_more") or not data:
                break
            after = str(data[-1].get("id"))
        else:
            return StepOutcome.operator(
                "could not prove the order has no PaymentIntent: the list is too long"
            )
    live = [i for i in found if i.status != "canceled"]
    if not live:
        return None
    # Money first: an intent that took or may take money wins over an idle one.
    live.sort(
        key=lambda i: (
            i.status in payments.CAPTURED,
            i.status in payments.HELD,
            i.status in payments.WAITING,
        )
    )
    return live[-1]


def intent_facts(intent: IntentView, **more: Any) -> dict[str, Any]:
    return {**intent.as_facts(), **more}


# ---------------------------------------------------------------- charge_payment


# The calls of charge_payment: the PaymentIntent is created under
# `{order_id}:charge_payment:create` (harmless to repeat: it takes no money) and
# confirmed under the row's own key `{order_id}:charge_payment`.
CREATE = "create"
CONFIRM = ""


class _PaymentStep(Step):
    """A step whose transitions move the order's stock with its payment."""

    def after_transition(
        self, conn: psycopg.Connection[Any], c: RecordCall, outcome: StepOutcome, moved: Outcome
    ) -> None:
        # A capture sells the reserved units; a processing debit holds them longer.
        payments.after_transition(
            conn, c.order_id, moved, IntentView.from_facts(outcome.facts),
            c.settings.processing_hold_s,
        )  # fmt: skip


class ChargePayment(_PaymentStep):
    """Create the order's PaymentIntent, note its id, then confirm it.

    The id is noted in the row (and in payment_intents, one per order) before
    the confirm, under a share lock on the order that proves it is still
    `reserved`: money can only be taken through that one intent, and only
    while the order waits for it.  A confirm whose answer is lost is settled by
    retrieving the intent by id (strongly consistent); a PaymentIntent can
    succeed only once, so no replay can take the money twice."""

    name = "charge_payment"

    def run(self, c: StepCall) -> StepOutcome:
        intent_id = c.memory.get("payment_intent_id") or c.order.get("payment_intent_id")
        if c.settle:
            return self._settle(c, intent_id)
        if not intent_id:
            created = self._create(c)
            if isinstance(created, StepOutcome):
                return created

            def note_intent(conn: psycopg.Connection[Any], intent: IntentView = created) -> None:
                payments.record_intent(
                    conn,
                    c.order_id,
                    intent,
                    total_cents=c.order["total_cents"],
                    currency=c.order["currency"],
                )

            try:
                c.checkpoint({"payment_intent_id": created.id}, (OrderState.RESERVED,), note_intent)
            except OrderMoved:
                return self._never_confirmed()
            intent_id = created.id
            c.memory["payment_intent_id"] = intent_id
        elif c.unsettled:
            # An earlier confirm's answer was lost: Stripe knows what it did.
            reply = c.providers.stripe.retrieve_intent(intent_id)
            intent = _intent(reply)
            if intent is None:
                return no_object(c, reply, CONFIRM, "PaymentIntent")
            if intent.status != "requires_confirmation":
                return self._report(c, intent)
            if c.ended(CONFIRM) or c.key_expired(CONFIRM):
                c.memory.update(c.next_key(CONFIRM))
        return self._confirm(c, intent_id)

    def _create(self, c: StepCall) -> IntentView | StepOutcome:
        created = self._create_or_find(c)
        if (
            isinstance(created, StepOutcome)
            and created.kind == Kind.UNKNOWN
            and (not created.unreadable)
        ):
            # An intent nobody confirmed takes no money: not knowing whether one was
            # created is no reason to wait.  The key is kept (the next attempt asks
            # Stripe first); three such attempts fail the payment, safely.
            return dataclasses.replace(created, kind=Kind.TRANSIENT)
        return created

    def _create_or_find(self, c: StepCall) -> IntentView | StepOutcome:
        answer_lost = CREATE in c.memory.get("sent_at", {})  # an earlier create said nothing
        if answer_lost and (c.key_expired(CREATE) or c.ended(CREATE)):
            # The first create may have made an intent but its key cannot tell
            # (expired, or a stored 5xx): find it.
            found = find_intent(c)
            if isinstance(found, StepOutcome):
                return found
            if found is not None:
                return found
            c.memory.update(c.next_key(CREATE))  # proven: none exists
        params: dict[str, Any] = {
            "amount": c.order["total_cents"],
            "currency": str(c.order["currency"]).lower(),
            "payment_method": c.order["payment_method_id"],
            "payment_method_types": list(c.settings.payment_method_types),
            "metadata": {"order_id": c.order_id},
        }
        if c.settings.capture == "at_shipment":
            # Cards are held until the parcel ships; other methods capture at once.
            params["payment_method_options"] = {"card": {"capture_method": "manual"}}
        reply = c.providers.stripe.create_intent(params, c.key(CREATE))
        intent = _intent(reply)
        if intent is not None:
            return intent
        if isinstance(reply, Refused):
            return self._declined(reply)
        if isinstance(reply, Ok):
            reply = unreadable("unreadable PaymentIntent")
        if isinstance(reply, Unknown) and reply.ended:
            found = find_intent(c)
            if isinstance(found, StepOutcome):
                return found
            if found is not None:
                return found
            # Stripe answered and holds no intent for the order: a new key may try.
            return StepOutcome.proven_absent(reply.reason, **c.next_key(CREATE))
        return not_an_answer(c, reply, CREATE)

    def _confirm(self, c: StepCall, intent_id: str) -> StepOutcome:
        # The charge says by when a hold must be captured (capture_before).
        params: dict[str, Any] = {"expand": ["latest_charge"]}
        if c.settings.return_url:
            params["return_url"] = c.settings.return_url
        mandate = c.order.get("payment_mandate")
        if isinstance(mandate, dict) and isinstance(mandate.get("customer_acceptance"), dict):
            # A bank debit confirmed by us needs the mandate the customer accepted.
            online = mandate["customer_acceptance"]
            params["mandate_data"] = {"customer_acceptance": {"type": "online", "online": online}}
        key = c.key(CONFIRM)
        reply = c.providers.stripe.confirm_intent(intent_id, params, key)
        intent = _intent(reply)
        if intent is not None:
            return self._report(c, intent)
        if isinstance(reply, Refused):
            embedded = IntentView.parse(reply.body.get("payment_intent"))
            if reply.status == 402 or reply.code == "card_declined":
                return self._declined(reply, embedded)
            if embedded is not None:  # e.g. payment_intent_unexpected_state
                return self._report(c, embedded)
            return self._declined(reply)
        if isinstance(reply, Ok | Unknown):
            unknown = reply if isinstance(reply, Unknown) else unreadable("unreadable")
            # Ask Stripe at once: the intent by id says whether the confirm happened.
            look = c.providers.stripe.retrieve_intent(intent_id)
            seen = _intent(look)
            if seen is not None and seen.status != "requires_confirmation":
                return self._report(c, seen)
            if seen is not None and unknown.ended:
                # The request is over and the intent is not confirmed: nothing was taken.
                return StepOutcome.proven_absent(unknown.reason, **c.next_key(CONFIRM))
            return c.unknown(unknown, CONFIRM)
        return not_an_answer(c, reply, CONFIRM)

    def _report(self, c: StepCall, intent: IntentView) -> StepOutcome:
        facts = intent_facts(intent)
        event = intent.event()
        if c.settle:
            # Whatever it came to, the order learns it; a capture is refunded
            # and an open intent cancelled by the compensation it now owes.
            if event == "payment_failed":
                return settled_nothing(f"the payment {intent.status}", **facts)
            return StepOutcome(Kind.DONE, event, facts)
        if event == "payment_failed":
            return StepOutcome(
                Kind.FAILED, None, facts, error=f"payment {intent.error_code or intent.status}"
            )
        return StepOutcome(Kind.DONE, event, facts)

    def _declined(self, reply: Refused, intent: IntentView | None = None) -> StepOutcome:
        code = reply.body.get("decline_code") or reply.code
        facts = intent_facts(intent) if intent is not None else {}
        return StepOutcome(
            Kind.FAILED,
            None,
            {**facts, "decline_code": code},
            error=f"card declined: {code}" if reply.status == 402 else f"refused: {code}",
        )

    def _never_confirmed(self) -> StepOutcome:
        return settled_nothing("the order moved on before the payment was confirmed")

    def _settle(self, c: StepCall, intent_id: str | None) -> StepOutcome:
        if not intent_id:
            # No intent was noted, so none was ever confirmed: no money moved.
            return self._never_confirmed()
        reply = c.providers.stripe.retrieve_intent(intent_id)
        intent = _intent(reply)
        if intent is None:
            return no_object(c, reply, "settle", f"PaymentIntent {intent_id}")
        return self._report(c, intent)

    def record(self, conn: psycopg.Connection[Any], c: RecordCall, outcome: StepOutcome) -> None:
        _record_payment(conn, c, outcome)


def _record_payment(conn: psycopg.Connection[Any], c: RecordCall, outcome: StepOutcome) -> None:
    intent = IntentView.from_facts(outcome.facts)
    if intent is not None:
        payments.record_payment_outcome(
            conn,
            c.order_id,
            intent,
            total_cents=c.order["total_cents"],
            currency=c.order["currency"],
            idempotency_key=c.idempotency_key,
        )
    elif outcome.kind == Kind.FAILED and c.order["total_cents"] > 0:
        payments.record_charge(
            conn,
            c.order_id,
            status="failed",
            provider_ref=None,
            amount_cents=c.order["total_cents"],
            currency=c.order["currency"],
            idempotency_key=c.idempotency_key,
            failure_code=outcome.facts.get("decline_code"),
        )


# ---------------------------------------------------------------- await_payment


class AwaitPayment(_PaymentStep):
    """Poll the PaymentIntent while it waits for the customer or the bank (the
    fallback: the webhook usually says it first)."""

    name = "await_payment"

    def run(self, c: StepCall) -> StepOutcome:
        if c.settle:
            return StepOutcome(
                Kind.DONE, facts={"note": f"the order is {c.order['state']}"}, silent=True
            )
        intent_id = c.order.get("payment_intent_id")
        if not intent_id:
            return StepOutcome.operator("no PaymentIntent recorded for an order awaiting payment")
        reply = c.providers.stripe.retrieve_intent(intent_id)
        intent = _intent(reply)
        if intent is None:
            outage = isinstance(reply, Throttled | NotSent) or (
                isinstance(reply, Unknown) and not reply.poison
            )
            if outage:
                return StepOutcome.wait(note="no answer; polling again")
            # an answer we cannot read, a bad key: counted, then a person
            return no_object(c, reply, "retrieve", "PaymentIntent")
        facts = intent_facts(intent)
        if intent.captured or intent.held:
            return StepOutcome(Kind.DONE, intent.event(), facts)
        if intent.event() == "payment_failed":
            return StepOutcome(Kind.FAILED, None, facts, error=f"payment {intent.status}")
        changed = intent.status != c.order.get("intent_status")
        return StepOutcome(Kind.WAIT, "payment_pending" if changed else None, facts)

    def record(self, conn: psycopg.Connection[Any], c: RecordCall, outcome: StepOutcome) -> None:
        if IntentView.from_facts(outcome.facts) is not None:
            _record_payment(conn, c, outcome)


# ---------------------------------------------------------------- capture_payment


class CapturePayment(Step):
    """Capture at shipment: take the held funds once the carrier has the shipment.

    The capture is sent under the row's key `{order_id}:capture_payment`: Stripe
    replays its stored answer for a repeat, and a PaymentIntent is captured at
    most once, so no replay can take the money twice.  A lost answer is settled
    by retrieving the intent by id (strongly consistent).  An intent that is no
    longer held and not captured (the hold expired or was cancelled at Stripe)
    fails the capture at once: the shipment is cancelled, the stock released."""

    name = "capture_payment"
    # Its plain success (the capture recorded, the order on to the e-mail) may
    # share the shipping path's group commit: no stock moves with it.
    batches = True

    def run(self, c: StepCall) -> StepOutcome:
        outcome = self._capture(c)
        if outcome.kind == Kind.TRANSIENT:
            # Definitely not captured (never sent, or Stripe shows the hold still
            # there), but the parcel exists: an outage must not cancel it.  Tried
            # again with backoff for as long as the hold lasts; a lapsed hold is
            # `canceled` at Stripe and fails the capture then.
            return dataclasses.replace(outcome, kind=Kind.WAIT)
        return outcome

    def _capture(self, c: StepCall) -> StepOutcome:
        intent_id = c.order.get("payment_intent_id")
        if not intent_id:
            return StepOutcome.operator("no PaymentIntent recorded for a held payment")
        stripe = c.providers.stripe
        if c.unsettled or c.settle:
            reply = stripe.retrieve_intent(intent_id)
            intent = _intent(reply)
            if intent is None:
                return no_object(c, reply, "retrieve", "PaymentIntent")
            if not intent.held or c.settle:
                return self._report(c, intent)
            if c.ended() or c.key_expired():
                c.memory.update(c.next_key())
            # else: the earlier capture may still run; replay its key
        reply = stripe.capture_intent(intent_id, c.key())
        intent = _intent(reply)
        if intent is not None:
            return self._report(c, intent)
        if isinstance(reply, Refused):
            embedded = IntentView.parse(reply.body.get("payment_intent"))
            if embedded is not None and not embedded.held:
                return self._report(c, embedded)  # captured already, or the hold is gone
            code = reply.body.get("decline_code") or reply.code
            error = f"capture refused ({reply.status} {code}): {reply.message}"
            if reply.status == 402:  # the card: a definite no
                return StepOutcome.failed(error)
            # Anything else (a 400 or 404 we did not expect): Stripe says how the
            # intent stands; a hold still there is a person's matter, never a
            # reason to cancel a parcel.
            look = _intent(stripe.retrieve_intent(intent_id))
            if look is not None and not look.held:
                return self._report(c, look)
            return StepOutcome.operator(error)
        if isinstance(reply, Ok | Unknown):
            unknown = reply if isinstance(reply, Unknown) else unreadable("unreadable")
            look = _intent(stripe.retrieve_intent(intent_id))
            if look is not None and not look.held:
                return self._report(c, look)
            if look is not None and unknown.ended:
                # Over, and the funds are still held: nothing was captured.
                return StepOutcome.proven_absent(unknown.reason, **c.next_key())
            return c.unknown(unknown)
        return not_an_answer(c, reply)

    def _report(self, c: StepCall, intent: IntentView) -> StepOutcome:
        facts = intent_facts(intent)
        if intent.captured:
            return StepOutcome(Kind.DONE, "payment_captured", facts)
        if c.settle:
            return settled_nothing(f"not captured: the PaymentIntent is {intent.status}", **facts)
        if intent.held:
            return c.unknown(unreadable("the PaymentIntent is still held"))
        # canceled (the hold expired or was released), or anything else that is
        # not money taken: the capture failed for good.
        return StepOutcome(
            Kind.FAILED,
            None,
            facts,
            error=f"capture failed: the PaymentIntent is {intent.status}",
        )

    def record(self, conn: psycopg.Connection[Any], c: RecordCall, outcome: StepOutcome) -> None:
        _record_payment(conn, c, outcome)


# ---------------------------------------------------------------- refunds


def _our_refund(c: StepCall, intent_id: str) -> StepOutcome | Reply | None:
    """The refund this step made for the intent (as an outcome), None if Stripe
    lists none, or the list's reply when it did not say."""
    listed = c.providers.stripe.list_refunds(intent_id)
    if not isinstance(listed, Ok) or not isinstance(listed.body.get("data"), list):
        return listed if not isinstance(listed, Ok) else unreadable("unreadable refunds")
    ours = [
        r
        for r in listed.body["data"]
        if isinstance(r, dict)
        and (r.get("metadata") or {}).get("step") == c.step
        and r.get("status") not in ("failed", "canceled")
    ]
    return _refund_outcome(c, ours[0]) if ours else None


def refund(c: StepCall, intent_id: str) -> StepOutcome:
    """Refund what the intent took, once: a refund Stripe has not finished is
    followed up by id; only `succeeded` is money back."""
    stripe = c.providers.stripe
    refund_id = c.memory.get("refund_id")
    if refund_id:
        reply = stripe.retrieve_refund(str(refund_id))
    else:
        if c.unsettled:
            ours = _our_refund(c, intent_id)
            if isinstance(ours, StepOutcome):
                return ours
            if ours is not None:
                return not_an_answer(c, ours, "refund")
            if c.ended("refund") or c.key_expired("refund"):
                c.memory.update(c.next_key("refund"))
        reply = stripe.create_refund(
            {"payment_intent": intent_id, "metadata": {"order_id": c.order_id, "step": c.step}},
            c.key("refund"),
        )
    if isinstance(reply, Ok) and reply.body.get("id") and reply.body.get("status"):
        return _refund_outcome(c, reply.body)
    if isinstance(reply, Refused) and reply.code == "charge_already_refunded":
        listed = stripe.list_refunds(intent_id)
        data = listed.body.get("data") if isinstance(listed, Ok) else None
        done = [r for r in data or [] if isinstance(r, dict) and r.get("status") == "succeeded"]
        if done:
            return _refund_outcome(c, done[0])
        return StepOutcome.operator("Stripe says the charge is refunded, but lists no refund")
    if isinstance(reply, Refused):
        return StepOutcome.operator(f"refund refused ({reply.code}): {reply.message}")
    if isinstance(reply, Ok):
        reply = unreadable("unreadable refund")
    if isinstance(reply, Unknown) and reply.ended and not refund_id:
        # The request is over but its answer says nothing: Stripe's list will.
        ours = _our_refund(c, intent_id)
        if isinstance(ours, StepOutcome):
            return ours
        if ours is None:
            return StepOutcome.proven_absent(reply.reason, **c.next_key("refund"))
    return not_an_answer(c, reply, "refund")


def _refund_outcome(c: StepCall, body: Mapping[str, Any]) -> StepOutcome:
    status = str(body.get("status"))
    facts = {"refund_id": body["id"], "refund": dict(body)}
    if status == "succeeded":
        return StepOutcome(Kind.DONE, None, facts)
    if status in ("failed", "canceled"):
        return StepOutcome(
            Kind.OPERATOR,
            facts=facts,
            error=f"refund {body['id']} {status}: {body.get('failure_reason') or 'no reason'}",
        )
    # pending (or requires_action): Stripe is still working; follow it up by id
    return StepOutcome(Kind.WAIT, None, facts, memory={"refund_id": body["id"]})


def _record_refund(conn: psycopg.Connection[Any], c: RecordCall, outcome: StepOutcome) -> None:
    body = outcome.facts.get("refund")
    if isinstance(body, Mapping):
        payments.record_refund(
            conn,
            c.order_id,
            refund=body,
            currency=c.order["currency"],
            idempotency_key=c.idempotency_key,
        )


class RefundPayment(Step):
    """Undo the payment as it actually stands at Stripe: cancel an intent that took
    nothing (a hold is released, no refund), refund what was taken, wait while a
    bank debit is processing (it cannot be cancelled)."""

    name = "refund_payment"

    def run(self, c: StepCall) -> StepOutcome:
        intent_id = c.order.get("payment_intent_id")
        if not intent_id:
            return StepOutcome.done(note="no PaymentIntent to undo")
        stripe = c.providers.stripe
        for _ in range(3):  # an intent that changes under us is looked at again
            reply = stripe.retrieve_intent(intent_id)
            intent = _intent(reply)
            if intent is None:
                return no_object(c, reply, "retrieve", "PaymentIntent")
            if intent.status == "canceled":
                return StepOutcome.done(voided=True, **intent_facts(intent))
            if intent.status == "succeeded":
                outcome = refund(c, intent.id)
                captured = {"captured": True, **intent_facts(intent)}
                return StepOutcome(
                    outcome.kind,
                    outcome.event,
                    {**captured, **outcome.facts},
                    outcome.memory,
                    outcome.error,
                    outcome.retry_after_s,
                )
            if intent.status == "processing":
                return StepOutcome.wait(**intent_facts(intent))
            cancelled = stripe.cancel_intent(intent.id, c.key("cancel"))
            after = _intent(cancelled)
            if after is not None and after.status == "canceled":
                return StepOutcome.done(voided=True, **intent_facts(after))
            if isinstance(cancelled, Refused) or after is not None:
                continue  # it moved on meanwhile (captured, processing): look again
            if isinstance(cancelled, Unknown) and cancelled.ended:
                # Over, but silent (a stored 5xx): look again; a cancel may use a new key.
                c.memory.update(c.next_key("cancel"))
                continue
            return not_an_answer(c, cancelled, "cancel")
        return c.unknown(Unknown("the PaymentIntent keeps changing", ended=True), "retrieve")

    def record(self, conn: psycopg.Connection[Any], c: RecordCall, outcome: StepOutcome) -> None:
        intent = IntentView.from_facts(outcome.facts)
        if intent is not None:
            payments.record_payment_outcome(
                conn,
                c.order_id,
                intent,
                total_cents=c.order["total_cents"],
                currency=c.order["currency"],
                idempotency_key=c.idempotency_key,
            )
        _record_refund(conn, c, outcome)


class RefundReturn(Step):
    """Refund a returned order's payment."""

    name = "refund_return"

    def run(self, c: StepCall) -> StepOutcome:
        intent_id = c.order.get("payment_intent_id")
        if not intent_id:
            return StepOutcome.operator("no captured payment to refund")
        return refund(c, intent_id)

    def record(self, conn: psycopg.Connection[Any], c: RecordCall, outcome: StepOutcome) -> None:
        _record_refund(conn, c, outcome)


# ---------------------------------------------------------------- carrier


def _live_shipment(reply: Reply) -> dict[str, Any] | Reply | None:
    """From a lookup: the order's live shipment, None if there is none, or the
    reply itself when it does not say."""
    data = reply.body.get("data") if isinstance(reply, Ok) else None
    if not isinstance(data, list):
        return reply if not isinstance(reply, Ok) else unreadable("unreadable lookup")
    live = [
        s for s in data if isinstance(s, dict) and s.get("id") and s.get("status") != "cancelled"
    ]
    return live[-1] if live else None


def _label_facts(answer: Mapping[str, Any]) -> dict[str, Any] | None:
    if not isinstance(answer.get("id"), str) or not answer["id"]:
        return None  # an answer without the object's id says nothing we can record
    return {
        "shipment_id": answer["id"],
        "tracking_number": answer.get("tracking_number"),
        "label_url": answer.get("label_url"),
    }


class _Label(Step):
    """Buy a label (a shipment or a return) once: look it up by order id when an
    earlier answer was lost, replay the key while the request may still run,
    and use a new key only once the carrier shows no label for the order."""

    def create(self, c: StepCall) -> Reply:
        raise NotImplementedError

    def lookup(self, c: StepCall) -> Reply:
        raise NotImplementedError

    def _look(self, c: StepCall) -> StepOutcome | Reply | None:
        """The label the carrier holds for the order (as an outcome), None if it
        holds none, or the lookup's reply when it did not say."""
        found = _live_shipment(self.lookup(c))
        if isinstance(found, dict):
            facts = _label_facts(found)
            return StepOutcome(Kind.DONE, self.spec.on_success, facts) if facts else None
        return found

    def _none_bought(self, c: StepCall, error: str) -> StepOutcome:
        """The carrier proved it bought nothing for the order."""
        if c.settle:
            return settled_nothing(f"no label was bought ({error})")
        return StepOutcome.proven_absent(error, **c.next_key())

    def run(self, c: StepCall) -> StepOutcome:
        if c.unsettled or c.settle:
            looked = self._look(c)
            if isinstance(looked, StepOutcome):
                return looked
            if looked is not None:  # the lookup did not answer
                return not_an_answer(c, looked, "lookup")
            if c.ended() or c.key_expired():
                # The carrier answered the earlier request and holds no label.
                if c.settle:
                    return self._none_bought(c, "no label was bought")
                c.memory.update(c.next_key())
            # else: the earlier request may still run; replay its key (409 while it does)
        reply = self.create(c)
        if isinstance(reply, Ok):
            facts = _label_facts(reply.body)
            if facts is not None:
                return StepOutcome(Kind.DONE, self.spec.on_success, facts)
            reply = unreadable("the carrier's answer has no id")
        if isinstance(reply, Refused):
            error = f"HTTP {reply.status}: {reply.code}"
            if c.settle:
                return settled_nothing(error)
            return StepOutcome.failed(error)
        if isinstance(reply, Unknown) and reply.ended:
            # The request is over but its answer says nothing: ask the carrier now.
            looked = self._look(c)
            if isinstance(looked, StepOutcome):
                return looked
            if looked is None:
                return self._none_bought(c, reply.reason)
            return c.unknown(reply)
        return not_an_answer(c, reply)

    def record(self, conn: psycopg.Connection[Any], c: RecordCall, outcome: StepOutcome) -> None:
        self.record_many(conn, [(c, outcome)])

    def record_many(
        self, conn: psycopg.Connection[Any], calls: Sequence[tuple[RecordCall, StepOutcome]]
    ) -> None:
        shipments = [
            shipment_row(c, outcome)
            for c, outcome in calls
            if outcome.event in (None, self.spec.on_success) and "shipment_id" in outcome.facts
        ]
        if shipments:  # one statement for the whole batch
            conn.execute(QUERIES["insert_shipments"], {"shipments": Jsonb(shipments)})


def shipment_row(c: RecordCall, outcome: StepOutcome) -> dict[str, Any]:
    """The shipments row a ship_order or create_return_label success records."""
    return {
        "order_id": c.order_id,
        "kind": "outbound" if c.step == "ship_order" else "return",
        "carrier_ref": outcome.facts["shipment_id"],
        "tracking_number": outcome.facts.get("tracking_number"),
        "label_url": outcome.facts.get("label_url"),
        "idempotency_key": c.idempotency_key,
    }


class ShipOrder(_Label):
    name = "ship_order"
    batches = True

    def create(self, c: StepCall) -> Reply:
        body = {
            "order_id": c.order_id,
            "address": c.order["shipping_address"],
            "items": c.order["lines"],
        }
        return c.providers.carrier.create_shipment(body, c.key())

    def lookup(self, c: StepCall) -> Reply:
        return c.providers.carrier.find_shipments(c.order_id)


class CreateReturnLabel(_Label):
    name = "create_return_label"

    def create(self, c: StepCall) -> Reply:
        body = {"order_id": c.order_id, "shipment_id": c.order.get("shipment_id")}
        return c.providers.carrier.create_return(body, c.key())

    def lookup(self, c: StepCall) -> Reply:
        return c.providers.carrier.find_returns(c.order_id)


class CancelShipment(Step):
    name = "cancel_shipment"

    def run(self, c: StepCall) -> StepOutcome:
        shipment_id = c.order.get("shipment_id")
        if not shipment_id:
            return StepOutcome.done(note="no shipment to cancel")
        carrier = c.providers.carrier
        if c.unsettled:
            seen = carrier.retrieve_shipment(shipment_id)
            if isinstance(seen, Ok) and seen.body.get("status") == "cancelled":
                return StepOutcome.done(note="cancelled at the carrier")
        reply = carrier.cancel_shipment(shipment_id, c.key())
        if isinstance(reply, Ok) and reply.body.get("status") == "cancelled":
            return StepOutcome.done()
        if isinstance(reply, Refused) and reply.status == 404:
            return StepOutcome.done(note="the carrier has no such shipment")
        if isinstance(reply, Refused):
            return StepOutcome.operator(
                f"the carrier cannot cancel ({reply.code}): a parcel may ship"
            )
        if isinstance(reply, Ok):
            return c.unknown(unreadable("the carrier's answer has no status"))
        if isinstance(reply, Unknown) and reply.ended:
            seen = carrier.retrieve_shipment(shipment_id)
            if isinstance(seen, Ok) and seen.body.get("status") == "cancelled":
                return StepOutcome.done(note="cancelled at the carrier")
            if isinstance(seen, Ok):  # not cancelled: a fresh key may try again
                return StepOutcome.proven_absent(reply.reason, **c.next_key())
            return c.unknown(reply)
        return not_an_answer(c, reply)

    def record(self, conn: psycopg.Connection[Any], c: RecordCall, outcome: StepOutcome) -> None:
        if outcome.kind == Kind.DONE:
            conn.execute(QUERIES["cancel_shipment_row"], {"order_id": c.order_id})


# ---------------------------------------------------------------- e-mail


class SendConfirmation(Step):
    name = "send_confirmation"
    batches = True

    def run(self, c: StepCall) -> StepOutcome:
        if not c.order.get("email"):
            return StepOutcome(Kind.DONE, self.spec.on_success, {"note": "no e-mail address"})
        email = c.providers.email
        if c.unsettled:
            found = email.find_messages(c.key())
            data = found.body.get("data") if isinstance(found, Ok) else None
            if isinstance(data, list) and any(isinstance(m, dict) and m.get("id") for m in data):
                return StepOutcome(Kind.DONE, self.spec.on_success, {"note": "sent earlier"})
            if isinstance(data, list) and (c.ended() or c.key_expired()):
                c.memory.update(c.next_key())
        body = {
            "to": c.order["email"],
            "order_id": c.order_id,
            "subject": f"Your order {c.order_id} is on its way",
            "text": f"Tracking number: {c.order.get('tracking_number') or 'pending'}",
        }
        reply = email.send(body, c.key())
        if isinstance(reply, Ok):
            return StepOutcome(
                Kind.DONE, self.spec.on_success, {"message_id": reply.body.get("id")}
            )
        if isinstance(reply, Refused):
            return StepOutcome.failed(f"HTTP {reply.status}: {reply.code}")
        if isinstance(reply, Unknown) and reply.ended:
            found = email.find_messages(c.key())
            data = found.body.get("data") if isinstance(found, Ok) else None
            if isinstance(data, list) and any(isinstance(m, dict) and m.get("id") for m in data):
                return StepOutcome(Kind.DONE, self.spec.on_success, {"note": "sent"})
            if isinstance(data, list):  # the provider holds no such message
                return StepOutcome.proven_absent(reply.reason, **c.next_key())
            return c.unknown(reply)
        return not_an_answer(c, reply)


# ---------------------------------------------------------------- local steps


class ReleaseInventory(Step):
    name = "release_inventory"

    def run(self, c: StepCall) -> StepOutcome:
        return StepOutcome.done()

    def record(self, conn: psycopg.Connection[Any], c: RecordCall, outcome: StepOutcome) -> None:
        release_inventory(conn, c.order_id)


class RestockInventory(Step):
    name = "restock_inventory"

    def run(self, c: StepCall) -> StepOutcome:
        return StepOutcome.done()

    def record(self, conn: psycopg.Connection[Any], c: RecordCall, outcome: StepOutcome) -> None:
        restock_order(conn, c.order_id)


STEP_IMPLEMENTATIONS: dict[str, Step] = {
    step.name: step
    for step in (
        ChargePayment(),
        AwaitPayment(),
        ShipOrder(),
        CapturePayment(),
        SendConfirmation(),
        CreateReturnLabel(),
        RefundReturn(),
        RestockInventory(),
        CancelShipment(),
        RefundPayment(),
        ReleaseInventory(),
    )
}
