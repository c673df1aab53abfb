"""stock ledger by the database: every change of products.available, whoever writes it

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01

Triggers on products write the stock ledger: one row per change of
`available`, with its true delta (an insert's once it is really inserted, so an
`INSERT … ON CONFLICT` counts only what it did).  The writer names the change in the
transient column `ledger_note` (`kind` or `kind:order_id`, reset by the
trigger, so it is always NULL at rest); a writer that names nothing (an
operator's UPDATE, a warehouse sync) is an `adjust`.  The ledger itself is
append-only: rows come from that trigger only (and go only with their order).
`loaded_available` keeps the stock each SKU was last loaded with from a
catalog file, so a reload applies the file's change, not its absolute value.

Processes of the previous release write the ledger themselves, which this
revision refuses: stop every API and worker before upgrading across it.
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
    note text := NEW.ledger_note;
    stash text := 'orderflow.ledger_note_' || md5(NEW.sku);
BEGIN
    NEW.ledger_note := NULL;  -- transient: it names this change only
    IF TG_OP = 'INSERT' THEN
        -- The row may yet meet ON CONFLICT (DO NOTHING, or DO UPDATE, which fires
        -- the UPDATE case): its ledger row is written once it is inserted, by
        -- orderflow_stock_ledger_inserted, which this hands the note to.
        IF note IS NOT NULL OR current_setting(stash, true) IS NOT NULL THEN
            PERFORM set_config(stash, COALESCE(note, ''), true);
        END IF;
    ELSIF NEW.available <> OLD.available THEN
        INSERT INTO stock_ledger (sku, order_id, kind, delta)
        VALUES (NEW.sku,
                NULLIF(split_part(COALESCE(note, ''), ':', 2), ''),
                COALESCE(NULLIF(split_part(COALESCE(note, ''), ':', 1), ''), 'adjust'),
                NEW.available - OLD.available);
    END IF;
    RETURN NEW;
END $$;

CREATE FUNCTION orderflow_stock_ledger_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    note text := current_setting('orderflow.ledger_note_' || md5(NEW.sku), true);
BEGIN
    IF NEW.available <> 0 THEN
        INSERT INTO stock_ledger (sku, order_id, kind, delta)
        VALUES (NEW.sku,
                NULLIF(split_part(COALESCE(note, ''), ':', 2), ''),
                COALESCE(NULLIF(split_part(COALESCE(note, ''), ':', 1), ''), 'adjust'),
                NEW.available);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER products_stock_ledger
    BEFORE INSERT OR UPDATE ON products
    FOR EACH ROW EXECUTE FUNCTION orderflow_stock_ledger();

CREATE TRIGGER products_stock_ledger_inserted
    AFTER INSERT ON products
    FOR EACH ROW EXECUTE FUNCTION orderflow_stock_ledger_inserted();
"""

APPEND_ONLY = """
CREATE FUNCTION orderflow_stock_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Depth 1 is a statement on the ledger itself; its rows come only from the
    -- products triggers, and leave only with their order (ON DELETE CASCADE).
    IF TG_OP = 'TRUNCATE' OR pg_trigger_depth() < 2 THEN
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

CREATE TRIGGER stock_ledger_no_truncate
    BEFORE TRUNCATE ON stock_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION orderflow_stock_ledger_append_only();
"""

# The last value each SKU was loaded with.  Loads before this revision set the
# stock absolutely, so that value is the stock just after the SKU's last load
# row: today's stock less every change recorded since (those rows came from the
# saga's own statements and are right; the load rows themselves may not be).
SEED_LOADED = """
UPDATE products p SET loaded_available = p.available - COALESCE(since.delta, 0)
  FROM (SELECT sku, max(id) AS last_load FROM stock_ledger WHERE kind = 'load' GROUP BY sku) l
  LEFT JOIN LATERAL (SELECT sum(delta)::int AS delta FROM stock_ledger s
                      WHERE s.sku = l.sku AND s.id > l.last_load) since ON true
 WHERE p.sku = l.sku AND p.available - COALESCE(since.delta, 0) >= 0
"""

# Before this revision a catalog reload wrote its full count as a delta, and
# stock written by plain SQL wrote nothing: one `adjust` row per SKU makes the
# ledger add up to the stock as it is at the upgrade, so the doctor's check means
# something from here on.
REPAIR_LEDGER = """
INSERT INTO stock_ledger (sku, kind, delta)
SELECT p.sku, 'adjust', p.available - COALESCE(l.balance, 0)
  FROM products p
  LEFT JOIN (SELECT sku, sum(delta)::int AS balance FROM stock_ledger GROUP BY sku) l USING (sku)
 WHERE p.available <> COALESCE(l.balance, 0)
"""


def upgrade() -> None:
    op.add_column("products", sa.Column("ledger_note", sa.Text(), nullable=True))
    op.add_column("products", sa.Column("loaded_available", sa.Integer(), nullable=True))
    op.create_check_constraint(op.f("ck_products_ledger_note_transient"), "products",
                               "ledger_note IS NULL")  # fmt: skip
    op.execute(SEED_LOADED)
    op.execute(REPAIR_LEDGER)
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
    op.execute("DROP TRIGGER stock_ledger_no_truncate ON stock_ledger")
    op.execute("DROP TRIGGER stock_ledger_append_only ON stock_ledger")
    op.execute("DROP FUNCTION orderflow_stock_ledger_append_only()")
    op.execute("DROP TRIGGER products_stock_ledger_inserted ON products")
    op.execute("DROP TRIGGER products_stock_ledger ON products")
    op.execute("DROP FUNCTION orderflow_stock_ledger_inserted()")
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
