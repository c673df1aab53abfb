"""Run Alembic migrations from code (`orderflow migrate`, the tests, the demo)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from orderflow import PROJECT_ROOT
from orderflow.db import sqlalchemy_url


def alembic_config(url: str, lock_timeout_ms: int = 60_000) -> Config:
    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.attributes["lock_timeout_ms"] = lock_timeout_ms
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    # Percent signs in a URL would be read as interpolation by configparser.
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head", *, lock_timeout_ms: int = 60_000) -> None:
    command.upgrade(alembic_config(url, lock_timeout_ms), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)
