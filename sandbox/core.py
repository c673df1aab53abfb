"""The sandbox's machinery: config, clock, fault rules, idempotency records, effects, tasks.

Everything a test can change lives in one `World`; POST /_sandbox/reset swaps in
a fresh one and cancels the old one's background tasks, so a request still
running from before the reset only ever touches the world it started in.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qsl

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

JSON = dict[str, Any]

log = logging.getLogger("sandbox")

STRIPE = "stripe"
CARRIER = "carrier"
EMAIL = "email"

# Endpoint names a fault rule may name, and the effect kind each one's alias is.
ENDPOINTS: dict[str, str] = {
    "payment_intents.create": "",  # "charge" only when it carries confirm=true
    "payment_intents.confirm": "charge",
    "payment_intents.retrieve": "",
    "payment_intents.cancel": "",
    "payment_intents.capture": "charge",
    "payment_intents.list": "",
    "payment_intents.search": "",
    "charges.retrieve": "",
    "refunds.create": "refund",
    "refunds.retrieve": "",
    "refunds.list": "",
    "shipments.create": "shipment",
    "shipments.retrieve": "",
    "shipments.list": "",
    "shipments.cancel": "shipment_cancel",
    "returns.create": "return_label",
    "returns.list": "",
    "messages.create": "email",
    "messages.list": "",
    "webhooks": "",
}
ALIASES = frozenset({"charge", "refund", "shipment", "shipment_cancel", "return_label", "email"})

BEFORE_MODES = frozenset({"error", "rate_limit"})
AFTER_MODES = frozenset({"error_after_effect", "malformed"})
REFUND_MODES = frozenset({"refund_pending", "refund_fails"})
WEBHOOK_MODES = frozenset({"drop", "duplicate", "delay"})
MODES = (
    BEFORE_MODES
    | AFTER_MODES
    | REFUND_MODES
    | WEBHOOK_MODES
    | frozenset({"latency", "timeout_after_success"})
)


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


# ---------------------------------------------------------------- config


def _default_secret() -> str:
    return "whsec_" + secrets.token_hex(16)


@dataclass
class Config:
    idempotency_window_s: float = 86400.0
    search_lag_s: float = 0.0
    processing_s: float = 1.0  # negative: a bank debit never settles by itself
    hold_s: float = 604800.0
    webhook_url: str | None = None
    webhook_secret: str = field(default_factory=_default_secret)
    webhook_retry_s: list[float] = field(default_factory=lambda: [0.2, 0.5, 1.0, 2.0, 5.0])
    webhook_timeout_s: float = 5.0
    expiry_check_s: float = 1.0  # the periodic check for expired holds and due settlements

    def as_json(self) -> JSON:
        return dict(self.__dict__)

    def merge(self, values: JSON) -> str | None:
        """Apply `values`; an error message (and nothing applied) if one is wrong."""
        checked: JSON = {}
        for name, value in values.items():
            if name not in self.__dataclass_fields__:
                return f"unknown config key {name!r}"
            if name == "webhook_url":
                if value is not None and not (
                    isinstance(value, str) and value.startswith(("http://", "https://"))
                ):
                    return "webhook_url: an http(s) URL or null"
            elif name == "webhook_secret":
                if not isinstance(value, str) or not value:
                    return "webhook_secret: a non-empty string"
            elif name == "webhook_retry_s":
                if not isinstance(value, list) or not all(_number(v) and v >= 0 for v in value):
                    return "webhook_retry_s: a list of seconds"
                value = [float(v) for v in value]
            else:
                if not _number(value):
                    return f"{name}: a number"
                if name in ("webhook_timeout_s", "expiry_check_s") and value <= 0:
                    return f"{name}: more than 0"
                if name != "processing_s" and value < 0:
                    return f"{name}: not negative"
                value = float(value)
            checked[name] = value
        for name, value in checked.items():
            setattr(self, name, value)
        return None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---------------------------------------------------------------- faults


@dataclass
class FaultRule:
    endpoint: str  # an endpoint name, an alias (effect kind), or "*"
    mode: str
    status: int = 500
    retry_after: float = 1.0
    latency_ms: float = 0.0
    rate: float = 1.0
    count: int = -1  # how many more times it applies; -1: always
    hang_s: float = 30.0
    duration_s: float = -1.0  # a storm: applies this long after it is set; -1: always
    settle_s: float = 0.5  # refund_pending / refund_fails: when the refund settles
    copies: int = 2  # duplicate: how many times the event is delivered
    delay_s: float = 1.0  # delay: how long the delivery waits before it is sent
    injected: int = 0  # how many times it applied (read back for test records)
    set_at: float = field(default_factory=time.monotonic)

    def problem(self) -> str | None:
        if self.mode not in MODES:
            return f"unknown mode {self.mode}"
        if self.endpoint != "*" and self.endpoint not in ENDPOINTS and self.endpoint not in ALIASES:
            return f"unknown endpoint {self.endpoint}"
        return None

    def matches(self, names: Collection[str]) -> bool:
        if self.count == 0:
            return False
        if self.duration_s >= 0 and time.monotonic() - self.set_at > self.duration_s:
            return False
        return self.endpoint == "*" or self.endpoint in names

    def consume(self) -> None:
        self.injected += 1
        if self.count > 0:
            self.count -= 1


# ---------------------------------------------------------------- Stripe objects


@dataclass
class Intent:
    data: JSON  # the PaymentIntent as the API shows it
    seq: int
    created_at: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    confirm_key: str | None = None  # the key of the confirm that started a 3DS / bank debit
    return_url: str | None = None
    settle_at: float | None = None
    settle_token: int = 0
    events: list[str] = field(default_factory=list)
    history: list[tuple[float, JSON]] = field(default_factory=list)  # what search sees, when

    @property
    def id(self) -> str:
        return str(self.data["id"])

    @property
    def status(self) -> str:
        return str(self.data["status"])

    @property
    def order_id(self) -> Any:
        return (self.data.get("metadata") or {}).get("order_id")


@dataclass
class Charge:
    data: JSON
    created_at: float
    manual: bool


@dataclass
class Refund:
    data: JSON
    seq: int
    key: str | None
    fails: bool = False
    settle_at: float | None = None


@dataclass
class Event:
    id: str
    type: str
    object_id: str
    payment_intent: str | None
    payload: bytes
    deliveries: list[JSON] = field(default_factory=list)
    delivered: bool = False
    dropped: int = 0


# ---------------------------------------------------------------- the world


@dataclass
class Record:
    fingerprint: str
    status: int
    body: Any
    stored_at: float
    request_id: str


@dataclass
class World:
    config: Config = field(default_factory=Config)
    clock_offset: float = 0.0
    effects: list[JSON] = field(default_factory=list)
    faults: list[FaultRule] = field(default_factory=list)
    records: dict[tuple[str, str], Record] = field(default_factory=dict)
    in_flight: set[tuple[str, str]] = field(default_factory=set)
    intents: dict[str, Intent] = field(default_factory=dict)
    charges: dict[str, Charge] = field(default_factory=dict)
    refunds: dict[str, Refund] = field(default_factory=dict)
    disputes: dict[str, JSON] = field(default_factory=dict)
    holds: set[str] = field(default_factory=set)  # requires_capture intents
    # When the soonest hold expires (sandbox clock): a sweep looks at the holds
    # only then, not at thousands of them on every request.
    next_hold_expiry: float = 0.0
    processing: set[str] = field(default_factory=set)  # bank debits not settled yet
    pending_refunds: set[str] = field(default_factory=set)
    shipments: dict[str, JSON] = field(default_factory=dict)
    returns: dict[str, JSON] = field(default_factory=dict)
    messages: dict[str, JSON] = field(default_factory=dict)
    events: dict[str, Event] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    sweeper: asyncio.Task[None] | None = None
    http: httpx.AsyncClient | None = None
    requests: int = 0
    seq: int = 0
    # Provider calls being served right now, and the most at once (bench saga
    # reports whether the worker keeps thousands in flight under latency).
    calls_in_flight: int = 0
    peak_calls_in_flight: int = 0

    def now(self) -> float:
        """The sandbox clock: real time moved on by POST /_sandbox/clock."""
        return time.time() + self.clock_offset

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def effect(self, kind: str, order_id: Any, key: str | None, amount: Any, ref: str) -> None:
        self.effects.append(
            {
                "kind": kind,
                "order_id": order_id,
                "idempotency_key": key if key is not None else f"auto:{ref}:{kind}",
                "amount": amount,
                "ref": ref,
                "at": self.now(),
            }
        )

    def take(self, names: Collection[str], modes: Collection[str]) -> FaultRule | None:
        """The first live rule of one of `modes` for this call that fires (and is consumed)."""
        for rule in self.faults:
            if rule.mode in modes and rule.matches(names) and random.random() < rule.rate:
                rule.consume()
                return rule
        return None

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(_logged(coro))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def close(self) -> None:
        """Cancel every background task (deliveries, timers, the periodic check)."""
        for task in list(self.tasks):
            task.cancel()
        self.tasks.clear()
        if self.http is not None:
            client, self.http = self.http, None
            closing = asyncio.get_running_loop().create_task(client.aclose())
            _closing.add(closing)
            closing.add_done_callback(_closing.discard)


_closing: set[asyncio.Task[None]] = set()


async def _logged(coro: Awaitable[None]) -> None:
    try:
        await coro
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("sandbox background task failed")


class Sandbox:
    """`app.state.sandbox`: the current world; reset replaces it."""

    def __init__(self) -> None:
        self.world = World()

    def reset(self) -> None:
        old, self.world = self.world, World()
        old.close()

    # Read-only views kept for callers of the old state object.
    @property
    def effects(self) -> list[JSON]:
        return self.world.effects

    @property
    def faults(self) -> list[FaultRule]:
        return self.world.faults

    @property
    def config(self) -> Config:
        return self.world.config


def sandbox_of(request: Request) -> Sandbox:
    return cast(Sandbox, request.app.state.sandbox)


# ---------------------------------------------------------------- requests and answers


@dataclass
class Outcome:
    status: int
    body: Any
    store: bool = True  # False: a validation failure, never saved for the key


@dataclass
class Call:
    family: str  # stripe | carrier | email: the idempotency key space
    endpoint: str
    object_name: str  # for a malformed answer
    aliases: tuple[str, ...] = ()
    is_list: bool = False
    lock: asyncio.Lock | None = None  # held across latency and execution (one PaymentIntent)

    @property
    def names(self) -> set[str]:
        alias = ENDPOINTS.get(self.endpoint, "")
        return {self.endpoint, *self.aliases, *([alias] if alias else [])}

    @property
    def stripe(self) -> bool:
        return self.family == STRIPE


Perform = Callable[[str | None], Awaitable[Outcome]]


def fingerprint(endpoint: str, params: Any) -> str:
    return hashlib.sha256(json.dumps([endpoint, params], sort_keys=True).encode()).hexdigest()


def stripe_error_body(type_: str, message: str, **extra: Any) -> JSON:
    return {"error": {"type": type_, "message": message, **extra}}


def json_error_body(code: str, message: str) -> JSON:
    return {"error": {"code": code, "message": message}}


def seconds_header(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _answer(call: Call, status: int, body: Any, request_id: str) -> Response:
    response = JSONResponse(body, status_code=status)
    if call.stripe:
        response.headers["Request-Id"] = request_id
    return response


def _fault_answer(call: Call, rule: FaultRule, request_id: str) -> Response:
    if rule.mode == "rate_limit":
        body = (
            stripe_error_body(
                "invalid_request_error",
                "Request rate limit exceeded. Try again later.",
                code="rate_limit",
            )
            if call.stripe
            else json_error_body("rate_limited", "Too many requests")
        )
        response = _answer(call, 429, body, request_id)
        response.headers["Retry-After"] = seconds_header(rule.retry_after)
        return response
    body = (
        stripe_error_body("api_error", "Injected failure")
        if call.stripe
        else json_error_body("injected_failure", "Injected failure")
    )
    response = _answer(call, rule.status, body, request_id)
    if rule.status == 429:
        response.headers["Retry-After"] = seconds_header(rule.retry_after)
    return response


def _after_effect(call: Call, rule: FaultRule, outcome: Outcome) -> Outcome:
    if rule.mode == "malformed":
        if call.is_list:
            return Outcome(outcome.status, {"object": "list", "data": None})
        return Outcome(outcome.status, {"id": None, "object": call.object_name, "status": None})
    body = (
        stripe_error_body("api_error", "An unknown error occurred after the request was processed.")
        if call.stripe
        else json_error_body("injected_failure", "Injected failure after the effect")
    )
    return Outcome(rule.status, body)


async def run(
    request: Request, world: World, call: Call, params: Any, perform: Perform
) -> Response:
    """One API request: faults, the idempotency record, execution, the answer.

    The order is Stripe's: a failure before execution (fault `error`, 429) saves
    nothing; a request with a key that has a saved answer replays it (or is an
    idempotency error if its parameters differ); one whose key is in use by a
    request still executing is a 409; otherwise the endpoint executes and its
    answer is saved for the key, unless it was a validation failure.
    """
    world.requests += 1
    request_id = "req_" + secrets.token_hex(7)
    names = call.names
    rule = world.take(names, BEFORE_MODES)
    if rule is not None:
        return _fault_answer(call, rule, request_id)
    key = request.headers.get("idempotency-key") if request.method == "POST" else None
    if key is None and request.method == "POST" and not call.stripe:
        return _answer(
            call, 400, json_error_body("idempotency_key_required", "send Idempotency-Key"), ""
        )
    print_ = fingerprint(call.endpoint, params)
    slot = (call.family, key or "")
    if key is not None:
        record = world.records.get(slot)
        if (
            record is not None
            and world.now() - record.stored_at >= world.config.idempotency_window_s
        ):
            del world.records[slot]  # expired: the key is new again
            record = None
        if record is not None:
            if record.fingerprint != print_:
                return _answer(call, *_reused(call), request_id)
            response = _answer(call, record.status, record.body, request_id)
            response.headers["Idempotent-Replayed"] = "true"
            if call.stripe:
                response.headers["Original-Request"] = record.request_id
            return response
        if slot in world.in_flight:
            return _answer(call, *_in_use(call), request_id)
        world.in_flight.add(slot)
    try:
        if call.lock is not None:
            async with call.lock:
                outcome = await _execute(world, call, names, key, perform)
        else:
            outcome = await _execute(world, call, names, key, perform)
        if key is not None and outcome.store:
            world.records[slot] = Record(
                print_, outcome.status, copy.deepcopy(outcome.body), world.now(), request_id
            )
    finally:
        if key is not None:
            world.in_flight.discard(slot)
    response = _answer(call, outcome.status, outcome.body, request_id)
    hang = world.take(names, {"timeout_after_success"})
    if hang is not None:
        await asyncio.sleep(hang.hang_s)  # the effect happened; the answer comes too late
    return response


async def _execute(
    world: World, call: Call, names: set[str], key: str | None, perform: Perform
) -> Outcome:
    latency = 0.0
    for rule in world.faults:
        if rule.mode == "latency" and rule.matches(names) and random.random() < rule.rate:
            rule.consume()
            latency += rule.latency_ms / 1000
    world.calls_in_flight += 1
    world.peak_calls_in_flight = max(world.peak_calls_in_flight, world.calls_in_flight)
    try:
        if latency > 0:
            await asyncio.sleep(latency)
        outcome = await perform(key)
    finally:
        world.calls_in_flight -= 1
    if 200 <= outcome.status < 300:
        after = world.take(names, AFTER_MODES)
        if after is not None:
            outcome = _after_effect(call, after, outcome)
    return outcome


def _reused(call: Call) -> tuple[int, JSON]:
    if call.stripe:
        return 400, stripe_error_body(
            "idempotency_error",
            "Keys for idempotent requests can only be used with the same parameters they"
            " were first used with. Try using a key other than the one used in the original"
            " request.",
        )
    return 422, json_error_body("idempotency_key_reused", "key used with other parameters")


def _in_use(call: Call) -> tuple[int, JSON]:
    if call.stripe:
        return 409, stripe_error_body(
            "idempotency_error",
            "There is currently another in-progress request using this Stripe-Idempotency-Key"
            " (that is, another request with the same key that has not yet returned). Try"
            " again later.",
            code="idempotency_key_in_use",
        )
    return 409, json_error_body("idempotency_key_in_use", "a request with this key is running")


# ---------------------------------------------------------------- encodings

_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_PART = re.compile(r"\[([^\[\]]*)\]")


def parse_form(pairs: Iterable[tuple[str, str]]) -> JSON:
    """Stripe's nested encoding: metadata[k]=v, types[0]=card, created[gte]=1, expand[]=x."""
    root: JSON = {}
    for raw_key, value in pairs:
        match = _KEY.match(raw_key)
        if match is None:
            root[raw_key] = value
            continue
        parts = [match.group(1), *_PART.findall(match.group(2))]
        node: JSON = root
        for i, part in enumerate(parts):
            if part == "":
                part = str(sum(1 for k in node if k.isdigit()))
            if i == len(parts) - 1:
                node[part] = value
                break
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
    return cast(JSON, _lists(root))


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        converted = {k: _lists(v) for k, v in value.items()}
        if converted and all(k.isdigit() for k in converted):
            return [converted[k] for k in sorted(converted, key=int)]
        return converted
    return value


async def form_params(request: Request) -> JSON:
    if request.method == "GET":
        return parse_form(parse_qsl(request.url.query, keep_blank_values=True))
    return parse_form(parse_qsl((await request.body()).decode(), keep_blank_values=True))


async def json_body(request: Request) -> JSON:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def snapshot(value: Any) -> Any:
    return copy.deepcopy(value)
