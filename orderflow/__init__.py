"""orderflow: a PostgreSQL-centric order-fulfillment saga service."""

from pathlib import Path

# The checkout root: alembic/, sql/ and workflows/ live beside the packages.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
