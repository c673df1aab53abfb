"""The claim's cost does not grow with the backlog: on a table with tens of
thousands of ready rows (and some expired leases), the claim statement reads each
partial index in order and stops at its LIMIT — no Seq Scan of the outbox, no Sort
fed more than 2 x LIMIT rows.  The plan's shape is checked, never its time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from orderflow.outbox_worker.core import WorkerConfig, claim
from orderflow.sql import QUERIES

LIMIT = 64
READY = 30_000
EXPIRED = 40

SEED = [
    "INSERT INTO orders (id, user_id, state, total_cents, currency, payment_method_id,"
    " shipping_address, idempotency_key)"
    " SELECT 'P' || lpad(g::text, 25, '0'), gen_random_uuid(), 'paid', 100, 'EUR',"
    " 'pm_card_visa', '{}', 'plan-' || g FROM generate_series(1, %(n)s) g",
    "INSERT INTO outbox (order_id, step, idempotency_key, available_at)"
    " SELECT id, 'ship_order', id || ':ship_order', now() - interval '1 hour'"
    " FROM orders WHERE id LIKE 'P%%'",
    "INSERT INTO outbox (order_id, step, idempotency_key, status, lease_owner, lease_until)"
    " SELECT id, 'send_confirmation', id || ':send_confirmation', 'in_flight', 'dead-worker',"
    " now() - interval '1 minute' FROM orders WHERE id LIKE 'P%%' ORDER BY id LIMIT %(expired)s",
]


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)


@pytest.fixture(scope="module")
def backlog(module_db_url: str) -> str:
    with psycopg.connect(module_db_url, autocommit=True) as conn:
        for statement in SEED:
            conn.execute(statement, {"n": READY, "expired": EXPIRED})  # type: ignore[arg-type]
        conn.execute("VACUUM ANALYZE outbox")
    return module_db_url


def _plan(url: str) -> list[dict[str, Any]]:
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + QUERIES["claim_outbox"],  # type: ignore[operator]
            {"limit": LIMIT, "owner": "plan-test", "lease_s": 30},
        ).fetchone()
        conn.rollback()  # the claim's leases are not kept
    assert row is not None
    return list(_nodes(row[0][0]["Plan"]))


def test_the_claim_reads_indexes_in_order_and_stops_at_its_limit(backlog: str) -> None:
    nodes = _plan(backlog)
    scans = [n for n in nodes if n.get("Relation Name") == "outbox"]
    assert scans and all(n["Node Type"] != "Seq Scan" for n in scans), scans
    assert {n.get("Index Name") for n in scans} >= {"ix_outbox_claimable", "ix_outbox_leases"}
    for sort in (n for n in nodes if n["Node Type"] == "Sort"):
        fed = sum(int(child["Actual Rows"]) * int(child.get("Actual Loops", 1))
                  for child in sort.get("Plans", [])
                  if child.get("Parent Relationship") == "Outer")  # not its sub-plans  # fmt: skip
        assert fed <= 2 * LIMIT, sort
    read = sum(int(n["Actual Rows"]) for n in scans if n["Node Type"] != "ModifyTable")
    assert read <= 3 * LIMIT  # the two reads and the update by primary key


def test_expired_leases_are_claimed_first_and_the_rest_fills_the_limit(backlog: str) -> None:
    with psycopg.connect(backlog) as conn:
        rows = conn.execute(
            QUERIES["claim_outbox"], {"limit": LIMIT, "owner": "plan-test", "lease_s": 30}
        ).fetchall()
        conn.rollback()
    steps = [r[2] for r in rows]
    assert len(rows) == LIMIT
    assert steps.count("send_confirmation") == EXPIRED  # every expired lease, however old the rest
    assert steps.count("ship_order") == LIMIT - EXPIRED


def test_the_claim_is_planned_afresh_never_server_prepared(backlog: str) -> None:
    """psycopg prepares a statement on its server after a few runs; the claim's
    generic plan, made while `shipments` was empty, then kept joining it by a Seq
    Scan per claimed row as the table grew (12 ms a claim at 13,000 shipments in
    `bench dispatch`, against 0.9 ms planned afresh)."""
    config = WorkerConfig(owner="plan-test", lease_s=30)
    with psycopg.connect(backlog) as conn:
        for _ in range(3 * (conn.prepare_threshold or 1) + 1):
            assert claim(conn, config, 1)
            conn.commit()  # (psycopg forgets what it prepared in a transaction rolled back)
        prepared = conn.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%%ix_outbox%%'"
            " OR statement LIKE '%%lease_until < now()%%'"
        ).fetchone()
    assert prepared == (0,)
