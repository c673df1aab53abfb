"""The carrier (shipments, returns) and the e-mail provider: JSON bodies, keys required."""

from __future__ import annotations

import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from orderflow.sandbox.core import (
    CARRIER,
    EMAIL,
    JSON,
    Call,
    Outcome,
    World,
    json_body,
    new_id,
    run,
    sandbox_of,
)


def _error(status: int, code: str, message: str, store: bool = True) -> Outcome:
    return Outcome(status, {"error": {"code": code, "message": message}}, store=store)


def _label_url() -> str:
    return f"https://labels.sandbox.invalid/{secrets.token_hex(6)}.pdf"


def _listing(items: list[JSON]) -> Outcome:
    return Outcome(200, {"object": "list", "data": [dict(i) for i in items]})


def _select(items: list[JSON], request: Request, *fields: str) -> list[JSON]:
    wanted = {f: request.query_params[f] for f in fields if f in request.query_params}
    return [i for i in items if all(i.get(f) == v for f, v in wanted.items())]


# ---------------------------------------------------------------- shipments


async def create_shipment(request: Request) -> Response:
    world = sandbox_of(request).world
    params = await json_body(request)
    call = Call(CARRIER, "shipments.create", "shipment")

    async def perform(key: str | None) -> Outcome:
        address = params.get("address")
        if (
            not params.get("order_id")
            or not isinstance(address, dict)
            or not address.get("country")
        ):
            return _error(422, "invalid_address", "order_id and address.country required", False)
        shipment = {
            "id": new_id("shp"),
            "object": "shipment",
            "order_id": params["order_id"],
            "status": "created",
            "tracking_number": "1Z" + secrets.token_hex(8).upper(),
            "label_url": _label_url(),
            "pickup": "scheduled",
            "idempotency_key": key,
            "created": int(world.now()),
        }
        world.shipments[shipment["id"]] = shipment
        items = params.get("items") or []
        count = len(items) if isinstance(items, list) else None
        world.effect("shipment", params["order_id"], key, count, shipment["id"])
        return Outcome(201, dict(shipment))

    return await run(request, world, call, params, perform)


async def list_shipments(request: Request) -> Response:
    world = sandbox_of(request).world
    call = Call(CARRIER, "shipments.list", "list", is_list=True)

    async def perform(key: str | None) -> Outcome:
        return _listing(
            _select(list(world.shipments.values()), request, "order_id", "idempotency_key")
        )

    return await run(request, world, call, dict(request.query_params), perform)


async def retrieve_shipment(request: Request) -> Response:
    world = sandbox_of(request).world
    shipment_id = request.path_params["shipment_id"]
    call = Call(CARRIER, "shipments.retrieve", "shipment")

    async def perform(key: str | None) -> Outcome:
        shipment = world.shipments.get(shipment_id)
        if shipment is None:
            return _error(404, "not_found", "no such shipment", False)
        return Outcome(200, dict(shipment))

    return await run(request, world, call, {"shipment": shipment_id}, perform)


async def cancel_shipment(request: Request) -> Response:
    world = sandbox_of(request).world
    shipment_id = request.path_params["shipment_id"]
    call = Call(CARRIER, "shipments.cancel", "shipment")

    async def perform(key: str | None) -> Outcome:
        shipment = world.shipments.get(shipment_id)
        if shipment is None:
            return _error(404, "not_found", "no such shipment", False)
        if shipment["status"] != "cancelled":
            shipment["status"] = "cancelled"
            world.effect("shipment_cancel", shipment["order_id"], key, None, shipment_id)
        return Outcome(200, dict(shipment))

    return await run(request, world, call, {"shipment": shipment_id}, perform)


# ---------------------------------------------------------------- returns


async def create_return(request: Request) -> Response:
    world = sandbox_of(request).world
    params = await json_body(request)
    call = Call(CARRIER, "returns.create", "return")

    async def perform(key: str | None) -> Outcome:
        if not params.get("order_id"):
            return _error(422, "invalid_request", "order_id required", False)
        label = {
            "id": new_id("ret"),
            "object": "return",
            "order_id": params["order_id"],
            "shipment_id": params.get("shipment_id"),
            "tracking_number": "RT" + secrets.token_hex(8).upper(),
            "label_url": _label_url(),
            "idempotency_key": key,
            "created": int(world.now()),
        }
        world.returns[label["id"]] = label
        world.effect("return_label", params["order_id"], key, None, label["id"])
        return Outcome(201, dict(label))

    return await run(request, world, call, params, perform)


async def list_returns(request: Request) -> Response:
    world = sandbox_of(request).world
    call = Call(CARRIER, "returns.list", "list", is_list=True)

    async def perform(key: str | None) -> Outcome:
        return _listing(
            _select(list(world.returns.values()), request, "order_id", "idempotency_key")
        )

    return await run(request, world, call, dict(request.query_params), perform)


# ---------------------------------------------------------------- e-mail


async def send_message(request: Request) -> Response:
    world = sandbox_of(request).world
    params = await json_body(request)
    call = Call(EMAIL, "messages.create", "message")

    async def perform(key: str | None) -> Outcome:
        if not params.get("to"):
            return _error(422, "invalid_recipient", "to required", False)
        message: dict[str, Any] = {
            "id": new_id("msg"),
            "object": "message",
            "status": "queued",
            "to": params["to"],
            "subject": params.get("subject"),
            "order_id": params.get("order_id"),
            "idempotency_key": key,
            "created": int(world.now()),
        }
        world.messages[message["id"]] = message
        world.effect("email", params.get("order_id"), key, None, message["id"])
        return Outcome(202, dict(message))

    return await run(request, world, call, params, perform)


async def list_messages(request: Request) -> Response:
    world: World = sandbox_of(request).world
    call = Call(EMAIL, "messages.list", "list", is_list=True)

    async def perform(key: str | None) -> Outcome:
        return _listing(
            _select(list(world.messages.values()), request, "order_id", "idempotency_key")
        )

    return await run(request, world, call, dict(request.query_params), perform)
