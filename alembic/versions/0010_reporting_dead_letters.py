"""reporting: dead_letters and needs_attention views (the dashboard reads them)

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-22
"""

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The views' SQL is package data of orderflow.sql (installed or in a checkout).
VIEWS_DIR = Path(str(resources.files("orderflow.sql") / "reporting"))


def upgrade() -> None:
    for name in ("08_dead_letters.sql", "09_needs_attention.sql"):
        op.execute((VIEWS_DIR / name).read_text(encoding="utf-8"))
    op.execute("GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO reporting_reader")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS reporting.needs_attention")
    op.execute("DROP VIEW IF EXISTS reporting.dead_letters")
