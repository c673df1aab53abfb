"""payments as Stripe answers: awaiting_payment, await_payment, payment_intents, stripe_events

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01

The state `awaiting_payment` (3-D Secure, bank debits) and the step
`await_payment` join the CHECK lists; a refund Stripe has not finished is a
`pending` payment row; an order keeps its bank-debit mandate; the order's
PaymentIntent as last seen (one per order) and the inbox of Stripe's webhook
events get their tables.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATES = (
    "'reserved', 'paid', 'shipped', 'confirmed', 'return_requested', 'awaiting_return',"
    " 'returned', 'compensating', 'cancelled', 'needs_attention'"
)
NEW_STATES = (
    "'reserved', 'awaiting_payment', 'paid', 'shipped', 'confirmed', 'return_requested',"
    " 'awaiting_return', 'returned', 'compensating', 'cancelled', 'needs_attention'"
)
OLD_STEPS = (
    "'charge_payment', 'ship_order', 'send_confirmation', 'create_return_label',"
    " 'refund_return', 'restock_inventory', 'cancel_shipment', 'refund_payment',"
    " 'release_inventory'"
)
NEW_STEPS = (
    "'charge_payment', 'await_payment', 'ship_order', 'send_confirmation',"
    " 'create_return_label', 'refund_return', 'restock_inventory', 'cancel_shipment',"
    " 'refund_payment', 'release_inventory'"
)
INTENT_STATUSES = (
    "'requires_payment_method', 'requires_confirmation', 'requires_action', 'processing',"
    " 'requires_capture', 'succeeded', 'canceled'"
)


def _checks(states: str, steps: str, payment_statuses: str) -> None:
    for table, name, expression in (
        ("orders", "ck_orders_state_known", f"state IN ({states})"),
        (
            "order_history",
            "ck_order_history_from_state_known",
            f"from_state IS NULL OR from_state IN ({states})",
        ),
        ("order_history", "ck_order_history_to_state_known", f"to_state IN ({states})"),
        ("outbox", "ck_outbox_step_known", f"step IN ({steps})"),
        ("payments", "ck_payments_status_known", f"status IN ({payment_statuses})"),
    ):
        op.drop_constraint(op.f(name), table, type_="check")
        op.create_check_constraint(op.f(name), table, expression)


def upgrade() -> None:
    _checks(NEW_STATES, NEW_STEPS, "'succeeded', 'failed', 'pending'")
    op.add_column(
        "orders",
        sa.Column("payment_mandate", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    )
    op.create_table(
        "payment_intents",
        sa.Column("order_id", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("amount_cents", sa.Integer(), nullable=False),
        sa.Column("amount_received_cents", sa.Integer(), server_default="0", nullable=False),
        sa.Column("amount_capturable_cents", sa.Integer(), server_default="0", nullable=False),
        sa.Column("currency", sa.Text(), nullable=False),
        sa.Column("client_secret", sa.Text(), nullable=True),
        sa.Column("next_action", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("last_error_code", sa.Text(), nullable=True),
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
        sa.CheckConstraint(
            f"status IN ({INTENT_STATUSES})", name=op.f("ck_payment_intents_status_known")
        ),
        sa.CheckConstraint("amount_cents > 0", name=op.f("ck_payment_intents_amount_positive")),
        sa.CheckConstraint(
            "amount_received_cents >= 0 AND amount_capturable_cents >= 0",
            name=op.f("ck_payment_intents_amounts_nonnegative"),
        ),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name=op.f("fk_payment_intents_order_id_orders"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("order_id", name=op.f("pk_payment_intents")),
        sa.UniqueConstraint("id", name=op.f("uq_payment_intents_id")),
    )
    op.create_table(
        "stripe_events",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("object_id", sa.Text(), nullable=True),
        sa.Column("order_id", sa.Text(), nullable=True),
        sa.Column("stripe_created", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column(
            "received_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("data", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_id"],
            ["orders.id"],
            name=op.f("fk_stripe_events_order_id_orders"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stripe_events")),
    )
    op.create_index(op.f("ix_stripe_events_order_id"), "stripe_events", ["order_id"])
    # reporting.state_timeouts lists every state in saga order: make room after reserved.
    op.execute("UPDATE reporting.state_timeouts SET position = position + 100 WHERE position >= 2")
    op.execute("UPDATE reporting.state_timeouts SET position = position - 99 WHERE position > 100")
    op.execute(
        "INSERT INTO reporting.state_timeouts (state, position, timeout_minutes)"
        " VALUES ('awaiting_payment', 2, NULL)"
    )


def downgrade() -> None:
    op.execute("DELETE FROM reporting.state_timeouts WHERE state = 'awaiting_payment'")
    op.execute("UPDATE reporting.state_timeouts SET position = position + 100 WHERE position > 2")
    op.execute("UPDATE reporting.state_timeouts SET position = position - 101 WHERE position > 100")
    op.drop_index(op.f("ix_stripe_events_order_id"), table_name="stripe_events")
    op.drop_table("stripe_events")
    op.drop_table("payment_intents")
    # Rows the old lists cannot hold have no place in the old schema.
    op.execute("DELETE FROM payments WHERE status = 'pending'")
    op.execute("DELETE FROM outbox WHERE step = 'await_payment'")
    _checks(OLD_STATES, OLD_STEPS, "'succeeded', 'failed'")
    op.drop_column("orders", "payment_mandate")
