"""HTTP handlers: parse, call one service function, render.

Each route is also an `Operation` record, from which the OpenAPI document is
generated (see app/openapi.py), so the document cannot list a route that does
not exist or miss one that does.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import stripe
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from orderflow.app import schemas
from orderflow.app.auth import Principal, TokenKey, authenticate, verify
from orderflow.app.context import AppContext
from orderflow.app.errors import ApiError, dumps, to_api_error
from orderflow.app.http import (
    Handler,
    decimal,
    idempotency_key,
    json_endpoint,
    json_response,
    parse_json,
    read_body,
    read_json,
    render,
)
from orderflow.metrics import REGISTRY
from orderflow.services import events, service, webhooks
from orderflow.services.idempotency import (
    Answer,
    IdempotentResult,
    Recover,
    request_fingerprint,
    run_idempotent,
)
from orderflow.statemachine.definition import OrderState

ULID_RE = re.compile(schemas.ULID_PATTERN)


def _ctx(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


def _principal(request: Request, *, admin: bool = False, scope: str | None = None) -> Principal:
    """The caller of a customer route (a customer's token), or of an admin route (an
    operator's token: its own key and audience; a customer's token is refused
    whatever its claims).  An operator's token carrying a `scope` claim is limited
    to those scopes: it opens the routes of its scope (`scope=`) and no other."""
    settings = _ctx(request).settings
    if admin:
        if not settings.jwt_admin_secret:
            raise ApiError(403, "forbidden", "admin routes need JWT_ADMIN_SECRET to be set")
        key = TokenKey(
            settings.jwt_admin_secret,
            settings.jwt_admin_audience,
            settings.jwt_issuer,
            settings.jwt_leeway_s,
        )
        principal = verify(request.headers.get("authorization"), key, admin=True)
        if principal.scopes and (scope is None or scope not in principal.scopes):
            raise ApiError(403, "forbidden", f"this token's scope does not open {request.url.path}")
        return principal
    return authenticate(
        request.headers.get("authorization"),
        secret=settings.jwt_secret or "",
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        leeway_s=settings.jwt_leeway_s,
    )


def _path_id(request: Request, name: str) -> str:
    value = str(request.path_params[name])
    if not ULID_RE.match(value):
        raise ApiError(404, "not_found", "no such resource")
    return value


async def _db(request: Request, fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Run a service function on a pooled connection, off the event loop."""
    ctx = _ctx(request)

    def call() -> Any:
        with ctx.connection() as conn:
            return fn(conn, **kwargs)

    return await run_in_threadpool(call)


def _error_answer(exc: Exception) -> Answer | None:
    """A known error becomes the stored answer of an idempotent request."""
    api = to_api_error(exc)
    return Answer(api.status, api.body()) if api else None


def _success(status: int, result: dict[str, Any]) -> Answer:
    return Answer(status, dumps(result), order_id=result.get("id"))


async def _idempotent(
    request: Request,
    principal: Principal,
    key: str,
    payload: Any,
    status: int,
    produce: Callable[[Any], dict[str, Any]],
    recover: Recover | None = None,
) -> Response:
    ctx = _ctx(request)
    path = request.url.path

    def call() -> IdempotentResult:
        with ctx.connection() as conn:
            return run_idempotent(
                conn,
                user_id=principal.user_id,
                key=key,
                method=request.method,
                path=path,
                request_hash=request_fingerprint(request.method, path, payload),
                work=lambda c: _success(status, produce(c)),
                answer_error=_error_answer,
                lock_timeout_s=ctx.idempotency_lock_timeout_s,
                fresh_connection=ctx.connection,
                recover=recover,
            )

    result = await run_in_threadpool(call)
    headers = {"Idempotent-Replayed": "true"} if result.replayed else None
    return json_response(result.status, result.body, headers)


# ---------------------------------------------------------------- handlers


async def create_cart(request: Request) -> Response:
    principal = _principal(request)
    cart = schemas.CartIn.model_validate(await read_json(request))
    body = await _db(
        request,
        service.create_cart,
        user_id=principal.user_id,
        lines=[(line.sku, line.qty) for line in cart.lines],
        shipping_address=cart.shipping_address.model_dump(exclude_none=True),
        email=cart.email,
        limits=_ctx(request).limits,
    )
    return render(201, body)


async def get_cart(request: Request) -> Response:
    principal = _principal(request)
    cart_id = _path_id(request, "cart_id")
    return render(
        200, await _db(request, service.get_cart, user_id=principal.user_id, cart_id=cart_id)
    )


async def create_order(request: Request) -> Response:
    principal = _principal(request)
    key = idempotency_key(request)  # 400 before reading the body
    payload = await read_json(request)
    # A body that fails validation is answered before the key is recorded: as
    # with Stripe, only a request that started executing has a stored answer.
    order = schemas.OrderIn.model_validate(payload)
    ctx = _ctx(request)

    def produce(conn: Any) -> dict[str, Any]:
        return service.place_order(
            conn,
            user_id=principal.user_id,
            cart_id=order.cart_id,
            payment_method_id=order.payment_method_id,
            payment_mandate=order.mandate.model_dump() if order.mandate else None,
            idempotency_key=key,
            limits=ctx.limits,
            ttl_seconds=ctx.settings.reservation_ttl_seconds,
        )

    mandate = order.mandate.model_dump() if order.mandate else None

    def recover(conn: Any, made: dict[str, Any]) -> Answer | None:
        """The key made this order and its row was purged: the same request gets it again."""
        same = (made["cart_id"], made["payment_method_id"], made["payment_mandate"]) == (
            order.cart_id,
            order.payment_method_id,
            mandate,
        )
        if not same:
            return None
        again = service.placed_order_again(conn, user_id=principal.user_id, order_id=made["id"])
        return _success(201, again)

    return await _idempotent(request, principal, key, payload, 201, produce, recover)


async def get_order(request: Request) -> Response:
    principal = _principal(request)
    order_id = _path_id(request, "order_id")
    return render(
        200, await _db(request, service.get_order, user_id=principal.user_id, order_id=order_id)
    )


async def list_orders(request: Request) -> Response:
    principal = _principal(request)
    params = request.query_params
    limit = decimal(params.get("limit", "20"))
    if limit is None:
        raise ApiError(
            422,
            "validation_error",
            "the request is invalid",
            [{"field": "limit", "message": "must be an integer"}],
        )
    body = await _db(
        request,
        service.list_orders,
        user_id=principal.user_id,
        state=params.get("state"),  # present but empty is invalid, not "any"
        limit=limit,
        cursor=params.get("cursor") or None,
    )
    return render(200, body)


async def list_events(request: Request) -> Response:
    _principal(request, admin=True, scope="events")
    params = request.query_params
    limit = decimal(params.get("limit", "100"))
    if limit is None or not 1 <= limit <= events.MAX_LIMIT:
        raise ApiError(
            422,
            "validation_error",
            "the request is invalid",
            [{"field": "limit", "message": f"must be an integer from 1 to {events.MAX_LIMIT}"}],
        )
    try:
        page = await _db(request, events.read_feed, after=params.get("after"), limit=limit)
    except events.BadCursor as exc:
        raise ApiError(
            422, "validation_error", "the request is invalid",
            [{"field": "after", "message": str(exc)}],
        ) from exc  # fmt: skip
    except events.CursorGone as exc:
        raise ApiError(
            410, "cursor_gone",
            "events after this cursor were purged (ORDERFLOW_EVENTS_RETENTION_H);"
            " start again without `after`",
        ) from exc  # fmt: skip
    return render(200, page)


async def request_return(request: Request) -> Response:
    principal = _principal(request)
    order_id = _path_id(request, "order_id")
    key = idempotency_key(request)
    payload = await read_json(request)
    body = schemas.ReturnIn.model_validate(payload)  # before the key is recorded

    def produce(conn: Any) -> dict[str, Any]:
        return service.request_return(
            conn,
            user_id=principal.user_id,
            order_id=order_id,
            reason=body.reason,
            idempotency_key=key,
        )

    return await _idempotent(request, principal, key, payload, 202, produce)


async def cancel_order(request: Request) -> Response:
    principal = _principal(request)
    order_id = _path_id(request, "order_id")
    key = idempotency_key(request)

    def produce(conn: Any) -> dict[str, Any]:
        return service.cancel_order(
            conn, order_id=order_id, user_id=principal.user_id, idempotency_key=key
        )

    # No body: the request is the order and the key.
    return await _idempotent(request, principal, key, {}, 202, produce)


async def admin_cancel_order(request: Request) -> Response:
    _principal(request, admin=True)
    order_id = _path_id(request, "order_id")
    return render(202, await _db(request, service.cancel_order, order_id=order_id, user_id=None))


async def receive_return(request: Request) -> Response:
    _principal(request, admin=True)
    order_id = _path_id(request, "order_id")
    return render(200, await _db(request, service.receive_return, order_id=order_id))


MAX_WEBHOOK_BYTES = 1024 * 1024
WEBHOOK_TOLERANCE_S = 300  # Stripe's own default for the signature's timestamp


async def stripe_webhook(request: Request) -> Response:
    """Stripe's events: the signature verified with the SDK, then stored once and
    applied in the transaction of the state change (orderflow.webhooks)."""
    secret = _ctx(request).settings.stripe_webhook_secret
    if not secret:
        raise ApiError(404, "webhooks_not_configured", "set STRIPE_WEBHOOK_SECRET to enable")
    body = await read_body(request, MAX_WEBHOOK_BYTES)
    try:
        stripe.WebhookSignature.verify_header(
            body.decode("utf-8", "replace"),
            request.headers.get("stripe-signature"),
            secret,
            WEBHOOK_TOLERANCE_S,
        )
    except stripe.SignatureVerificationError as exc:
        raise ApiError(400, "invalid_signature", "the Stripe-Signature does not verify") from exc
    event = parse_json(body)
    if not isinstance(event, dict):
        raise ApiError(400, "invalid_event", "the body is not a Stripe event")
    try:
        result = await _db(
            request,
            webhooks.receive,
            event=event,
            processing_hold_s=_ctx(request).settings.processing_hold_s,
        )
    except webhooks.BadEvent as exc:
        raise ApiError(400, "invalid_event", str(exc)) from exc
    return render(200, result)


async def metrics(request: Request) -> Response:
    wanted = _ctx(request).settings.metrics_token
    if wanted is not None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {wanted}".encode()):
            raise ApiError(
                401, "unauthorized", "metrics need the metrics token",
                headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
    body = await run_in_threadpool(generate_latest, REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def healthz(request: Request) -> Response:
    ctx = _ctx(request)

    def probe() -> bool:
        try:
            with ctx.pool.connection(timeout=1.0) as conn:
                conn.execute("SELECT 1")
            return True
        except Exception:
            return False

    ok = await run_in_threadpool(probe)
    body = {"status": "ok" if ok else "degraded", "database": "ok" if ok else "unreachable"}
    headers = None if ok else {"Retry-After": "2"}
    return json_response(200 if ok else 503, dumps(body), headers)


# ---------------------------------------------------------------- the route table


@dataclass(frozen=True)
class QueryParam:
    name: str
    schema: dict[str, Any]
    description: str


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    responses: dict[int, tuple[type[BaseModel] | None, str]]
    body: type[BaseModel] | None = None
    auth: bool = True
    idempotent: bool = False
    query: tuple[QueryParam, ...] = ()
    tags: tuple[str, ...] = field(default=("orders",))
    media_type: str = "application/json"
    # OpenAPI links per status: how a client (or schemathesis' stateful phase)
    # feeds this answer into the next call.
    links: dict[int, dict[str, Any]] = field(default_factory=dict)


E = schemas.ErrorBody
AUTH_ERRORS: dict[int, tuple[type[BaseModel] | None, str]] = {
    401: (E, "Missing, invalid or expired bearer token"),
    503: (E, "The database is unavailable; retry after Retry-After seconds"),
}
BODY_ERRORS: dict[int, tuple[type[BaseModel] | None, str]] = {
    400: (E, "Malformed JSON (or a missing or invalid Idempotency-Key)"),
    413: (E, "Body larger than 64 KiB"),
    415: (E, "Body is not application/json"),
    422: (E, "Invalid fields; details lists them"),
}
IDEMPOTENCY_ERRORS: dict[int, tuple[type[BaseModel] | None, str]] = {
    409: (E, "out_of_stock, cart_already_ordered, invalid_state or idempotency_key_in_use"),
    422: (E, "validation_error or idempotency_key_reused"),
}

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "POST",
        "/v1/carts",
        create_cart,
        "createCart",
        "Create a cart of the caller's",
        {201: (schemas.Cart, "The cart"), **AUTH_ERRORS, **BODY_ERRORS},
        body=schemas.CartIn,
        tags=("carts",),
        links={
            201: {
                "GetCart": {
                    "operationId": "getCart",
                    "parameters": {"cart_id": "$response.body#/id"},
                },
                "PlaceOrder": {
                    "operationId": "createOrder",
                    "requestBody": {
                        "cart_id": "$response.body#/id",
                        "payment_method_id": "pm_card_visa",
                    },
                },
            }
        },
    ),
    Operation(
        "GET",
        "/v1/carts/{cart_id}",
        get_cart,
        "getCart",
        "One of the caller's carts",
        {200: (schemas.Cart, "The cart"), 404: (E, "No such cart of the caller's"), **AUTH_ERRORS},
        tags=("carts",),
    ),
    Operation(
        "POST",
        "/v1/orders",
        create_order,
        "createOrder",
        "Place an order from a cart: validate, reserve stock, create the order (one transaction)",
        {
            201: (schemas.PlacedOrder, "The order, reserved; replays return it byte for byte"),
            404: (E, "No such cart of the caller's"),
            **AUTH_ERRORS,
            **BODY_ERRORS,
            **IDEMPOTENCY_ERRORS,
        },
        body=schemas.OrderIn,
        idempotent=True,
        links={
            201: {
                "GetOrder": {
                    "operationId": "getOrder",
                    "parameters": {"order_id": "$response.body#/id"},
                },
                "RequestReturn": {
                    "operationId": "requestReturn",
                    "parameters": {"order_id": "$response.body#/id"},
                },
            }
        },
    ),
    Operation(
        "GET",
        "/v1/orders",
        list_orders,
        "listOrders",
        "The caller's orders, newest first",
        {
            200: (schemas.OrderPage, "A page of orders"),
            422: (E, "Invalid state, limit or cursor"),
            **AUTH_ERRORS,
        },
        query=(
            QueryParam(
                "state",
                {"type": "string", "enum": [s.value for s in OrderState]},
                "Only orders in this state",
            ),
            QueryParam(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": service.MAX_PAGE, "default": 20},
                "Page size",
            ),
            QueryParam("cursor", {"type": "string"}, "next_cursor of the previous page"),
        ),
    ),
    Operation(
        "GET",
        "/v1/orders/{order_id}",
        get_order,
        "getOrder",
        "One of the caller's orders: state, lines, payment and shipment, history",
        {
            200: (schemas.Order, "The order"),
            404: (E, "No such order of the caller's"),
            **AUTH_ERRORS,
        },
    ),
    Operation(
        "POST",
        "/v1/orders/{order_id}/return",
        request_return,
        "requestReturn",
        "Ask to return a confirmed order (the human step return_requested)",
        {
            202: (schemas.OrderStateChange, "The return was requested"),
            404: (E, "No such order of the caller's"),
            **AUTH_ERRORS,
            **BODY_ERRORS,
            **IDEMPOTENCY_ERRORS,
        },
        body=schemas.ReturnIn,
        idempotent=True,
    ),
    Operation(
        "POST",
        "/v1/orders/{order_id}/cancel",
        cancel_order,
        "cancelOrder",
        "Cancel one of the caller's orders before it ships: the hold is released (or a"
        " capture refunded) and the stock put back, newest first",
        {
            202: (schemas.Order, "The cancel was accepted: the order is being undone"),
            400: (E, "A missing or invalid Idempotency-Key"),
            404: (E, "No such order of the caller's"),
            409: (
                E,
                "`not_cancellable`: the order has shipped (a return is the way); or the key"
                " is in use",
            ),
            **AUTH_ERRORS,
            **{k: v for k, v in IDEMPOTENCY_ERRORS.items() if k != 409},
        },
        idempotent=True,
    ),
    Operation(
        "POST",
        "/v1/admin/orders/{order_id}/cancel",
        admin_cancel_order,
        "adminCancelOrder",
        "Cancel an order before it ships, as an operator (admin token; reason operator_cancelled)",
        {
            202: (schemas.OrderStateChange, "The cancel was accepted"),
            403: (E, "Not an admin token"),
            404: (E, "No such order"),
            409: (E, "`not_cancellable`: the order has shipped"),
            **AUTH_ERRORS,
        },
        tags=("admin",),
    ),
    Operation(
        "POST",
        "/v1/admin/orders/{order_id}/return-received",
        receive_return,
        "receiveReturn",
        "Record that a returned parcel arrived (admin token)",
        {
            200: (schemas.OrderStateChange, "The order moved on"),
            403: (E, "Not an admin token"),
            404: (E, "No such order"),
            409: (E, "The order is not awaiting a return"),
            **AUTH_ERRORS,
        },
        tags=("admin",),
    ),
    Operation(
        "POST",
        "/v1/webhooks/stripe",
        stripe_webhook,
        "stripeWebhook",
        "Stripe's webhook events (signed with STRIPE_WEBHOOK_SECRET; no bearer token)",
        {
            200: (schemas.WebhookAck, "Stored once and applied (or recorded as not applying)"),
            400: (E, "A missing or bad Stripe-Signature, or a body that is not an event"),
            404: (E, "Webhooks are not configured (no STRIPE_WEBHOOK_SECRET)"),
            413: (E, "Body larger than 1 MiB"),
            503: (E, "The database is unavailable; Stripe retries"),
        },
        body=schemas.StripeEvent,
        auth=False,
        tags=("webhooks",),
    ),
    Operation(
        "GET",
        "/v1/events",
        list_events,
        "listEvents",
        "Order events (CloudEvents 1.0), oldest first after a cursor: every state change of"
        " every order (an operator's token, or one with scope=events, signed with the admin"
        " key). Served only once every older transaction has ended, so a cursor never skips"
        " a late commit; at least once: deduplicate by id",
        {
            200: (schemas.EventPage, "A page of events and the cursor to continue from"),
            401: (E, "Missing, invalid or expired bearer token"),
            403: (E, "Not an operator's token, or its scope is not events"),
            410: (E, "Events after this cursor were purged: start again without after"),
            422: (E, "A bad limit or after"),
            503: (E, "The database is unavailable; retry after Retry-After seconds"),
        },
        query=(
            QueryParam(
                "after",
                {"type": "string", "pattern": "^[0-9]{1,19}-[0-9]{1,19}$"},
                "The `next` cursor of the previous page (omit to start at the oldest kept)",
            ),
            QueryParam(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                "Events per page",
            ),
        ),
        tags=("events",),
    ),
    Operation(
        "GET",
        "/healthz",
        healthz,
        "health",
        "Liveness and database reachability",
        {200: (schemas.Health, "Healthy"), 503: (schemas.Health, "The database is unreachable")},
        auth=False,
        tags=("operations",),
    ),
    Operation(
        "GET",
        "/metrics",
        metrics,
        "metrics",
        "Prometheus metrics: orders by state, outbox backlog, HTTP latency",
        {
            200: (None, "Prometheus text exposition format"),
            401: (E, "ORDERFLOW_METRICS_TOKEN is set and the bearer token is not it"),
        },
        auth=False,
        tags=("operations",),
        media_type="text/plain",
    ),
)


def route_handlers() -> list[tuple[str, str, Handler]]:
    return [(op.path, op.method, json_endpoint(op.handler, op.path)) for op in OPERATIONS]
