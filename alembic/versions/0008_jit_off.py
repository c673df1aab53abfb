"""database setting: jit = off

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-22

Postgres JIT-compiles any plan estimated above jit_above_cost; for the live
reporting views (estimates in the hundreds of thousands of rows, real answers
in the hundreds) compiling took ~230 ms of a 2 ms query at a million orders.
Nothing in this service is a long analytic scan that JIT would repay.  New
sessions of this database pick the setting up; a session may still SET jit = on.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET jit = off', current_database()); END $$"
    )


def downgrade() -> None:
    op.execute(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I RESET jit', current_database()); END $$"
    )
