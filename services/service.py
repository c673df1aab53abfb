"""The service layer behind the HTTP API: carts, placing orders, reads, returns.

Framework-free: functions take a connection and plain values, return plain
JSON-ready dicts, and raise the named errors of `statemachine.errors`,
`services.orders` (stock and carts) or the ones below.  `app/` parses requests,
calls one of these and renders.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from ulid import ULID

from orderflow.config import Settings
from orderflow.services.countries import ISO_3166_ALPHA2
from orderflow.services.orders import (
    LineRequest,
    PlacedOrder,
    insert_order,
    new_order_id,
    reserve,
)
from orderflow.sql import QUERIES, atomic
from orderflow.statemachine.definition import OrderState
from orderflow.statemachine.engine import advance
from orderflow.statemachine.errors import IllegalTransition, OrderflowError


class NotFound(OrderflowError):
    pass


class InvalidState(OrderflowError):
    """The order's state does not allow this request."""

    def __init__(self, order_id: str, state: str, action: str) -> None:
        super().__init__(f"order {order_id} is {state}; {action} is not allowed")
        self.state = state


class NotCancellable(InvalidState):
    """The order has shipped (or is past cancelling): a return is the way."""

    def __init__(self, order_id: str, state: str) -> None:
        OrderflowError.__init__(
            self,
            f"order {order_id} is {state} and can no longer be cancelled; once it is"
            f" delivered, ask for a return (POST /v1/orders/{order_id}/return)",
        )
        self.state = state


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


class ValidationFailed(OrderflowError):
    def __init__(self, errors: Sequence[FieldError]) -> None:
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in errors))
        self.errors = list(errors)


@dataclass(frozen=True)
class OrderLimits:
    min_qty: int = 1
    max_qty: int = 10
    max_lines: int = 50
    max_total_cents: int = 1_000_000

    @classmethod
    def from_settings(cls, settings: Settings) -> OrderLimits:
        return cls(
            max_qty=settings.order_max_qty_per_line,
            max_lines=settings.order_max_lines,
            max_total_cents=settings.order_max_total_cents,
        )


REQUIRED_ADDRESS_FIELDS = ("name", "line1", "city", "postal_code", "country")


def check_address(address: Mapping[str, Any], prefix: str = "shipping_address") -> list[FieldError]:
    errors = [
        FieldError(f"{prefix}.{f}", "is required")
        for f in REQUIRED_ADDRESS_FIELDS
        if not str(address.get(f) or "").strip()
    ]
    country = address.get("country")
    if country and country not in ISO_3166_ALPHA2:
        errors.append(
            FieldError(f"{prefix}.country", "must be an ISO 3166-1 alpha-2 code, e.g. DE")
        )
    return errors


def check_lines(lines: Sequence[tuple[str, int]], limits: OrderLimits) -> list[FieldError]:
    errors = []
    if not lines:
        errors.append(FieldError("lines", "must not be empty"))
    if len(lines) > limits.max_lines:
        errors.append(FieldError("lines", f"at most {limits.max_lines} lines"))
    seen: set[str] = set()
    for i, (sku, qty) in enumerate(lines):
        if not limits.min_qty <= qty <= limits.max_qty:
            errors.append(
                FieldError(f"lines[{i}].qty", f"must be {limits.min_qty} to {limits.max_qty}")
            )
        if sku in seen:
            errors.append(FieldError(f"lines[{i}].sku", "appears twice"))
        seen.add(sku)
    return errors


# ---------------------------------------------------------------- carts


def create_cart(
    conn: psycopg.Connection[Any],
    *,
    user_id: uuid.UUID,
    lines: Sequence[tuple[str, int]],
    shipping_address: Mapping[str, Any],
    email: str | None,
    limits: OrderLimits,
) -> dict[str, Any]:
    errors = check_lines(lines, limits) + check_address(shipping_address)
    skus = [sku for sku, _ in lines]
    with atomic(conn), conn.cursor(row_factory=dict_row) as cur:
        known = {r["sku"] for r in cur.execute(QUERIES["known_skus"], {"skus": skus})}
        errors += [
            FieldError(f"lines[{i}].sku", "unknown SKU")
            for i, sku in enumerate(skus)
            if sku not in known
        ]
        if errors:
            raise ValidationFailed(errors)
        cart_id = str(ULID())
        cur.execute(
            QUERIES["insert_cart"],
            {
                "cart_id": cart_id,
                "user_id": user_id,
                "shipping_address": Jsonb(dict(shipping_address)),
                "email": email,
                "skus": skus,
                "qtys": [qty for _, qty in lines],
            },
        )
        return get_cart(conn, user_id=user_id, cart_id=cart_id)


def get_cart(conn: psycopg.Connection[Any], *, user_id: uuid.UUID, cart_id: str) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(QUERIES["get_cart"], {"cart_id": cart_id, "user_id": user_id}).fetchone()
    if row is None:
        raise NotFound(f"cart {cart_id}")
    return {
        "id": row["id"],
        "status": row["status"],
        "lines": row["lines"],
        "shipping_address": row["shipping_address"],
        "email": row["email"],
        "created_at": _iso(row["created_at"]),
        "ordered_at": _iso(row["ordered_at"]),
    }


# ---------------------------------------------------------------- orders


def create_order(
    conn: psycopg.Connection[Any],
    *,
    user_id: uuid.UUID,
    payment_method_id: str,
    idempotency_key: str,
    ttl_seconds: int,
    limits: OrderLimits = OrderLimits(),
    cart_id: str | None = None,
    lines: Sequence[LineRequest] = (),
    shipping_address: Mapping[str, Any] | None = None,
    email: str | None = None,
    payment_mandate: Mapping[str, Any] | None = None,
) -> PlacedOrder:
    """The one create path: validate_order + reserve_inventory + the order, in one
    transaction, from the caller's cart (the API) or from lines with an address
    (benches and tests, which skip the cart).

    The reservation statement also locks and reads the cart, so the checks run
    after stock was taken; any failure rolls the whole transaction back.  Raises
    ValidationFailed, CartNotFound, CartAlreadyOrdered, UnknownSku, OutOfStock or
    MixedCurrency, having written nothing.
    """
    order_id = new_order_id()
    with atomic(conn):
        reservation = reserve(
            conn, order_id=order_id, lines=lines, cart_id=cart_id, user_id=user_id
        )
        address = (reservation.shipping_address if cart_id else shipping_address) or {}
        wanted = [(line.sku, line.qty) for line in reservation.lines]
        errors = check_lines(wanted, limits) + check_address(address)
        if reservation.total_cents > limits.max_total_cents:
            errors.append(
                FieldError(
                    "total_cents", f"the order total must not exceed {limits.max_total_cents}"
                )
            )
        if errors:
            raise ValidationFailed(errors)
        return insert_order(
            conn,
            reservation,
            order_id=order_id,
            user_id=user_id,
            shipping_address=address,
            email=reservation.email if cart_id else email,
            payment_method_id=payment_method_id,
            idempotency_key=idempotency_key,
            ttl_seconds=ttl_seconds,
            payment_mandate=payment_mandate,
        )


def place_order(
    conn: psycopg.Connection[Any],
    *,
    user_id: uuid.UUID,
    cart_id: str,
    payment_method_id: str,
    idempotency_key: str,
    limits: OrderLimits,
    ttl_seconds: int,
    payment_mandate: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """POST /v1/orders: the caller's cart ordered, in the create's answer shape."""
    order = create_order(
        conn,
        user_id=user_id,
        cart_id=cart_id,
        payment_method_id=payment_method_id,
        idempotency_key=idempotency_key,
        limits=limits,
        ttl_seconds=ttl_seconds,
        payment_mandate=payment_mandate,
    )
    return placed_order_view(order)


PLACED_FIELDS = (
    "id",
    "state",
    "lines",
    "total_cents",
    "currency",
    "reservation_expires_at",
    "created_at",
)


def placed_order_again(
    conn: psycopg.Connection[Any], *, user_id: uuid.UUID, order_id: str
) -> dict[str, Any]:
    """The answer to a create replayed after its idempotency key row was purged:
    the order it made, in the create's shape, with its values as they are now."""
    order = get_order(conn, user_id=user_id, order_id=order_id)
    return {name: order[name] for name in PLACED_FIELDS}


def placed_order_view(order: PlacedOrder) -> dict[str, Any]:
    return {
        "id": order.id,
        "state": order.state,
        "lines": [
            {"sku": li.sku, "qty": li.qty, "unit_price_cents": li.unit_price_cents}
            for li in order.lines
        ],
        "total_cents": order.total_cents,
        "currency": order.currency,
        "reservation_expires_at": _iso(order.reservation_expires_at),
        "created_at": _iso(order.created_at),
    }


def get_order(
    conn: psycopg.Connection[Any], *, user_id: uuid.UUID, order_id: str
) -> dict[str, Any]:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            QUERIES["get_order_for_user"], {"order_id": order_id, "user_id": user_id}
        ).fetchone()
    if row is None:
        raise NotFound(f"order {order_id}")
    shipment = row["shipment"]
    return {
        "id": row["id"],
        "state": row["state"],
        "lines": row["lines"],
        "total_cents": row["total_cents"],
        "currency": row["currency"],
        "reservation_expires_at": _iso(row["reservation_expires_at"]),
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
        "payment": row["payment"],
        "refund": row["refund"],
        "shipment": shipment,
        "tracking_number": shipment["tracking_number"] if shipment else None,
        "history": [{**h, "at": _iso_text(h["at"])} for h in row["history"]],
    }


MAX_PAGE = 100


def list_orders(
    conn: psycopg.Connection[Any],
    *,
    user_id: uuid.UUID,
    state: str | None,
    limit: int,
    cursor: str | None,
) -> dict[str, Any]:
    if state is not None and state not in {s.value for s in OrderState}:
        raise ValidationFailed([FieldError("state", "unknown order state")])
    if not 1 <= limit <= MAX_PAGE:
        raise ValidationFailed([FieldError("limit", f"must be 1 to {MAX_PAGE}")])
    after_created_at, after_id = decode_cursor(cursor) if cursor else (None, None)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            QUERIES["list_orders_for_user"],
            {
                "user_id": user_id,
                "state": state,
                "after_created_at": after_created_at,
                "after_id": after_id,
                "limit": limit + 1,
            },
        ).fetchall()
    page, more = rows[:limit], len(rows) > limit
    return {
        "orders": [
            {
                "id": r["id"],
                "state": r["state"],
                "total_cents": r["total_cents"],
                "currency": r["currency"],
                "created_at": _iso(r["created_at"]),
                "updated_at": _iso(r["updated_at"]),
            }
            for r in page
        ],
        "next_cursor": encode_cursor(page[-1]["created_at"], page[-1]["id"]) if more else None,
    }


def encode_cursor(created_at: datetime, order_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), order_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, order_id = json.loads(raw)
        return datetime.fromisoformat(created_at), str(order_id)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise ValidationFailed([FieldError("cursor", "is not a cursor this API issued")]) from exc


# ---------------------------------------------------------------- returns


def request_return(
    conn: psycopg.Connection[Any],
    *,
    user_id: uuid.UUID,
    order_id: str,
    reason: str,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The human step `return_requested`, only from `confirmed`.  The request's key
    is kept in the history row, so a replay after the key row's purge still gets
    the same answer."""
    with atomic(conn), conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            QUERIES["order_owner_state"], {"order_id": order_id, "user_id": user_id}
        ).fetchone()
        if row is None:
            raise NotFound(f"order {order_id}")
        detail: dict[str, Any] = {"reason": reason}
        if idempotency_key is not None:
            detail["idempotency_key"] = idempotency_key
        try:
            outcome = advance(conn, order_id, "return_requested", detail)
        except IllegalTransition as exc:
            asked = cur.execute(
                QUERIES["return_requested_with_key"],
                {"order_id": order_id, "key": idempotency_key},
            ).fetchone()
            if idempotency_key is not None and asked is not None:
                return {"id": order_id, "state": exc.state}  # this very request, long ago
            raise InvalidState(order_id, exc.state, "a return") from exc
    return {"id": order_id, "state": outcome.dest.value}


# ---------------------------------------------------------------- cancels

# Already being undone, or undone: a cancel asks for nothing more.
_UNDONE = (OrderState.COMPENSATING.value, OrderState.CANCELLED.value)


def cancel_order(
    conn: psycopg.Connection[Any],
    *,
    order_id: str,
    user_id: uuid.UUID | None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The customer's cancel (`user_id` given: only the owner's order) or an
    operator's (`user_id` None), allowed until the shipment exists: the order goes
    to `compensating` with reason `customer_cancelled` or `operator_cancelled`, and
    the compensations release the hold (or refund a capture) and the stock.

    The order's row lock and the guarded UPDATE decide a race with the ship step:
    exactly one wins.  If the ship step's call was in flight, compensation waits
    for it to settle, and a shipment it created is cancelled first.  Raises
    NotFound, or NotCancellable once the order has shipped."""
    event = "customer_cancelled" if user_id is not None else "operator_cancelled"
    with atomic(conn), conn.cursor(row_factory=dict_row) as cur:
        if user_id is not None:
            row = cur.execute(
                QUERIES["order_owner_state"], {"order_id": order_id, "user_id": user_id}
            ).fetchone()
        else:
            row = cur.execute(QUERIES["order_state_change"], {"order_id": order_id}).fetchone()
        if row is None:
            raise NotFound(f"order {order_id}")
        detail: dict[str, Any] = {"reason": event}
        if idempotency_key is not None:
            detail["idempotency_key"] = idempotency_key
        try:
            advance(conn, order_id, event, detail)
        except IllegalTransition as exc:
            if exc.state not in _UNDONE:
                raise NotCancellable(order_id, exc.state) from exc
    if user_id is not None:
        return get_order(conn, user_id=user_id, order_id=order_id)
    with conn.cursor(row_factory=dict_row) as cur:
        changed = cur.execute(QUERIES["order_state_change"], {"order_id": order_id}).fetchone()
    assert changed is not None
    return {"id": changed["id"], "state": changed["state"]}


def receive_return(conn: psycopg.Connection[Any], *, order_id: str) -> dict[str, Any]:
    """An operator records that the returned parcel arrived."""
    try:
        outcome = advance(conn, order_id, "return_received", {})
    except IllegalTransition as exc:
        raise InvalidState(order_id, exc.state, "receiving a return") from exc
    return {"id": order_id, "state": outcome.dest.value}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _iso_text(value: str | None) -> str | None:
    """Timestamps inside json_agg come back as text; normalise them to ISO 8601."""
    return datetime.fromisoformat(value).isoformat() if value else None
