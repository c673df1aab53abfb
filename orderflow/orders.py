"""Creating an order: reserve_inventory and the `place` transition, one transaction."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from ulid import ULID

from orderflow import failpoints
from sql import QUERIES
from statemachine.errors import MixedCurrency, OutOfStock, UnknownSku
from statemachine.machine import PLACE_TRANSITION


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


def create_order(
    conn: psycopg.Connection[Any],
    *,
    user_id: uuid.UUID,
    lines: Sequence[LineRequest],
    shipping_address: Mapping[str, Any],
    email: str | None,
    payment_method_id: str,
    idempotency_key: str,
    ttl_seconds: int,
    cart_id: str | None = None,
) -> PlacedOrder:
    """Reserve every line (or none), then create the order in `reserved` with its
    history row and first outbox row.  Raises OutOfStock, UnknownSku or
    MixedCurrency having written nothing."""
    if not lines:
        raise ValueError("an order needs at least one line")
    skus = [line.sku for line in lines]
    qtys = [line.qty for line in lines]
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        reserved = cur.execute(QUERIES["reserve_stock"], {"skus": skus, "qtys": qtys}).fetchall()
        found = {r["sku"] for r in reserved}
        if missing := sorted(set(skus) - found):
            raise UnknownSku(missing)
        if not reserved[0]["ok"]:
            raise OutOfStock(sorted(r["sku"] for r in reserved if r["available"] < r["qty"]))
        currencies = sorted({r["currency"] for r in reserved})
        if len(currencies) != 1:
            raise MixedCurrency(currencies)
        priced = tuple(PricedLine(r["sku"], r["qty"], r["price_cents"]) for r in reserved)
        total = sum(line.qty * line.unit_price_cents for line in priced)
        order_id = str(ULID())
        created = cur.execute(
            QUERIES["insert_order"],
            {
                "order_id": order_id,
                "user_id": user_id,
                "cart_id": cart_id,
                "state": PLACE_TRANSITION.dest.value,
                "total_cents": total,
                "currency": currencies[0],
                "payment_method_id": payment_method_id,
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
        failpoints.hit("create_order.after_write")
    return PlacedOrder(
        id=order_id,
        state=PLACE_TRANSITION.dest.value,
        total_cents=total,
        currency=currencies[0],
        lines=priced,
        created_at=created["created_at"],
        reservation_expires_at=created["expires_at"],
    )


def release_inventory(conn: psycopg.Connection[Any], order_id: str) -> int:
    """Give the order's live reservation back to stock; a second call does nothing.

    Returns the number of SKUs put back."""
    with conn.transaction():
        return len(conn.execute(QUERIES["release_reservation"], {"order_id": order_id}).fetchall())


def consume_reservation(conn: psycopg.Connection[Any], order_id: str) -> bool:
    """Payment captured: the reserved stock is sold.  False if it was not live."""
    with conn.transaction():
        return (
            conn.execute(QUERIES["consume_reservation"], {"order_id": order_id}).fetchone()
            is not None
        )


def restock_order(conn: psycopg.Connection[Any], order_id: str) -> int:
    """Return received: put the order's lines back on sale; a second call does nothing."""
    with conn.transaction():
        return len(conn.execute(QUERIES["restock_order"], {"order_id": order_id}).fetchall())
