"""reporting: order_states and stuck_orders read orders by state through the (state, updated_at) index

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The views' SQL is package data of orderflow.sql (installed or in a checkout).
VIEWS_DIR = Path(str(resources.files("orderflow.sql") / "reporting"))


def upgrade() -> None:
    for name in ("01_order_states.sql", "04_stuck_orders.sql"):
        op.execute((VIEWS_DIR / name).read_text(encoding="utf-8"))


def downgrade() -> None:
    pass  # the same columns; 0003's downgrade drops the schema
