"""Stock is the database's truth, whoever writes it: catalog reloads, plain SQL,
concurrent buyers; the ledger written by the products trigger, append-only."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orderflow.services.catalog import CatalogError, load_catalog, plan_product, render_changes
from orderflow.services.doctor import report, run_checks
from orderflow.services.orders import LineRequest, OutOfStock, release_inventory
from orderflow.services.service import create_order
from orderflow.sql.db import connect
from orderflow.statemachine.engine import advance
from tests.support.helpers import ADDRESS, place


def _catalog(tmp_path: Path, *rows: tuple[str, str, int, int]) -> Path:
    path = tmp_path / f"catalog-{uuid.uuid4().hex[:6]}.csv"
    lines = ["sku,name,price_cents,currency,available"]
    lines += [f"{sku},{name},{price},EUR,{available}" for sku, name, price, available in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _product(conn: Any, sku: str) -> dict[str, Any]:
    row = conn.execute(
        "SELECT available, price_cents, loaded_available FROM products WHERE sku = %s", (sku,)
    ).fetchone()
    assert row is not None
    return dict(row)


def _ledger(conn: Any, sku: str) -> list[tuple[str, int]]:
    rows = conn.execute(
        "SELECT kind, delta FROM stock_ledger WHERE sku = %s ORDER BY id", (sku,)
    ).fetchall()
    return [(r["kind"], r["delta"]) for r in rows]


def _doctor_clean(conn: Any) -> None:
    checks = run_checks(conn)
    assert all(c.ok for c in checks), report(checks)


# ---------------------------------------------------------------- the plan (no database)


def test_plan_applies_the_files_change_not_its_value() -> None:
    row = {"sku": "X", "name": "x", "price_cents": 100, "currency": "EUR", "available": 10}
    current = {**row, "available": 7, "loaded_available": 10, "put_in": 10}  # 3 sold since
    unchanged = plan_product(current, row)
    assert unchanged.changes == () and unchanged.values["available"] == 7
    fewer = plan_product(current, {**row, "available": 8})  # the warehouse counts 2 less
    assert fewer.values["available"] == 5 and fewer.short_by == 0
    gone = plan_product(current, {**row, "available": 1})  # 9 less, only 7 available
    assert gone.values["available"] == 0 and gone.short_by == 2
    # never loaded from a file: the file's count against the stock put in (10)
    never = plan_product({**current, "loaded_available": None}, {**row, "available": 12})
    assert never.values["available"] == 9 and never.values["loaded_available"] == 12
    same = plan_product({**current, "loaded_available": None}, row)
    assert same.values["available"] == 7 and same.changes  # the count loaded is kept
    new = plan_product(None, row)
    assert new.is_new and new.values["loaded_available"] == 10


# ---------------------------------------------------------------- reloads


def test_load_sell_reload_the_same_file_changes_nothing(conn: Any, tmp_path: Path) -> None:
    path = _catalog(tmp_path, ("CAT-1", "Cat one", 500, 10))
    load_catalog(conn, path)
    for _ in range(3):
        place(conn, [("CAT-1", 1)])
    assert _product(conn, "CAT-1")["available"] == 7
    again = load_catalog(conn, path)
    assert again.changes == []
    assert _product(conn, "CAT-1")["available"] == 7  # the 3 held units stay held
    assert _ledger(conn, "CAT-1") == [("load", 10), ("reserve", -1), ("reserve", -1),
                                      ("reserve", -1)]  # fmt: skip
    _doctor_clean(conn)


def test_a_price_only_reload_writes_no_stock(conn: Any, tmp_path: Path) -> None:
    load_catalog(conn, _catalog(tmp_path, ("CAT-2", "Cat two", 500, 40)))
    place(conn, [("CAT-2", 2)])
    changed = load_catalog(conn, _catalog(tmp_path, ("CAT-2", "Cat two", 450, 40)))
    assert [(c.field, c.old, c.new) for c in changed.changes] == [("price_cents", "500", "450")]
    assert _product(conn, "CAT-2") == {"available": 38, "price_cents": 450, "loaded_available": 40}
    assert _ledger(conn, "CAT-2") == [("load", 40), ("reserve", -2)]
    _doctor_clean(conn)


def test_a_warehouse_count_going_down_takes_units_away(conn: Any, tmp_path: Path) -> None:
    load_catalog(conn, _catalog(tmp_path, ("CAT-3", "Cat three", 500, 10)))
    place(conn, [("CAT-3", 6)])
    load = load_catalog(conn, _catalog(tmp_path, ("CAT-3", "Cat three", 500, 8)))
    assert _product(conn, "CAT-3")["available"] == 2  # 4 left, 2 taken away
    short = load_catalog(conn, _catalog(tmp_path, ("CAT-3", "Cat three", 500, 3)))
    assert _product(conn, "CAT-3")["available"] == 0
    assert short.plans[0].short_by == 3
    assert "takes away 3 more units" in render_changes(short)
    assert [c.field for c in load.changes] == ["available"]
    _doctor_clean(conn)


def test_dry_run_writes_nothing(conn: Any, tmp_path: Path) -> None:
    load_catalog(conn, _catalog(tmp_path, ("CAT-4", "Cat four", 500, 10)))
    before = (_product(conn, "CAT-4"), _ledger(conn, "CAT-4"))
    dry = load_catalog(conn, _catalog(tmp_path, ("CAT-4", "Renamed", 900, 20),
                                      ("CAT-5", "New", 100, 3)), dry_run=True)  # fmt: skip
    assert not dry.applied and len(dry.changes) == 3 + 4
    assert (_product(conn, "CAT-4"), _ledger(conn, "CAT-4")) == before
    assert (
        conn.execute("SELECT count(*) AS n FROM products WHERE sku = 'CAT-5'").fetchone()["n"] == 0
    )


def test_a_reload_racing_buyers_never_sells_a_unit_twice(
    db_url: str, conn: Any, tmp_path: Path
) -> None:
    """K buyers race reloads of the file (its stock unchanged): exactly the physical
    units sell."""
    units, buyers = 5, 12
    path = _catalog(tmp_path, ("CAT-6", "Cat six", 500, units))
    load_catalog(conn, path)
    barrier = threading.Barrier(buyers + 1)
    sold: list[str] = []

    def buy() -> None:
        with connect(db_url) as c:
            barrier.wait()
            try:
                create_order(c, user_id=uuid.uuid4(), lines=[LineRequest("CAT-6", 1)],
                             shipping_address=ADDRESS, email=None, payment_method_id="pm_card_visa",
                             idempotency_key=str(uuid.uuid4()), ttl_seconds=900)  # fmt: skip
                sold.append("ok")
            except OutOfStock:
                pass

    # The price changes on every reload, so each one rewrites the row (stock included).
    repriced = [_catalog(tmp_path, ("CAT-6", "Cat six", p, units)) for p in (510, 500)]

    def reload() -> None:
        with connect(db_url) as c:
            barrier.wait()
            for n in range(10):
                load_catalog(c, repriced[n % 2])

    threads = [threading.Thread(target=buy) for _ in range(buyers)]
    threads.append(threading.Thread(target=reload))
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(sold) == units  # never more than the warehouse holds
    assert _product(conn, "CAT-6")["available"] == 0
    _doctor_clean(conn)


# ---------------------------------------------------------------- any writer


def test_plain_sql_is_in_the_ledger_and_the_stock_still_adds_up(db_url: str, conn: Any) -> None:
    conn.execute("UPDATE products SET available = available + 5 WHERE sku = 'PEN-05'")
    assert _ledger(conn, "PEN-05")[-1] == ("adjust", 5)
    conn.execute(
        "INSERT INTO products (sku, name, price_cents, currency, available)"
        " VALUES ('SQL-1', 'made by hand', 300, 'EUR', 9)"
    )
    assert _ledger(conn, "SQL-1") == [("adjust", 9)]
    _doctor_clean(conn)
    # 20 concurrent orders on both, half of them then cancelled
    errors: list[BaseException] = []
    placed: list[str] = []

    def buy(i: int) -> None:
        try:
            with connect(db_url) as c:
                order = place(c, [("PEN-05", 1), ("SQL-1", 1)] if i % 2 else [("SQL-1", 1)])
                placed.append(order.id)
        except OutOfStock:
            pass
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=buy, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(placed) == 9  # SQL-1 had 9 units
    for order_id in placed[::2]:  # cancelled: what the worker's release_inventory does
        advance(conn, order_id, "payment_failed", {})
        release_inventory(conn, order_id)
        advance(conn, order_id, "compensation_done", {"step": "release_inventory"})
    assert _product(conn, "SQL-1")["available"] == 5
    _doctor_clean(conn)


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO stock_ledger (sku, kind, delta) VALUES ('MUG-01', 'adjust', 5)",
        "UPDATE stock_ledger SET delta = delta + 1",
        "DELETE FROM stock_ledger",
        "TRUNCATE stock_ledger CASCADE",
    ],
)
def test_the_ledger_is_written_by_the_database_only(conn: Any, statement: str) -> None:
    place(conn)  # a reservation row to tamper with
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)
    _doctor_clean(conn)


@pytest.mark.parametrize(
    ("conflict", "ledger", "available"),
    [
        ("DO NOTHING", [("adjust", 10)], 10),
        ("DO UPDATE SET available = excluded.available", [("adjust", 10), ("adjust", 2)], 12),
    ],
)
def test_an_upsert_is_in_the_ledger_with_what_it_did(
    conn: Any, conflict: str, ledger: list[tuple[str, int]], available: int
) -> None:
    """A warehouse sync's INSERT … ON CONFLICT: only the row really written counts
    (Postgres fires an insert's BEFORE trigger even when the row then conflicts)."""
    insert = "INSERT INTO products (sku, name, price_cents, currency, available)"
    conn.execute(f"{insert} VALUES ('UPS-1', 'u', 100, 'EUR', 10)")
    conn.execute(f"{insert} VALUES ('UPS-1', 'u', 100, 'EUR', 12) ON CONFLICT (sku) {conflict}")
    assert _ledger(conn, "UPS-1") == ledger
    assert _product(conn, "UPS-1")["available"] == available
    _doctor_clean(conn)


def test_a_sku_made_by_sql_is_not_sold_twice_by_reloads(conn: Any, tmp_path: Path) -> None:
    """Never loaded from a file, the SKU compares the file with the stock put in:
    units sold in between stay sold, on the first load and every one after."""
    conn.execute(
        "INSERT INTO products (sku, name, price_cents, currency, available)"
        " VALUES ('SQL-2', 'by hand', 100, 'EUR', 10)"
    )
    path = _catalog(tmp_path, ("SQL-2", "by hand", 100, 10))
    for _ in range(3):
        place(conn, [("SQL-2", 2)])
        load_catalog(conn, path)
    assert _product(conn, "SQL-2")["available"] == 4  # 10 put in, 6 reserved
    assert _product(conn, "SQL-2")["loaded_available"] == 10
    _doctor_clean(conn)


def test_a_sku_twice_in_one_file_is_refused(conn: Any, tmp_path: Path) -> None:
    path = _catalog(tmp_path, ("DUP-1", "a", 100, 1), ("DUP-1", "b", 100, 2))
    with pytest.raises(CatalogError, match="twice"):
        load_catalog(conn, path)
    assert (
        conn.execute("SELECT count(*) AS n FROM products WHERE sku = 'DUP-1'").fetchone()["n"] == 0
    )


def test_loads_racing_to_create_a_sku_both_succeed(db_url: str, conn: Any, tmp_path: Path) -> None:
    path = _catalog(tmp_path, *[(f"NEW-{i}", "new", 100, 5) for i in range(30)])
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def load() -> None:
        try:
            with connect(db_url) as c:
                barrier.wait()
                load_catalog(c, path)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert [_product(conn, f"NEW-{i}")["available"] for i in range(30)] == [5] * 30
    _doctor_clean(conn)
