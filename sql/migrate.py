"""Run Alembic migrations from code (`orderflow migrate`, the tests, the demo).

The migrations are package data (`orderflow/migrations`, which in a checkout is
the design card's `alembic/` folder), so an installed orderflow migrates from any
directory.  `alembic.ini` at the checkout's top serves the `alembic` command."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from orderflow.sql.db import sqlalchemy_url

SCRIPT_LOCATION = "orderflow:migrations"


def alembic_config(url: str, lock_timeout_ms: int = 60_000) -> Config:
    cfg = Config()
    cfg.attributes["lock_timeout_ms"] = lock_timeout_ms
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.set_main_option("path_separator", "os")
    # Percent signs in a URL would be read as interpolation by configparser.
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head", *, lock_timeout_ms: int = 60_000) -> None:
    command.upgrade(alembic_config(url, lock_timeout_ms), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)
