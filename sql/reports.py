"""`orderflow report`: the reporting views as tables, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg

from orderflow.sql import QUERIES

VIEWS: tuple[str, ...] = (
    "order_states",
    "funnel",
    "state_durations",
    "stuck_orders",
    "outbox_backlog",
    "compensations",
    "daily_sales",
    "dead_letters",
    "needs_attention",
    "payments",
    "cancellations",
    "holds",
    "event_backlog",
)


def fetch(conn: psycopg.Connection[Any], view: str) -> list[dict[str, Any]]:
    if view not in VIEWS:
        raise ValueError(f"unknown report {view!r}; one of: {', '.join(VIEWS)}")
    return [dict(row) for row in conn.execute(QUERIES[f"report_{view}"])]


def plain(value: Any) -> Any:
    """A JSON/CSV-friendly form: intervals in seconds, numerics as numbers, times in ISO 8601."""
    if isinstance(value, timedelta):
        return round(value.total_seconds(), 3)
    if isinstance(value, Decimal):
        return float(value) if value % 1 else int(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def render_json(reports: dict[str, list[dict[str, Any]]]) -> str:
    return json.dumps(
        {
            name: [{k: plain(v) for k, v in row.items()} for row in rows]
            for name, rows in reports.items()
        },
        indent=2,
    )


def render_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: plain(v) for k, v in row.items()})
    return out.getvalue()


def render_table(name: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"== {name} ({len(rows)} rows)"]
    if not rows:
        return lines[0] + "\n   (none)\n"
    headers = list(rows[0])
    cells = [[_cell(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, timedelta):
        seconds = int(value.total_seconds())
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    text = str(plain(value))
    return text if len(text) <= 60 else text[:57] + "..."


SNAPSHOTS: tuple[str, ...] = ("funnel", "state_durations", "compensations", "daily_sales")


def refresh(
    conn: psycopg.Connection[Any], interval_s: float = 0.0, timeout_ms: int = 120_000
) -> list[str]:
    """Refresh the snapshots older than `interval_s` (all with 0); returns which.

    One refresher at a time across workers (a session advisory lock; a second
    caller returns at once); REFRESH ... CONCURRENTLY never blocks readers.  The
    refresh has its own statement timeout (ORDERFLOW_REFRESH_TIMEOUT_MS): 5.5 s at
    a million orders, longer than a request's."""
    locked = conn.execute(QUERIES["refresh_lock"]).fetchone()
    if not locked or not locked["locked"]:
        return []
    previous = conn.execute(
        QUERIES["set_statement_timeout"], {"value": f"{int(timeout_ms)}ms"}
    ).fetchone()
    try:
        due = [
            r["view"]
            for r in conn.execute(
                QUERIES["snapshots_due"], {"views": list(SNAPSHOTS), "interval_s": interval_s}
            )
        ]
        for view in due:
            started = time.perf_counter()
            conn.execute(QUERIES[f"refresh_{view}"])
            conn.execute(
                QUERIES["record_refresh"],
                {"view": view, "duration_ms": round((time.perf_counter() - started) * 1000, 1)},
            )
    finally:
        conn.execute(QUERIES["refresh_unlock"])
        if previous is not None:
            conn.execute(QUERIES["set_statement_timeout"], {"value": previous["previous"]})
    return due
