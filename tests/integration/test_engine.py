"""advance(): each event writes exactly its outbox rows, atomically, or nothing."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from orderflow import failpoints
from orderflow.sql import QUERIES
from orderflow.sql.db import connect
from orderflow.statemachine.definition import TRANSITIONS, OrderState
from orderflow.statemachine.engine import advance
from orderflow.statemachine.errors import IllegalTransition, InvalidEventDetail, OrderNotFound
from tests.support.helpers import outbox_steps, place, snapshot, state_of

Ev = tuple[str, dict[str, Any]]

PC: Ev = ("payment_captured", {})
SC: Ev = ("shipment_created", {})
CS: Ev = ("confirmation_sent", {})
RR: Ev = ("return_requested", {"reason": "too big"})
RLC: Ev = ("return_label_created", {})
EXPIRE: Ev = ("reservation_expired", {})
DEAD: Ev = ("step_dead_lettered", {})
REDRIVE: Ev = ("redrive", {})
RETURNED: list[Ev] = [PC, SC, CS, RR, RLC, ("return_received", {})]
PP: Ev = ("payment_pending", {"payment_intent_id": "pi_1", "intent_status": "requires_action"})
FAILED: Ev = ("payment_failed", {})
DISPUTE: Ev = ("dispute_opened", {"dispute_id": "dp_1"})
CANCELLED: list[Ev] = [EXPIRE, ("compensation_done", {"step": "release_inventory"})]
# Capture at shipment: the hold, the customer's and an operator's cancel, the hold's expiry
PA: Ev = ("payment_authorized", {"payment_intent_id": "pi_1", "intent_status": "requires_capture"})
CC: Ev = ("customer_cancelled", {"reason": "customer_cancelled"})
OC: Ev = ("operator_cancelled", {"reason": "operator_cancelled"})
HE: Ev = ("hold_expiring", {"capture_before": "2026-12-09T00:00:00+00:00"})


def done(step: str) -> Ev:
    return ("compensation_done", {"step": step})


# (prefix of events from `reserved`, the event, expected state, expected NEW outbox steps).
# The expectations are written out by hand: they are the oracle, not the table.
CASES: list[tuple[list[Ev], Ev, str, str, list[str]]] = [
    ([], PC, "reserved", "paid", ["ship_order"]),
    (
        [],
        ("payment_failed", {"code": "card_declined"}),
        "reserved",
        "compensating",
        ["release_inventory"],
    ),
    ([], EXPIRE, "reserved", "compensating", ["release_inventory"]),
    ([EXPIRE], PC, "compensating", "compensating", []),
    ([EXPIRE, done("release_inventory")], PC, "cancelled", "compensating", ["refund_payment"]),
    ([EXPIRE, DEAD], PC, "needs_attention", "needs_attention", []),
    ([PC], SC, "paid", "shipped", ["send_confirmation"]),
    ([PC], ("shipment_failed", {}), "paid", "compensating", ["refund_payment"]),
    (
        [PC],
        ("shipment_failed", {"effects_done": ["ship_order"]}),
        "paid",
        "compensating",
        ["cancel_shipment"],
    ),
    ([PC, SC], CS, "shipped", "confirmed", []),
    ([PC, SC, CS], RR, "confirmed", "return_requested", ["create_return_label"]),
    ([PC, SC, CS, RR], RLC, "return_requested", "awaiting_return", []),
    (
        [PC, SC, CS, RR, RLC],
        ("return_received", {}),
        "awaiting_return",
        "returned",
        ["refund_return", "restock_inventory"],
    ),
    (
        [PC, ("shipment_failed", {})],
        done("refund_payment"),
        "compensating",
        "compensating",
        ["release_inventory"],
    ),
    ([("payment_failed", {})], done("release_inventory"), "compensating", "cancelled", []),
    ([EXPIRE, PC], done("release_inventory"), "compensating", "compensating", ["refund_payment"]),
    ([PC, SC], DEAD, "shipped", "needs_attention", []),
    ([PC, SC, CS, RR], DEAD, "return_requested", "needs_attention", []),
    ([*RETURNED], DEAD, "returned", "needs_attention", []),
    ([EXPIRE], DEAD, "compensating", "needs_attention", []),
    # 3-D Secure and bank debits: the intent waits for the customer or the bank
    ([], PP, "reserved", "awaiting_payment", ["await_payment"]),
    ([PP], PC, "awaiting_payment", "paid", ["ship_order"]),
    ([PP], PP, "awaiting_payment", "awaiting_payment", []),
    # the open intent is cancelled (refund_payment) before the stock is released
    ([PP], FAILED, "awaiting_payment", "compensating", ["refund_payment"]),
    ([PP], EXPIRE, "awaiting_payment", "compensating", ["refund_payment"]),
    # an effectful step settling after the order moved on (a compensation runs:
    # what it adds waits for it)
    ([EXPIRE], PP, "compensating", "compensating", []),
    ([EXPIRE], SC, "compensating", "compensating", []),
    # poison answers: dead letters from the forward states, and back
    ([], DEAD, "reserved", "needs_attention", []),
    ([PP], DEAD, "awaiting_payment", "needs_attention", []),
    ([PC], DEAD, "paid", "needs_attention", []),
    ([DEAD], REDRIVE, "needs_attention", "reserved", []),
    ([PP, DEAD], REDRIVE, "needs_attention", "awaiting_payment", []),
    ([PC, DEAD], REDRIVE, "needs_attention", "paid", []),
    # disputes: a settled order goes to an operator, a working one records it
    ([PC, SC, CS], DISPUTE, "confirmed", "needs_attention", []),
    ([PC, SC, CS, RR, RLC], DISPUTE, "awaiting_return", "needs_attention", []),
    ([*RETURNED], DISPUTE, "returned", "needs_attention", []),
    ([*CANCELLED], DISPUTE, "cancelled", "needs_attention", []),
    ([], DISPUTE, "reserved", "reserved", []),
    ([PP], DISPUTE, "awaiting_payment", "awaiting_payment", []),
    ([PC], DISPUTE, "paid", "paid", []),
    ([PC, SC], DISPUTE, "shipped", "shipped", []),
    ([PC, SC, CS, RR], DISPUTE, "return_requested", "return_requested", []),
    ([EXPIRE], DISPUTE, "compensating", "compensating", []),
    ([EXPIRE, DEAD], DISPUTE, "needs_attention", "needs_attention", []),
    ([PC, SC, CS, DISPUTE], REDRIVE, "needs_attention", "confirmed", []),
    ([PC, SC, CS, RR, RLC, DISPUTE], REDRIVE, "needs_attention", "awaiting_return", []),
    ([*CANCELLED, DISPUTE], REDRIVE, "needs_attention", "cancelled", []),
    ([EXPIRE, DEAD, DISPUTE], REDRIVE, "needs_attention", "compensating", []),
    ([PC, SC, DEAD], REDRIVE, "needs_attention", "shipped", []),
    ([PC, SC, CS, RR, DEAD], REDRIVE, "needs_attention", "return_requested", []),
    ([*RETURNED, DEAD], REDRIVE, "needs_attention", "returned", []),
    ([EXPIRE, DEAD], REDRIVE, "needs_attention", "compensating", []),
    # capture at shipment: a hold, then the capture after the shipment exists
    ([], PA, "reserved", "paid", ["ship_order"]),
    ([PP], PA, "awaiting_payment", "paid", ["ship_order"]),
    ([PA], SC, "paid", "shipped", ["capture_payment"]),
    ([PA, SC], PC, "shipped", "shipped", ["send_confirmation"]),
    ([PA, SC], ("capture_failed", {}), "shipped", "compensating", ["cancel_shipment"]),
    ([PA], ("hold_lost", {}), "paid", "compensating", ["refund_payment"]),
    ([PA], HE, "paid", "needs_attention", []),
    # parked while the ship step's call was in flight: the parcel exists, capture it
    ([PA, HE], SC, "needs_attention", "shipped", ["capture_payment"]),
    ([EXPIRE], PA, "compensating", "compensating", []),
    ([*CANCELLED], PA, "cancelled", "compensating", ["refund_payment"]),
    ([EXPIRE, DEAD], PA, "needs_attention", "needs_attention", []),
    # the customer's cancel and an operator's, until the shipment exists
    ([], CC, "reserved", "compensating", ["release_inventory"]),
    ([PP], CC, "awaiting_payment", "compensating", ["refund_payment"]),
    ([PA], CC, "paid", "compensating", ["refund_payment"]),
    ([PA, HE], CC, "needs_attention", "compensating", ["refund_payment"]),
    ([], OC, "reserved", "compensating", ["release_inventory"]),
    ([PP], OC, "awaiting_payment", "compensating", ["refund_payment"]),
    ([PC], OC, "paid", "compensating", ["refund_payment"]),
    ([PA, HE], OC, "needs_attention", "compensating", ["refund_payment"]),
]


@pytest.mark.parametrize(("prefix", "event", "source", "state", "new_steps"), CASES)
def test_event_writes_exactly_its_outbox_rows(
    conn: psycopg.Connection[Any],
    prefix: list[Ev],
    event: Ev,
    source: str,
    state: str,
    new_steps: list[str],
) -> None:
    order = place(conn)
    for name, detail in prefix:
        advance(conn, order.id, name, detail)
    before = snapshot(conn, order.id)
    assert before["state"]["state"] == source

    outcome = advance(conn, order.id, event[0], event[1])

    after = snapshot(conn, order.id)
    assert after["state"]["state"] == state == outcome.dest.value
    assert [r["step"] for r in after["outbox"][len(before["outbox"]) :]] == new_steps
    assert after["outbox"][: len(before["outbox"])] == before["outbox"]
    assert len(after["history"]) == len(before["history"]) + 1
    last = after["history"][-1]
    assert (last["from_state"], last["to_state"], last["event"]) == (source, state, event[0])
    assert last["detail"] == event[1]
    for row in after["outbox"]:
        assert row["idempotency_key"] == f"{order.id}:{row['step']}"


def test_cases_cover_every_transition_of_the_table() -> None:
    """A new row in the table must come with a case above."""
    covered = {(event[0], source, dest) for _, event, source, dest, _ in CASES}
    # step_settled needs an order held by an unsettled step: its own tests build one
    covered |= {
        ("step_settled", "compensating", "compensating"),
        ("step_settled", "compensating", "cancelled"),
    }
    table = {(t.event, t.source.value, t.dest.value) for t in TRANSITIONS if t.source is not None}
    assert table == covered, (table - covered, covered - table)


def test_illegal_event_raises_and_writes_nothing(conn: psycopg.Connection[Any]) -> None:
    order = place(conn)
    before = snapshot(conn, order.id)
    for event in (
        "confirmation_sent",
        "shipment_created",
        "return_received",
        "redrive",
        "nonsense",
    ):
        with pytest.raises(IllegalTransition):
            advance(conn, order.id, event)
    assert snapshot(conn, order.id) == before


def test_compensation_that_is_not_owed_is_refused(conn: psycopg.Connection[Any]) -> None:
    order = place(conn)
    advance(conn, order.id, "payment_failed")
    before = snapshot(conn, order.id)
    for detail in ({"step": "refund_payment"}, {"step": "cancel_shipment"}, {}):
        with pytest.raises(InvalidEventDetail):
            advance(conn, order.id, "compensation_done", detail)
    assert snapshot(conn, order.id) == before


def test_unknown_order(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(OrderNotFound):
        advance(conn, "01NOSUCHORDER0000000000000", "payment_captured")


def test_failure_after_the_state_update_leaves_nothing(conn: psycopg.Connection[Any]) -> None:
    order = place(conn)
    before = snapshot(conn, order.id)
    with failpoints.armed("advance.after_write"), pytest.raises(failpoints.FailpointHit):
        advance(conn, order.id, "payment_captured")
    assert snapshot(conn, order.id) == before
    # and the order still moves normally afterwards
    advance(conn, order.id, "payment_captured")
    assert outbox_steps(conn, order.id) == ["charge_payment", "ship_order"]


def test_caller_transaction_rollback_undoes_the_event(conn: psycopg.Connection[Any]) -> None:
    """The worker joins advance() to its own transaction; if that fails, nothing stays."""
    order = place(conn)
    before = snapshot(conn, order.id)
    with pytest.raises(RuntimeError), conn.transaction():
        advance(conn, order.id, "payment_captured")
        assert state_of(conn, order.id) == "paid"  # visible inside the transaction
        raise RuntimeError("the worker's commit failed")
    assert snapshot(conn, order.id) == before


def test_guarded_update_refuses_a_stale_source_state(conn: psycopg.Connection[Any]) -> None:
    """The SQL itself, not only Python, refuses to move an order from a state it is not in."""
    order = place(conn)
    before = snapshot(conn, order.id)
    row = conn.execute(
        QUERIES["transition_orders"],
        {
            "moves": Jsonb(
                [
                    {
                        "order_id": order.id,
                        "from_state": "paid",  # stale: the order is `reserved`
                        "to_state": "shipped",
                        "event": "shipment_created",
                        "detail": {},
                        "steps": ["send_confirmation"],
                    }
                ]
            )
        },
    ).fetchone()
    assert row is not None and row["moved"] == 0 and row["emitted"] == 0
    assert snapshot(conn, order.id) == before


def test_notify_is_sent_on_commit_only(db_url: str, conn: psycopg.Connection[Any]) -> None:
    with connect(db_url) as listener:
        listener.execute("LISTEN orderflow_outbox")
        order = place(conn)
        assert [n.channel for n in listener.notifies(timeout=2, stop_after=1)] == [
            "orderflow_outbox"
        ]
        with pytest.raises(RuntimeError), conn.transaction():
            advance(conn, order.id, "payment_captured")
            raise RuntimeError
        assert list(listener.notifies(timeout=0.3)) == []
        advance(conn, order.id, "payment_captured")
        assert len(list(listener.notifies(timeout=2, stop_after=1))) == 1


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("payment_captured", "payment_captured"),
        ("payment_captured", "reservation_expired"),
        ("reservation_expired", "payment_captured"),
        ("payment_failed", "payment_captured"),
    ],
)
def test_two_connections_racing_on_one_order(
    db_url: str, conn: psycopg.Connection[Any], first: str, second: str
) -> None:
    """The first holds the order's lock; the second waits, then gets the named error."""
    order = place(conn)
    second_started = threading.Event()
    second_result: list[object] = []

    def fire_second() -> None:
        with connect(db_url) as other:
            second_started.set()
            try:
                second_result.append(advance(other, order.id, second))
            except IllegalTransition as exc:
                second_result.append(exc)

    with connect(db_url) as one, one.transaction():
        advance(one, order.id, first)
        thread = threading.Thread(target=fire_second)
        thread.start()
        second_started.wait(5)
        # The second must be blocked on our row lock, not finished.
        _wait_for_lock_waiter(conn, order.id)
        assert second_result == []
    thread.join(10)

    history = snapshot(conn, order.id)["history"]
    if first == "reservation_expired" or first == "payment_failed":
        # a capture after expiry is recorded in compensating, never lost
        assert [h["event"] for h in history] == ["place", first, second]
        assert history[-1]["to_state"] == "compensating"
        assert not isinstance(second_result[0], IllegalTransition)
    else:
        assert isinstance(second_result[0], IllegalTransition)
        assert [h["event"] for h in history] == ["place", first]
    _assert_path(history)


def _wait_for_lock_waiter(conn: psycopg.Connection[Any], order_id: str) -> None:
    for _ in range(200):
        row = conn.execute(
            "SELECT count(*) AS n FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
        ).fetchone()
        if row and row["n"] >= 1:
            return
        threading.Event().wait(0.02)
    raise AssertionError("the second connection never waited for the order's lock")


def _assert_path(history: list[dict[str, Any]]) -> None:
    edges = {(t.source.value if t.source else None, t.event, t.dest.value) for t in TRANSITIONS}
    previous = None
    for h in history:
        assert h["from_state"] == previous
        assert (h["from_state"], h["event"], h["to_state"]) in edges
        previous = h["to_state"]


def test_many_connections_free_for_all(db_url: str, conn: psycopg.Connection[Any]) -> None:
    """Eight threads fire racing events; history stays a path and state matches it."""
    orders = [place(conn).id for _ in range(10)]
    events = ["payment_captured", "reservation_expired", "payment_failed", "shipment_created"]
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        with connect(db_url) as c:
            barrier.wait()
            for n, order_id in enumerate(orders):
                try:
                    advance(c, order_id, events[(i + n) % len(events)])
                except IllegalTransition:
                    pass
                except BaseException as exc:  # pragma: no cover - reported below
                    errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    for order_id in orders:
        snap = snapshot(conn, order_id)
        _assert_path(snap["history"])
        assert snap["history"][-1]["to_state"] == snap["state"]["state"]


def _charge_in_flight(conn: psycopg.Connection[Any], order_id: str) -> None:
    """A worker has claimed the order's charge: its outcome is unknown until it commits."""
    conn.execute(
        "UPDATE outbox SET status = 'in_flight', lease_owner = 'w', attempts = 1,"
        " lease_until = now() + interval '1 minute'"
        " WHERE order_id = %s AND step = 'charge_payment'",
        (order_id,),
    )


def _charge_done(conn: psycopg.Connection[Any], order_id: str) -> None:
    conn.execute(
        "UPDATE outbox SET status = 'done', done_at = now(), lease_owner = NULL,"
        " lease_until = NULL WHERE order_id = %s AND step = 'charge_payment'",
        (order_id,),
    )


def test_no_compensation_starts_while_a_charge_may_have_happened(
    conn: psycopg.Connection[Any],
) -> None:
    """The reservation expires while the charge's call is in flight: nothing is
    released (the money may have been taken) until the charge reports back."""
    order = place(conn)
    _charge_in_flight(conn, order.id)
    advance(conn, order.id, "reservation_expired")
    assert state_of(conn, order.id) == "compensating"
    assert outbox_steps(conn, order.id) == ["charge_payment"]  # nothing compensates yet
    # the same for a row whose answer was lost (pending again, marked unsettled)
    conn.execute(
        "UPDATE outbox SET status = 'pending', lease_owner = NULL, lease_until = NULL,"
        " payload = '{\"unsettled\": true}' WHERE order_id = %s",
        (order.id,),
    )
    advance(conn, order.id, "dispute_opened", {})  # any event: still nothing emitted
    assert outbox_steps(conn, order.id) == ["charge_payment"]
    # the charge settles: it did take the money; the refund runs first, then the release
    _charge_done(conn, order.id)
    advance(conn, order.id, "payment_captured", {"step": "charge_payment"})
    assert outbox_steps(conn, order.id) == ["charge_payment", "refund_payment"]
    advance(conn, order.id, "compensation_done", {"step": "refund_payment"})
    assert outbox_steps(conn, order.id)[-1] == "release_inventory"
    advance(conn, order.id, "compensation_done", {"step": "release_inventory"})
    assert state_of(conn, order.id) == "cancelled"


def test_a_charge_that_settles_as_nothing_releases_the_stock(
    conn: psycopg.Connection[Any],
) -> None:
    order = place(conn)
    _charge_in_flight(conn, order.id)
    advance(conn, order.id, "reservation_expired")
    _charge_done(conn, order.id)
    advance(conn, order.id, "step_settled", {"step": "charge_payment"})
    assert outbox_steps(conn, order.id) == ["charge_payment", "release_inventory"]
    # nothing waits any more: a second "nothing new" has nothing to start and is refused
    with pytest.raises(IllegalTransition):
        advance(conn, order.id, "step_settled", {"step": "charge_payment"})


def test_the_table_has_its_step_settled_row() -> None:
    """step_settled is covered above (it needs a held order, which CASES cannot build)."""
    rows = [t for t in TRANSITIONS if t.event == "step_settled"]
    assert [(r.source, r.dest, r.conditions) for r in rows] == [
        (OrderState.COMPENSATING, OrderState.COMPENSATING, ("a_compensation_may_start",)),
        (OrderState.COMPENSATING, OrderState.CANCELLED, ("no_work_remains",)),
    ]


def test_the_last_compensation_done_while_the_charge_was_in_flight(
    conn: psycopg.Connection[Any],
) -> None:
    """The stock was released while a retry of the charge was in flight: the order
    waits in compensating (that charge might take money), and when the charge
    settles with nothing it is cancelled, not left with nothing to run."""
    order = place(conn)
    advance(conn, order.id, "reservation_expired")  # the charge row pending: no hold
    _charge_in_flight(conn, order.id)  # a retry is claimed meanwhile
    advance(conn, order.id, "compensation_done", {"step": "release_inventory"})
    assert state_of(conn, order.id) == "compensating"  # not cancelled: the charge is unknown
    _charge_done(conn, order.id)
    advance(conn, order.id, "step_settled", {"step": "charge_payment"})
    assert state_of(conn, order.id) == "cancelled"


def test_a_capture_already_recorded_releases_the_hold_instead_of_failing(
    conn: psycopg.Connection[Any],
) -> None:
    """A reconciliation records the capture while the charge is still unsettled; the
    charge then reports the same capture: engine.settle turns it into step_settled."""
    from orderflow.statemachine.engine import settle

    order = place(conn)
    _charge_in_flight(conn, order.id)
    advance(conn, order.id, "reservation_expired")
    advance(conn, order.id, "payment_captured", {"step": "reconcile"})  # held: nothing emitted
    assert outbox_steps(conn, order.id) == ["charge_payment"]
    _charge_done(conn, order.id)
    outcome = settle(conn, order.id, "payment_captured", {"step": "charge_payment"})
    assert outcome is not None and outcome.emits == ("refund_payment",)
    assert snapshot(conn, order.id)["history"][-1]["event"] == "step_settled"


def test_an_event_waiting_for_the_lock_decides_on_fresh_history(
    db_url: str, conn: psycopg.Connection[Any]
) -> None:
    """The capture of a cancelled order waits for the lock while the last
    compensation commits; it must see that compensation (a statement that waited
    for a lock still reads the snapshot it started with) and owe the refund."""
    order = place(conn)
    advance(conn, order.id, "reservation_expired")
    result: list[object] = []

    def capture() -> None:
        with connect(db_url) as other:
            result.append(advance(other, order.id, "payment_captured", {}))

    with connect(db_url) as one, one.transaction():
        advance(one, order.id, "compensation_done", {"step": "release_inventory"})
        thread = threading.Thread(target=capture)
        thread.start()
        _wait_for_lock_waiter(conn, order.id)
    thread.join(10)
    assert state_of(conn, order.id) == "compensating"
    assert outbox_steps(conn, order.id)[-1] == "refund_payment"  # not stuck with nothing owed
