"""The order events feed: `GET /v1/events?after=&limit=` reads it.

A cursor is `<txid>-<position>` of the last event served: the feed is ordered by
the writing transaction's id, then by position, and serves only transactions
older than every one still running, so an event committed late always sorts
after any cursor already handed out.  A cursor older than the retention purge's
mark may have missed purged events: CursorGone (410) says so.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg

from orderflow.sql import QUERIES

CURSOR_RE = re.compile(r"([0-9]{1,19})-([0-9]{1,19})")
MAX_LIMIT = 1000


class BadCursor(ValueError):
    """`after` is not a cursor this feed handed out."""


class CursorGone(Exception):
    """Events after this cursor were purged (retention): start again without `after`."""


def parse_cursor(after: str | None) -> tuple[int, int] | None:
    if after is None:
        return None
    match = CURSOR_RE.fullmatch(after)
    if not match:
        raise BadCursor("after must be the `next` cursor of a previous page, <txid>-<position>")
    txid, position = int(match.group(1)), int(match.group(2))
    if txid > 2**63 - 1 or position > 2**63 - 1:
        raise BadCursor("after is out of range")
    return txid, position


def format_cursor(txid: int, position: int) -> str:
    return f"{txid}-{position}"


def read_feed(conn: psycopg.Connection[Any], *, after: str | None, limit: int) -> dict[str, Any]:
    """One page of events after the cursor, oldest first, and the cursor to continue from."""
    start = parse_cursor(after)
    with conn.transaction():
        # the mark and the page from one snapshot: a purge committing between them
        # would otherwise delete events this page skips without a 410
        conn.execute(QUERIES["event_feed_snapshot"])
        purged = conn.execute(QUERIES["event_feed_purged"]).fetchone()
        mark = (purged["txid"], purged["position"]) if purged else None
        if start is not None and mark is not None and start < mark:
            raise CursorGone(after)
        txid, position = max(start or (0, 0), mark or (0, 0))
        rows = conn.execute(
            QUERIES["event_feed"],
            {"after_txid": txid, "after_position": position, "limit": limit},
        ).fetchall()
    if rows:
        txid, position = rows[-1]["txid"], rows[-1]["position"]
    # an empty page hands back the cursor it was asked from, or the purge mark if that
    # is later: following it never answers 410
    return {
        "events": [r["envelope"] for r in rows],
        "next": format_cursor(txid, position),
    }


def counts_by_type(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """How many events of each type are kept."""
    return {r["type"]: int(r["n"]) for r in conn.execute(QUERIES["event_counts_by_type"])}
