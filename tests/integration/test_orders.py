"""create_order: one statement reserves every line or none; stock is conserved."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import psycopg
import pytest

from orderflow import failpoints
from orderflow.services.orders import (
    MixedCurrency,
    OutOfStock,
    UnknownSku,
    consume_reservation,
    release_inventory,
    restock_order,
)
from orderflow.sql.db import connect
from tests.support.helpers import place, snapshot


def _available(conn: psycopg.Connection[Any], sku: str) -> int:
    row = conn.execute("SELECT available FROM products WHERE sku = %s", (sku,)).fetchone()
    assert row is not None
    return int(row["available"])


def _counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    tables = ["orders", "order_lines", "reservations", "order_history", "outbox", "stock_ledger"]
    return {
        t: conn.execute(f"SELECT count(*) AS n FROM {t}").fetchone()["n"]  # type: ignore[index]
        for t in tables
    }


def _ledger_matches_stock(conn: psycopg.Connection[Any]) -> None:
    rows = conn.execute(
        "SELECT p.sku, p.available, COALESCE(sum(l.delta), 0) AS ledger"
        " FROM products p LEFT JOIN stock_ledger l USING (sku) GROUP BY p.sku, p.available"
    ).fetchall()
    for r in rows:
        assert r["available"] == r["ledger"], r


def test_order_is_created_reserved_with_its_first_outbox_row(conn: psycopg.Connection[Any]) -> None:
    before = _available(conn, "MUG-01"), _available(conn, "TEE-M")
    order = place(conn, [("MUG-01", 2), ("TEE-M", 1)])
    assert order.state == "reserved"
    assert order.total_cents == 2 * 1200 + 2500
    assert order.currency == "EUR"
    assert order.reservation_expires_at > order.created_at
    assert (_available(conn, "MUG-01"), _available(conn, "TEE-M")) == (before[0] - 2, before[1] - 1)
    snap = snapshot(conn, order.id)
    assert [(h["from_state"], h["to_state"], h["event"]) for h in snap["history"]] == [
        (None, "reserved", "place")
    ]
    assert [(r["step"], r["status"]) for r in snap["outbox"]] == [("charge_payment", "pending")]
    _ledger_matches_stock(conn)


def test_short_line_reserves_nothing(conn: psycopg.Connection[Any]) -> None:
    before = {sku: _available(conn, sku) for sku in ("MUG-01", "LAMP-01")}
    counts = _counts(conn)
    with pytest.raises(OutOfStock) as info:
        place(conn, [("MUG-01", 1), ("LAMP-01", 6)])  # 5 lamps in stock
    assert info.value.skus == ["LAMP-01"]
    assert {sku: _available(conn, sku) for sku in before} == before
    assert _counts(conn) == counts


def test_unknown_sku_and_mixed_currency_write_nothing(conn: psycopg.Connection[Any]) -> None:
    counts = _counts(conn)
    with pytest.raises(UnknownSku):
        place(conn, [("MUG-01", 1), ("NOPE", 1)])
    conn.execute(
        "INSERT INTO products (sku, name, price_cents, currency, available)"
        " VALUES ('USD-1', 'dollar item', 100, 'USD', 10)"
    )
    counts = _counts(conn)
    with pytest.raises(MixedCurrency):
        place(conn, [("MUG-01", 1), ("USD-1", 1)])
    assert _counts(conn) == counts
    assert _available(conn, "USD-1") == 10


def test_failure_after_insert_rolls_back_reservation_too(conn: psycopg.Connection[Any]) -> None:
    counts, stock = _counts(conn), _available(conn, "MUG-01")
    with failpoints.armed("create_order.after_write"), pytest.raises(failpoints.FailpointHit):
        place(conn, [("MUG-01", 3)])
    assert _counts(conn) == counts
    assert _available(conn, "MUG-01") == stock


def test_one_order_per_user_and_key(conn: psycopg.Connection[Any]) -> None:
    user = uuid.uuid4()
    place(conn, user_id=user, key="k-1")
    stock = _available(conn, "MUG-01")
    with pytest.raises(psycopg.errors.UniqueViolation):
        place(conn, user_id=user, key="k-1")
    assert _available(conn, "MUG-01") == stock  # the reservation went with the rollback
    place(conn, user_id=uuid.uuid4(), key="k-1")  # another user's key is theirs


def test_concurrent_orders_for_the_last_units(db_url: str, conn: psycopg.Connection[Any]) -> None:
    """K buyers race for M units: exactly M succeed, stock never goes below zero."""
    conn.execute("UPDATE products SET available = 0 WHERE sku = 'PEN-05'")  # trigger: adjust -8
    units, buyers = 3, 12
    conn.execute("UPDATE products SET available = %s WHERE sku = 'PEN-05'", (units,))
    barrier = threading.Barrier(buyers)
    results: list[str] = []

    def buy() -> None:
        with connect(db_url) as c:
            barrier.wait()
            try:
                # lines in both orders of SKUs, to provoke lock-order deadlocks
                lines = [("PEN-05", 1), ("MUG-01", 1)]
                place(c, lines if len(results) % 2 else lines[::-1])
                results.append("ok")
            except OutOfStock:
                results.append("out")

    threads = [threading.Thread(target=buy) for _ in range(buyers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["ok"] * units + ["out"] * (buyers - units)
    assert _available(conn, "PEN-05") == 0
    _ledger_matches_stock(conn)


def test_release_consume_and_restock_happen_once(conn: psycopg.Connection[Any]) -> None:
    stock = _available(conn, "TEE-L")
    first = place(conn, [("TEE-L", 2)])
    assert release_inventory(conn, first.id) == 1
    assert release_inventory(conn, first.id) == 0
    assert _available(conn, "TEE-L") == stock

    second = place(conn, [("TEE-L", 2)])
    assert consume_reservation(conn, second.id) is True
    assert consume_reservation(conn, second.id) is False
    assert _available(conn, "TEE-L") == stock - 2
    assert restock_order(conn, second.id) == 1
    assert restock_order(conn, second.id) == 0
    assert _available(conn, "TEE-L") == stock
    _ledger_matches_stock(conn)
