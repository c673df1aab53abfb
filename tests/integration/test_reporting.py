"""The reporting views against a small set of orders whose figures are known."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from orderflow.sql.reports import SNAPSHOTS, VIEWS, fetch, refresh
from orderflow.statemachine.definition import STATE_TIMEOUT_MINUTES, OrderState
from tests.support.paths import PROJECT_ROOT

NOW = datetime.now(UTC).replace(microsecond=0)
D1 = (NOW - timedelta(days=3)).replace(hour=10, minute=0, second=0)
D2 = (NOW - timedelta(days=2)).replace(hour=9, minute=0, second=0)
M = timedelta(minutes=1)


def _order(
    conn: psycopg.Connection[Any],
    created: datetime,
    path: list[tuple[str, str, dict[str, Any], timedelta]],
    *,
    currency: str = "EUR",
    total: int = 1000,
    charge: int | None = None,
    refund: int | None = None,
    outbox: list[tuple[str, str, int, str | None]] = (),  # type: ignore[assignment]
    updated: datetime | None = None,
) -> str:
    order_id = str(uuid.uuid4().hex[:26]).upper()
    state = path[-1][0] if path else "reserved"
    last = created + (path[-1][3] if path else timedelta())
    conn.execute(
        "INSERT INTO orders (id, user_id, state, total_cents, currency, payment_method_id,"
        " shipping_address, idempotency_key, created_at, updated_at)"
        " VALUES (%s, %s, %s, %s, %s, 'pm_card_visa', '{}', %s, %s, %s)",
        (order_id, uuid.uuid4(), state, total, currency, order_id, created, updated or last),
    )
    rows = [(None, "reserved", "place", {}, created)]
    previous = "reserved"
    for to_state, event_detail, detail, offset in path:
        event, _, _ = event_detail.partition(":")
        rows.append((previous, to_state, event, detail, created + offset))
        previous = to_state
    for from_state, to_state, event, detail, at in rows:
        conn.execute(
            "INSERT INTO order_history (order_id, from_state, to_state, event, detail, at)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (order_id, from_state, to_state, event, Jsonb(detail), at),
        )
    for kind, amount in (("charge", charge), ("refund", refund)):
        if amount:
            conn.execute(
                "INSERT INTO payments (order_id, kind, status, provider_ref, amount_cents,"
                " currency, idempotency_key) VALUES (%s, %s, 'succeeded', %s, %s, %s, %s)",
                (order_id, kind, f"ref_{kind}", amount, currency, f"{order_id}:{kind}"),
            )
    for step, status, attempts, error in outbox:
        conn.execute(
            "INSERT INTO outbox (order_id, step, idempotency_key, status, attempts, last_error,"
            " created_at, lease_owner, lease_until)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, NULL, NULL)",
            (order_id, step, f"{order_id}:{step}", status, attempts, error, NOW - 2 * 60 * M),
        )
    return order_id


@pytest.fixture()
def known(conn: psycopg.Connection[Any]) -> dict[str, str]:
    orders = _known_orders(conn)
    assert set(refresh(conn)) == set(SNAPSHOTS)  # the snapshots see them
    return orders


def _known_orders(conn: psycopg.Connection[Any]) -> dict[str, str]:
    step = {"step": "charge_payment"}
    return {
        "A": _order(
            conn, D1,
            [("paid", "payment_captured", step, M), ("shipped", "shipment_created", {}, 3 * M),
             ("confirmed", "confirmation_sent", {}, 4 * M)],
            charge=1000,
        ),
        "B": _order(
            conn, D1 + 60 * M,
            [("compensating", "payment_failed", step, 2 * M),
             ("cancelled", "compensation_done", {"step": "release_inventory"}, 3 * M)],
        ),
        "C": _order(
            conn, D1 + 120 * M,
            [("paid", "payment_captured", step, M),
             ("compensating", "shipment_failed", {"step": "ship_order"}, 5 * M),
             ("compensating", "compensation_done", {"step": "refund_payment"}, 6 * M),
             ("cancelled", "compensation_done", {"step": "release_inventory"}, 7 * M)],
            total=2000, charge=2000, refund=2000,
        ),
        "D": _order(
            conn, D2,
            [("paid", "payment_captured", step, M), ("shipped", "shipment_created", {}, 2 * M),
             ("confirmed", "confirmation_sent", {}, 3 * M)],
            currency="USD", total=500, charge=500,
        ),
        "E": _order(
            conn, D2 + 60 * M, [], updated=NOW - 120 * M,
            outbox=[("charge_payment", "pending", 2, "HTTP 500")],
        ),
        "F": _order(
            conn, D2 + 120 * M,
            [("compensating", "reservation_expired", {}, 30 * M),
             ("needs_attention", "step_dead_lettered", {"step": "release_inventory"}, 31 * M)],
            outbox=[("release_inventory", "dead", 8, "boom")],
        ),
    }  # fmt: skip


def test_order_states(conn: Any, known: dict[str, str]) -> None:
    rows = {r["state"]: r["orders"] for r in fetch(conn, "order_states")}
    assert list(rows) == [s.value for s in OrderState]  # every state, in saga order
    assert rows == {
        **{s.value: 0 for s in OrderState},
        "reserved": 1, "confirmed": 2, "cancelled": 2, "needs_attention": 1,
    }  # fmt: skip


def test_funnel(conn: Any, known: dict[str, str]) -> None:
    rows = {r["day"]: r for r in fetch(conn, "funnel")}
    d1, d2 = rows[D1.date()], rows[D2.date()]
    assert (d1["placed"], d1["paid"], d1["shipped"], d1["confirmed"], d1["cancelled"]) == (
        3,
        2,
        1,
        1,
        2,
    )
    assert (d2["placed"], d2["paid"], d2["shipped"], d2["confirmed"], d2["cancelled"]) == (
        3,
        1,
        1,
        1,
        0,
    )
    assert float(d1["paid_rate"]) == pytest.approx(2 / 3, abs=1e-4)


def test_state_durations(conn: Any, known: dict[str, str]) -> None:
    rows = {r["state"]: r for r in fetch(conn, "state_durations")}
    # reserved stays: A 60, B 120, C 60, D 60, F 1800 seconds (E's stay is still open)
    assert rows["reserved"]["stays"] == 5
    assert float(rows["reserved"]["p50_seconds"]) == 60
    assert float(rows["reserved"]["max_seconds"]) == 1800
    # paid: A 120, C 240, D 60
    assert float(rows["paid"]["p50_seconds"]) == 120
    assert "confirmed" not in rows  # nobody left confirmed


def test_stuck_orders(conn: Any, known: dict[str, str]) -> None:
    rows = fetch(conn, "stuck_orders")
    assert [r["order_id"] for r in rows] == [known["E"]]
    assert (rows[0]["pending_step"], rows[0]["attempts"], rows[0]["last_error"]) == (
        "charge_payment", 2, "HTTP 500",
    )  # fmt: skip


def test_outbox_backlog(conn: Any, known: dict[str, str]) -> None:
    rows = {
        r["step"]: (r["pending"], r["in_flight"], r["dead"]) for r in fetch(conn, "outbox_backlog")
    }
    assert rows == {"charge_payment": (1, 0, 0), "release_inventory": (0, 0, 1)}


def test_compensations(conn: Any, known: dict[str, str]) -> None:
    rows = {
        (r["reason"], r["failed_step"]): (r["cancelled"], r["needs_attention"], r["refunded_cents"])
        for r in fetch(conn, "compensations")
    }
    assert rows == {
        ("payment_failed", "charge_payment"): (1, 0, 0),
        ("shipment_failed", "ship_order"): (1, 0, 2000),
        ("reservation_expired", "reserve_inventory"): (0, 1, 0),
    }


def test_daily_sales(conn: Any, known: dict[str, str]) -> None:
    rows = {
        (r["day"], r["currency"]): (
            r["orders"],
            r["paid_orders"],
            r["gross_cents"],
            r["refunded_cents"],
            r["net_cents"],
        )
        for r in fetch(conn, "daily_sales")
    }
    assert rows == {
        (D1.date(), "EUR"): (3, 2, 3000, 2000, 1000),
        (D2.date(), "EUR"): (2, 0, 0, 0, 0),
        (D2.date(), "USD"): (1, 1, 500, 0, 500),
    }


def test_every_view_has_a_comment(conn: Any) -> None:
    rows = conn.execute(
        "SELECT c.relname, obj_description(c.oid) AS comment FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'reporting' AND c.relkind = 'v'"
    ).fetchall()
    assert {r["relname"] for r in rows} == set(VIEWS) - set(SNAPSHOTS)
    snapshots = conn.execute(
        "SELECT matviewname, obj_description(format('reporting.%I', matviewname)::regclass)"
        " AS comment FROM pg_matviews WHERE schemaname = 'reporting'"
    ).fetchall()
    assert {r["matviewname"] for r in snapshots} == set(SNAPSHOTS)
    assert all(r["comment"] for r in [*rows, *snapshots])


def test_snapshots_are_refreshed_by_the_worker_housekeeping(
    conn: Any, known: dict[str, str], worker: Any
) -> None:
    before = {r["day"]: r["placed"] for r in fetch(conn, "funnel")}
    _order(conn, D1 + 300 * M, [])
    assert {r["day"]: r["placed"] for r in fetch(conn, "funnel")} == before  # a snapshot
    assert refresh(conn, interval_s=3600) == []  # fresh enough: nothing to do
    worker.report_refresh_s = 0
    worker.housekeeping()
    after = {r["day"]: r["placed"] for r in fetch(conn, "funnel")}
    assert after[D1.date()] == before[D1.date()] + 1
    as_of = conn.execute("SELECT max(as_of) AS t FROM reporting.funnel").fetchone()["t"]
    assert as_of > NOW - timedelta(minutes=1)


def test_state_timeouts_match_the_machine(conn: Any) -> None:
    rows = {
        r["state"]: r["timeout_minutes"]
        for r in conn.execute("SELECT * FROM reporting.state_timeouts")
    }
    assert set(rows) == {s.value for s in OrderState}
    assert rows == {s.value: STATE_TIMEOUT_MINUTES.get(s) for s in OrderState}


def test_reporting_reader_sees_views_and_nothing_else(conn: Any, known: dict[str, str]) -> None:
    with conn.transaction():
        conn.execute("SET LOCAL ROLE reporting_reader")
        for view in VIEWS:
            fetch(conn, view)
        for table in ("orders", "carts", "payments", "order_history", "idempotency_keys"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute(f"SELECT 1 FROM public.{table} LIMIT 1")


def test_report_json_parses(db_url: str, known: dict[str, str]) -> None:
    env = {**os.environ, "DATABASE_URL": db_url}
    out = subprocess.run(
        [sys.executable, "-m", "orderflow.app.cli", "report", "--format", "json"],
        env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    reports = json.loads(out)
    assert set(reports) == set(VIEWS)
    assert {r["state"]: r["orders"] for r in reports["order_states"]}["confirmed"] == 2
    table = subprocess.run(
        [sys.executable, "-m", "orderflow.app.cli", "report", "stuck_orders"],
        env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert known["E"] in table and "charge_payment" in table
