"""stock ledger by the database: every change of products.available, whoever writes it

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01

A trigger on products writes the stock ledger: one row per change of
`available`, with its true delta.  The writer names the change in the
transient column `ledger_note` (`kind` or `kind:order_id`, reset by the
trigger, so it is always NULL at rest); a writer that names nothing (an
operator's UPDATE, a warehouse sync) is an `adjust`.  The ledger itself is
append-only: rows come from that trigger only (and go only with their order).
`loaded_available` keeps the stock each SKU was last loaded with from a
catalog file, so a reload applies the file's change, not its absolute value.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LEDGER_TRIGGER = """
CREATE FUNCTION orderflow_stock_ledger() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta integer := NEW.available
                     - CASE WHEN TG_OP = 'INSERT' THEN 0 ELSE OLD.available END;
    note text := NEW.ledger_note;
BEGIN
    NEW.ledger_note := NULL;  -- transient: it names this change only
    IF delta <> 0 THEN
        INSERT INTO stock_ledger (sku, order_id, kind, delta)
        VALUES (NEW.sku,
                NULLIF(split_part(COALESCE(note, ''), ':', 2), ''),
                COALESCE(NULLIF(split_part(COALESCE(note, ''), ':', 1), ''), 'adjust'),
                delta);
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER products_stock_ledger
    BEFORE INSERT OR UPDATE ON products
    FOR EACH ROW EXECUTE FUNCTION orderflow_stock_ledger();
"""

APPEND_ONLY = """
CREATE FUNCTION orderflow_stock_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Depth 1 is a statement on the ledger itself; its rows come only from the
    -- products trigger, and leave only with their order (ON DELETE CASCADE).
    IF pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'stock_ledger is written by the products trigger only: change products.available instead'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF TG_OP = 'UPDATE' THEN
        RAISE EXCEPTION 'stock_ledger rows are never changed' USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$;

CREATE TRIGGER stock_ledger_append_only
    BEFORE INSERT OR UPDATE OR DELETE ON stock_ledger
    FOR EACH ROW EXECUTE FUNCTION orderflow_stock_ledger_append_only();
"""


def upgrade() -> None:
    op.add_column("products", sa.Column("ledger_note", sa.Text(), nullable=True))
    op.add_column("products", sa.Column("loaded_available", sa.Integer(), nullable=True))
    op.create_check_constraint(op.f("ck_products_ledger_note_transient"), "products",
                               "ledger_note IS NULL")  # fmt: skip
    # What each SKU was last loaded with: the sum of its load rows so far.
    op.execute(
        "UPDATE products p SET loaded_available = l.loaded"
        "  FROM (SELECT sku, sum(delta)::int AS loaded FROM stock_ledger"
        "         WHERE kind = 'load' GROUP BY sku) l"
        " WHERE l.sku = p.sku AND l.loaded >= 0"
    )
    # The trigger writes a reservation's ledger row before its order's row exists
    # (same transaction): the ledger's foreign keys are checked at commit.
    for name, column, target in (
        ("fk_stock_ledger_sku_products", "sku", "products(sku)"),
        ("fk_stock_ledger_order_id_orders", "order_id", "orders(id) ON DELETE CASCADE"),
    ):
        op.execute(f"ALTER TABLE stock_ledger DROP CONSTRAINT {name}")
        op.execute(
            f"ALTER TABLE stock_ledger ADD CONSTRAINT {name} FOREIGN KEY ({column})"
            f" REFERENCES {target} DEFERRABLE INITIALLY DEFERRED"
        )
    op.execute(LEDGER_TRIGGER)
    op.execute(APPEND_ONLY)


def downgrade() -> None:
    op.execute("DROP TRIGGER stock_ledger_append_only ON stock_ledger")
    op.execute("DROP FUNCTION orderflow_stock_ledger_append_only()")
    op.execute("DROP TRIGGER products_stock_ledger ON products")
    op.execute("DROP FUNCTION orderflow_stock_ledger()")
    for name, column, target in (
        ("fk_stock_ledger_sku_products", "sku", "products(sku)"),
        ("fk_stock_ledger_order_id_orders", "order_id", "orders(id) ON DELETE CASCADE"),
    ):
        op.execute(f"ALTER TABLE stock_ledger DROP CONSTRAINT {name}")
        op.execute(
            f"ALTER TABLE stock_ledger ADD CONSTRAINT {name} FOREIGN KEY ({column})"
            f" REFERENCES {target}"
        )
    op.drop_constraint(op.f("ck_products_ledger_note_transient"), "products", type_="check")
    op.drop_column("products", "loaded_available")
    op.drop_column("products", "ledger_note")
