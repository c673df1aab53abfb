"""outbox.claimed_at: when a row was first claimed (pickup latency = claimed_at - created_at)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("claimed_at", postgresql.TIMESTAMP(timezone=True)))


def downgrade() -> None:
    op.drop_column("outbox", "claimed_at")
