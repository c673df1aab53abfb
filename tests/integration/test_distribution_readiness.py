"""The schema facts docs/operations.md's Citus plan relies on, checked against the live schema.

The per-order tables must stay co-locatable by order_id.  The few constraints that
a distribution would have to change are listed in the guide; this test pins that
list, so a new constraint that breaks co-location fails here, not in a migration
to Citus years later.
"""

from __future__ import annotations

from typing import Any

from tests.support.paths import PROJECT_ROOT

PER_ORDER_TABLES = (
    "order_lines",
    "order_history",
    "outbox",
    "payments",
    "payment_intents",
    "shipments",
    "reservations",
)
# Unique constraints on orders and per-order tables without order_id (orders: id) in their
# key, which a distribution by order_id must change; each is named in the guide.
MUST_CHANGE_UNIQUES = {
    "pk_order_history",
    "pk_outbox",
    "pk_payments",
    "pk_shipments",
    "uq_outbox_idempotency_key",
    "uq_payment_intents_id",
}
# Foreign keys that cross co-location groups and must go.
MUST_CHANGE_FKS = {
    "fk_orders_cart_id_carts",
    "fk_order_lines_sku_products",
    "fk_cart_lines_sku_products",
    "fk_stock_ledger_order_id_orders",
    "fk_idempotency_keys_order_id_orders",
    "fk_stripe_events_order_id_orders",
}


def unique_keys(conn: Any) -> list[dict[str, Any]]:
    """Every unique index (constraint-backed or not) of the saga's tables, with its columns."""
    return conn.execute(
        """
        SELECT t.relname AS table_name, i.relname AS index_name,
               array_agg(a.attname::text ORDER BY k.n) AS columns
          FROM pg_index x
          JOIN pg_class t ON t.oid = x.indrelid
          JOIN pg_class i ON i.oid = x.indexrelid
          JOIN pg_namespace ns ON ns.oid = t.relnamespace AND ns.nspname = 'public'
          CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, n)
          JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
         WHERE x.indisunique AND t.relname = ANY(%s)
         GROUP BY 1, 2
        """,
        (["orders", *PER_ORDER_TABLES],),
    ).fetchall()


def test_every_per_order_table_has_order_id_referencing_orders(conn: Any) -> None:
    for table in PER_ORDER_TABLES:
        column = conn.execute(
            """SELECT data_type, is_nullable FROM information_schema.columns
                WHERE table_schema = 'public' AND table_name = %s AND column_name = 'order_id'""",
            (table,),
        ).fetchone()
        assert column == {"data_type": "text", "is_nullable": "NO"}, table
        fk = conn.execute(
            """SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint
                WHERE conrelid = %s::regclass AND contype = 'f'
                  AND confrelid = 'orders'::regclass""",
            (table,),
        ).fetchall()
        assert [r["def"].split(" ON ")[0] for r in fk] == [
            "FOREIGN KEY (order_id) REFERENCES orders(id)"
        ], table


def test_only_the_listed_unique_keys_lack_the_distribution_column(conn: Any) -> None:
    lacking = {
        r["index_name"]
        for r in unique_keys(conn)
        if ("id" if r["table_name"] == "orders" else "order_id") not in r["columns"]
    }
    # orders' own uniques on (user_id, …) and cart_id are the anchor table's: listed apart
    lacking -= {"uq_orders_user_id_idempotency_key", "uq_orders_cart_id"}
    assert lacking == MUST_CHANGE_UNIQUES


def test_only_the_listed_foreign_keys_cross_colocation_groups(conn: Any) -> None:
    rows = conn.execute(
        """SELECT conname, conrelid::regclass::text AS src, confrelid::regclass::text AS dst,
                  pg_get_constraintdef(oid) AS def
             FROM pg_constraint
            WHERE contype = 'f' AND connamespace = 'public'::regnamespace"""
    ).fetchall()
    group = {t: "order" for t in ("orders", *PER_ORDER_TABLES)}
    group |= {"products": "sku", "stock_ledger": "sku", "carts": "cart", "cart_lines": "cart"}
    group |= {"idempotency_keys": "user", "stripe_events": "event"}
    crossing = {r["conname"] for r in rows if group[r["src"]] != group[r["dst"]]}
    assert crossing == MUST_CHANGE_FKS


def test_the_operations_guide_names_every_constraint_to_change() -> None:
    guide = (PROJECT_ROOT / "docs" / "operations.md").read_text()
    for name in MUST_CHANGE_UNIQUES | MUST_CHANGE_FKS:
        assert f"`{name}`" in guide, name
