"""The provider sandbox: a Stripe-compatible subset, a carrier API and an e-mail API.

It stands in for the outside world in the demo and the tests.  Every effect it
performs is kept in memory and listed at GET /_sandbox/effects; a request that
an idempotency key answers from its record adds no effect.  Faults are set at
run time through POST /_sandbox/faults.

Stripe subset (form-encoded, as Stripe): POST /v1/payment_intents (with
confirm=true), GET /v1/payment_intents/{id}, POST /v1/refunds.  Test payment
methods: pm_card_visa, pm_card_mastercard (succeed), pm_card_chargeDeclined,
pm_card_chargeDeclinedInsufficientFunds (402 card_error).  Idempotency as
Stripe: same key and parameters replay the first answer (header
Idempotent-Replayed: true); same key, other parameters is a 400
idempotency_error.

Carrier (JSON): POST /v1/shipments, POST /v1/shipments/{id}/cancel,
POST /v1/returns.  E-mail (JSON): POST /v1/messages.  Same key semantics, with
422 idempotency_key_reused for other parameters.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

DECLINES = {
    "pm_card_chargeDeclined": ("card_declined", "generic_decline", "Your card was declined."),
    "pm_card_chargeDeclinedInsufficientFunds": (
        "card_declined",
        "insufficient_funds",
        "Your card has insufficient funds.",
    ),
}
GOOD_CARDS = {"pm_card_visa", "pm_card_mastercard", "pm_card_amex"}

# endpoint name -> the effect kind it produces (fault rules may name either)
ENDPOINTS = {
    "payment_intents.create": "charge",
    "payment_intents.retrieve": "",
    "refunds.create": "refund",
    "shipments.create": "shipment",
    "shipments.cancel": "shipment_cancel",
    "returns.create": "return_label",
    "messages.create": "email",
}


@dataclass
class FaultRule:
    endpoint: str  # an endpoint name, an effect kind, or "*"
    mode: str  # "error" | "rate_limit" | "timeout_after_success" | "latency"
    status: int = 500
    retry_after: float = 1.0
    latency_ms: float = 0.0
    rate: float = 1.0
    count: int = -1  # how many more times it applies; -1: always
    hang_s: float = 30.0
    duration_s: float = -1.0  # a storm: applies this long after it is set; -1: always
    injected: int = 0  # how many times it applied (read back for test records)
    set_at: float = field(default_factory=time.monotonic)

    def matches(self, endpoint: str) -> bool:
        if self.duration_s >= 0 and time.monotonic() - self.set_at > self.duration_s:
            return False
        return self.endpoint in ("*", endpoint, ENDPOINTS.get(endpoint, "?"))


@dataclass
class Record:
    fingerprint: str
    status: int
    body: dict[str, Any]


@dataclass
class SandboxState:
    effects: list[dict[str, Any]] = field(default_factory=list)
    faults: list[FaultRule] = field(default_factory=list)
    records: dict[tuple[str, str], Record] = field(default_factory=dict)
    key_locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    payment_intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunded: dict[str, int] = field(default_factory=dict)
    shipments: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: int = 0

    def effect(self, kind: str, order_id: Any, key: str | None, amount: Any, ref: str) -> None:
        self.effects.append(
            {
                "kind": kind,
                "order_id": order_id,
                "idempotency_key": key,
                "amount": amount,
                "ref": ref,
                "at": time.time(),
            }
        )


class Fault(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _fingerprint(endpoint: str, params: Any) -> str:
    return hashlib.sha256(json.dumps([endpoint, params], sort_keys=True).encode()).hexdigest()


def _stripe_error(status: int, type_: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message, **extra}}, status_code=status)


def _json_error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _nested_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding: metadata[order_id]=x, payment_method_types[0]=card."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if "[" in key:
            head, rest = key.split("[", 1)
            sub = rest.rstrip("]")
            container = out.setdefault(head, {})
            if isinstance(container, dict):
                container[sub] = value
        else:
            out[key] = value
    for name, value in list(out.items()):
        if isinstance(value, dict) and value and all(k.isdigit() for k in value):
            out[name] = [value[k] for k in sorted(value, key=int)]
    return out


def create_sandbox_app() -> Starlette:
    state = SandboxState()

    async def apply_faults(endpoint: str, before_effect: bool) -> FaultRule | None:
        """Raise a Fault answer, sleep for latency, or return a timeout rule."""
        for rule in state.faults:
            if not rule.matches(endpoint) or rule.count == 0 or random.random() >= rule.rate:
                continue
            if rule.mode == "latency":
                if before_effect:
                    rule.injected += 1
                    await asyncio.sleep(rule.latency_ms / 1000)
                continue
            if rule.mode == "timeout_after_success":
                if before_effect:
                    continue
                _consume(rule)
                return rule
            if not before_effect:
                continue
            _consume(rule)
            if rule.mode == "rate_limit":
                limited = (
                    _stripe_error(429, "rate_limit_error", "Too many requests")
                    if endpoint.startswith(("payment_intents", "refunds"))
                    else _json_error(429, "rate_limited", "Too many requests")
                )
                limited.headers["Retry-After"] = _seconds(rule.retry_after)
                raise Fault(limited)
            if rule.mode == "error":
                body = (
                    _stripe_error(rule.status, "api_error", "Injected failure")
                    if endpoint.startswith(("payment_intents", "refunds"))
                    else _json_error(rule.status, "injected_failure", "Injected failure")
                )
                if rule.status == 429:
                    body.headers["Retry-After"] = _seconds(rule.retry_after)
                raise Fault(body)
        return None

    def _consume(rule: FaultRule) -> None:
        rule.injected += 1
        if rule.count > 0:
            rule.count -= 1

    async def idempotent(
        request: Request,
        endpoint: str,
        family: str,
        params: Any,
        perform: Any,
    ) -> Response:
        state.requests += 1
        key = request.headers.get("idempotency-key")
        stripe = family == "stripe"
        try:
            await apply_faults(endpoint, before_effect=True)
        except Fault as fault:
            return fault.response
        if key is None:
            if not stripe:
                return _json_error(400, "idempotency_key_required", "send Idempotency-Key")
            status, body = perform()
            return JSONResponse(body, status_code=status)
        lock = state.key_locks.setdefault((family, key), asyncio.Lock())
        async with lock:
            fingerprint = _fingerprint(endpoint, params)
            record = state.records.get((family, key))
            if record is not None:
                if record.fingerprint != fingerprint:
                    if stripe:
                        return _stripe_error(
                            400,
                            "idempotency_error",
                            "Keys for idempotent requests can only be used with the same"
                            " parameters they were first used with.",
                        )
                    return _json_error(
                        422, "idempotency_key_reused", "key used with other parameters"
                    )
                response: Response = JSONResponse(record.body, status_code=record.status)
                response.headers["Idempotent-Replayed"] = "true"
                return response
            status, body = perform()
            if status < 500:
                state.records[(family, key)] = Record(fingerprint, status, body)
        hang = await apply_faults(endpoint, before_effect=False)
        if hang is not None:
            await asyncio.sleep(hang.hang_s)  # the effect happened; the answer never comes
        return JSONResponse(body, status_code=status)

    # ------------------------------------------------------------ Stripe

    async def create_payment_intent(request: Request) -> Response:
        params = _nested_form(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        key = request.headers.get("idempotency-key")

        def perform() -> tuple[int, dict[str, Any]]:
            try:
                amount = int(params.get("amount", ""))
            except ValueError:
                return 400, _invalid("amount", "Invalid integer")
            currency = str(params.get("currency", "")).lower()
            method = str(params.get("payment_method", ""))
            if amount <= 0 or len(currency) != 3:
                return 400, _invalid("amount", "Amount must be positive, currency ISO")
            if method not in GOOD_CARDS and method not in DECLINES:
                return 400, _invalid("payment_method", f"No such PaymentMethod: '{method}'")
            metadata = params.get("metadata") or {}
            intent: dict[str, Any] = {
                "id": _id("pi"),
                "object": "payment_intent",
                "amount": amount,
                "amount_received": 0,
                "currency": currency,
                "payment_method": method,
                "payment_method_types": params.get("payment_method_types") or ["card"],
                "metadata": metadata,
                "capture_method": "automatic",
                "confirmation_method": "automatic",
                "created": int(time.time()),
                "livemode": False,
                "latest_charge": None,
                "status": "requires_confirmation",
            }
            if str(params.get("confirm", "false")).lower() == "true":
                if method in DECLINES:
                    code, decline, message = DECLINES[method]
                    intent["status"] = "requires_payment_method"
                    state.payment_intents[intent["id"]] = intent
                    return 402, {
                        "error": {
                            "type": "card_error",
                            "code": code,
                            "decline_code": decline,
                            "message": message,
                            "payment_intent": intent,
                        }
                    }
                intent["status"] = "succeeded"
                intent["amount_received"] = amount
                intent["latest_charge"] = _id("ch")
                state.effect("charge", metadata.get("order_id"), key, amount, intent["id"])
            state.payment_intents[intent["id"]] = intent
            return 200, intent

        return await idempotent(request, "payment_intents.create", "stripe", params, perform)

    async def retrieve_payment_intent(request: Request) -> Response:
        try:
            await apply_faults("payment_intents.retrieve", before_effect=True)
        except Fault as fault:
            return fault.response
        intent = state.payment_intents.get(request.path_params["intent_id"])
        if intent is None:
            return _stripe_error(404, "invalid_request_error", "No such payment_intent")
        return JSONResponse(intent)

    async def create_refund(request: Request) -> Response:
        params = _nested_form(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        key = request.headers.get("idempotency-key")

        def perform() -> tuple[int, dict[str, Any]]:
            intent = state.payment_intents.get(str(params.get("payment_intent", "")))
            if intent is None or intent["status"] != "succeeded":
                return 400, _invalid("payment_intent", "No such captured payment_intent")
            remaining = intent["amount_received"] - state.refunded.get(intent["id"], 0)
            amount = int(params.get("amount") or remaining)
            if amount <= 0 or amount > remaining:
                return 400, {
                    "error": {
                        "type": "invalid_request_error",
                        "code": "charge_already_refunded",
                        "message": "The charge has already been refunded.",
                    }
                }
            state.refunded[intent["id"]] = state.refunded.get(intent["id"], 0) + amount
            refund: dict[str, Any] = {
                "id": _id("re"),
                "object": "refund",
                "amount": amount,
                "currency": intent["currency"],
                "payment_intent": intent["id"],
                "charge": intent["latest_charge"],
                "metadata": params.get("metadata") or {},
                "status": "succeeded",
                "created": int(time.time()),
            }
            order_id = (params.get("metadata") or {}).get("order_id") or intent["metadata"].get(
                "order_id"
            )
            state.effect("refund", order_id, key, amount, refund["id"])
            return 200, refund

        return await idempotent(request, "refunds.create", "stripe", params, perform)

    # ------------------------------------------------------------ carrier

    async def create_shipment(request: Request) -> Response:
        params = await _json(request)
        key = request.headers.get("idempotency-key")

        def perform() -> tuple[int, dict[str, Any]]:
            address = params.get("address") or {}
            if not params.get("order_id") or not address.get("country"):
                return 422, {"error": {"code": "invalid_address", "message": "address required"}}
            shipment = {
                "id": _id("shp"),
                "order_id": params["order_id"],
                "status": "created",
                "tracking_number": "1Z" + secrets.token_hex(8).upper(),
                "label_url": f"https://labels.sandbox.invalid/{secrets.token_hex(6)}.pdf",
                "pickup": "scheduled",
            }
            state.shipments[shipment["id"]] = shipment
            items = params.get("items") or []
            state.effect("shipment", params["order_id"], key, len(items), shipment["id"])
            return 201, shipment

        return await idempotent(request, "shipments.create", "carrier", params, perform)

    async def cancel_shipment(request: Request) -> Response:
        shipment_id = request.path_params["shipment_id"]
        key = request.headers.get("idempotency-key")

        def perform() -> tuple[int, dict[str, Any]]:
            shipment = state.shipments.get(shipment_id)
            if shipment is None:
                return 404, {"error": {"code": "not_found", "message": "no such shipment"}}
            if shipment["status"] != "cancelled":
                shipment["status"] = "cancelled"
                state.effect("shipment_cancel", shipment["order_id"], key, None, shipment_id)
            return 200, dict(shipment)

        return await idempotent(
            request, "shipments.cancel", "carrier", {"shipment": shipment_id}, perform
        )

    async def create_return(request: Request) -> Response:
        params = await _json(request)
        key = request.headers.get("idempotency-key")

        def perform() -> tuple[int, dict[str, Any]]:
            if not params.get("order_id"):
                return 422, {"error": {"code": "invalid_request", "message": "order_id required"}}
            label = {
                "id": _id("ret"),
                "order_id": params["order_id"],
                "tracking_number": "RT" + secrets.token_hex(8).upper(),
                "label_url": f"https://labels.sandbox.invalid/{secrets.token_hex(6)}.pdf",
            }
            state.effect("return_label", params["order_id"], key, None, label["id"])
            return 201, label

        return await idempotent(request, "returns.create", "carrier", params, perform)

    # ------------------------------------------------------------ e-mail

    async def send_message(request: Request) -> Response:
        params = await _json(request)
        key = request.headers.get("idempotency-key")

        def perform() -> tuple[int, dict[str, Any]]:
            if not params.get("to"):
                return 422, {"error": {"code": "invalid_recipient", "message": "to required"}}
            message: dict[str, Any] = {
                "id": _id("msg"),
                "status": "queued",
                "order_id": params.get("order_id"),
            }
            state.effect("email", params.get("order_id"), key, None, message["id"])
            return 202, message

        return await idempotent(request, "messages.create", "email", params, perform)

    # ------------------------------------------------------------ control

    async def effects(request: Request) -> Response:
        kind = request.query_params.get("kind")
        order_id = request.query_params.get("order_id")
        selected = [
            e
            for e in state.effects
            if (kind is None or e["kind"] == kind)
            and (order_id is None or e["order_id"] == order_id)
        ]
        return JSONResponse({"effects": selected})

    async def get_faults(request: Request) -> Response:
        return JSONResponse({"rules": [rule.__dict__ for rule in state.faults]})

    async def set_faults(request: Request) -> Response:
        body = await _json(request)
        try:
            rules = [
                FaultRule(**{k: v for k, v in rule.items() if k not in ("injected", "set_at")})
                for rule in body.get("rules", [])
            ]
        except (TypeError, AttributeError) as exc:
            return _json_error(422, "invalid_rule", str(exc))
        for rule in rules:
            if rule.mode not in ("error", "rate_limit", "timeout_after_success", "latency"):
                return _json_error(422, "invalid_rule", f"unknown mode {rule.mode}")
        state.faults = rules
        return JSONResponse({"rules": [rule.__dict__ for rule in rules]})

    async def reset(request: Request) -> Response:
        fresh = SandboxState()
        for name in fresh.__dataclass_fields__:
            setattr(state, name, getattr(fresh, name))
        return JSONResponse({"reset": True})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "requests": state.requests})

    app = Starlette(
        routes=[
            Route("/v1/payment_intents", create_payment_intent, methods=["POST"]),
            Route("/v1/payment_intents/{intent_id}", retrieve_payment_intent, methods=["GET"]),
            Route("/v1/refunds", create_refund, methods=["POST"]),
            Route("/v1/shipments", create_shipment, methods=["POST"]),
            Route("/v1/shipments/{shipment_id}/cancel", cancel_shipment, methods=["POST"]),
            Route("/v1/returns", create_return, methods=["POST"]),
            Route("/v1/messages", send_message, methods=["POST"]),
            Route("/_sandbox/effects", effects, methods=["GET"]),
            Route("/_sandbox/faults", get_faults, methods=["GET"]),
            Route("/_sandbox/faults", set_faults, methods=["POST"]),
            Route("/_sandbox/reset", reset, methods=["POST"]),
            Route("/_sandbox/health", health, methods=["GET"]),
        ]
    )
    app.state.sandbox = state
    return app


def _invalid(param: str, message: str) -> dict[str, Any]:
    return {
        "error": {
            "type": "invalid_request_error",
            "code": "parameter_invalid",
            "param": param,
            "message": message,
        }
    }


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
