"""Alembic builds exactly the declared schema, and can go down and up again."""

from __future__ import annotations

import re
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from orderflow.migrations.schema import metadata
from orderflow.sql import migrate
from orderflow.sql.db import connect, sqlalchemy_url
from orderflow.statemachine.definition import STEP_NAMES, OrderState


def _tables(url: str) -> set[str]:
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {r["tablename"] for r in rows} - {"alembic_version"}


def test_upgrade_downgrade_upgrade(empty_db_url: str) -> None:
    migrate.upgrade(empty_db_url)
    assert _tables(empty_db_url) == set(metadata.tables)
    migrate.downgrade(empty_db_url, "base")
    assert _tables(empty_db_url) == set()
    migrate.upgrade(empty_db_url)
    assert _tables(empty_db_url) == set(metadata.tables)
    with connect(empty_db_url) as conn:  # a new session picks up the database's settings
        assert conn.execute("SHOW jit").fetchone()["jit"] == "off"  # type: ignore[index]


def test_processes_starting_together_migrate_one_at_a_time(empty_db_url: str) -> None:
    """Several machines start at once, each running the migrations: none may fail."""
    import subprocess
    import sys

    code = "import sys; from orderflow.sql import migrate; migrate.upgrade(sys.argv[1])"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, empty_db_url], stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    failures = [p.communicate(timeout=120)[1] for p in procs if p.wait(timeout=120) != 0]
    assert failures == []
    assert _tables(empty_db_url) == set(metadata.tables)


def test_single_head() -> None:
    script = ScriptDirectory.from_config(migrate.alembic_config("postgresql://unused/x"))
    assert len(script.get_heads()) == 1


def test_alembic_head_equals_declared_schema(db_url: str) -> None:
    engine = create_engine(sqlalchemy_url(db_url))
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": True}
            )
            diff = compare_metadata(context, metadata)
            # autogenerate does not compare CHECK constraints; compare them here.
            inspector = inspect(connection)
            for table in metadata.tables.values():
                declared = {
                    c.name: _norm(str(c.sqltext))
                    for c in table.constraints
                    if c.__class__.__name__ == "CheckConstraint"
                }
                actual = {
                    c["name"]: _norm(c["sqltext"])
                    for c in inspector.get_check_constraints(table.name)
                }
                assert set(declared) == set(actual), table.name
                for name, text in declared.items():
                    assert _same_check(text, actual[name]), (table.name, name, text, actual[name])
    finally:
        engine.dispose()
    assert diff == []


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _same_check(declared: str, actual: str) -> bool:
    """Postgres rewrites CHECK text (casts, ANY(ARRAY[...])); compare the quoted
    literals and the column names, which is what drifts in practice."""

    def literals(text: str) -> list[str]:
        return sorted(re.findall(r"'([^']*)'", text))

    def words(text: str) -> set[str]:
        stripped = re.sub(r"'[^']*'", "", text)
        return set(re.findall(r"[a-z_]+", stripped)) - {
            "text",
            "any",
            "array",
            "and",
            "or",
            "is",
            "not",
            "null",
            "in",
            "between",
            "char_length",
            "character",
            "varying",
        }

    return literals(declared) == literals(actual) and words(declared) <= words(actual) | {"between"}


def _check_values(conn, table: str, constraint: str) -> set[str]:  # type: ignore[no-untyped-def]
    row = conn.execute(
        "SELECT pg_get_constraintdef(c.oid) AS def FROM pg_constraint c"
        " JOIN pg_class t ON t.oid = c.conrelid WHERE t.relname = %s AND c.conname = %s",
        (table, constraint),
    ).fetchone()
    assert row is not None, constraint
    return set(re.findall(r"'([^']+)'::text", row["def"]))


@pytest.mark.parametrize(
    ("table", "constraint"),
    [
        ("orders", "ck_orders_state_known"),
        ("order_history", "ck_order_history_to_state_known"),
        ("order_history", "ck_order_history_from_state_known"),
    ],
)
def test_database_states_equal_python_enum(db_url: str, table: str, constraint: str) -> None:
    with connect(db_url) as conn:
        assert _check_values(conn, table, constraint) == {s.value for s in OrderState}


def test_database_steps_equal_python_table(db_url: str) -> None:
    with connect(db_url) as conn:
        assert _check_values(conn, "outbox", "ck_outbox_step_known") == set(STEP_NAMES)


def test_state_check_rejects_unknown_state(db_url: str) -> None:
    import psycopg

    from tests.support.helpers import place

    with connect(db_url) as conn:
        order = place(conn)
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE orders SET state = 'teleported' WHERE id = %s", (order.id,))


def test_the_stock_ledger_revision_keeps_what_was_loaded(empty_db_url: str, tmp_path: Any) -> None:
    """Upgrading a database the old catalog load wrote (a reload logged its full
    count again; SQL writes logged nothing): each SKU's last loaded count is found,
    the ledger adds up again, and reloading the same file sells nothing twice."""
    from orderflow.services.catalog import load_catalog
    from orderflow.services.doctor import run_checks

    migrate.upgrade(empty_db_url, "0011")
    with connect(empty_db_url) as conn:
        conn.execute(
            "INSERT INTO products (sku, name, price_cents, currency, available)"
            " VALUES ('OLD-A', 'a', 100, 'EUR', 40), ('OLD-B', 'b', 100, 'EUR', 7)"
        )
        conn.execute(  # OLD-A loaded, then reloaded by the old statement: +40 twice
            "INSERT INTO stock_ledger (sku, kind, delta) VALUES ('OLD-A', 'load', 40),"
            " ('OLD-A', 'load', 40)"
        )
    migrate.upgrade(empty_db_url)
    with connect(empty_db_url) as conn:
        rows = conn.execute("SELECT sku, loaded_available FROM products ORDER BY sku").fetchall()
        assert [(r["sku"], r["loaded_available"]) for r in rows] == [("OLD-A", 40), ("OLD-B", None)]
        stock = next(c for c in run_checks(conn) if "stock" in c.name)
        assert stock.ok, stock
        path = tmp_path / "catalog.csv"
        path.write_text(
            "sku,name,price_cents,currency,available\nOLD-A,a,100,EUR,40\nOLD-B,b,100,EUR,7\n"
        )
        load_catalog(conn, path)
        available = conn.execute("SELECT sku, available FROM products ORDER BY sku").fetchall()
        assert [r["available"] for r in available] == [40, 7]
