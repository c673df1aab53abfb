"""Alembic environment: online migrations only, URL from the config or the environment."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool, text

from orderflow.config import settings_errors_printed
from orderflow.migrations.schema import metadata
from orderflow.sql.db import resolve_url, sqlalchemy_url

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = metadata

# Every process that starts (API, worker, dashboard, on several machines) runs the
# migrations; this transaction-scoped lock makes them take turns, and the ones that
# come after find the head already applied.  The number is arbitrary but fixed.
MIGRATION_LOCK = 0x6F726465  # "orde"


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if not url:  # the `alembic` command in a checkout: the URL comes from the settings
        with settings_errors_printed():
            url = sqlalchemy_url(resolve_url())
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            # A migration waits at most this long for a table's lock (a long
            # transaction of the running system would otherwise stall every
            # process that starts), and its own statements are not time-bounded.
            lock_ms = int(config.attributes.get("lock_timeout_ms", 60_000))
            connection.execute(
                text("SELECT set_config('lock_timeout', :v, true)"), {"v": f"{lock_ms}ms"}
            )
            connection.execute(text("SELECT set_config('statement_timeout', '0', true)"))
            context.run_migrations()
    engine.dispose()


run_migrations_online()
