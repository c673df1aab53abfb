"""The heartbeat extends our own in-flight leases, never another worker's, and never
queues behind a lock: a row locked right now (a commit finishing it) is skipped
this round and the rest are extended at once."""

from __future__ import annotations

from typing import Any

import psycopg

from orderflow.sql import QUERIES
from orderflow.sql.db import connect

SEED = [
    "INSERT INTO orders (id, user_id, state, total_cents, currency, payment_method_id,"
    " shipping_address, idempotency_key)"
    " SELECT 'H' || g, gen_random_uuid(), 'paid', 100, 'EUR', 'pm_card_visa', '{}', 'hb-' || g"
    " FROM generate_series(1, 4) g",
    "INSERT INTO outbox (order_id, step, idempotency_key, status, lease_owner, lease_until)"
    " SELECT id, 'ship_order', id || ':ship_order', 'in_flight',"
    " CASE WHEN id = 'H4' THEN 'other-worker' ELSE 'me' END, now() + interval '5 seconds'"
    " FROM orders WHERE id LIKE 'H%%'",
]


def _leases(conn: Any) -> dict[str, float]:
    rows = conn.execute(
        "SELECT order_id, EXTRACT(EPOCH FROM lease_until - now()) AS left_s FROM outbox"
        " WHERE order_id LIKE 'H%%'"
    ).fetchall()
    return {r["order_id"]: float(r["left_s"]) for r in rows}


def test_the_heartbeat_skips_a_locked_row_and_extends_the_rest(conn: Any, db_url: str) -> None:
    for statement in SEED:
        conn.execute(statement)
    ids = [r["id"] for r in conn.execute("SELECT id FROM outbox ORDER BY order_id").fetchall()]
    with connect(db_url) as locker, locker.transaction():
        # A committer holds H2's row (it is finishing it): the heartbeat must not wait.
        locker.execute("SELECT 1 FROM outbox WHERE order_id = 'H2' FOR UPDATE")
        with psycopg.connect(db_url, options="-c lock_timeout=2000") as beat:
            extended = beat.execute(
                QUERIES["extend_leases"], {"ids": ids, "owner": "me", "lease_s": 300}
            ).fetchall()
            beat.commit()
    assert len(extended) == 2  # H1 and H3: not H2 (locked), not H4 (another worker's)
    left = _leases(conn)
    assert left["H1"] > 250 and left["H3"] > 250
    assert left["H2"] < 10  # skipped this round; the next heartbeat takes it
    assert left["H4"] < 10  # never another worker's lease
