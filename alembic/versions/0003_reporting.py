"""reporting schema: state timeouts, the reporting views (sql/reporting/*.sql), reporting_reader

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22

The views are (re)created from the files in sql/reporting/ in name order; a
later migration that changes a view re-runs them the same way.
"""

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The views' SQL is package data of orderflow.sql (installed or in a checkout).
VIEWS_DIR = Path(str(resources.files("orderflow.sql") / "reporting"))

# (state, position, minutes before an order in it counts as stuck; NULL: never)
STATE_TIMEOUTS = [
    ("reserved", 1, 30),  # the seed's timeout for reserve_inventory
    ("paid", 2, 30),
    ("shipped", 3, 60),
    ("confirmed", 4, None),
    ("return_requested", 5, 60),
    ("awaiting_return", 6, None),  # waits for the parcel: a person's pace
    ("returned", 7, None),
    ("compensating", 8, 60),
    ("cancelled", 9, None),
    ("needs_attention", 10, None),  # already with an operator
]


def upgrade() -> None:
    op.execute("CREATE SCHEMA IF NOT EXISTS reporting")
    op.execute(
        "CREATE TABLE reporting.state_timeouts ("
        " state text PRIMARY KEY,"
        " position int NOT NULL UNIQUE,"
        " timeout_minutes int CHECK (timeout_minutes IS NULL OR timeout_minutes > 0))"
    )
    op.execute(
        "COMMENT ON TABLE reporting.state_timeouts IS"
        " 'Every order state, in saga order, with the minutes after which an order in it is"
        " stuck (NULL: settled or waiting for a person). Operators may edit the minutes.'"
    )
    timeouts = sa.table(
        "state_timeouts",
        sa.column("state", sa.Text),
        sa.column("position", sa.Integer),
        sa.column("timeout_minutes", sa.Integer),
        schema="reporting",
    )
    op.bulk_insert(
        timeouts,
        [{"state": s, "position": p, "timeout_minutes": m} for s, p, m in STATE_TIMEOUTS],
    )
    # The live views of this revision (later ones have their own migrations).
    for name in ("01_order_states.sql", "04_stuck_orders.sql", "05_outbox_backlog.sql"):
        op.execute((VIEWS_DIR / name).read_text(encoding="utf-8"))
    # A role that reads the views and nothing else (views run with their owner's rights,
    # so it needs no grant on the tables, whose addresses and e-mails it must not see).
    op.execute(
        "DO $$ BEGIN"
        " IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'reporting_reader') THEN"
        " CREATE ROLE reporting_reader NOLOGIN; END IF; END $$"
    )
    op.execute("GRANT USAGE ON SCHEMA reporting TO reporting_reader")
    op.execute("GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO reporting_reader")
    # Reporting scans order_history by state; these make the views cheaper.
    op.create_index("ix_order_history_to_state", "order_history", ["to_state", "order_id"])
    op.create_index("ix_payments_order_kind_status", "payments", ["order_id", "kind", "status"])


def downgrade() -> None:
    op.drop_index("ix_payments_order_kind_status", table_name="payments")
    op.drop_index("ix_order_history_to_state", table_name="order_history")
    op.execute("REVOKE ALL ON ALL TABLES IN SCHEMA reporting FROM reporting_reader")
    op.execute("REVOKE ALL ON SCHEMA reporting FROM reporting_reader")
    op.execute("DROP SCHEMA reporting CASCADE")
    # The role is cluster-wide: other databases may still use it, so it stays.
