"""capture at shipment: the step capture_payment, a hold's deadline, the money views

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02

The step `capture_payment` joins the outbox's CHECK list; the order's
PaymentIntent keeps when its hold was placed (`held_at`) and the date Stripe
gives for capturing it (`capture_before`); the reporting schema gains the money
held vs captured, the cancellations by reason and the open holds.
"""

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STEPS = (
    "'charge_payment', 'await_payment', 'ship_order', 'send_confirmation',"
    " 'create_return_label', 'refund_return', 'restock_inventory', 'cancel_shipment',"
    " 'refund_payment', 'release_inventory'"
)
NEW_STEPS = (
    "'charge_payment', 'await_payment', 'ship_order', 'capture_payment', 'send_confirmation',"
    " 'create_return_label', 'refund_return', 'restock_inventory', 'cancel_shipment',"
    " 'refund_payment', 'release_inventory'"
)
VIEWS_DIR = Path(str(resources.files("orderflow.sql") / "reporting"))
VIEWS = ("10_payments.sql", "11_cancellations.sql", "12_holds_near_expiry.sql")


def _steps(steps: str) -> None:
    op.drop_constraint(op.f("ck_outbox_step_known"), "outbox", type_="check")
    op.create_check_constraint(op.f("ck_outbox_step_known"), "outbox", f"step IN ({steps})")


def upgrade() -> None:
    _steps(NEW_STEPS)
    for column in ("held_at", "capture_before"):
        op.add_column(
            "payment_intents",
            sa.Column(column, postgresql.TIMESTAMP(timezone=True), nullable=True),
        )
    op.create_index(
        "ix_payment_intents_held",
        "payment_intents",
        ["capture_before"],
        postgresql_where=sa.text("status = 'requires_capture'"),
    )
    for name in VIEWS:
        op.execute((VIEWS_DIR / name).read_text(encoding="utf-8"))
    op.execute("GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO reporting_reader")


def downgrade() -> None:
    for view in ("holds", "cancellations", "payments"):
        op.execute(f"DROP VIEW IF EXISTS reporting.{view}")
    op.drop_index("ix_payment_intents_held", table_name="payment_intents")
    op.drop_column("payment_intents", "capture_before")
    op.drop_column("payment_intents", "held_at")
    op.execute("DELETE FROM outbox WHERE step = 'capture_payment'")
    _steps(OLD_STEPS)
