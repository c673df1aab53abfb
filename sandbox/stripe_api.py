"""The Stripe subset: PaymentIntents, Charges, Refunds (form-encoded, as Stripe).

PaymentIntent life cycle by test payment method (see sandbox/app.py for the
whole contract): good cards succeed (or hold, with capture_method=manual),
decline cards answer 402, pm_card_authenticationRequired waits in
requires_action for the 3-D Secure page, bank debits (pm_sepaDebit,
pm_sepaDebitFails) wait in processing until they settle.  Operations on one
PaymentIntent hold its lock, so they are serialised.
"""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from orderflow.sandbox.core import (
    JSON,
    STRIPE,
    Call,
    Charge,
    Intent,
    Outcome,
    Refund,
    World,
    form_params,
    json_body,
    new_id,
    run,
    sandbox_of,
    snapshot,
    stripe_error_body,
)
from orderflow.sandbox.webhooks import emit

GOOD_CARDS = {
    "pm_card_visa": ("visa", "4242"),
    "pm_card_mastercard": ("mastercard", "4444"),
    "pm_card_amex": ("amex", "8431"),
}
DECLINES = {
    "pm_card_chargeDeclined": ("card_declined", "generic_decline", "Your card was declined."),
    "pm_card_chargeDeclinedInsufficientFunds": (
        "card_declined",
        "insufficient_funds",
        "Your card has insufficient funds.",
    ),
}
THREE_DS = "pm_card_authenticationRequired"
BANK_DEBITS = {"pm_sepaDebit": "succeeded", "pm_sepaDebitFails": "failed"}
METHOD_TYPES = {"card", "sepa_debit"}
CAPTURE_METHODS = {"automatic", "automatic_async", "manual"}
CANCELLATION_REASONS = {"duplicate", "fraudulent", "requested_by_customer", "abandoned"}
REFUND_REASONS = {"duplicate", "fraudulent", "requested_by_customer"}

CONFIRMABLE = ("requires_payment_method", "requires_confirmation")
CANCELABLE = (
    "requires_payment_method",
    "requires_confirmation",
    "requires_action",
    "requires_capture",
)


def method_type(method: str) -> str | None:
    if method in GOOD_CARDS or method in DECLINES or method == THREE_DS:
        return "card"
    if method in BANK_DEBITS:
        return "sepa_debit"
    return None


# ---------------------------------------------------------------- validation


class Invalid(Exception):
    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome


def invalid(
    param: str, message: str, code: str = "parameter_invalid", status: int = 400
) -> Invalid:
    body = stripe_error_body("invalid_request_error", message, code=code, param=param)
    return Invalid(Outcome(status, body, store=False))


def missing(param: str) -> Invalid:
    return invalid(param, f"Missing required param: {param}.", "parameter_missing")


def no_such(kind: str, object_id: str, param: str | None = None) -> Outcome:
    """A reference to an unknown object: 404 on the path, 400 in a parameter; not saved."""
    extra = {"param": param} if param else {}
    body = stripe_error_body(
        "invalid_request_error", f"No such {kind}: '{object_id}'", code="resource_missing", **extra
    )
    return Outcome(400 if param else 404, body, store=False)


def _int(params: JSON, name: str, required: bool = False, minimum: int = 1) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        if required:
            raise missing(name)
        return None
    try:
        number = int(str(value))
    except ValueError:
        raise invalid(name, f"Invalid integer: {value}") from None
    if number < minimum:
        raise invalid(name, f"{name} must be at least {minimum}")
    return number


def _str(params: JSON, name: str) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise invalid(name, f"Invalid string: {name}")
    return value


def _choice(params: JSON, name: str, allowed: set[str], default: str | None) -> str | None:
    value = _str(params, name)
    if value is None:
        return default
    if value not in allowed:
        raise invalid(name, f"Invalid {name}: must be one of {', '.join(sorted(allowed))}")
    return value


def _bool(params: JSON, name: str) -> bool:
    value = params.get(name)
    if value is None or value == "":
        return False
    if str(value).lower() not in ("true", "false"):
        raise invalid(name, f"Invalid boolean: {value}")
    return str(value).lower() == "true"


def _metadata(params: JSON) -> dict[str, str]:
    value = params.get("metadata")
    if value is None or value == "":
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise invalid("metadata", "Invalid hash: metadata")
    return dict(value)


def _expand(params: JSON) -> set[str]:
    value = params.get("expand")
    if value is None or value == "":
        return set()
    values = value if isinstance(value, list) else [value]
    return {str(v) for v in values}


def _method_types(params: JSON) -> list[str]:
    value = params.get("payment_method_types")
    if value is None or value == "":
        return ["card"]
    values = value if isinstance(value, list) else [value]
    for item in values:
        if item not in METHOD_TYPES:
            raise invalid(
                "payment_method_types", f"The payment method type provided: {item} is invalid."
            )
    return [str(v) for v in values]


def _method_options(params: JSON) -> JSON:
    """`payment_method_options[card][capture_method]`: manual capture for cards only
    (Stripe: it overrides the top-level capture_method for that method type)."""
    raw = params.get("payment_method_options")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise invalid("payment_method_options", "Invalid payment_method_options: an object")
    card = raw.get("card")
    if card is None:
        return {}
    if not isinstance(card, dict):
        raise invalid("payment_method_options[card]", "Invalid payment_method_options[card]")
    capture = card.get("capture_method")
    if capture not in (None, "manual", ""):
        raise invalid(
            "payment_method_options[card][capture_method]",
            f"Invalid payment_method_options[card][capture_method]: must be manual ({capture})",
        )
    return {"card": {"capture_method": capture or None}}


def _card_capture(d: JSON) -> str:
    """The capture method a card payment of this intent uses."""
    card = (d.get("payment_method_options") or {}).get("card") or {}
    return str(card.get("capture_method") or d["capture_method"])


def _check_mandate(method: str, params: JSON) -> None:
    """A bank debit confirmed by the server needs the customer's acceptance of the
    debit mandate (Stripe: mandate_data[customer_acceptance]); a card does not."""
    if method_type(method) != "sepa_debit":
        return
    mandate = params.get("mandate_data")
    acceptance = mandate.get("customer_acceptance") if isinstance(mandate, dict) else None
    if not isinstance(acceptance, dict) or acceptance.get("type") not in ("online", "offline"):
        raise missing("mandate_data[customer_acceptance]")
    online = acceptance.get("online")
    if acceptance["type"] == "online" and not (
        isinstance(online, dict) and online.get("ip_address") and online.get("user_agent")
    ):
        raise missing("mandate_data[customer_acceptance][online]")


def _check_method(method: str, types: Sequence[str]) -> None:
    kind = method_type(method)
    if kind is None:
        raise invalid(
            "payment_method", f"No such PaymentMethod: '{method}'", code="resource_missing"
        )
    if kind not in types:
        raise invalid(
            "payment_method",
            f"The provided PaymentMethod's type ({kind}) is not included in"
            f" payment_method_types ({', '.join(types)}).",
        )


def _limit(params: JSON) -> int:
    limit = _int(params, "limit") or 10
    if limit > 100:
        raise invalid("limit", "limit must be at most 100")
    return limit


def _created_filter(params: JSON) -> Callable[[int], bool]:
    value = params.get("created")
    if value is None or value == "":
        return lambda created: True
    if not isinstance(value, dict):
        exact = _int({"created": value}, "created", minimum=0)
        return lambda created: created == exact
    bounds: dict[str, int] = {}
    for op, raw in value.items():
        if op not in ("gt", "gte", "lt", "lte"):
            raise invalid(f"created[{op}]", f"Received unknown parameter: created[{op}]")
        number = _int({op: raw}, op, minimum=0)
        assert number is not None
        bounds[op] = number

    def accept(created: int) -> bool:
        return (
            created > bounds.get("gt", -1)
            and created >= bounds.get("gte", -1)
            and created < bounds.get("lt", 1 << 62)
            and created <= bounds.get("lte", 1 << 62)
        )

    return accept


def _page(
    items: list[Any], seq: Callable[[Any], int], cursor: Callable[[str], int | None], params: JSON
) -> tuple[list[Any], bool]:
    """Stripe's cursor pagination over `items` (newest first)."""
    limit = _limit(params)
    after, before = _str(params, "starting_after"), _str(params, "ending_before")
    if after is not None:
        at = cursor(after)
        if at is None:
            raise Invalid(no_such("object", after, "starting_after"))
        rest = [i for i in items if seq(i) < at]
        return rest[:limit], len(rest) > limit
    if before is not None:
        at = cursor(before)
        if at is None:
            raise Invalid(no_such("object", before, "ending_before"))
        newer = [i for i in items if seq(i) > at]
        return newer[-limit:], len(newer) > limit
    return items[:limit], len(items) > limit


# ---------------------------------------------------------------- rendering


def render_charge(world: World, charge: Charge) -> JSON:
    out: JSON = snapshot(charge.data)
    details = out["payment_method_details"]
    if charge.manual and not out["captured"] and details["type"] == "card":
        details["card"]["capture_before"] = out["created"] + int(world.config.hold_s)
    return out


def render_intent(
    world: World, intent: Intent, expand: set[str] | frozenset[str] = frozenset()
) -> JSON:
    out: JSON = snapshot(intent.data)
    if ("latest_charge" in expand or "data.latest_charge" in expand) and out["latest_charge"]:
        out["latest_charge"] = render_charge(world, world.charges[out["latest_charge"]])
    return out


def _changed(world: World, intent: Intent, event: str | None, key: str | None) -> None:
    """Note a state change: what search will see (after its lag), and its event."""
    d = intent.data
    intent.history.append(
        (
            world.now(),
            {
                "status": d["status"],
                "metadata": dict(d["metadata"]),
                "amount": d["amount"],
                "currency": d["currency"],
                "created": d["created"],
            },
        )
    )
    if event is not None:
        emit(world, event, render_intent(world, intent), key, intent.id)


_PAST = {"confirm": "confirmed", "cancel": "canceled", "capture": "captured", "refund": "refunded"}


def _unexpected(world: World, intent: Intent, action: str, allowed: Sequence[str]) -> Outcome:
    message = (
        f"You cannot {action} this PaymentIntent because it has a status of {intent.status}."
        f" Only a PaymentIntent with one of the following statuses may be {_PAST[action]}:"
        f" {', '.join(allowed)}."
    )
    body = stripe_error_body(
        "invalid_request_error",
        message,
        code="payment_intent_unexpected_state",
        payment_intent=render_intent(world, intent),
    )
    return Outcome(400, body)


# ---------------------------------------------------------------- state changes


def _new_charge(world: World, intent: Intent, status: str) -> Charge:
    d = intent.data
    method = str(d["payment_method"])
    if method_type(method) == "sepa_debit":
        details: JSON = {"type": "sepa_debit", "sepa_debit": {}}
    else:
        brand, last4 = GOOD_CARDS.get(method, ("visa", "3184"))
        details = {"type": "card", "card": {"brand": brand, "last4": last4}}
    now = world.now()
    charge = Charge(
        data={
            "id": new_id("ch"),
            "object": "charge",
            "amount": d["amount"],
            "amount_captured": 0,
            "amount_refunded": 0,
            "captured": False,
            "refunded": False,
            "paid": status == "succeeded",
            "disputed": False,
            "currency": d["currency"],
            "payment_intent": intent.id,
            "payment_method": method,
            "payment_method_details": details,
            "status": status,
            "failure_code": None,
            "failure_message": None,
            "metadata": dict(d["metadata"]),
            "created": int(now),
            "livemode": False,
        },
        created_at=now,
        manual=details["type"] == "card" and _card_capture(d) == "manual",
    )
    world.charges[charge.data["id"]] = charge
    d["latest_charge"] = charge.data["id"]
    return charge


def _authorize(world: World, intent: Intent, effect_key: str | None, event_key: str | None) -> None:
    """A card payment goes through: taken at once, or held for a manual capture."""
    d = intent.data
    charge = _new_charge(world, intent, "succeeded")
    d["next_action"] = None
    d["last_payment_error"] = None
    if charge.manual:
        d["status"] = "requires_capture"
        d["amount_capturable"] = d["amount"]
        world.holds.add(intent.id)
        world.next_hold_expiry = min(
            world.next_hold_expiry, charge.created_at + world.config.hold_s
        )
        world.effect("authorization", intent.order_id, effect_key, d["amount"], intent.id)
        _changed(world, intent, "payment_intent.amount_capturable_updated", event_key)
    else:
        charge.data.update(captured=True, amount_captured=d["amount"])
        d["status"] = "succeeded"
        d["amount_received"] = d["amount"]
        world.effect("charge", intent.order_id, effect_key, d["amount"], intent.id)
        _changed(world, intent, "payment_intent.succeeded", event_key)


def _fail(world: World, intent: Intent, error: JSON, event_key: str | None) -> None:
    d = intent.data
    method = d["payment_method"]
    d["last_payment_error"] = {
        **error,
        "payment_method": {"id": method, "object": "payment_method", "type": method_type(method)},
    }
    d["payment_method"] = None
    d["next_action"] = None
    d["status"] = "requires_payment_method"
    _changed(world, intent, "payment_intent.payment_failed", event_key)


def _confirm(
    world: World, intent: Intent, method: str, key: str | None, base_url: str, expand: set[str]
) -> Outcome:
    d = intent.data
    d["payment_method"] = method
    d["last_payment_error"] = None
    d["next_action"] = None
    if method in DECLINES:
        code, decline, message = DECLINES[method]
        _fail(
            world,
            intent,
            {"type": "card_error", "code": code, "decline_code": decline, "message": message},
            key,
        )
        body = stripe_error_body(
            "card_error",
            message,
            code=code,
            decline_code=decline,
            payment_intent=render_intent(world, intent, expand),
        )
        return Outcome(402, body)
    if method == THREE_DS:
        intent.confirm_key = key
        d["status"] = "requires_action"
        d["next_action"] = {
            "type": "redirect_to_url",
            "redirect_to_url": {
                "url": f"{base_url}/_sandbox/3ds/{intent.id}",
                "return_url": intent.return_url,
            },
        }
        _changed(world, intent, "payment_intent.requires_action", key)
    elif method in BANK_DEBITS:
        intent.confirm_key = key
        _new_charge(world, intent, "pending")
        d["status"] = "processing"
        world.processing.add(intent.id)
        intent.settle_token += 1
        delay = world.config.processing_s
        intent.settle_at = world.now() + delay if delay >= 0 else None
        if delay >= 0:
            world.spawn(_settle_later(world, intent, intent.settle_token, delay))
        _changed(world, intent, "payment_intent.processing", key)
    else:
        _authorize(world, intent, key, key)
    return Outcome(200, render_intent(world, intent, expand))


def _settle(world: World, intent: Intent, outcome: str | None) -> None:
    """A bank debit settles: the money arrives, or the bank refuses it."""
    d = intent.data
    charge = world.charges[d["latest_charge"]]
    outcome = outcome or BANK_DEBITS.get(str(d["payment_method"]), "succeeded")
    world.processing.discard(intent.id)
    intent.settle_at = None
    if outcome == "succeeded":
        charge.data.update(
            status="succeeded", paid=True, captured=True, amount_captured=d["amount"]
        )
        d["status"] = "succeeded"
        d["amount_received"] = d["amount"]
        world.effect("charge", intent.order_id, intent.confirm_key, d["amount"], intent.id)
        _changed(world, intent, "payment_intent.succeeded", None)
    else:
        message = "The customer's account has insufficient funds to cover this payment."
        charge.data.update(
            status="failed", paid=False, failure_code="insufficient_funds", failure_message=message
        )
        error = {"type": "invalid_request_error", "code": "insufficient_funds", "message": message}
        _fail(world, intent, error, None)


async def _settle_later(world: World, intent: Intent, token: int, delay: float) -> None:
    await asyncio.sleep(delay)
    async with intent.lock:
        if intent.status == "processing" and intent.settle_token == token:
            _settle(world, intent, None)


def _release(world: World, intent: Intent, key: str | None, reason: str | None) -> None:
    d = intent.data
    if d["status"] == "requires_capture":
        world.effect(
            "authorization_release", intent.order_id, key, d["amount_capturable"], intent.id
        )
        d["amount_capturable"] = 0
        world.holds.discard(intent.id)
    d["status"] = "canceled"
    d["cancellation_reason"] = reason
    d["canceled_at"] = int(world.now())
    d["next_action"] = None


def check_expiry(world: World, intent: Intent) -> None:
    """A hold older than hold_s has expired: the intent is canceled, the hold released."""
    if intent.status != "requires_capture":
        return
    charge = world.charges[intent.data["latest_charge"]]
    if world.now() >= charge.created_at + world.config.hold_s:
        _release(world, intent, f"auto:{intent.id}:hold_expired", "automatic")
        _changed(world, intent, "payment_intent.canceled", None)


def sweep(world: World) -> None:
    """Whatever is due now: expired holds, settled bank debits, settled refunds."""
    now = world.now()
    if world.holds and now >= world.next_hold_expiry:
        soonest = float("inf")
        for intent_id in list(world.holds):
            intent = world.intents[intent_id]
            if not intent.lock.locked():  # the holder looks at it itself
                check_expiry(world, intent)
            if intent_id in world.holds:
                charge = world.charges[intent.data["latest_charge"]]
                soonest = min(soonest, charge.created_at + world.config.hold_s)
        world.next_hold_expiry = soonest
    for intent_id in list(world.processing):
        intent = world.intents[intent_id]
        if not intent.lock.locked() and intent.settle_at is not None and now >= intent.settle_at:
            _settle(world, intent, None)
    for refund_id in list(world.pending_refunds):
        refund = world.refunds[refund_id]
        if refund.settle_at is not None and now >= refund.settle_at:
            _settle_refund(world, refund)


async def _periodic(world: World) -> None:
    while True:
        await asyncio.sleep(world.config.expiry_check_s)
        sweep(world)


def touch(world: World) -> None:
    if world.sweeper is None:
        world.sweeper = world.spawn(_periodic(world))
    sweep(world)


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


# ---------------------------------------------------------------- PaymentIntents


def _new_intent(world: World, params: JSON) -> tuple[Intent, str | None, bool, set[str]]:
    amount = _int(params, "amount", required=True)
    currency = _str(params, "currency")
    if currency is None:
        raise missing("currency")
    if not re.fullmatch(r"[A-Za-z]{3}", currency):
        raise invalid("currency", f"Invalid currency: {currency}")
    types = _method_types(params)
    capture = _choice(params, "capture_method", CAPTURE_METHODS, "automatic")
    options = _method_options(params)
    method = _str(params, "payment_method")
    confirm = _bool(params, "confirm")
    metadata = _metadata(params)
    return_url = _str(params, "return_url")
    expand = _expand(params)
    if method is not None:
        _check_method(method, types)
        if confirm:
            _check_mandate(method, params)
    elif confirm:
        raise missing("payment_method")
    now = world.now()
    intent_id = new_id("pi")
    intent = Intent(
        data={
            "id": intent_id,
            "object": "payment_intent",
            "amount": amount,
            "amount_capturable": 0,
            "amount_received": 0,
            "currency": currency.lower(),
            "status": "requires_confirmation" if method else "requires_payment_method",
            "payment_method": method,
            "payment_method_types": types,
            "capture_method": capture,
            "payment_method_options": options,
            "confirmation_method": "automatic",
            "metadata": metadata,
            "client_secret": f"{intent_id}_secret_{new_id('x')[2:26]}",
            "created": int(now),
            "latest_charge": None,
            "last_payment_error": None,
            "next_action": None,
            "cancellation_reason": None,
            "canceled_at": None,
            "description": _str(params, "description"),
            "livemode": False,
        },
        seq=world.next_seq(),
        created_at=now,
        return_url=return_url,
    )
    return intent, method, confirm, expand


async def create_payment_intent(request: Request) -> Response:
    world = sandbox_of(request).world
    touch(world)
    params = await form_params(request)
    moves_money = str(params.get("confirm", "")).lower() == "true"
    call = Call(
        STRIPE, "payment_intents.create", "payment_intent", ("charge",) if moves_money else ()
    )
    base_url = _base_url(request)

    async def perform(key: str | None) -> Outcome:
        try:
            intent, method, confirm, expand = _new_intent(world, params)
        except Invalid as exc:
            return exc.outcome
        world.intents[intent.id] = intent
        _changed(world, intent, "payment_intent.created", key)
        if confirm and method is not None:
            async with intent.lock:
                return _confirm(world, intent, method, key, base_url, expand)
        return Outcome(200, render_intent(world, intent, expand))

    return await run(request, world, call, params, perform)


async def confirm_payment_intent(request: Request) -> Response:
    world = sandbox_of(request).world
    touch(world)
    params = await form_params(request)
    intent_id = request.path_params["intent_id"]
    intent = world.intents.get(intent_id)
    call = Call(
        STRIPE, "payment_intents.confirm", "payment_intent", lock=intent.lock if intent else None
    )
    base_url = _base_url(request)

    async def perform(key: str | None) -> Outcome:
        if intent is None:
            return no_such("payment_intent", intent_id)
        check_expiry(world, intent)
        try:
            method = _str(params, "payment_method")
            return_url = _str(params, "return_url")
            expand = _expand(params)
            if method is not None:
                _check_method(method, intent.data["payment_method_types"])
            if intent.status not in CONFIRMABLE:
                return _unexpected(world, intent, "confirm", CONFIRMABLE)
        except Invalid as exc:
            return exc.outcome
        method = method or intent.data["payment_method"]
        if method is None:  # as Stripe: a state problem (saved), not a parameter one
            body = stripe_error_body(
                "invalid_request_error",
                "You cannot confirm this PaymentIntent because it's missing a payment method.",
                code="payment_intent_unexpected_state",
                payment_intent=render_intent(world, intent),
            )
            return Outcome(400, body)
        try:
            _check_mandate(method, params)
        except Invalid as exc:
            return exc.outcome
        if return_url is not None:
            intent.return_url = return_url
        return _confirm(world, intent, method, key, base_url, expand)

    return await run(request, world, call, {"id": intent_id, **params}, perform)


async def retrieve_payment_intent(request: Request) -> Response:
    world = sandbox_of(request).world
    touch(world)
    params = await form_params(request)
    intent_id = request.path_params["intent_id"]
    call = Call(STRIPE, "payment_intents.retrieve", "payment_intent")

    async def perform(key: str | None) -> Outcome:
        intent = world.intents.get(intent_id)
        if intent is None:
            return no_such("payment_intent", intent_id)
        return Outcome(200, render_intent(world, intent, _expand(params)))

    return await run(request, world, call, {"id": intent_id, **params}, perform)


async def cancel_payment_intent(request: Request) -> Response:
    world = sandbox_of(request).world
    touch(world)
    params = await form_params(request)
    intent_id = request.path_params["intent_id"]
    intent = world.intents.get(intent_id)
    call = Call(
        STRIPE, "payment_intents.cancel", "payment_intent", lock=intent.lock if intent else None
    )

    async def perform(key: str | None) -> Outcome:
        if intent is None:
            return no_such("payment_intent", intent_id)
        check_expiry(world, intent)
        try:
            reason = _choice(params, "cancellation_reason", CANCELLATION_REASONS, None)
            expand = _expand(params)
        except Invalid as exc:
            return exc.outcome
        if intent.status not in CANCELABLE:
            return _unexpected(world, intent, "cancel", CANCELABLE)
        _release(world, intent, key, reason)
        _changed(world, intent, "payment_intent.canceled", key)
        return Outcome(200, render_intent(world, intent, expand))

    return await run(request, world, call, {"id": intent_id, **params}, perform)


async def capture_payment_intent(request: Request) -> Response:
    world = sandbox_of(request).world
    touch(world)
    params = await form_params(request)
    intent_id = request.path_params["intent_id"]
    intent = world.intents.get(intent_id)
    call = Call(
        STRIPE, "payment_intents.capture", "payment_intent", lock=intent.lock if intent else None
    )

    async def perform(key: str | None) -> Outcome:
        if intent is None:
            return no_such("payment_intent", intent_id)
        check_expiry(world, intent)
        try:
            wanted = _int(params, "amount_to_capture")
            expand = _expand(params)
            if intent.status != "requires_capture":
                return _unexpected(world, intent, "capture", ("requires_capture",))
            capturable = int(intent.data["amount_capturable"])
            amount = capturable if wanted is None else wanted
            if amount > capturable:
                raise invalid(
                    "amount_to_capture",
                    f"The amount_to_capture ({amount}) must be less than or equal to the"
                    f" amount_capturable ({capturable}).",
                )
        except Invalid as exc:
            return exc.outcome
        d = intent.data
        charge = world.charges[d["latest_charge"]]
        charge.data.update(captured=True, amount_captured=amount)
        d.update(status="succeeded", amount_received=amount, amount_capturable=0)
        world.holds.discard(intent.id)
        world.effect("charge", intent.order_id, key, amount, intent.id)
        if amount < capturable:
            world.effect(
                "authorization_release", intent.order_id, key, capturable - amount, intent.id
            )
        emit(world, "charge.captured", render_charge(world, charge), key, intent.id)
        _changed(world, intent, "payment_intent.succeeded", key)
        return Outcome(200, render_intent(world, intent, expand))

    return await run(request, world, call, {"id": intent_id, **params}, perform)


async def list_payment_intents(request: Request) -> Response:
    world = sandbox_of(request).world
    touch(world)
    params = await form_params(request)
    call = Call(STRIPE, "payment_intents.list", "list", is_list=True)

    async def perform(key: str | None) -> Outcome:
        try:
            accept = _created_filter(params)
            expand = _expand(params)
            items = [
                i
                for i in sorted(world.intents.values(), key=lambda i: i.seq, reverse=True)
                if accept(int(i.data["created"]))
            ]
            page, has_more = _page(items, lambda i: int(i.seq), _intent_seq(world), params)
        except Invalid as exc:
            return exc.outcome
        return Outcome(
            200,
            {
                "object": "list",
                "data": [render_intent(world, i, expand) for i in page],
                "has_more": has_more,
                "url": "/v1/payment_intents",
            },
        )

    return await run(request, world, call, params, perform)


def _intent_seq(world: World) -> Callable[[str], int | None]:
    def seq(intent_id: str) -> int | None:
        intent = world.intents.get(intent_id)
        return intent.seq if intent else None

    return seq


# ---------------------------------------------------------------- search

_CLAUSE = re.compile(
    r"""\s*(?P<neg>-)?(?P<field>metadata\[(?:'(?P<k1>[^']*)'|"(?P<k2>[^"]*)")\]|[a-z_]+)"""
    r"""\s*(?P<op>:|>=|<=|>|<)\s*(?:'(?P<v1>[^']*)'|"(?P<v2>[^"]*)"|(?P<num>-?\d+))\s*"""
)
_JOIN = re.compile(r"(AND|OR)\s+", re.IGNORECASE)
_NUMERIC = {"amount", "created"}
_TEXT = {"status", "currency"}


def parse_query(query: str) -> Callable[[JSON], bool]:
    """Stripe's search syntax, the subset: metadata['k']:'v', status:'v', currency:'v',
    amount / created with : > < >= <=, negation with '-', joined by AND or by OR."""
    clauses: list[Callable[[JSON], bool]] = []
    joins: set[str] = set()
    pos = 0
    while True:
        match = _CLAUSE.match(query, pos)
        if match is None:
            raise ValueError(f"could not parse the query at position {pos}")
        clauses.append(_clause(match))
        pos = match.end()
        if pos >= len(query):
            break
        join = _JOIN.match(query, pos)
        if join is None:
            raise ValueError(f"expected AND or OR at position {pos}")
        joins.add(join.group(1).upper())
        pos = join.end()
    if len(joins) > 1:
        raise ValueError("a query cannot mix AND and OR")
    if joins == {"OR"}:
        return lambda doc: any(c(doc) for c in clauses)
    return lambda doc: all(c(doc) for c in clauses)


def _clause(match: re.Match[str]) -> Callable[[JSON], bool]:
    name, op, negate = match.group("field"), match.group("op"), bool(match.group("neg"))
    text = match.group("v1") if match.group("v1") is not None else match.group("v2")
    number = match.group("num")
    value = text if text is not None else number
    assert value is not None
    if name.startswith("metadata["):
        key = match.group("k1") if match.group("k1") is not None else match.group("k2")
        if op != ":":
            raise ValueError("metadata supports ':' only")
        test: Callable[[JSON], bool] = lambda doc: doc["metadata"].get(key) == value  # noqa: E731
    elif name in _TEXT:
        if op != ":":
            raise ValueError(f"{name} supports ':' only")
        test = lambda doc: str(doc[name]).lower() == value.lower()  # noqa: E731
    elif name in _NUMERIC:
        try:
            bound = int(value)
        except ValueError:
            raise ValueError(f"{name} needs a number") from None
        compare: dict[str, Callable[[int], bool]] = {
            ":": lambda v: v == bound,
            ">": lambda v: v > bound,
            "<": lambda v: v < bound,
            ">=": lambda v: v >= bound,
            "<=": lambda v: v <= bound,
        }
        test = lambda doc: compare[op](int(doc[name]))  # noqa: E731
    else:
        raise ValueError(f"Field '{name}' is an unsupported search field")
    if negate:
        return lambda doc: not test(doc)
    return test


def _indexed(intent: Intent, cutoff: float) -> JSON | None:
    """What the (lagging) search index knows of an intent at `cutoff`."""
    for at, doc in reversed(intent.history):
        if at <= cutoff:
            return doc
    return None


async def search_payment_intents(request: Request) -> Response:
    world = sandbox_of(request).world
    touch(world)
    params = await form_params(request)
    call = Call(STRIPE, "payment_intents.search", "search_result", is_list=True)

    async def perform(key: str | None) -> Outcome:
        try:
            query = _str(params, "query")
            if query is None:
                raise missing("query")
            try:
                accept = parse_query(query)
            except ValueError as exc:
                raise invalid("query", str(exc)) from None
            limit = _limit(params)
            page = _str(params, "page")
            offset = 0
            if page is not None:
                if not re.fullmatch(r"page_\d+", page):
                    raise invalid("page", f"Invalid page: {page}")
                offset = int(page[5:])
            expand = _expand(params)
        except Invalid as exc:
            return exc.outcome
        cutoff = world.now() - world.config.search_lag_s
        found = []
        for intent in sorted(world.intents.values(), key=lambda i: i.seq, reverse=True):
            doc = _indexed(intent, cutoff)
            if doc is not None and accept(doc):
                found.append(intent)
        chosen = found[offset : offset + limit]
        has_more = len(found) > offset + limit
        return Outcome(
            200,
            {
                "object": "search_result",
                "data": [render_intent(world, i, expand) for i in chosen],
                "has_more": has_more,
                "next_page": f"page_{offset + limit}" if has_more else None,
                "url": "/v1/payment_intents/search",
            },
        )

    return await run(request, world, call, params, perform)


# ---------------------------------------------------------------- charges


async def retrieve_charge(request: Request) -> Response:
    world = sandbox_of(request).world
    touch(world)
    params = await form_params(request)
    charge_id = request.path_params["charge_id"]
    call = Call(STRIPE, "charges.retrieve", "charge")

    async def perform(key: str | None) -> Outcome:
        charge = world.charges.get(charge_id)
        if charge is None:
            return no_such("charge", charge_id)
        return Outcome(200, render_charge(world, charge))

    return await run(request, world, call, {"id": charge_id, **params}, perform)


# ---------------------------------------------------------------- refunds


def _refund_order(world: World, refund: Refund) -> Any:
    order_id = (refund.data.get("metadata") or {}).get("order_id")
    if order_id:
        return order_id
    return world.intents[refund.data["payment_intent"]].order_id


def _refund_succeeds(world: World, refund: Refund, event_key: str | None) -> None:
    d = refund.data
    d["status"] = "succeeded"
    charge = world.charges[d["charge"]]
    charge.data["amount_refunded"] += d["amount"]
    charge.data["refunded"] = charge.data["amount_refunded"] >= charge.data["amount_captured"]
    world.effect("refund", _refund_order(world, refund), refund.key, d["amount"], d["id"])
    emit(world, "charge.refunded", render_charge(world, charge), event_key, d["payment_intent"])


def _settle_refund(world: World, refund: Refund) -> None:
    world.pending_refunds.discard(refund.data["id"])
    refund.settle_at = None
    d = refund.data
    if refund.fails:
        d["status"] = "failed"
        d["failure_reason"] = "declined"
        emit(world, "refund.updated", snapshot(d), None, d["payment_intent"])
        emit(world, "refund.failed", snapshot(d), None, d["payment_intent"])
    else:
        d["status"] = "succeeded"
        emit(world, "refund.updated", snapshot(d), None, d["payment_intent"])
        _refund_succeeds(world, refund, None)


async def _refund_later(world: World, refund: Refund, delay: float) -> None:
    await asyncio.sleep(delay)
    if refund.data["status"] == "pending":
        _settle_refund(world, refund)


async def create_refund(request: Request) -> Response:
    world = sandbox_of(request).world
    touch(world)
    params = await form_params(request)
    intent = _refund_target(world, params)
    call = Call(STRIPE, "refunds.create", "refund", lock=intent.lock if intent else None)

    async def perform(key: str | None) -> Outcome:
        try:
            intent_id, charge_id = _str(params, "payment_intent"), _str(params, "charge")
            if intent_id is None and charge_id is None:
                raise missing("payment_intent")
            if intent is None:
                if intent_id is not None:
                    return no_such("payment_intent", intent_id, "payment_intent")
                return no_such("charge", str(charge_id), "charge")
            wanted = _int(params, "amount")
            metadata = _metadata(params)
            reason = _choice(params, "reason", REFUND_REASONS, None)
        except Invalid as exc:
            return exc.outcome
        if intent.status != "succeeded":
            return _unexpected(world, intent, "refund", ("succeeded",))
        charge = world.charges[intent.data["latest_charge"]]
        taken = sum(
            int(r.data["amount"])
            for r in world.refunds.values()
            if r.data["charge"] == charge.data["id"]
            and r.data["status"] in ("pending", "succeeded")
        )
        remaining = int(charge.data["amount_captured"]) - taken
        amount = remaining if wanted is None else wanted
        if remaining <= 0 or amount > remaining:
            body = stripe_error_body(
                "invalid_request_error",
                f"Charge {charge.data['id']} has already been refunded."
                if remaining <= 0
                else f"Refund amount ({amount}) is greater than unrefunded amount on charge"
                f" ({remaining}).",
                code="charge_already_refunded",
                param="amount",
            )
            return Outcome(400, body)
        mode = world.take(call.names, {"refund_pending", "refund_fails"})
        refund = Refund(
            data={
                "id": new_id("re"),
                "object": "refund",
                "amount": amount,
                "currency": intent.data["currency"],
                "payment_intent": intent.id,
                "charge": charge.data["id"],
                "metadata": metadata,
                "reason": reason,
                "status": "pending" if mode else "succeeded",
                "failure_reason": None,
                "created": int(world.now()),
            },
            seq=world.next_seq(),
            key=key,
        )
        world.refunds[refund.data["id"]] = refund
        emit(world, "refund.created", snapshot(refund.data), key, intent.id)
        if mode is None:
            _refund_succeeds(world, refund, key)
        else:
            refund.fails = mode.mode == "refund_fails"
            delay = max(0.0, mode.settle_s)
            refund.settle_at = world.now() + delay
            world.pending_refunds.add(refund.data["id"])
            world.spawn(_refund_later(world, refund, delay))
        return Outcome(200, snapshot(refund.data))

    return await run(request, world, call, params, perform)


def _refund_target(world: World, params: JSON) -> Intent | None:
    intent_id = params.get("payment_intent")
    if isinstance(intent_id, str) and intent_id:
        return world.intents.get(intent_id)
    charge = world.charges.get(str(params.get("charge") or ""))
    return world.intents.get(charge.data["payment_intent"]) if charge else None


async def retrieve_refund(request: Request) -> Response:
    world = sandbox_of(request).world
    touch(world)
    params = await form_params(request)
    refund_id = request.path_params["refund_id"]
    call = Call(STRIPE, "refunds.retrieve", "refund")

    async def perform(key: str | None) -> Outcome:
        refund = world.refunds.get(refund_id)
        if refund is None:
            return no_such("refund", refund_id)
        return Outcome(200, snapshot(refund.data))

    return await run(request, world, call, {"id": refund_id, **params}, perform)


async def list_refunds(request: Request) -> Response:
    world = sandbox_of(request).world
    touch(world)
    params = await form_params(request)
    call = Call(STRIPE, "refunds.list", "list", is_list=True)

    async def perform(key: str | None) -> Outcome:
        try:
            intent_id, charge_id = _str(params, "payment_intent"), _str(params, "charge")
            accept = _created_filter(params)
            items = [
                r
                for r in sorted(world.refunds.values(), key=lambda r: r.seq, reverse=True)
                if (intent_id is None or r.data["payment_intent"] == intent_id)
                and (charge_id is None or r.data["charge"] == charge_id)
                and accept(int(r.data["created"]))
            ]

            def cursor(refund_id: str) -> int | None:
                refund = world.refunds.get(refund_id)
                return refund.seq if refund else None

            page, has_more = _page(items, lambda r: int(r.seq), cursor, params)
        except Invalid as exc:
            return exc.outcome
        return Outcome(
            200,
            {
                "object": "list",
                "data": [snapshot(r.data) for r in page],
                "has_more": has_more,
                "url": "/v1/refunds",
            },
        )

    return await run(request, world, call, params, perform)


# ---------------------------------------------------------------- far side: 3DS, settle, dispute

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>3D Secure test page</title></head>
<body>
<h1>3D Secure 2 test page</h1>
<p>PaymentIntent {id}: {amount} {currency} &mdash; status {status}</p>
<form method="post" action="/_sandbox/3ds/{id}">
<input type="hidden" name="result" value="complete">
<button type="submit" id="complete">Complete authentication</button>
</form>
<form method="post" action="/_sandbox/3ds/{id}">
<input type="hidden" name="result" value="fail">
<button type="submit" id="fail">Fail authentication</button>
</form>
</body></html>
"""


def _sandbox_error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    body = stripe_error_body("invalid_request_error", message, code=code, **extra)
    return JSONResponse(body, status_code=status)


async def three_ds_page(request: Request) -> Response:
    world = sandbox_of(request).world
    intent = world.intents.get(request.path_params["intent_id"])
    if intent is None:
        return _sandbox_error(404, "resource_missing", "No such payment_intent")
    d = intent.data
    return HTMLResponse(
        _PAGE.format(
            id=html.escape(intent.id),
            amount=d["amount"],
            currency=html.escape(str(d["currency"]).upper()),
            status=html.escape(intent.status),
        )
    )


async def three_ds_submit(request: Request) -> Response:
    world = sandbox_of(request).world
    touch(world)
    intent = world.intents.get(request.path_params["intent_id"])
    if intent is None:
        return _sandbox_error(404, "resource_missing", "No such payment_intent")
    result = request.query_params.get("result")
    if result is None:
        if request.headers.get("content-type", "").startswith("application/json"):
            result = (await json_body(request)).get("result")
        else:
            body = (await request.body()).decode()
            result = dict(parse_qsl(body)).get("result")
    if result not in ("complete", "fail"):
        return _sandbox_error(400, "parameter_invalid", "result: complete or fail", param="result")
    async with intent.lock:
        if intent.status != "requires_action":
            return _sandbox_error(
                409,
                "payment_intent_unexpected_state",
                f"This PaymentIntent is {intent.status}, not waiting for authentication.",
                payment_intent=render_intent(world, intent),
            )
        if result == "complete":
            _authorize(world, intent, intent.confirm_key, None)
        else:
            error = {
                "type": "card_error",
                "code": "payment_intent_authentication_failure",
                "message": "The provided PaymentMethod has failed authentication. You can"
                " provide payment_method_data or a new PaymentMethod to attempt to fulfill"
                " this PaymentIntent again.",
            }
            _fail(world, intent, error, None)
    if intent.return_url:
        extra = {
            "payment_intent": intent.id,
            "payment_intent_client_secret": intent.data["client_secret"],
            "redirect_status": "succeeded" if result == "complete" else "failed",
        }
        parts = urlsplit(intent.return_url)
        query = "&".join(q for q in (parts.query, urlencode(extra)) if q)
        return RedirectResponse(urlunsplit(parts._replace(query=query)), status_code=303)
    return JSONResponse(render_intent(world, intent))


async def settle_payment_intent(request: Request) -> Response:
    world = sandbox_of(request).world
    touch(world)
    intent = world.intents.get(request.path_params["intent_id"])
    if intent is None:
        return _sandbox_error(404, "resource_missing", "No such payment_intent")
    outcome = (await json_body(request)).get("outcome")
    if outcome not in (None, "succeeded", "failed"):
        return _sandbox_error(400, "parameter_invalid", "outcome: succeeded or failed")
    async with intent.lock:
        if intent.status != "processing":
            return _sandbox_error(
                409,
                "payment_intent_unexpected_state",
                f"This PaymentIntent is {intent.status}, not processing.",
            )
        _settle(world, intent, outcome)
    return JSONResponse(render_intent(world, intent))


async def open_dispute(request: Request) -> Response:
    world = sandbox_of(request).world
    touch(world)
    body = await json_body(request)
    intent = world.intents.get(str(body.get("payment_intent")))
    if intent is None:
        return _sandbox_error(404, "resource_missing", "No such payment_intent")
    charge = world.charges.get(str(intent.data.get("latest_charge")))
    if charge is None or not charge.data["captured"]:
        return _sandbox_error(409, "charge_not_captured", "No captured charge to dispute.")
    dispute = {
        "id": new_id("dp"),
        "object": "dispute",
        "amount": charge.data["amount_captured"],
        "currency": charge.data["currency"],
        "charge": charge.data["id"],
        "payment_intent": intent.id,
        "reason": str(body.get("reason") or "fraudulent"),
        "status": "needs_response",
        "created": int(world.now()),
        "livemode": False,
    }
    world.disputes[dispute["id"]] = dispute
    charge.data["disputed"] = True
    emit(world, "charge.dispute.created", dispute, None, intent.id)
    return JSONResponse(dispute)


async def inspect_payment_intents(request: Request) -> Response:
    world = sandbox_of(request).world
    touch(world)
    order_id = request.query_params.get("order_id")
    intents = [
        {**render_intent(world, i, {"latest_charge"}), "events": list(i.events)}
        for i in sorted(world.intents.values(), key=lambda i: i.seq)
        if order_id is None or i.order_id == order_id
    ]
    return JSONResponse({"payment_intents": intents})
