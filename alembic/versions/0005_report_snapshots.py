"""reporting: funnel, state_durations, compensations and daily_sales become snapshots

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22

On a million orders these four scan the whole history (seconds); as
materialized views they answer in milliseconds and the worker refreshes them
(CONCURRENTLY, so readers never wait) every ORDERFLOW_REPORT_REFRESH_S.  The
live views (order_states, stuck_orders, outbox_backlog) stay live.
"""

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The snapshots' SQL is package data of orderflow.sql (installed or in a checkout).
SNAPSHOTS_DIR = Path(str(resources.files("orderflow.sql") / "reporting" / "snapshots"))
SNAPSHOTS = ("funnel", "state_durations", "compensations", "daily_sales")


def upgrade() -> None:
    for path in sorted(SNAPSHOTS_DIR.glob("*.sql")):
        op.execute(path.read_text(encoding="utf-8"))
    op.execute(
        "CREATE TABLE reporting.refreshes ("
        " view text PRIMARY KEY, refreshed_at timestamptz NOT NULL, duration_ms numeric NOT NULL)"
    )
    op.execute(
        "COMMENT ON TABLE reporting.refreshes IS"
        " 'When each reporting snapshot was last refreshed, and how long it took.'"
    )
    op.execute("GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO reporting_reader")


def downgrade() -> None:
    op.execute("DROP TABLE reporting.refreshes")
    for name in SNAPSHOTS:
        op.execute(f"DROP MATERIALIZED VIEW IF EXISTS reporting.{name}")
