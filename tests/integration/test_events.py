"""Order events in Postgres: one CloudEvent per history row, in its transaction,
whatever wrote the row; the feed's cursor never skips a late commit; the purge."""

from __future__ import annotations

import json
import threading
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from orderflow.services import events as event_feed
from orderflow.sql import QUERIES
from orderflow.sql.db import connect
from orderflow.statemachine.definition import TRANSITIONS
from orderflow.statemachine.engine import advance
from tests.support.helpers import place, state_of
from tests.support.sandbox_client import drain

PRIVATE_KEYS = {"shipping_address", "address", "email", "payment_method", "payment_method_id"}


def events_of(conn: psycopg.Connection[Any], order_id: str) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT e.*, h.from_state, h.to_state, h.event AS history_event"
        "  FROM order_events e JOIN order_history h ON h.id = e.history_id"
        " WHERE e.order_id = %s ORDER BY e.sequence",
        (order_id,),
    ).fetchall()


def age_events(conn: Any, by: str, order_ids: list[str] | None = None) -> None:
    """Move events back in time, for the retention tests: past the immutability guard
    (a replica session skips triggers), as no writer of the application can."""
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(
            "UPDATE order_events SET time = time - %s::interval"
            " WHERE %s::text[] IS NULL OR order_id = ANY(%s::text[])",
            (by, order_ids, order_ids),
        )


def _keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


def test_every_history_row_of_a_saga_has_its_event(conn: Any, worker: Any) -> None:
    confirmed = place(conn, [("MUG-01", 2)])
    declined = place(conn, payment_method="pm_card_chargeDeclined")
    drain(worker, conn)
    assert state_of(conn, confirmed.id) == "confirmed"
    assert state_of(conn, declined.id) == "cancelled"
    for order in (confirmed, declined):
        history = conn.execute(
            "SELECT id, from_state, to_state, event FROM order_history"
            " WHERE order_id = %s ORDER BY id",
            (order.id,),
        ).fetchall()
        events = events_of(conn, order.id)
        assert [e["history_id"] for e in events] == [h["id"] for h in history]
        assert [e["sequence"] for e in events] == list(range(1, len(history) + 1))
        assert events[0]["type"] == "orderflow.order.created"
        for event in events[1:]:
            assert event["type"] == f"orderflow.order.{event['to_state']}"
        for event in events:
            data = event["data"]
            assert data["event"] == event["history_event"]
            assert data["sequence"] == event["sequence"]
            assert data["state"] == event["to_state"]
            assert data["order_id"] == order.id and data["currency"] == "EUR"
            assert data["lines"] and data["total_cents"] > 0
            assert not _keys(data) & PRIVATE_KEYS, "an event carries private data"
    shipped = [e for e in events_of(conn, confirmed.id) if e["to_state"] == "confirmed"]
    assert shipped[0]["data"]["tracking_number"], "the tracking number is known once shipped"
    assert events_of(conn, confirmed.id)[0]["data"]["lines"] == [
        {"sku": "MUG-01", "qty": 2, "unit_price_cents": 1200}
    ]
    # the compensation's self-loop writes an event too
    assert "compensation_done" in [e["history_event"] for e in events_of(conn, declined.id)]


@pytest.mark.parametrize(
    "transition",
    [t for t in TRANSITIONS if t.source is not None],
    ids=lambda t: f"{t.source}-{t.event}-{t.dest}",
)
def test_every_transition_of_the_table_emits_its_type(conn: Any, transition: Any) -> None:
    order = place(conn)
    with conn.transaction():
        conn.execute("UPDATE orders SET state = %s WHERE id = %s", (transition.source, order.id))
    before = len(events_of(conn, order.id))
    moved = conn.execute(
        QUERIES["transition_orders"],
        {
            "moves": Jsonb(
                [
                    {
                        "order_id": order.id,
                        "from_state": str(transition.source),
                        "to_state": str(transition.dest),
                        "event": transition.event,
                        "detail": {},
                        "steps": [],
                    }
                ]
            )
        },
    ).fetchone()
    assert moved["moved"] == 1
    events = events_of(conn, order.id)
    assert len(events) == before + 1
    assert events[-1]["type"] == f"orderflow.order.{transition.dest}"
    assert events[-1]["data"]["event"] == transition.event
    assert events[-1]["data"]["previous_state"] == str(transition.source)


def test_any_writer_of_history_writes_the_event_and_a_rollback_takes_both(conn: Any) -> None:
    order = place(conn)
    # an operator's psql, not the engine
    conn.execute(
        "INSERT INTO order_history (order_id, from_state, to_state, event)"
        " VALUES (%s, 'reserved', 'reserved', 'operator_note')",
        (order.id,),
    )
    assert [e["sequence"] for e in events_of(conn, order.id)] == [1, 2]
    with pytest.raises(RuntimeError), conn.transaction():
        advance(conn, order.id, "payment_captured", {"step": "charge_payment"})
        assert len(events_of(conn, order.id)) == 3  # visible inside the transaction
        raise RuntimeError("the commit failed")
    assert state_of(conn, order.id) == "reserved"
    assert len(events_of(conn, order.id)) == 2


def test_an_event_that_cannot_be_written_takes_its_state_change_with_it(conn: Any) -> None:
    """The failpoint between the two writes: the event's insert fails (a trigger that
    raises stands in for a full disk or a bad row), so the transition fails whole."""
    order = place(conn)
    conn.execute(
        "CREATE FUNCTION pg_temp.refuse_event() RETURNS trigger LANGUAGE plpgsql"
        " AS $$ BEGIN RAISE EXCEPTION 'failpoint: the event write fails'; END $$"
    )
    conn.execute(
        "CREATE TRIGGER refuse_event BEFORE INSERT ON order_events"
        " FOR EACH ROW EXECUTE FUNCTION pg_temp.refuse_event()"
    )
    try:
        with pytest.raises(psycopg.errors.RaiseException), conn.transaction():
            advance(conn, order.id, "payment_captured", {"step": "charge_payment"})
    finally:
        conn.execute("DROP TRIGGER refuse_event ON order_events")
    assert state_of(conn, order.id) == "reserved"
    history = conn.execute(
        "SELECT count(*) AS n FROM order_history WHERE order_id = %s", (order.id,)
    ).fetchone()
    assert history["n"] == len(events_of(conn, order.id)) == 1
    advance(conn, order.id, "payment_captured", {"step": "charge_payment"})  # and then it can
    assert state_of(conn, order.id) == "paid" and len(events_of(conn, order.id)) == 2


def test_no_writer_forges_or_rewrites_an_event(conn: Any) -> None:
    order = place(conn)
    (event,) = events_of(conn, order.id)
    forged = (
        "INSERT INTO order_events (id, order_id, sequence, history_id, type, time, data, txid)"
        " VALUES ('01FORGED', %s, 2, %s, 'orderflow.order.paid', now(), '{}', txid_current())"
    )
    with pytest.raises(psycopg.errors.RestrictViolation), conn.transaction():
        conn.execute(forged, (order.id, event["history_id"] + 1000))
    rewrites = (
        "UPDATE order_events SET data = '{}' WHERE order_id = %s",
        "UPDATE order_events SET type = 'orderflow.order.paid' WHERE order_id = %s",
        "UPDATE order_events SET time = now() - interval '1 day' WHERE order_id = %s",
    )
    for rewrite in rewrites:
        with pytest.raises(psycopg.errors.RestrictViolation), conn.transaction():
            conn.execute(rewrite, (order.id,))
    assert [dict(e) for e in events_of(conn, order.id)] == [dict(event)]
    # the relay's mark, and an operator's reset to publish again, are allowed
    conn.execute("UPDATE order_events SET published_at = now() WHERE order_id = %s", (order.id,))
    conn.execute("UPDATE order_events SET published_at = NULL WHERE order_id = %s", (order.id,))
    assert events_of(conn, order.id)[0]["published_at"] is None


def _feed(conn: Any, after: str | None = None, limit: int = 100) -> dict[str, Any]:
    return event_feed.read_feed(conn, after=after, limit=limit)


def test_feed_never_serves_past_a_transaction_still_open(db_url: str, conn: Any) -> None:
    early = place(conn)
    page = _feed(conn)
    assert [e["subject"] for e in page["events"]] == [early.id]
    late_order = place(conn)
    after_late = _feed(conn, after=page["next"])
    assert [e["subject"] for e in after_late["events"]] == [late_order.id]
    # A transaction that writes its event first but commits last.
    with connect(db_url) as slow:
        slow.execute("BEGIN")
        slow.execute(
            "INSERT INTO order_history (order_id, from_state, to_state, event)"
            " VALUES (%s, 'reserved', 'reserved', 'slow_note')",
            (late_order.id,),
        )
        third = place(conn)  # commits while `slow` is open
        held = _feed(conn, after=after_late["next"])
        # the committed third order is held back behind the open transaction
        assert held["events"] == [] and held["next"] == after_late["next"]
        slow.execute("COMMIT")
    rest = _feed(conn, after=held["next"])
    assert [(e["subject"], e["data"]["event"]) for e in rest["events"]] == [
        (late_order.id, "slow_note"),
        (third.id, "place"),
    ]


def test_feed_pages_in_order_and_answers_gone_after_a_purge(conn: Any) -> None:
    orders = [place(conn) for _ in range(5)]
    seen: list[str] = []
    cursors: list[str] = []
    cursor = None
    while True:
        page = _feed(conn, after=cursor, limit=2)
        if not page["events"]:
            break
        seen += [e["subject"] for e in page["events"]]
        cursor = page["next"]
        cursors.append(cursor)
    assert seen == [o.id for o in orders]
    age_events(conn, "10 days", [o.id for o in orders[:3]])
    purged = conn.execute(
        QUERIES["purge_events"], {"hours": 24, "published_only": False, "limit": 100}
    ).fetchone()
    assert purged["purged"] == 3
    # a consumer that had read only the first two missed the third: 410
    with pytest.raises(event_feed.CursorGone):
        _feed(conn, after=cursors[0])
    # one that had read past the purged ones missed nothing
    assert [e["subject"] for e in _feed(conn, after=cursors[1])["events"]] == [orders[4].id]
    assert _feed(conn, after=cursor)["events"] == []
    # from the start: the kept ones
    assert [e["subject"] for e in _feed(conn)["events"]] == [o.id for o in orders[3:]]
    with pytest.raises(event_feed.BadCursor):
        _feed(conn, after="yesterday")


class PurgeAfterTheMark:
    """The feed's connection, with another session's purge committing right after the
    feed has read the purge mark: the race a page must not lose events to."""

    def __init__(self, conn: Any, db_url: str) -> None:
        self.conn, self.db_url = conn, db_url

    def transaction(self) -> Any:
        return self.conn.transaction()

    def execute(self, query: Any, params: Any = None) -> Any:
        result = self.conn.execute(query, params)
        if query == QUERIES["event_feed_purged"]:
            with connect(self.db_url) as other:
                other.execute(QUERIES["purge_events"],
                              {"hours": 24, "published_only": False, "limit": 100})  # fmt: skip
        return result


def test_a_purge_during_a_page_never_skips_events_silently(db_url: str, conn: Any) -> None:
    orders = [place(conn) for _ in range(4)]
    first = _feed(conn, limit=1)
    age_events(conn, "10 days", [o.id for o in orders[1:3]])
    # the page sees the purge (410) or the events it deletes: never neither
    try:
        page = event_feed.read_feed(PurgeAfterTheMark(conn, db_url), after=first["next"], limit=10)  # type: ignore[arg-type]
    except event_feed.CursorGone:
        return
    assert [e["subject"] for e in page["events"]] == [o.id for o in orders[1:]]


def test_an_empty_page_hands_back_a_cursor_that_is_not_gone(conn: Any) -> None:
    place(conn)
    age_events(conn, "10 days")
    conn.execute(QUERIES["purge_events"], {"hours": 24, "published_only": False, "limit": 100})
    empty = _feed(conn)
    assert empty["events"] == []
    assert _feed(conn, after=empty["next"])["events"] == []  # no 410: nothing was missed
    later = place(conn)
    assert [e["subject"] for e in _feed(conn, after=empty["next"])["events"]] == [later.id]


def test_two_unlocked_writers_of_one_orders_history_number_in_turn(db_url: str, conn: Any) -> None:
    """An operator's psql beside another: both notes are kept, numbered one after the other."""
    order = place(conn)
    note = (
        "INSERT INTO order_history (order_id, from_state, to_state, event)"
        " VALUES (%s, 'reserved', 'reserved', %s)"
    )
    errors: list[BaseException] = []
    with connect(db_url) as first, connect(db_url) as second:
        with first.transaction():
            first.execute(note, (order.id, "first_note"))

            def write_second() -> None:
                try:
                    with second.transaction():
                        second.execute(note, (order.id, "second_note"))
                except BaseException as exc:  # reported below
                    errors.append(exc)

            writer = threading.Thread(target=write_second)
            writer.start()
            writer.join(1.0)  # it waits for the first one's lock
            assert writer.is_alive()
        writer.join(10)
    assert errors == []
    events = events_of(conn, order.id)
    assert [(e["sequence"], e["history_event"]) for e in events] == [
        (1, "place"), (2, "first_note"), (3, "second_note"),
    ]  # fmt: skip


def test_published_only_purge_keeps_the_relays_backlog(conn: Any) -> None:
    order = place(conn)
    age_events(conn, "10 days", [order.id])
    purged = conn.execute(
        QUERIES["purge_events"], {"hours": 24, "published_only": True, "limit": 100}
    ).fetchone()
    assert purged["purged"] == 0


def test_envelope_is_cloudevents(conn: Any) -> None:
    order = place(conn)
    [event] = _feed(conn)["events"]
    assert event["specversion"] == "1.0"
    assert event["type"] == "orderflow.order.created"
    assert event["subject"] == order.id
    assert event["source"] == "/orderflow/orders"
    assert len(event["id"]) == 26
    assert event["datacontenttype"] == "application/json"
    assert event["data"]["user_id"]
    json.dumps(event)


def test_the_feed_over_http(client: Any, conn: Any) -> None:
    from tests.support.api_helpers import auth, token

    orders = [place(conn) for _ in range(3)]
    events_token = token(admin=True, scope="events")
    page = client.get("/v1/events?limit=2", headers=auth(events_token))
    assert page.status_code == 200, page.text
    assert [e["subject"] for e in page.json()["events"]] == [o.id for o in orders[:2]]
    rest = client.get(
        f"/v1/events?after={page.json()['next']}", headers=auth(token(admin=True))
    ).json()
    assert [e["subject"] for e in rest["events"]] == [orders[2].id]
    # a customer's token, and a bad cursor or limit, change nothing and say why
    assert client.get("/v1/events", headers=auth(token())).status_code == 401
    hostile = ("limit=%C2%B2", f"limit={'9' * 5000}", "after=1-2%0A", "after=%D9%A3-1")
    for query in ("after=yesterday", "limit=0", "limit=5000", "limit=x", *hostile):
        answer = client.get(f"/v1/events?{query}", headers=auth(events_token))
        assert answer.status_code == 422 and answer.json()["error"], query
    # the events scope opens the feed and nothing else
    cancel = client.post(f"/v1/admin/orders/{orders[0].id}/cancel", headers=auth(events_token))
    assert cancel.status_code == 403
    assert state_of(conn, orders[0].id) == "reserved"
    age_events(conn, "30 days")
    conn.execute(QUERIES["purge_events"], {"hours": 1, "published_only": False, "limit": 100})
    gone = client.get(f"/v1/events?after={page.json()['next']}", headers=auth(events_token))
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "cursor_gone"


def test_doctor_sees_a_state_change_without_its_event(conn: Any) -> None:
    from orderflow.services.doctor import run_checks

    def failing() -> set[str]:
        return {c.name for c in run_checks(conn) if not c.ok}

    place(conn)
    order = place(conn)
    place(conn)
    assert "every state change has its event, every event its state change" not in failing()
    conn.execute("DELETE FROM order_events WHERE order_id = %s", (order.id,))
    assert "every state change has its event, every event its state change" in failing()
