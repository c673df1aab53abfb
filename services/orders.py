"""Creating an order: reserve_inventory and the `place` transition, one transaction."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from ulid import ULID

from orderflow import failpoints
from orderflow.sql import QUERIES, atomic
from orderflow.statemachine.errors import OrderflowError
from orderflow.statemachine.machine import PLACE_TRANSITION

# What reserve and insert_order raise; each leaves nothing written once its
# transaction rolls back.


class OutOfStock(OrderflowError):
    """Some lines cannot be reserved; nothing was reserved."""

    def __init__(self, skus: list[str]) -> None:
        super().__init__(f"out of stock: {', '.join(skus)}")
        self.skus = skus


class UnknownSku(OrderflowError):
    def __init__(self, skus: list[str]) -> None:
        super().__init__(f"unknown SKU: {', '.join(skus)}")
        self.skus = skus


class MixedCurrency(OrderflowError):
    def __init__(self, currencies: list[str]) -> None:
        super().__init__(f"an order is in one currency; the lines are in {', '.join(currencies)}")
        self.currencies = currencies


class CartAlreadyOrdered(OrderflowError):
    pass


class CartNotFound(OrderflowError):
    pass


@dataclass(frozen=True)
class LineRequest:
    sku: str
    qty: int


@dataclass(frozen=True)
class PricedLine:
    sku: str
    qty: int
    unit_price_cents: int


@dataclass(frozen=True)
class PlacedOrder:
    id: str
    state: str
    total_cents: int
    currency: str
    lines: tuple[PricedLine, ...]
    created_at: datetime
    reservation_expires_at: datetime


@dataclass(frozen=True)
class Reservation:
    """Stock taken for an order that is about to be inserted (same transaction)."""

    lines: tuple[PricedLine, ...]
    currency: str
    total_cents: int
    cart_id: str | None = None
    shipping_address: Mapping[str, Any] | None = None  # the cart's
    email: str | None = None  # the cart's


def new_order_id() -> str:
    """A ULID: order ids sort by creation time."""
    return str(ULID())


def reserve(
    conn: psycopg.Connection[Any],
    *,
    order_id: str,
    lines: Sequence[LineRequest] = (),
    cart_id: str | None = None,
    user_id: uuid.UUID | None = None,
) -> Reservation:
    """reserve_inventory: ONE statement takes every line's quantity from stock, or none.

    The stock is taken for `order_id`, which insert_order then creates in the same
    transaction (the products trigger writes the ledger rows, naming the order).
    With `cart_id` it first locks the caller's cart and reserves its lines.
    Raises CartNotFound, CartAlreadyOrdered, UnknownSku, OutOfStock or
    MixedCurrency.  Runs inside the caller's transaction, which must roll
    back on any error (stock may already be taken when MixedCurrency is raised).
    """
    if conn.info.transaction_status == TransactionStatus.IDLE:
        raise RuntimeError("reserve() must run inside the order's transaction")
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            QUERIES["reserve_stock"],
            {
                "order_id": order_id,
                "cart_id": cart_id,
                "user_id": user_id,
                "skus": [line.sku for line in lines],
                "qtys": [line.qty for line in lines],
            },
        ).fetchone()
    assert row is not None  # the statement always answers one row
    if cart_id is not None and row["cart_status"] is None:
        raise CartNotFound(f"cart {cart_id}")
    if cart_id is not None and row["cart_status"] != "open":
        raise CartAlreadyOrdered(f"cart {cart_id} has already been ordered")
    if not row["wanted_skus"]:
        raise ValueError("an order needs at least one line")
    locked = row["lines"]
    if missing := sorted(set(row["wanted_skus"]) - {line["sku"] for line in locked}):
        raise UnknownSku(missing)
    if not row["ok"]:
        raise OutOfStock(sorted(line["sku"] for line in locked if line["available"] < line["qty"]))
    currencies = sorted({line["currency"] for line in locked})
    if len(currencies) != 1:
        raise MixedCurrency(currencies)
    priced = tuple(PricedLine(line["sku"], line["qty"], line["price_cents"]) for line in locked)
    return Reservation(
        lines=priced,
        currency=currencies[0],
        total_cents=sum(line.qty * line.unit_price_cents for line in priced),
        cart_id=cart_id,
        shipping_address=row["shipping_address"],
        email=row["email"],
    )


def insert_order(
    conn: psycopg.Connection[Any],
    reservation: Reservation,
    *,
    order_id: str,
    user_id: uuid.UUID,
    shipping_address: Mapping[str, Any],
    email: str | None,
    payment_method_id: str,
    idempotency_key: str,
    ttl_seconds: int,
    payment_mandate: Mapping[str, Any] | None = None,
) -> PlacedOrder:
    """The order in its first state with lines, reservation row, history and first
    outbox row (one statement, in the reservation's transaction)."""
    priced = reservation.lines
    with conn.cursor(row_factory=dict_row) as cur:
        created = cur.execute(
            QUERIES["insert_order"],
            {
                "order_id": order_id,
                "user_id": user_id,
                "cart_id": reservation.cart_id,
                "state": PLACE_TRANSITION.dest.value,
                "total_cents": reservation.total_cents,
                "currency": reservation.currency,
                "payment_method_id": payment_method_id,
                "payment_mandate": Jsonb(dict(payment_mandate)) if payment_mandate else None,
                "shipping_address": Jsonb(dict(shipping_address)),
                "email": email,
                "idempotency_key": idempotency_key,
                "skus": [line.sku for line in priced],
                "qtys": [line.qty for line in priced],
                "prices": [line.unit_price_cents for line in priced],
                "ttl_seconds": ttl_seconds,
                "event": PLACE_TRANSITION.event,
                "detail": Jsonb({}),
                "steps": list(PLACE_TRANSITION.emits),
            },
        ).fetchone()
    assert created is not None
    if reservation.cart_id is not None and created["cart_marked"] != 1:
        raise CartAlreadyOrdered(f"cart {reservation.cart_id} has already been ordered")
    failpoints.hit("create_order.after_write")
    return PlacedOrder(
        id=order_id,
        state=PLACE_TRANSITION.dest.value,
        total_cents=reservation.total_cents,
        currency=reservation.currency,
        lines=priced,
        created_at=created["created_at"],
        reservation_expires_at=created["expires_at"],
    )


def release_inventory(conn: psycopg.Connection[Any], order_id: str) -> int:
    """Give the order's live reservation back to stock; a second call does nothing.

    Returns the number of SKUs put back."""
    with atomic(conn):
        return len(conn.execute(QUERIES["release_reservation"], {"order_id": order_id}).fetchall())


def consume_reservation(conn: psycopg.Connection[Any], order_id: str) -> bool:
    """Payment captured: the reserved stock is sold.  False if it was not live."""
    with atomic(conn):
        return (
            conn.execute(QUERIES["consume_reservation"], {"order_id": order_id}).fetchone()
            is not None
        )


def restock_order(conn: psycopg.Connection[Any], order_id: str) -> int:
    """Return received: put the order's lines back on sale; a second call does nothing."""
    with atomic(conn):
        return len(conn.execute(QUERIES["restock_order"], {"order_id": order_id}).fetchall())
