"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-21 23:28:09.452376
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "carts",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("status", sa.Text(), server_default="open", nullable=False),
        sa.Column("shipping_address", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("email", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("ordered_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(status = 'ordered') = (ordered_at IS NOT NULL)",
            name=op.f("ck_carts_ordered_at_iff_ordered"),
        ),
        sa.CheckConstraint("status IN ('open', 'ordered')", name=op.f("ck_carts_status_known")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_carts")),
    )
    op.create_index(
        op.f("ix_carts_user_id_created_at"), "carts", ["user_id", "created_at"], unique=False
    )
    op.create_table(
        "products",
        sa.Column("sku", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("price_cents", sa.Integer(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("available", sa.Integer(), nullable=False),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("currency ~ '^[A-Z]{3}$'", name=op.f("ck_products_currency_iso")),
        sa.CheckConstraint("available >= 0", name=op.f("ck_products_available_nonnegative")),
        sa.CheckConstraint(
            "char_length(sku) BETWEEN 1 AND 64", name=op.f("ck_products_sku_length")
        ),
        sa.CheckConstraint("price_cents >= 0", name=op.f("ck_products_price_nonnegative")),
        sa.PrimaryKeyConstraint("sku", name=op.f("pk_products")),
    )
    op.create_table(
        "cart_lines",
        sa.Column("cart_id", sa.Text(), nullable=False),
        sa.Column("sku", sa.Text(), nullable=False),
        sa.Column("qty", sa.Integer(), nullable=False),
        sa.CheckConstraint("qty > 0", name=op.f("ck_cart_lines_qty_positive")),
        sa.ForeignKeyConstraint(
            ["cart_id"], ["carts.id"], name=op.f("fk_cart_lines_cart_id_carts"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["sku"], ["products.sku"], name=op.f("fk_cart_lines_sku_products")),
        sa.PrimaryKeyConstraint("cart_id", "sku", name=op.f("pk_cart_lines")),
    )
    op.create_index(op.f("ix_cart_lines_sku"), "cart_lines", ["sku"], unique=False)
    op.create_table(
        "orders",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("cart_id", sa.Text(), nullable=True),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("total_cents", sa.Integer(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("payment_method_id", sa.Text(), nullable=False),
        sa.Column("shipping_address", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("email", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("currency ~ '^[A-Z]{3}$'", name=op.f("ck_orders_currency_iso")),
        sa.CheckConstraint(
            "state IN ('reserved', 'paid', 'shipped', 'confirmed', 'return_requested', 'awaiting_return', 'returned', 'compensating', 'cancelled', 'needs_attention')",
            name=op.f("ck_orders_state_known"),
        ),
        sa.CheckConstraint(
            "char_length(idempotency_key) BETWEEN 1 AND 255", name=op.f("ck_orders_key_length")
        ),
        sa.CheckConstraint("total_cents >= 0", name=op.f("ck_orders_total_nonnegative")),
        sa.ForeignKeyConstraint(["cart_id"], ["carts.id"], name=op.f("fk_orders_cart_id_carts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_orders")),
        sa.UniqueConstraint("cart_id", name=op.f("uq_orders_cart_id")),
        sa.UniqueConstraint(
            "user_id", "idempotency_key", name=op.f("uq_orders_user_id_idempotency_key")
        ),
    )
    op.create_index(
        op.f("ix_orders_state_updated_at"), "orders", ["state", "updated_at"], unique=False
    )
    op.create_index(
        "ix_orders_user_id_created_at",
        "orders",
        ["user_id", sa.literal_column("created_at DESC")],
        unique=False,
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("request_method", sa.Text(), nullable=False),
        sa.Column("request_path", sa.Text(), nullable=False),
        sa.Column("request_hash", sa.Text(), nullable=False),
        sa.Column("recovery_point", sa.Text(), server_default="started", nullable=False),
        sa.Column("locked_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.Column("order_id", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "last_run_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "(recovery_point = 'finished') = (response_status IS NOT NULL)",
            name=op.f("ck_idempotency_keys_finished_has_response"),
        ),
        sa.CheckConstraint(
            "recovery_point IN ('started', 'finished')",
            name=op.f("ck_idempotency_keys_recovery_point_known"),
        ),
        sa.CheckConstraint(
            "char_length(key) BETWEEN 1 AND 255", name=op.f("ck_idempotency_keys_key_length")
        ),
        sa.CheckConstraint(
            "response_status IS NULL OR response_status BETWEEN 100 AND 599",
            name=op.f("ck_idempotency_keys_status_http"),
        ),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name=op.f("fk_idempotency_keys_order_id_orders"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idempotency_keys")),
        sa.UniqueConstraint("user_id", "key", name=op.f("uq_idempotency_keys_user_id_key")),
    )
    op.create_index(
        op.f("ix_idempotency_keys_created_at"), "idempotency_keys", ["created_at"], unique=False
    )
    op.create_table(
        "order_history",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("from_state", sa.Text(), nullable=True),
        sa.Column("to_state", sa.Text(), nullable=False),
        sa.Column("event", sa.Text(), nullable=False),
        sa.Column(
            "detail",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("clock_timestamp()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "from_state IS NULL OR from_state IN ('reserved', 'paid', 'shipped', 'confirmed', 'return_requested', 'awaiting_return', 'returned', 'compensating', 'cancelled', 'needs_attention')",
            name=op.f("ck_order_history_from_state_known"),
        ),
        sa.CheckConstraint(
            "to_state IN ('reserved', 'paid', 'shipped', 'confirmed', 'return_requested', 'awaiting_return', 'returned', 'compensating', 'cancelled', 'needs_attention')",
            name=op.f("ck_order_history_to_state_known"),
        ),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name=op.f("fk_order_history_order_id_orders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_order_history")),
    )
    op.create_index(
        op.f("ix_order_history_order_id_id"), "order_history", ["order_id", "id"], unique=False
    )
    op.create_table(
        "order_lines",
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("sku", sa.Text(), nullable=False),
        sa.Column("qty", sa.Integer(), nullable=False),
        sa.Column("unit_price_cents", sa.Integer(), nullable=False),
        sa.CheckConstraint("qty > 0", name=op.f("ck_order_lines_qty_positive")),
        sa.CheckConstraint("unit_price_cents >= 0", name=op.f("ck_order_lines_price_nonnegative")),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name=op.f("fk_order_lines_order_id_orders"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["sku"], ["products.sku"], name=op.f("fk_order_lines_sku_products")
        ),
        sa.PrimaryKeyConstraint("order_id", "sku", name=op.f("pk_order_lines")),
    )
    op.create_index(op.f("ix_order_lines_sku"), "order_lines", ["sku"], unique=False)
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("step", sa.Text(), nullable=False),
        sa.Column(
            "payload",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "available_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_until", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("fence", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("done_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(status = 'done') = (done_at IS NOT NULL)", name=op.f("ck_outbox_done_at_iff_done")
        ),
        sa.CheckConstraint(
            "(status = 'in_flight') = (lease_owner IS NOT NULL AND lease_until IS NOT NULL)",
            name=op.f("ck_outbox_lease_iff_in_flight"),
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'in_flight', 'done', 'dead')",
            name=op.f("ck_outbox_status_known"),
        ),
        sa.CheckConstraint(
            "step IN ('charge_payment', 'ship_order', 'send_confirmation', 'create_return_label', 'refund_return', 'restock_inventory', 'cancel_shipment', 'refund_payment', 'release_inventory')",
            name=op.f("ck_outbox_step_known"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_outbox_attempts_nonnegative")),
        sa.CheckConstraint("fence >= 0", name=op.f("ck_outbox_fence_nonnegative")),
        sa.ForeignKeyConstraint(
            ["order_id"], ["orders.id"], name=op.f("fk_outbox_order_id_orders"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_outbox_idempotency_key")),
        sa.UniqueConstraint("order_id", "step", name=op.f("uq_outbox_order_id_step")),
    )
    op.create_index(
        "ix_outbox_claimable",
        "outbox",
        ["available_at", "id"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_outbox_dead",
        "outbox",
        ["id"],
        unique=False,
        postgresql_where=sa.text("status = 'dead'"),
    )
    op.create_index(
        "ix_outbox_done_at",
        "outbox",
        ["done_at"],
        unique=False,
        postgresql_where=sa.text("status = 'done'"),
    )
    op.create_index(
        "ix_outbox_leases",
        "outbox",
        ["lease_until"],
        unique=False,
        postgresql_where=sa.text("status = 'in_flight'"),
    )
    op.create_table(
        "payments",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("provider_ref", sa.Text(), nullable=True),
        sa.Column("amount_cents", sa.Integer(), nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column("failure_code", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("currency ~ '^[A-Z]{3}$'", name=op.f("ck_payments_currency_iso")),
        sa.CheckConstraint("kind IN ('charge', 'refund')", name=op.f("ck_payments_kind_known")),
        sa.CheckConstraint(
            "status <> 'succeeded' OR provider_ref IS NOT NULL",
            name=op.f("ck_payments_succeeded_has_ref"),
        ),
        sa.CheckConstraint(
            "status IN ('succeeded', 'failed')", name=op.f("ck_payments_status_known")
        ),
        sa.CheckConstraint("amount_cents > 0", name=op.f("ck_payments_amount_positive")),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name=op.f("fk_payments_order_id_orders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payments")),
    )
    op.create_index(
        op.f("ix_payments_idempotency_key"), "payments", ["idempotency_key"], unique=False
    )
    op.create_index(
        "uq_payments_order_kind_succeeded",
        "payments",
        ["order_id", "kind"],
        unique=True,
        postgresql_where=sa.text("status = 'succeeded'"),
    )
    op.create_table(
        "reservations",
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("expires_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("consumed_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("released_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "expires_at > created_at", name=op.f("ck_reservations_expires_after_creation")
        ),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name=op.f("fk_reservations_order_id_orders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("order_id", name=op.f("pk_reservations")),
    )
    op.create_index(
        "ix_reservations_live_expires_at",
        "reservations",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text("consumed_at IS NULL AND released_at IS NULL"),
    )
    op.create_table(
        "shipments",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), server_default="created", nullable=False),
        sa.Column("carrier_ref", sa.Text(), nullable=False),
        sa.Column("tracking_number", sa.Text(), nullable=True),
        sa.Column("label_url", sa.Text(), nullable=True),
        sa.Column("idempotency_key", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("cancelled_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(status = 'cancelled') = (cancelled_at IS NOT NULL)",
            name=op.f("ck_shipments_cancelled_at_iff_cancelled"),
        ),
        sa.CheckConstraint("kind IN ('outbound', 'return')", name=op.f("ck_shipments_kind_known")),
        sa.CheckConstraint(
            "status IN ('created', 'cancelled')", name=op.f("ck_shipments_status_known")
        ),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name=op.f("fk_shipments_order_id_orders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shipments")),
        sa.UniqueConstraint("order_id", "kind", name=op.f("uq_shipments_order_id_kind")),
    )
    op.create_table(
        "stock_ledger",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("sku", sa.Text(), nullable=False),
        sa.Column("order_id", sa.Text(), nullable=True),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("delta", sa.Integer(), nullable=False),
        sa.Column(
            "at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "(kind = 'reserve' AND delta < 0) OR (kind IN ('release', 'restock') AND delta > 0) OR kind IN ('load', 'adjust')",
            name=op.f("ck_stock_ledger_delta_sign"),
        ),
        sa.CheckConstraint(
            "(order_id IS NULL) = (kind IN ('load', 'adjust'))",
            name=op.f("ck_stock_ledger_order_iff_order_kind"),
        ),
        sa.CheckConstraint(
            "kind IN ('load', 'adjust', 'reserve', 'release', 'restock')",
            name=op.f("ck_stock_ledger_kind_known"),
        ),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name=op.f("fk_stock_ledger_order_id_orders"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["sku"], ["products.sku"], name=op.f("fk_stock_ledger_sku_products")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stock_ledger")),
    )
    op.create_index(op.f("ix_stock_ledger_sku"), "stock_ledger", ["sku"], unique=False)
    op.create_index(
        "uq_stock_ledger_order_sku_kind",
        "stock_ledger",
        ["order_id", "sku", "kind"],
        unique=True,
        postgresql_where=sa.text("order_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "uq_stock_ledger_order_sku_kind",
        table_name="stock_ledger",
        postgresql_where=sa.text("order_id IS NOT NULL"),
    )
    op.drop_index(op.f("ix_stock_ledger_sku"), table_name="stock_ledger")
    op.drop_table("stock_ledger")
    op.drop_table("shipments")
    op.drop_index(
        "ix_reservations_live_expires_at",
        table_name="reservations",
        postgresql_where=sa.text("consumed_at IS NULL AND released_at IS NULL"),
    )
    op.drop_table("reservations")
    op.drop_index(
        "uq_payments_order_kind_succeeded",
        table_name="payments",
        postgresql_where=sa.text("status = 'succeeded'"),
    )
    op.drop_index(op.f("ix_payments_idempotency_key"), table_name="payments")
    op.drop_table("payments")
    op.drop_index(
        "ix_outbox_leases", table_name="outbox", postgresql_where=sa.text("status = 'in_flight'")
    )
    op.drop_index(
        "ix_outbox_done_at", table_name="outbox", postgresql_where=sa.text("status = 'done'")
    )
    op.drop_index(
        "ix_outbox_dead", table_name="outbox", postgresql_where=sa.text("status = 'dead'")
    )
    op.drop_index(
        "ix_outbox_claimable", table_name="outbox", postgresql_where=sa.text("status = 'pending'")
    )
    op.drop_table("outbox")
    op.drop_index(op.f("ix_order_lines_sku"), table_name="order_lines")
    op.drop_table("order_lines")
    op.drop_index(op.f("ix_order_history_order_id_id"), table_name="order_history")
    op.drop_table("order_history")
    op.drop_index(op.f("ix_idempotency_keys_created_at"), table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_index("ix_orders_user_id_created_at", table_name="orders")
    op.drop_index(op.f("ix_orders_state_updated_at"), table_name="orders")
    op.drop_table("orders")
    op.drop_index(op.f("ix_cart_lines_sku"), table_name="cart_lines")
    op.drop_table("cart_lines")
    op.drop_table("products")
    op.drop_index(op.f("ix_carts_user_id_created_at"), table_name="carts")
    op.drop_table("carts")
