"""Shared bench plumbing: a scratch database, percentiles, the JSON last line."""

from __future__ import annotations

import json
import statistics
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

from orderflow import PROJECT_ROOT, migrate
from orderflow.catalog import load_catalog
from orderflow.db import connect, resolve_url, with_database


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A fresh, migrated database with the sample catalog; dropped afterwards."""
    server = resolve_url()
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = with_database(server, name)
    try:
        migrate.upgrade(url)
        with connect(url) as conn:
            load_catalog(conn, PROJECT_ROOT / "catalog" / "sample.csv")
        yield url
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[int(pct * 10) - 1]


def pct_ms(values: list[float], pct: float) -> float | None:
    value = percentile(values, pct)
    return None if value is None else round(value, 2)


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result, sort_keys=True, allow_nan=False))
