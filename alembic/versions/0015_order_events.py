"""order events: one CloudEvent per history row, written by a trigger; the relay's backlog

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02

Every `order_history` row (the creation included) writes, in the same statement
and so the same transaction, one row of `order_events`: a CloudEvents 1.0 event
whatever wrote the history (the engine, a migration, an operator's psql).  The
relay publishes the rows to the broker and marks them; without a broker
`GET /v1/events` serves them.  `order_events_purged` remembers how far the
retention purge went (a feed cursor before it answers 410).  Events start at
this revision: history written before it is not replayed as events.
"""

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VIEWS_DIR = Path(str(resources.files("orderflow.sql") / "reporting"))
VIEWS = ("13_event_backlog.sql",)

# A ULID (Crockford base32 of 48 bits of milliseconds and 80 random bits): the
# CloudEvents id.  Ordered by time only coarsely, which is why the relay orders
# an order's events by their sequence, never by id.
ULID_FUNCTION = """
CREATE FUNCTION orderflow_ulid(at timestamptz) RETURNS text LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    alphabet CONSTANT text := '0123456789ABCDEFGHJKMNPQRSTVWXYZ';
    random_part bytea := substring(uuid_send(gen_random_uuid()) FROM 1 FOR 6)
                         || substring(uuid_send(gen_random_uuid()) FROM 11 FOR 4);
    bits bit(130);
    ulid text := '';
BEGIN
    bits := B'00' || (floor(extract(epoch FROM at) * 1000)::bigint)::bit(48)
            || ('x' || encode(random_part, 'hex'))::bit(80);
    FOR i IN 0..25 LOOP
        ulid := ulid || substr(alphabet, substring(bits FROM i * 5 + 1 FOR 5)::int + 1, 1);
    END LOOP;
    RETURN ulid;
END $$;
"""

# One statement-level trigger: a batch of transitions writes its events in one
# INSERT (after locking their orders, so two writers number in turn).  `sequence`
# is the history row's rank in its order's history, so it survives the purge of
# old events; no address, e-mail or payment method.
EVENTS_TRIGGER = """
CREATE FUNCTION orderflow_order_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Two writers of one order's history (an operator's psql beside the engine)
    -- take its sequence numbers in turn: the count below runs after the lock,
    -- so it sees the other's committed row.  The engine already holds these.
    PERFORM 1 FROM orders o WHERE o.id IN (SELECT order_id FROM added) ORDER BY o.id FOR UPDATE;
    INSERT INTO order_events (id, order_id, sequence, history_id, type, time, data, txid)
    SELECT orderflow_ulid(h.at), h.order_id, seq.n, h.id,
           'orderflow.order.' || CASE WHEN h.from_state IS NULL THEN 'created' ELSE h.to_state END,
           h.at,
           jsonb_build_object(
               'event', h.event,
               'sequence', seq.n,
               'order_id', o.id,
               'user_id', o.user_id,
               'state', h.to_state,
               'previous_state', h.from_state,
               'total_cents', o.total_cents,
               'currency', o.currency,
               'lines', COALESCE(
                   (SELECT jsonb_agg(jsonb_build_object(
                                'sku', l.sku, 'qty', l.qty,
                                'unit_price_cents', l.unit_price_cents) ORDER BY l.sku)
                      FROM order_lines l WHERE l.order_id = o.id),
                   '[]'::jsonb),
               'tracking_number', (SELECT s.tracking_number FROM shipments s
                                    WHERE s.order_id = o.id AND s.kind = 'outbound'
                                    ORDER BY s.id DESC LIMIT 1)),
           pg_current_xact_id()::text::bigint
      FROM added h
      JOIN orders o ON o.id = h.order_id
     CROSS JOIN LATERAL (SELECT count(*)::int AS n FROM order_history p
                          WHERE p.order_id = h.order_id AND p.id <= h.id) seq
     ORDER BY h.order_id, h.id;
    PERFORM pg_notify('orderflow_events', '');
    RETURN NULL;
END $$;

CREATE TRIGGER order_history_events
    AFTER INSERT ON order_history REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION orderflow_order_events();
"""

# Any writer could otherwise forge an event without its state change, or rewrite a
# published one: events are inserted only by the history trigger above (one
# trigger level down), and once written only `published_at` may change (the
# relay's mark, or an operator's reset to re-publish).  Deleting stays open: the
# retention purge.
EVENTS_GUARDS = """
CREATE FUNCTION orderflow_order_events_insert_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'order_events are written by the order_history trigger only'
            USING ERRCODE = 'restrict_violation',
                  HINT = 'insert the order_history row: its event follows in the same statement';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER order_events_insert_guard
    BEFORE INSERT ON order_events
    FOR EACH STATEMENT EXECUTE FUNCTION orderflow_order_events_insert_guard();

CREATE FUNCTION orderflow_order_events_update_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (OLD.id, OLD.order_id, OLD.sequence, OLD.history_id, OLD.type, OLD.time, OLD.data,
        OLD.txid)
       IS DISTINCT FROM
       (NEW.id, NEW.order_id, NEW.sequence, NEW.history_id, NEW.type, NEW.time, NEW.data,
        NEW.txid) THEN
        RAISE EXCEPTION 'an order event is immutable: only published_at may change'
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END $$;

-- Only an UPDATE naming one of these columns fires it: the relay's mark, which sets
-- published_at alone, costs nothing (a statement trigger on every UPDATE took a
-- third off the relay's rate).
CREATE TRIGGER order_events_update_guard
    BEFORE UPDATE OF id, order_id, sequence, history_id, type, time, data, txid
    ON order_events
    FOR EACH ROW EXECUTE FUNCTION orderflow_order_events_update_guard();
"""


def upgrade() -> None:
    op.create_table(
        "order_events",
        sa.Column("position", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("history_id", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("time", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("data", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("txid", sa.BigInteger(), nullable=False),
        sa.Column("published_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.CheckConstraint("sequence > 0", name=op.f("ck_order_events_sequence_positive")),
        sa.CheckConstraint(
            "type LIKE 'orderflow.order.%'", name=op.f("ck_order_events_type_namespaced")
        ),
        sa.PrimaryKeyConstraint("position", name=op.f("pk_order_events")),
        sa.UniqueConstraint("id", name=op.f("uq_order_events_id")),
        sa.UniqueConstraint("history_id", name=op.f("uq_order_events_history_id")),
        sa.UniqueConstraint("order_id", "sequence", name=op.f("uq_order_events_order_id_sequence")),
    )
    op.create_index(op.f("ix_order_events_txid_position"), "order_events", ["txid", "position"])
    op.create_index(op.f("ix_order_events_time"), "order_events", ["time"])
    op.create_index(
        "ix_order_events_unpublished",
        "order_events",
        ["position"],
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.create_table(
        "order_events_purged",
        sa.Column("singleton", sa.Integer(), server_default="1", nullable=False),
        sa.Column("txid", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column(
            "purged_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("singleton = 1", name=op.f("ck_order_events_purged_one_row")),
        sa.PrimaryKeyConstraint("singleton", name=op.f("pk_order_events_purged")),
    )
    op.execute(ULID_FUNCTION)
    op.execute(EVENTS_TRIGGER)
    op.execute(EVENTS_GUARDS)
    for name in VIEWS:
        op.execute((VIEWS_DIR / name).read_text(encoding="utf-8"))
    op.execute("GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO reporting_reader")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS reporting.event_backlog")
    op.execute("DROP TRIGGER order_events_update_guard ON order_events")
    op.execute("DROP TRIGGER order_events_insert_guard ON order_events")
    op.execute("DROP FUNCTION orderflow_order_events_update_guard()")
    op.execute("DROP FUNCTION orderflow_order_events_insert_guard()")
    op.execute("DROP TRIGGER order_history_events ON order_history")
    op.execute("DROP FUNCTION orderflow_order_events()")
    op.execute("DROP FUNCTION orderflow_ulid(timestamptz)")
    op.drop_table("order_events_purged")
    op.drop_index("ix_order_events_unpublished", table_name="order_events")
    op.drop_index(op.f("ix_order_events_time"), table_name="order_events")
    op.drop_index(op.f("ix_order_events_txid_position"), table_name="order_events")
    op.drop_table("order_events")
