"""The /_sandbox/ endpoints: effects, faults, config, clock, events, reset, health."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from orderflow.sandbox.core import FaultRule, json_body, json_error_body, sandbox_of
from orderflow.sandbox.stripe_api import touch
from orderflow.sandbox.webhooks import describe, schedule

_RULE_FIELDS = {f.name: f for f in fields(FaultRule) if f.name not in ("injected", "set_at")}


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(json_error_body(code, message), status_code=status)


async def effects(request: Request) -> Response:
    world = sandbox_of(request).world
    touch(world)
    kind = request.query_params.get("kind")
    order_id = request.query_params.get("order_id")
    selected = [
        e
        for e in world.effects
        if (kind is None or e["kind"] == kind) and (order_id is None or e["order_id"] == order_id)
    ]
    return JSONResponse({"effects": selected})


def _rule(raw: Any) -> FaultRule | str:
    if not isinstance(raw, dict):
        return "a rule is an object"
    values = {k: v for k, v in raw.items() if k not in ("injected", "set_at")}
    for name, value in values.items():
        spec = _RULE_FIELDS.get(name)
        if spec is None:
            return f"unknown rule field {name!r}"
        if spec.type == "str":
            if not isinstance(value, str):
                return f"{name}: a string"
        elif not isinstance(value, int | float) or isinstance(value, bool):
            return f"{name}: a number"
    if "endpoint" not in values or "mode" not in values:
        return "endpoint and mode are required"
    for name in ("status", "count", "copies"):
        if name in values:
            values[name] = int(values[name])
    rule = FaultRule(**values)
    return rule.problem() or rule


async def get_faults(request: Request) -> Response:
    world = sandbox_of(request).world
    return JSONResponse({"rules": [rule.__dict__ for rule in world.faults]})


async def set_faults(request: Request) -> Response:
    world = sandbox_of(request).world
    body = await json_body(request)
    raw_rules = body.get("rules", [])
    if not isinstance(raw_rules, list):
        return _error(422, "invalid_rule", "rules: a list")
    rules: list[FaultRule] = []
    for raw in raw_rules:
        rule = _rule(raw)
        if isinstance(rule, str):
            return _error(422, "invalid_rule", rule)
        rules.append(rule)
    world.faults = rules
    return JSONResponse({"rules": [rule.__dict__ for rule in rules]})


async def get_config(request: Request) -> Response:
    return JSONResponse(sandbox_of(request).world.config.as_json())


async def set_config(request: Request) -> Response:
    world = sandbox_of(request).world
    values = await json_body(request)
    problem = world.config.merge(values)
    if problem is not None:
        return _error(422, "invalid_config", problem)
    if "expiry_check_s" in values and world.sweeper is not None:
        world.sweeper.cancel()  # the periodic check restarts at its new pace
        world.sweeper = None
    if "hold_s" in values:
        world.next_hold_expiry = 0.0  # every hold's expiry moved: look at them all again
    touch(world)
    return JSONResponse(world.config.as_json())


def _clock(request: Request) -> JSONResponse:
    world = sandbox_of(request).world
    return JSONResponse({"now": world.now(), "offset_s": world.clock_offset})


async def get_clock(request: Request) -> Response:
    return _clock(request)


async def advance_clock(request: Request) -> Response:
    world = sandbox_of(request).world
    advance = (await json_body(request)).get("advance_s")
    if not isinstance(advance, int | float) or isinstance(advance, bool) or advance < 0:
        return _error(422, "invalid_clock", "advance_s: a number of seconds, not negative")
    world.clock_offset += float(advance)
    touch(world)  # settles whatever the moved clock made due
    return _clock(request)


async def list_events(request: Request) -> Response:
    world = sandbox_of(request).world
    touch(world)
    type_ = request.query_params.get("type")
    object_id = request.query_params.get("object_id")
    chosen = [
        describe(e)
        for e in world.events.values()
        if (type_ is None or e.type == type_) and (object_id is None or e.object_id == object_id)
    ]
    return JSONResponse({"events": chosen})


async def resend_event(request: Request) -> Response:
    world = sandbox_of(request).world
    event = world.events.get(request.path_params["event_id"])
    if event is None:
        return _error(404, "not_found", "no such event")
    if not world.config.webhook_url:
        return _error(409, "no_webhook_url", "configure webhook_url first")
    schedule(world, event, faults=False)
    return JSONResponse({"resent": event.id}, status_code=202)


async def reset(request: Request) -> Response:
    sandbox_of(request).reset()
    return JSONResponse({"reset": True})


async def health(request: Request) -> Response:
    world = sandbox_of(request).world
    return JSONResponse(
        {
            "status": "ok",
            "requests": world.requests,
            "calls_in_flight": world.calls_in_flight,
            "peak_calls_in_flight": world.peak_calls_in_flight,
        }
    )
