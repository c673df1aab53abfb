"""Connections: DATABASE_URL when set, else the embedded server."""

from __future__ import annotations

import re

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from orderflow.config import Settings
from orderflow.sql.embedded import embedded_url

NOTIFY_CHANNEL = "orderflow_outbox"


def libpq_url(url: str) -> str:
    """A URL psycopg accepts: drop a SQLAlchemy `+driver` suffix."""
    return re.sub(r"^postgres(?:ql)?(\+\w+)?://", "postgresql://", url)


def sqlalchemy_url(url: str) -> str:
    """A URL SQLAlchemy maps to psycopg 3."""
    return re.sub(r"^postgres(?:ql)?(\+\w+)?://", "postgresql+psycopg://", url)


def resolve_url(settings: Settings | None = None) -> str:
    settings = settings or Settings.from_env()
    if settings.database_url:
        return libpq_url(settings.database_url)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    return embedded_url(settings.state_dir)


def connection_options(settings: Settings) -> str:
    """Every API and worker session: statements and lock waits are bounded, so a
    held lock fails a request (503) or a step (retried) instead of hanging it."""
    return (
        f"-c statement_timeout={settings.statement_timeout_ms}"
        f" -c lock_timeout={settings.lock_timeout_ms}"
        " -c idle_in_transaction_session_timeout=30000"
    )


def connect(url: str | None = None, **kwargs: object) -> psycopg.Connection[dict[str, object]]:
    """An autocommit connection: each `with conn.transaction()` is one transaction."""
    return psycopg.connect(
        url or resolve_url(),
        autocommit=True,
        row_factory=dict_row,
        **kwargs,  # type: ignore[arg-type]
    )


def with_database(url: str, dbname: str) -> str:
    """The same server URL pointing at another database."""
    from sqlalchemy.engine import make_url

    return libpq_url(make_url(url).set(database=dbname).render_as_string(hide_password=False))


def create_database(server_url: str, name: str, template: str | None = None) -> str:
    """CREATE DATABASE (optionally from a template) on the server; return its URL."""
    statement = (
        sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template)
        )
        if template
        else sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    )
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(statement)
    return with_database(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    """DROP DATABASE ... WITH (FORCE): its sessions are ended first."""
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
