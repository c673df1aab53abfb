"""Shared bench plumbing: a scratch database, percentiles, the JSON last line."""

from __future__ import annotations

import json
import os
import statistics
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, LiteralString

import psycopg

from orderflow.services.catalog import SAMPLE_CATALOG, load_catalog
from orderflow.sql import QUERIES as PRODUCTION_QUERIES
from orderflow.sql import migrate, parse_queries
from orderflow.sql.db import connect, create_database, drop_database, resolve_url

# The benches' own statements live here, out of the production registry that every
# API and worker loads; the benches see both.
QUERIES: dict[str, LiteralString] = {
    **PRODUCTION_QUERIES,
    **parse_queries(Path(__file__).with_name("bench.sql").read_text("utf-8"), "bench.sql"),
}

# bench/ is a checkout tool (never in the wheel): its processes run from the checkout.
CHECKOUT = Path(__file__).resolve().parents[1]


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A fresh, migrated database with the sample catalog; dropped afterwards."""
    server = resolve_url()
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    url = create_database(server, name)
    try:
        migrate.upgrade(url)
        with connect(url) as conn:
            load_catalog(conn, SAMPLE_CATALOG)
        yield url
    finally:
        drop_database(server, name)


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


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set (VmHWM), read before it exits; None off Linux."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def cpu_seconds(pid: int | None = None) -> float | None:
    """CPU time (user + system) of a process, or of the whole machine if pid is None."""
    try:
        if pid is None:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
            busy = sum(
                int(f) for i, f in enumerate(fields) if i not in (3, 4)
            )  # minus idle, iowait
            return busy / os.sysconf("SC_CLK_TCK")
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def postgres_cpu_seconds() -> float | None:
    """CPU time of every process named postgres on this machine (the server's
    backends and helpers; a bench runs alone on its server)."""
    total, found = 0.0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        name, rest = text.split("(", 1)[1].rsplit(")", 1)
        if name == "postgres":
            fields = rest.split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            found = True
    return total if found else None


def count_statements(url: str) -> bool:
    """Reset pg_stat_statements in this database; False where the server does not
    preload it (its counts are then not printed)."""
    try:
        with connect(url) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute(QUERIES["bench_statements_reset"])
        return True
    except psycopg.Error:
        return False


def statements_since_reset(url: str, per: int, top: int = 5) -> dict[str, Any]:
    """Statements per unit of work since count_statements, and the top few by server time."""
    with connect(url) as conn:
        total: dict[str, Any] | None = conn.execute(QUERIES["bench_statements_total"]).fetchone()
        rows: list[dict[str, Any]] = conn.execute(
            QUERIES["bench_statements_top"], {"n": top}
        ).fetchall()
    assert total is not None
    return {
        "statements_per_unit": round(int(total["calls"]) / per, 2),
        "transaction_controls_per_unit": round(int(total["transaction_controls"]) / per, 2),
        "top_statements": [
            {**r, "calls_per_unit": round(int(r["calls"]) / per, 2),
             "total_ms": float(r["total_ms"]), "mean_ms": float(r["mean_ms"])}
            for r in rows
        ],
    }  # fmt: skip


def print_top_statements(tops: list[dict[str, Any]] | None, unit: str) -> None:
    """One line per statement of statements_since_reset's top: server time, calls per unit."""
    for top in tops or []:
        print(
            f"postgres: {top['total_ms']:>9} ms {top['calls_per_unit']:>6} per {unit}"
            f" {top['mean_ms']:>7} ms each  {top['query']}"
        )
