"""orders.idempotency_key index: the dashboard's search by idempotency key

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-22

An operator usually has the key from the storefront's request log and not the
user id, and the unique key (user_id, idempotency_key) cannot serve a search by
key alone.  On a large live table build it by hand first with
CREATE INDEX CONCURRENTLY under the same name (see docs/operations.md); this
migration then finds it and does nothing.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("CREATE INDEX IF NOT EXISTS ix_orders_idempotency_key ON orders (idempotency_key)")


def downgrade() -> None:
    op.drop_index("ix_orders_idempotency_key", table_name="orders")
