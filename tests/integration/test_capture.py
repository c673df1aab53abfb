"""Capture at shipment (ORDERFLOW_CAPTURE=at_shipment, the default) and the
customer's cancel before shipment.

Real worker code, real Postgres, the sandbox over HTTP.  Money is counted at the
sandbox: `authorization` is the hold, `authorization_release` its release, and
`charge` money taken (at capture), so a count of charges means what it always
meant.  Every test ends with the doctor's invariants."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psycopg
import pytest
import stripe

from orderflow.outbox_worker.runner import Worker
from orderflow.services.doctor import run_checks
from orderflow.services.service import NotCancellable, cancel_order
from orderflow.sql.db import connect
from tests.integration.test_payments import (
    WEBHOOK_SECRET,
    _available,
    _history,
    _intent_id,
    _wait_state,
    run_until,
    webhook_api,  # noqa: F401  (a fixture)
)
from tests.support.api_helpers import auth, order_headers, token
from tests.support.helpers import new_worker, place
from tests.support.sandbox_client import check_invariants, drain, states

THREE_DS = "pm_card_authenticationRequired"


def _kinds(effects: list[dict[str, Any]]) -> list[str]:
    return [e["kind"] for e in effects]


@pytest.fixture()
def immediate_worker(db_url: str, providers: Any) -> Iterator[Worker]:
    w = new_worker(db_url, providers, "immediate")
    yield w
    w.close()


def _payment(client: Any, user: uuid.UUID, order_id: str) -> dict[str, Any]:
    answer = client.get(f"/v1/orders/{order_id}", headers=auth(token(user)))
    assert answer.status_code == 200, answer.text
    return dict(answer.json()["payment"])


# ---------------------------------------------------------------- at_shipment


def test_the_hold_is_placed_at_checkout_and_captured_after_the_shipment(
    conn: Any, worker: Worker, sandbox: Any, client: Any
) -> None:
    user = uuid.uuid4()
    order = place(conn, user_id=user)
    run_until(worker, conn, order.id, "paid")
    assert _kinds(sandbox.effects(order_id=order.id)) == ["authorization"]
    held = _payment(client, user, order.id)
    assert (held["funds"], held["held_cents"], held["captured_cents"]) == (
        "held",
        order.total_cents,
        0,
    )
    assert held["status"] == "requires_capture" and held["capture_before"]
    drain(worker, conn)
    assert states(conn)[order.id] == "confirmed"
    # the hold, the parcel, then the money, then the e-mail: in that order
    effects = sandbox.effects(order_id=order.id)
    assert _kinds(effects) == ["authorization", "shipment", "charge", "email"]
    charge = effects[2]
    assert charge["amount"] == order.total_cents
    assert charge["idempotency_key"] == f"{order.id}:capture_payment"
    captured = _payment(client, user, order.id)
    assert (captured["funds"], captured["held_cents"], captured["captured_cents"]) == (
        "captured",
        0,
        order.total_cents,
    )
    assert _history(conn, order.id) == [
        "place",
        "payment_authorized",
        "shipment_created",
        "payment_captured",
        "confirmation_sent",
    ]
    check_invariants(conn, sandbox.effects())


def test_a_declined_card_holds_nothing(conn: Any, worker: Worker, sandbox: Any) -> None:
    before = _available(conn, "MUG-01")
    order = place(conn, payment_method="pm_card_chargeDeclined")
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    assert sandbox.effects(order_id=order.id) == []
    assert _available(conn, "MUG-01") == before
    check_invariants(conn, sandbox.effects())


def test_a_refused_parcel_releases_the_hold_and_refunds_nothing(
    conn: Any, worker: Worker, sandbox: Any, client: Any
) -> None:
    sandbox.faults({"endpoint": "shipments.create", "mode": "error", "status": 422})
    before = _available(conn, "MUG-01")
    user = uuid.uuid4()
    order = place(conn, user_id=user)
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    assert _kinds(sandbox.effects(order_id=order.id)) == ["authorization", "authorization_release"]
    assert _available(conn, "MUG-01") == before
    assert _payment(client, user, order.id)["funds"] == "released"
    refunds = conn.execute(
        "SELECT count(*) AS n FROM payments WHERE order_id = %s AND kind = 'refund'", (order.id,)
    ).fetchone()
    assert refunds["n"] == 0
    check_invariants(conn, sandbox.effects())


@pytest.mark.parametrize("cause", ["card", "hold_expired"])
def test_a_failed_capture_cancels_the_shipment_and_takes_no_money(
    cause: str, conn: Any, worker: Worker, sandbox: Any
) -> None:
    before = _available(conn, "MUG-01")
    if cause == "card":
        sandbox.faults({"endpoint": "payment_intents.capture", "mode": "error", "status": 402})
        order = place(conn)
    else:
        # The carrier is down for a week: the hold lapses at Stripe before the parcel ships.
        sandbox.faults({"endpoint": "shipments.create", "mode": "error", "status": 503, "count": 1})
        order = place(conn)
        run_until(worker, conn, order.id, "paid")
        worker.run_once()  # the carrier's 503
        sandbox.advance_clock(8 * 24 * 3600)
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    kinds = _kinds(sandbox.effects(order_id=order.id))
    assert "charge" not in kinds and "refund" not in kinds
    assert kinds.count("shipment") == kinds.count("shipment_cancel") == 1
    assert kinds.count("authorization") == kinds.count("authorization_release") == 1
    assert _available(conn, "MUG-01") == before
    history = _history(conn, order.id)
    assert "capture_failed" in history
    done = conn.execute(
        "SELECT detail ->> 'step' AS step FROM order_history"
        " WHERE order_id = %s AND event = 'compensation_done' ORDER BY id",
        (order.id,),
    ).fetchall()
    assert [r["step"] for r in done] == ["cancel_shipment", "refund_payment", "release_inventory"]
    check_invariants(conn, sandbox.effects())


def test_a_hold_near_its_expiry_is_never_left_to_lapse(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    # Holds that must be captured within the hour: inside the 24 h margin.
    sandbox.config(hold_s=3600)
    # Not shipped yet (the carrier is down): an operator decides, before it lapses.
    sandbox.faults({"endpoint": "shipments.create", "mode": "error", "status": 503})
    stuck = place(conn)
    run_until(worker, conn, stuck.id, "needs_attention")
    last = conn.execute(
        "SELECT event, from_state, detail FROM order_history WHERE order_id = %s"
        " ORDER BY id DESC LIMIT 1",
        (stuck.id,),
    ).fetchone()
    assert (last["event"], last["from_state"]) == ("hold_expiring", "paid")
    assert last["detail"]["capture_before"]
    sandbox.faults()
    for _ in range(3):  # its rows wait for the person, as the order does
        worker.run_once()
    assert states(conn)[stuck.id] == "needs_attention"
    # ... the operator cancels it: the hold is released, never left to lapse.
    assert cancel_order(conn, order_id=stuck.id, user_id=None)["state"] == "compensating"
    drain(worker, conn)
    assert states(conn)[stuck.id] == "cancelled"
    assert _kinds(sandbox.effects(order_id=stuck.id)) == ["authorization", "authorization_release"]

    # Shipped, its capture backing off, its hold placed days ago: the capture is
    # made due at once.
    sandbox.config(hold_s=7 * 24 * 3600)
    shipped = place(conn)
    run_until(worker, conn, shipped.id, "shipped")
    conn.execute(
        "UPDATE payment_intents SET capture_before = now() + interval '1 hour' WHERE order_id = %s",
        (shipped.id,),
    )
    conn.execute(
        "UPDATE outbox SET available_at = now() + interval '1 hour'"
        " WHERE order_id = %s AND step = 'capture_payment' AND status = 'pending'",
        (shipped.id,),
    )
    assert worker.act_on_expiring_holds() == 1
    due = conn.execute(
        "SELECT available_at <= now() AS due FROM outbox"
        " WHERE order_id = %s AND step = 'capture_payment'",
        (shipped.id,),
    ).fetchone()
    assert due["due"]
    drain(worker, conn)
    assert states(conn)[shipped.id] == "confirmed"
    assert _kinds(sandbox.effects(order_id=shipped.id)).count("charge") == 1
    check_invariants(conn, sandbox.effects())


def test_a_parcel_made_while_its_order_was_parked_for_its_hold_is_captured(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    """The sweep parks a paid order whose hold nears expiry while its ship call is in
    flight: the parcel the carrier made is recorded, and the hold captured at once."""
    # slow, but inside the provider timeout (1 s here)
    sandbox.faults({"endpoint": "shipments.create", "mode": "latency", "latency_ms": 600})
    order = place(conn)
    run_until(worker, conn, order.id, "paid")
    shipper = threading.Thread(target=worker.run_once)
    shipper.start()
    deadline = time.monotonic() + 10
    while not conn.execute(
        "SELECT 1 FROM outbox WHERE order_id = %s AND step = 'ship_order' AND status = 'in_flight'",
        (order.id,),
    ).fetchone():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    conn.execute(
        "UPDATE payment_intents SET capture_before = now() + interval '1 hour' WHERE order_id = %s",
        (order.id,),
    )
    assert worker.act_on_expiring_holds() == 1
    assert states(conn)[order.id] == "needs_attention"
    shipper.join()
    assert states(conn)[order.id] == "shipped"
    drain(worker, conn)
    assert states(conn)[order.id] == "confirmed"
    assert _kinds(sandbox.effects(order_id=order.id)) == [
        "authorization",
        "shipment",
        "charge",
        "email",
    ]
    assert _history(conn, order.id)[1:4] == [
        "payment_authorized",
        "hold_expiring",
        "shipment_created",
    ]
    check_invariants(conn, sandbox.effects())


def test_a_stored_5xx_after_the_capture_is_found_not_repeated(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    sandbox.faults(
        {"endpoint": "payment_intents.capture", "mode": "error_after_effect", "status": 500}
    )
    order = place(conn)
    drain(worker, conn)
    assert sandbox.injected().get("error_after_effect") == 1
    assert states(conn)[order.id] == "confirmed"
    kinds = _kinds(sandbox.effects(order_id=order.id))
    assert kinds == ["authorization", "shipment", "charge", "email"]
    check_invariants(conn, sandbox.effects())


def test_a_stripe_outage_at_capture_never_cancels_the_parcel(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    """Twelve captures answered 500 (nothing captured, the hold still there): more
    than any attempt limit.  The capture waits it out; the parcel stays shipped."""
    sandbox.faults(
        {"endpoint": "payment_intents.capture", "mode": "error", "status": 500, "count": 12}
    )
    order = place(conn)
    drain(worker, conn, timeout_s=60)
    assert sandbox.injected().get("error") == 12
    assert states(conn)[order.id] == "confirmed"
    kinds = _kinds(sandbox.effects(order_id=order.id))
    assert kinds == ["authorization", "shipment", "charge", "email"]
    check_invariants(conn, sandbox.effects())


def test_a_parked_order_keeps_an_unknown_shipment_unknown(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    """The carrier's answer is lost (the label may exist); the order is parked for its
    hold before the step asks again.  Waiting with the operator must not forget that
    the outcome is unknown: the cancel then finds the label and cancels it."""
    sandbox.faults(
        {"endpoint": "shipments.create", "mode": "timeout_after_success", "hang_s": 1.5,
         "count": 1},
    )  # fmt: skip
    order = place(conn)
    run_until(worker, conn, order.id, "paid")
    worker.run_once()  # the label is bought, the answer lost: unknown
    conn.execute(
        "UPDATE payment_intents SET capture_before = now() + interval '1 hour' WHERE order_id = %s",
        (order.id,),
    )
    conn.execute("UPDATE outbox SET available_at = now() WHERE order_id = %s", (order.id,))
    worker.run_once()  # parked for its hold; the ship row waits with it
    assert states(conn)[order.id] == "needs_attention"
    row = conn.execute(
        "SELECT payload FROM outbox WHERE order_id = %s AND step = 'ship_order'", (order.id,)
    ).fetchone()
    assert row["payload"]["unsettled"] is True
    cancel_order(conn, order_id=order.id, user_id=None)
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    kinds = _kinds(sandbox.effects(order_id=order.id))
    assert kinds.count("shipment") == kinds.count("shipment_cancel") == 1
    assert "charge" not in kinds
    check_invariants(conn, sandbox.effects())


# ---------------------------------------------------------------- immediate


def test_immediate_capture_takes_the_money_at_confirmation(
    conn: Any, immediate_worker: Worker, sandbox: Any
) -> None:
    order = place(conn)
    drain(immediate_worker, conn)
    assert states(conn)[order.id] == "confirmed"
    assert _kinds(sandbox.effects(order_id=order.id)) == ["charge", "shipment", "email"]
    assert _history(conn, order.id) == [
        "place",
        "payment_captured",
        "shipment_created",
        "confirmation_sent",
    ]
    steps = conn.execute(
        "SELECT step FROM outbox WHERE order_id = %s ORDER BY id", (order.id,)
    ).fetchall()
    assert [r["step"] for r in steps] == ["charge_payment", "ship_order", "send_confirmation"]
    check_invariants(conn, sandbox.effects())


# ---------------------------------------------------------------- the customer's cancel


@pytest.mark.parametrize(
    ("where", "capture", "method", "effects"),
    [
        ("reserved", "at_shipment", "pm_card_visa", []),
        # 3-D Secure waiting for the customer: the intent is cancelled, nothing was held
        ("awaiting_payment", "at_shipment", THREE_DS, []),
        ("paid", "at_shipment", "pm_card_visa", ["authorization", "authorization_release"]),
        ("paid", "immediate", "pm_card_visa", ["charge", "refund"]),
    ],
    ids=["reserved", "awaiting_payment", "paid-held", "paid-captured"],
)
def test_a_cancel_before_shipment_undoes_what_happened(
    where: str,
    capture: str,
    method: str,
    effects: list[str],
    conn: Any,
    worker: Worker,  # with the case's capture policy (conftest)
    sandbox: Any,
    client: Any,
) -> None:
    user = uuid.uuid4()
    before = _available(conn, "MUG-01")
    order = place(conn, user_id=user, payment_method=method)
    if where != "reserved":
        run_until(worker, conn, order.id, where)
    headers = order_headers(token(user), "cancel-1")
    answer = client.post(f"/v1/orders/{order.id}/cancel", headers=headers)
    assert answer.status_code == 202, answer.text
    assert (answer.json()["id"], answer.json()["state"]) == (order.id, "compensating")
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    assert _kinds(sandbox.effects(order_id=order.id)) == effects
    assert _available(conn, "MUG-01") == before
    entered = conn.execute(
        "SELECT from_state, detail FROM order_history WHERE order_id = %s"
        " AND event = 'customer_cancelled'",
        (order.id,),
    ).fetchall()
    assert [(r["from_state"], r["detail"]["reason"]) for r in entered] == [
        (where, "customer_cancelled")
    ]
    # the same key again: the first answer, and nothing more happens
    again = client.post(f"/v1/orders/{order.id}/cancel", headers=headers)
    assert (again.status_code, again.json()) == (202, answer.json())
    assert again.headers.get("Idempotent-Replayed") == "true"
    # someone else's order does not exist for them
    other = client.post(f"/v1/orders/{order.id}/cancel", headers=order_headers(token()))
    assert other.status_code == 404
    check_invariants(conn, sandbox.effects())


@pytest.mark.parametrize("state", ["shipped", "confirmed"])
def test_no_cancel_once_the_shipment_exists(
    state: str, conn: Any, worker: Worker, sandbox: Any, client: Any
) -> None:
    user = uuid.uuid4()
    order = place(conn, user_id=user)
    run_until(worker, conn, order.id, state)
    seen = sandbox.effects(order_id=order.id)
    answer = client.post(f"/v1/orders/{order.id}/cancel", headers=order_headers(token(user)))
    assert answer.status_code == 409, answer.text
    error = answer.json()["error"]
    assert error["code"] == "not_cancellable"
    assert "return" in error["message"] and error["details"]["state"] == state
    assert states(conn)[order.id] == state
    assert sandbox.effects(order_id=order.id) == seen
    # the operator's cancel refuses too
    with pytest.raises(NotCancellable):
        cancel_order(conn, order_id=order.id, user_id=None)
    drain(worker, conn)
    assert states(conn)[order.id] == "confirmed"
    check_invariants(conn, sandbox.effects())


def test_thirty_concurrent_cancels_with_one_key_undo_once(
    conn: Any, worker: Worker, sandbox: Any, live_server: str
) -> None:
    user = uuid.uuid4()
    order = place(conn, user_id=user)
    run_until(worker, conn, order.id, "paid")
    headers = order_headers(token(user), "one-key")
    url = f"{live_server}/v1/orders/{order.id}/cancel"
    barrier = threading.Barrier(30)

    def cancel(_: int) -> httpx.Response:
        barrier.wait()
        return httpx.post(url, headers=headers, timeout=30)

    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(cancel, range(30)))
    accepted = [a for a in answers if a.status_code == 202]
    assert accepted, [a.text for a in answers]
    assert all(a.json() == accepted[0].json() for a in accepted)
    busy = [a for a in answers if a.status_code != 202]
    assert all(
        a.status_code == 409 and a.json()["error"]["code"] == "idempotency_key_in_use" for a in busy
    ), [a.text for a in busy]
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    assert _kinds(sandbox.effects(order_id=order.id)) == ["authorization", "authorization_release"]
    assert _history(conn, order.id).count("customer_cancelled") == 1
    check_invariants(conn, sandbox.effects())


def test_a_cancel_racing_the_ship_step_never_ships_and_releases(
    db_url: str, conn: Any, worker: Worker, sandbox: Any
) -> None:
    """The order's row lock and the guarded update let exactly one win; a shipment
    the carrier created meanwhile is cancelled there before anything else."""
    sandbox.faults({"endpoint": "shipments.create", "mode": "latency", "latency_ms": 40})
    rng = random.Random(17)
    outcomes: dict[str, str] = {}
    for _ in range(12):
        user = uuid.uuid4()
        order = place(conn, user_id=user)
        run_until(worker, conn, order.id, "paid")
        shipper = threading.Thread(target=worker.run_once)
        shipper.start()
        time.sleep(rng.uniform(0, 0.08))
        with connect(db_url) as other:
            try:
                cancel_order(other, order_id=order.id, user_id=user)
                outcomes[order.id] = "cancel won"
            except NotCancellable:
                outcomes[order.id] = "ship won"
        shipper.join()
        drain(worker, conn)
        final = states(conn)[order.id]
        assert final == ("cancelled" if outcomes[order.id] == "cancel won" else "confirmed")
        kinds = _kinds(sandbox.effects(order_id=order.id))
        if final == "cancelled":
            # never shipped-and-released: every parcel the carrier made is cancelled
            assert kinds.count("shipment") == kinds.count("shipment_cancel")
            assert "charge" not in kinds
            assert kinds.count("authorization_release") == 1
        else:
            assert kinds == ["authorization", "shipment", "charge", "email"]
    assert set(outcomes.values()) == {"cancel won", "ship won"}, outcomes
    check_invariants(conn, sandbox.effects())


# ---------------------------------------------------------------- webhooks


def test_webhooks_move_a_hold_and_undo_an_order_whose_hold_was_released(
    conn: Any,
    worker: Worker,
    sandbox: Any,
    webhook_api: str,  # noqa: F811
) -> None:
    sandbox.config(webhook_url=f"{webhook_api}/v1/webhooks/stripe", webhook_secret=WEBHOOK_SECRET)
    # 3-D Secure, then held: payment_intent.amount_capturable_updated moves it to paid
    order = place(conn, payment_method=THREE_DS)
    run_until(worker, conn, order.id, "awaiting_payment")
    sandbox.faults({"endpoint": "shipments.create", "mode": "error", "status": 503})
    assert sandbox.authenticate(_intent_id(conn, order.id)).status_code in (200, 303)
    _wait_state(conn, order.id, "paid")  # the worker did not run
    applied = conn.execute(
        "SELECT outcome FROM stripe_events WHERE type = 'payment_intent.amount_capturable_updated'"
    ).fetchall()
    assert [r["outcome"] for r in applied] == ["applied: payment_authorized"]
    # Someone releases the hold in Stripe's dashboard before the parcel ships.
    client = stripe.StripeClient("sk_test_x", base_addresses={"api": sandbox.url})
    client.v1.payment_intents.cancel(_intent_id(conn, order.id))
    _wait_state(conn, order.id, "compensating")
    sandbox.faults()
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    assert "hold_lost" in _history(conn, order.id)
    kinds = _kinds(sandbox.effects(order_id=order.id))
    assert kinds == ["authorization", "authorization_release"]
    check_invariants(conn, sandbox.effects())


# ---------------------------------------------------------------- the doctor


def test_the_doctor_finds_holds_left_on_cancelled_and_confirmed_orders(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    confirmed = place(conn)
    drain(worker, conn)
    sandbox.faults({"endpoint": "shipments.create", "mode": "error", "status": 422, "count": 1})
    cancelled = place(conn)
    drain(worker, conn)
    assert states(conn)[confirmed.id] == "confirmed"
    assert states(conn)[cancelled.id] == "cancelled"

    def failing() -> set[str]:
        return {c.name for c in run_checks(conn) if not c.ok}

    assert failing() == set()
    with conn.transaction():
        conn.execute(
            "UPDATE payment_intents SET status = 'requires_capture' WHERE order_id = %s",
            (confirmed.id,),
        )
        assert failing() == {"no confirmed order has an uncaptured hold"}
        raise psycopg.Rollback()
    with conn.transaction():
        conn.execute(
            "UPDATE payment_intents SET status = 'requires_capture' WHERE order_id = %s",
            (cancelled.id,),
        )
        assert failing() == {"no cancelled order holds uncaptured funds"}
        raise psycopg.Rollback()
    # ... and counted at the provider: a hold never released on a cancelled order
    effects = [e for e in sandbox.effects() if e["kind"] != "authorization_release"]
    names = {c.name for c in run_checks(conn, effects) if not c.ok}
    assert "no cancelled or returned order keeps money at the provider" in names


def test_reconcile_releases_a_hold_left_on_a_cancelled_order(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    from orderflow.outbox_worker.providers import StripeApi
    from orderflow.services.reconcile import reconcile

    order = place(conn)
    conn.execute(
        "UPDATE reservations SET expires_at = created_at + interval '1 microsecond'"
        " WHERE order_id = %s",
        (order.id,),
    )
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    # A hold placed at Stripe for the order and never released (a record lost)
    client = stripe.StripeClient(
        "sk_test_x", base_addresses={"api": sandbox.url},
        http_client=stripe.HTTPXClient(allow_sync_methods=True),
    )  # fmt: skip
    intent = client.v1.payment_intents.create(
        params={"amount": order.total_cents, "currency": "eur", "payment_method": "pm_card_visa",
                "confirm": True, "metadata": {"order_id": order.id},
                "payment_method_options": {"card": {"capture_method": "manual"}}},
    )  # fmt: skip
    assert intent.status == "requires_capture"
    conn.execute(
        "INSERT INTO payment_intents (order_id, id, status, amount_cents, currency, held_at)"
        " VALUES (%s, %s, 'requires_capture', %s, 'EUR', now())",
        (order.id, intent.id, order.total_cents),
    )
    api = StripeApi(sandbox.provider_config())
    failing = {c.name for c in run_checks(conn, None, api) if not c.ok}
    assert failing == {
        "no cancelled order holds uncaptured funds",
        "no cancelled or returned order keeps money at Stripe",
    }
    findings = reconcile(conn, api, 3600)
    assert [(f.order_id, f.action) for f in findings] == [
        (order.id, "fixed: hold released at Stripe")
    ]
    assert _kinds(sandbox.effects(order_id=order.id)) == ["authorization", "authorization_release"]
    assert reconcile(conn, api, 3600) == []
    check_invariants(conn, sandbox.effects())
