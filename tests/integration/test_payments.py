"""Payments as Stripe really answers: unknown outcomes settled by asking, 3-D Secure
and bank debits, signed webhooks, the key window, poison answers, reconciliation.

Real worker code, real Postgres, the sandbox over HTTP; every check counts the
effects on the provider's side and ends with the doctor's invariants."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import stripe

from orderflow import failpoints
from orderflow.config import Settings
from orderflow.outbox_worker.runner import Worker
from orderflow.outbox_worker.steps import StepSettings
from orderflow.services.doctor import run_checks
from orderflow.statemachine.engine import advance
from tests.support.api_helpers import JWT_SECRET, auth, token
from tests.support.helpers import place
from tests.support.sandbox_client import check_invariants, drain, states

WEBHOOK_SECRET = "whsec_test_orderflow_secret"

# These tests pin the immediate capture (money taken at confirmation: today's
# behaviour, unchanged); tests/integration/test_capture.py covers at_shipment.
CAPTURE = "immediate"


def _kinds(effects: list[dict[str, Any]]) -> Counter[str]:
    return Counter(e["kind"] for e in effects)


def _history(conn: psycopg.Connection[Any], order_id: str) -> list[str]:
    rows = conn.execute(
        "SELECT event FROM order_history WHERE order_id = %s ORDER BY id", (order_id,)
    ).fetchall()
    return [r["event"] for r in rows]


def _available(conn: psycopg.Connection[Any], sku: str) -> int:
    return int(
        conn.execute("SELECT available FROM products WHERE sku = %s", (sku,)).fetchone()[
            "available"
        ]
    )


def _intent_id(conn: psycopg.Connection[Any], order_id: str) -> str:
    row = conn.execute("SELECT id FROM payment_intents WHERE order_id = %s", (order_id,)).fetchone()
    assert row is not None, "the order recorded no PaymentIntent"
    return str(row["id"])


def _expire(conn: psycopg.Connection[Any], order_id: str) -> None:
    conn.execute(
        "UPDATE reservations SET expires_at = created_at + interval '1 microsecond'"
        " WHERE order_id = %s",
        (order_id,),
    )


def run_until(
    worker: Worker, conn: psycopg.Connection[Any], order_id: str, wanted: str, timeout_s: float = 20
) -> None:
    deadline = time.monotonic() + timeout_s
    while states(conn)[order_id] != wanted:
        assert time.monotonic() < deadline, f"never reached {wanted}: {states(conn)[order_id]}"
        if worker.run_once() == 0:
            time.sleep(0.02)


# ---------------------------------------------------------------- 5xx after the effect


@pytest.mark.parametrize(
    ("endpoint", "path", "final", "kind"),
    [
        ("payment_intents.create", "happy", "confirmed", "charge"),
        ("payment_intents.confirm", "happy", "confirmed", "charge"),
        ("shipments.create", "happy", "confirmed", "shipment"),
        ("messages.create", "happy", "confirmed", "email"),
        ("refunds.create", "refused", "cancelled", "refund"),
        ("returns.create", "return", "returned", "return_label"),
        ("refunds.create", "return", "returned", "refund"),
        ("payment_intents.cancel", "abandoned", "cancelled", None),
    ],
)
def test_effect_then_a_stored_5xx_is_found_not_repeated(
    conn: Any, worker: Worker, sandbox: Any, endpoint: str, path: str, final: str, kind: str | None
) -> None:
    """The provider acts, then answers 500 and stores that 500 for the key (Stripe
    replays it): the worker asks what exists, records the effect, and neither
    compensates blind nor makes the effect twice."""
    fault = {"endpoint": endpoint, "mode": "error_after_effect", "status": 500, "count": 1}
    if path == "refused":
        sandbox.faults({"endpoint": "shipments.create", "mode": "error", "status": 422}, fault)
    elif path != "return":
        sandbox.faults(fault)
    card = "pm_card_authenticationRequired" if path == "abandoned" else "pm_card_visa"
    order = place(conn, payment_method=card)
    if path == "abandoned":
        run_until(worker, conn, order.id, "awaiting_payment")
        _expire(conn, order.id)
    drain(worker, conn)
    if path == "return":
        sandbox.faults(fault)
        advance(conn, order.id, "return_requested", {"reason": "too big"})
        drain(worker, conn)
        advance(conn, order.id, "return_received", {})
        drain(worker, conn)
    assert sandbox.injected().get("error_after_effect") == 1
    assert states(conn)[order.id] == final
    effects = sandbox.effects(order_id=order.id)
    if kind is not None:
        assert _kinds(effects)[kind] == 1
    if final == "confirmed":
        assert _kinds(effects) == {"charge": 1, "shipment": 1, "email": 1}
    if path == "abandoned":
        [intent] = sandbox.intents(order.id)
        assert intent["status"] == "canceled" and "charge" not in _kinds(effects)
    assert len(sandbox.intents(order.id)) == 1  # never a second PaymentIntent
    check_invariants(conn, sandbox.effects())


@pytest.mark.parametrize("capture", ["immediate", "at_shipment"])
@pytest.mark.parametrize("endpoint", ["payment_intents.create", "payment_intents.confirm"])
def test_a_5xx_then_the_reservation_expires(
    conn: Any, worker: Worker, sandbox: Any, endpoint: str, capture: str
) -> None:
    """The charge's answer is a stored 5xx and Stripe cannot be asked at once; the
    reservation expires before the retry.  A confirm that may have taken money
    holds the compensation until Stripe is asked; an intent merely created takes
    no money, so the stock is released at once.  Either way what really happened
    is compensated: money taken is refunded, stock released."""
    stock = _available(conn, "MUG-01")
    sandbox.faults(
        {"endpoint": endpoint, "mode": "error_after_effect", "status": 500, "count": 1},
        {"endpoint": "payment_intents.retrieve", "mode": "error", "status": 503, "count": 1},
        {"endpoint": "payment_intents.search", "mode": "error", "status": 503, "count": 1},
        {"endpoint": "payment_intents.list", "mode": "error", "status": 503, "count": 1},
    )
    order = place(conn)
    worker.run_once()  # the effect happened; the answer says nothing
    assert states(conn)[order.id] == "reserved"
    _expire(conn, order.id)
    worker.expire_reservations()
    assert states(conn)[order.id] == "compensating"
    steps = [r["step"] for r in conn.execute("SELECT step FROM outbox WHERE order_id = %s",
                                             (order.id,))]  # fmt: skip
    if endpoint == "payment_intents.confirm":
        assert steps == ["charge_payment"]  # nothing compensates while the charge is unknown
    else:
        assert steps == ["charge_payment", "release_inventory"]
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    assert _available(conn, "MUG-01") == stock
    kinds = _kinds(sandbox.effects(order_id=order.id))
    assert kinds["charge"] == kinds["refund"]  # never money kept for a cancelled order
    if endpoint == "payment_intents.confirm" and capture == "immediate":
        assert kinds == {"charge": 1, "refund": 1}
        events = _history(conn, order.id)
        assert events.index("payment_captured") < events.index("compensation_done")
    elif endpoint == "payment_intents.confirm":  # the card was held: released, no refund
        assert kinds == {"authorization": 1, "authorization_release": 1}
        events = _history(conn, order.id)
        assert events.index("payment_authorized") < events.index("compensation_done")
    check_invariants(conn, sandbox.effects())


# ---------------------------------------------------------------- 3-D Secure


@pytest.fixture()
def webhooks_off(sandbox: Any) -> None:
    sandbox.config(webhook_url=None)


def test_three_d_secure_completed(conn: Any, worker: Worker, sandbox: Any, client: Any) -> None:
    user = uuid.uuid4()
    order = place(conn, payment_method="pm_card_authenticationRequired", user_id=user)
    run_until(worker, conn, order.id, "awaiting_payment")
    shown = client.get(f"/v1/orders/{order.id}", headers=auth(token(user))).json()["payment"]
    assert shown["status"] == "requires_action"
    assert shown["client_secret"].startswith(shown["payment_intent_id"])
    assert shown["next_action"]["type"] == "redirect_to_url"
    # only the owner sees it
    assert client.get(f"/v1/orders/{order.id}", headers=auth(token())).status_code == 404
    # the customer completes 3-D Secure on the bank's page
    page = shown["next_action"]["redirect_to_url"]["url"]
    assert httpx.post(page, data={"result": "complete"}).status_code in (200, 303)
    drain(worker, conn)
    assert states(conn)[order.id] == "confirmed"
    assert _kinds(sandbox.effects(order_id=order.id)) == {"charge": 1, "shipment": 1, "email": 1}
    after = client.get(f"/v1/orders/{order.id}", headers=auth(token(user))).json()["payment"]
    assert after["status"] == "succeeded" and after["client_secret"] is None
    assert _history(conn, order.id)[:3] == ["place", "payment_pending", "payment_captured"]
    check_invariants(conn, sandbox.effects())


def test_three_d_secure_failed(conn: Any, worker: Worker, sandbox: Any) -> None:
    stock = _available(conn, "MUG-01")
    order = place(conn, payment_method="pm_card_authenticationRequired")
    run_until(worker, conn, order.id, "awaiting_payment")
    sandbox.authenticate(_intent_id(conn, order.id), "fail")
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    assert _available(conn, "MUG-01") == stock
    assert sandbox.effects(order_id=order.id) == []  # no capture
    # the open intent is cancelled: its client secret can no longer pay
    [intent] = sandbox.intents(order.id)
    assert intent["status"] == "canceled"
    check_invariants(conn, sandbox.effects())


def test_three_d_secure_abandoned_until_the_reservation_expires(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    stock = _available(conn, "MUG-01")
    order = place(conn, payment_method="pm_card_authenticationRequired")
    run_until(worker, conn, order.id, "awaiting_payment")
    _expire(conn, order.id)
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    assert _available(conn, "MUG-01") == stock
    intent_id = _intent_id(conn, order.id)
    [intent] = sandbox.intents(order.id)
    assert intent["status"] == "canceled"  # cancelled at Stripe before the stock went back
    events = _history(conn, order.id)
    assert events == ["place", "payment_pending", "reservation_expired",
                      "compensation_done", "compensation_done"]  # fmt: skip
    # the customer comes back too late: the bank page cannot take the money any more
    assert sandbox.authenticate(intent_id, "complete").status_code == 409
    assert sandbox.effects(order_id=order.id) == []
    check_invariants(conn, sandbox.effects())


def test_three_d_secure_completion_racing_the_expiry(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    """The customer completes 3-D Secure while the reservation expires: exactly one
    wins at Stripe (the intent is locked), and money is never kept for a
    cancelled order nor taken twice."""
    outcomes: Counter[str] = Counter()
    # The bank page answers in tens of milliseconds: the customer's click lands
    # before, during or after the expiry and the cancel of the intent.
    for delay in (0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08):
        order = place(conn, payment_method="pm_card_authenticationRequired")
        run_until(worker, conn, order.id, "awaiting_payment")
        intent_id = _intent_id(conn, order.id)
        customer = threading.Thread(target=sandbox.authenticate, args=(intent_id, "complete"))
        customer.start()
        time.sleep(delay)
        _expire(conn, order.id)
        drain(worker, conn)
        customer.join()
        drain(worker, conn)
        final = states(conn)[order.id]
        kinds = _kinds(sandbox.effects(order_id=order.id))
        assert final in ("confirmed", "cancelled"), final
        if final == "cancelled":
            assert kinds["charge"] == kinds["refund"] <= 1
        else:
            assert kinds["charge"] == 1 and not kinds["refund"]
        outcomes[f"{final}, charged {kinds['charge']}"] += 1
    print("completion racing expiry:", dict(outcomes))
    check_invariants(conn, sandbox.effects())


# ---------------------------------------------------------------- bank debits


@pytest.mark.parametrize(
    ("method", "outcome", "final"),
    [("pm_sepaDebit", "succeeded", "confirmed"), ("pm_sepaDebitFails", "failed", "cancelled")],
)
def test_a_bank_debit_processing_then_settling(
    conn: Any, worker: Worker, sandbox: Any, method: str, outcome: str, final: str
) -> None:
    sandbox.config(processing_s=-1)  # the bank settles when the test says
    stock = _available(conn, "MUG-01")
    order = place(conn, payment_method=method)
    run_until(worker, conn, order.id, "awaiting_payment")
    held = conn.execute(
        "SELECT expires_at - now() AS left FROM reservations WHERE order_id = %s", (order.id,)
    ).fetchone()["left"]
    assert held.days >= 13  # a debit settles in days: the stock stays held meanwhile
    worker.run_once()
    assert states(conn)[order.id] == "awaiting_payment"  # still processing
    assert sandbox.settle(_intent_id(conn, order.id), outcome).status_code == 200
    drain(worker, conn)
    assert states(conn)[order.id] == final
    kinds = _kinds(sandbox.effects(order_id=order.id))
    if final == "confirmed":
        assert kinds == {"charge": 1, "shipment": 1, "email": 1}
    else:
        assert kinds == {} and _available(conn, "MUG-01") == stock
    check_invariants(conn, sandbox.effects())


# ---------------------------------------------------------------- webhooks


@pytest.fixture()
def webhook_api(db_url: str) -> Iterator[str]:
    """The HTTP API with the webhook secret set, served for the sandbox to call."""
    from orderflow.app.main import create_app
    from orderflow.app.serving import free_port, serve

    settings = Settings(
        database_url=None,
        state_dir=Settings.from_env().state_dir,
        reservation_ttl_seconds=900,
        jwt_secret=JWT_SECRET,
        jwt_audience="orderflow",
        stripe_webhook_secret=WEBHOOK_SECRET,
    )
    with serve(create_app(settings, database_url=db_url), free_port()) as url:
        yield url


def _signed(event: dict[str, Any], secret: str = WEBHOOK_SECRET) -> tuple[str, dict[str, str]]:
    body = json.dumps(event)
    header = stripe.WebhookSignature.generate_signature_header(body, secret)
    return body, {"Stripe-Signature": header, "content-type": "application/json"}


def _awaiting_with_webhooks(
    conn: Any, worker: Worker, sandbox: Any, webhook_api: str
) -> tuple[str, str]:
    sandbox.config(webhook_url=f"{webhook_api}/v1/webhooks/stripe", webhook_secret=WEBHOOK_SECRET)
    order = place(conn, payment_method="pm_card_authenticationRequired")
    run_until(worker, conn, order.id, "awaiting_payment")
    return order.id, _intent_id(conn, order.id)


def _wait_state(conn: Any, order_id: str, wanted: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while states(conn)[order_id] != wanted:
        assert time.monotonic() < deadline, f"never reached {wanted}: {states(conn)[order_id]}"
        time.sleep(0.05)


def test_webhook_with_a_bad_signature_changes_nothing(
    conn: Any, worker: Worker, sandbox: Any, webhook_api: str
) -> None:
    order_id, intent_id = _awaiting_with_webhooks(conn, worker, sandbox, webhook_api)
    event = {
        "id": "evt_forged",
        "object": "event",
        "type": "payment_intent.succeeded",
        "created": int(time.time()),
        "data": {"object": {"id": intent_id, "object": "payment_intent", "status": "succeeded",
                            "amount": 1, "amount_received": 1, "metadata": {"order_id": order_id}}},
    }  # fmt: skip
    url = f"{webhook_api}/v1/webhooks/stripe"
    body, headers = _signed(event, secret="whsec_someone_else")
    for sent_headers in (headers, {"content-type": "application/json"}):
        r = httpx.post(url, content=body, headers=sent_headers)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_signature"
    stale = stripe.WebhookSignature.generate_signature_header(
        body, WEBHOOK_SECRET, timestamp=int(time.time()) - 3600
    )
    r = httpx.post(url, content=body, headers={"Stripe-Signature": stale})
    assert r.status_code == 400  # outside Stripe's timestamp tolerance: a replay
    assert states(conn)[order_id] == "awaiting_payment"
    forged = conn.execute("SELECT count(*) AS n FROM stripe_events WHERE id = 'evt_forged'")
    assert forged.fetchone()["n"] == 0


def test_webhooks_delivered_five_times_and_out_of_order_apply_once(
    conn: Any, worker: Worker, sandbox: Any, webhook_api: str
) -> None:
    order_id, intent_id = _awaiting_with_webhooks(conn, worker, sandbox, webhook_api)
    sandbox.faults(
        {"endpoint": "webhooks", "mode": "duplicate", "copies": 5},
        # the first event (requires_action...) waits, so the later ones overtake it
        {"endpoint": "webhooks", "mode": "delay", "delay_s": 0.5, "count": 1},
    )
    sandbox.authenticate(intent_id, "complete")
    _wait_state(conn, order_id, "paid")  # moved by the webhook: the worker did not run
    time.sleep(1.0)  # every copy has arrived
    events = conn.execute(
        "SELECT id, type, outcome FROM stripe_events WHERE order_id = %s", (order_id,)
    ).fetchall()
    assert len(events) == len({e["id"] for e in events})
    applied = [e for e in events if e["outcome"].startswith("applied")]
    assert [e["type"] for e in applied] == ["payment_intent.succeeded"]
    assert _history(conn, order_id).count("payment_captured") == 1
    drain(worker, conn)
    assert states(conn)[order_id] == "confirmed"
    assert _kinds(sandbox.effects(order_id=order_id)) == {"charge": 1, "shipment": 1, "email": 1}
    deliveries = sum(len(e["deliveries"]) for e in sandbox.events())
    assert deliveries >= 5  # the copies really came
    check_invariants(conn, sandbox.effects())


def test_a_webhook_for_an_order_in_another_state_is_recorded_and_ignored(
    conn: Any, worker: Worker, sandbox: Any, webhook_api: str
) -> None:
    order = place(conn)
    drain(worker, conn)
    assert states(conn)[order.id] == "confirmed"
    intent_id = _intent_id(conn, order.id)
    before = _history(conn, order.id)
    url = f"{webhook_api}/v1/webhooks/stripe"
    for status, kind in (("canceled", "payment_intent.canceled"),
                         ("requires_payment_method", "payment_intent.payment_failed")):  # fmt: skip
        event = {
            "id": f"evt_{kind}",
            "object": "event",
            "type": kind,
            "created": int(time.time()),
            "data": {"object": {"id": intent_id, "object": "payment_intent", "status": status,
                                "amount": 1, "metadata": {"order_id": order.id}}},
        }  # fmt: skip
        body, headers = _signed(event)
        r = httpx.post(url, content=body, headers=headers)
        assert r.status_code == 200 and r.json()["outcome"].startswith("ignored"), r.text
        assert httpx.post(url, content=body, headers=headers).json()["duplicate"] is True
    body, headers = _signed({"id": "evt_other", "object": "event", "type": "customer.created",
                             "data": {"object": {"id": "cus_1"}}})  # fmt: skip
    assert httpx.post(url, content=body, headers=headers).json()["outcome"] == (
        "ignored: type not handled"
    )
    assert _history(conn, order.id) == before
    assert states(conn)[order.id] == "confirmed"
    assert conn.execute("SELECT count(*) AS n FROM stripe_events").fetchone()["n"] == 3


def test_a_lost_webhook_leaves_the_poll_to_settle_the_order(
    conn: Any, worker: Worker, sandbox: Any, webhook_api: str
) -> None:
    order_id, intent_id = _awaiting_with_webhooks(conn, worker, sandbox, webhook_api)
    sandbox.faults({"endpoint": "webhooks", "mode": "drop"})
    sandbox.authenticate(intent_id, "complete")
    time.sleep(0.3)
    assert states(conn)[order_id] == "awaiting_payment"  # no webhook came
    drain(worker, conn)
    assert states(conn)[order_id] == "confirmed"
    succeeded = conn.execute(
        "SELECT count(*) AS n FROM stripe_events WHERE type = 'payment_intent.succeeded'"
    )
    assert succeeded.fetchone()["n"] == 0  # the poll did it
    check_invariants(conn, sandbox.effects())


def test_a_dispute_sends_a_settled_order_to_an_operator(
    conn: Any, worker: Worker, sandbox: Any, webhook_api: str
) -> None:
    sandbox.config(webhook_url=f"{webhook_api}/v1/webhooks/stripe", webhook_secret=WEBHOOK_SECRET)
    order = place(conn)
    drain(worker, conn)
    sandbox.dispute(_intent_id(conn, order.id))
    _wait_state(conn, order.id, "needs_attention")
    assert _history(conn, order.id)[-1] == "dispute_opened"
    assert sandbox.effects(kind="refund") == []  # no automatic action


# ---------------------------------------------------------------- the key window


def test_an_unknown_create_older_than_the_key_window_is_found_not_created_again(
    db_url: str, conn: Any, providers: Any, sandbox: Any
) -> None:
    """The PaymentIntent was created but the answer lost; by the retry Stripe has
    forgotten the key (24 h).  Replaying it would create a second intent: the
    worker finds the first by listing (search lags) and confirms that one."""
    worker = Worker(db_url, providers, concurrency=4, lease_s=5, backoff_scale=0.01,
                    steps=StepSettings(key_window_s=0.5))  # fmt: skip
    try:
        sandbox.config(search_lag_s=3600)  # an empty search proves nothing
        sandbox.faults(
            {"endpoint": "payment_intents.create", "mode": "timeout_after_success",
             "count": 1, "hang_s": 2},
        )  # fmt: skip
        order = place(conn)
        worker.run_once()  # the intent exists; its answer never came
        assert len(sandbox.intents(order.id)) == 1
        time.sleep(0.6)
        sandbox.advance_clock(25 * 3600)  # Stripe pruned the key
        drain(worker, conn)
        assert states(conn)[order.id] == "confirmed"
        assert len(sandbox.intents(order.id)) == 1  # reconciled, not re-created
        assert _kinds(sandbox.effects(order_id=order.id))["charge"] == 1
        check_invariants(conn, sandbox.effects())
    finally:
        worker.close()


# ---------------------------------------------------------------- poison answers


def _requests(sandbox: Any) -> int:
    return int(httpx.get(f"{sandbox.url}/_sandbox/health").json()["requests"])


def test_a_poison_answer_goes_to_an_operator_with_bounded_calls(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    """The carrier answers bodies without the shipment's id, even to lookups: the
    step never compensates (a parcel may ship) and never loops: after its limit
    of unknown outcomes the row is dead and the order needs a person."""
    sandbox.faults({"endpoint": "shipments.create", "mode": "malformed"},
                   {"endpoint": "shipments.list", "mode": "malformed"})  # fmt: skip
    order = place(conn)
    before = _requests(sandbox)
    drain(worker, conn, timeout_s=60)
    assert states(conn)[order.id] == "needs_attention"
    dead = conn.execute("SELECT step, last_error FROM outbox WHERE status = 'dead'").fetchone()
    assert dead["step"] == "ship_order" and "unreadable" in dead["last_error"]
    assert _requests(sandbox) - before <= 2 * 20 + 5  # the limit: 20 unknowns, 2 calls each
    assert sandbox.effects(kind="refund") == []  # never compensated blind
    assert _kinds(sandbox.effects(order_id=order.id))["shipment"] == 1


def test_a_step_that_crashes_dead_letters_within_its_attempts(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    order2 = place(conn)
    with failpoints.armed("charge_payment.after_call", "raise"):
        for _ in range(10):
            worker.run_once()
            conn.execute("UPDATE outbox SET available_at = now() WHERE status = 'pending'")
    assert states(conn)[order2.id] == "needs_attention"
    row = conn.execute(
        "SELECT attempts, status, payload FROM outbox WHERE order_id = %s", (order2.id,)
    ).fetchone()
    assert row["status"] == "dead" and row["payload"]["crashes"] == 3
    # three attempts, one confirm at Stripe (the later ones find the intent succeeded)
    assert _kinds(sandbox.effects(order_id=order2.id)) == {"charge": 1}


def test_a_payment_intent_without_optional_fields_is_read(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    """A Stripe-compatible answer that omits optional fields (amount_received,
    next_action...) is read as Stripe documents it, not a crash."""
    from orderflow.services.payments import IntentView

    view = IntentView.parse({"id": "pi_1", "status": "succeeded"})
    assert view is not None and view.amount_received == 0 and view.event() == "payment_captured"
    assert IntentView.parse({"id": "pi_1"}) is None  # no status: says nothing
    assert IntentView.parse({"id": None, "status": "succeeded"}) is None


# ---------------------------------------------------------------- reconcile and doctor


def _stripe(sandbox: Any) -> Any:
    from orderflow.outbox_worker.providers import StripeApi

    return StripeApi(sandbox.provider_config())


def _charge_behind_our_back(sandbox: Any, order_id: str, amount: int) -> str:
    """A PaymentIntent for the order, confirmed at Stripe without the worker."""
    client = stripe.StripeClient(
        "sk_test_x", base_addresses={"api": sandbox.url},
        http_client=stripe.HTTPXClient(allow_sync_methods=True),
    )  # fmt: skip
    intent = client.v1.payment_intents.create(
        params={"amount": amount, "currency": "eur", "payment_method": "pm_card_visa",
                "confirm": True, "metadata": {"order_id": order_id}},
        options={"idempotency_key": f"behind:{order_id}"},
    )  # fmt: skip
    return str(intent.id)


def test_reconcile_refunds_a_capture_missed_on_a_cancelled_order(
    db_url: str, conn: Any, worker: Worker, sandbox: Any
) -> None:
    from orderflow.services.reconcile import reconcile

    order = place(conn)
    _expire(conn, order.id)
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    # Stripe took the money and nothing told us (a capture whose record was lost)
    intent_id = _charge_behind_our_back(sandbox, order.id, order.total_cents)
    conn.execute(
        "INSERT INTO payment_intents (order_id, id, status, amount_cents, currency)"
        " VALUES (%s, %s, 'requires_confirmation', %s, 'EUR')",
        (order.id, intent_id, order.total_cents),
    )
    failing = [c.name for c in run_checks(conn, None, _stripe(sandbox)) if not c.ok]
    assert failing == ["no cancelled or returned order keeps money at Stripe"]
    findings = reconcile(conn, _stripe(sandbox), 3600)
    assert [(f.order_id, f.action) for f in findings] == [
        (order.id, "fixed: payment_captured (compensating)")
    ]
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    assert _kinds(sandbox.effects(order_id=order.id)) == {"charge": 1, "refund": 1}
    assert reconcile(conn, _stripe(sandbox), 3600) == []
    check_invariants(conn, sandbox.effects())


def test_reconcile_cancels_an_orphan_intent_and_reports_money_on_one(
    db_url: str, conn: Any, worker: Worker, sandbox: Any
) -> None:
    import os
    import subprocess
    import sys

    from tests.support.paths import PROJECT_ROOT

    order = place(conn)
    drain(worker, conn)
    client = stripe.StripeClient(
        "sk_test_x", base_addresses={"api": sandbox.url},
        http_client=stripe.HTTPXClient(allow_sync_methods=True),
    )  # fmt: skip
    orphan = client.v1.payment_intents.create(
        params={"amount": 100, "currency": "eur", "payment_method": "pm_card_visa",
                "metadata": {"order_id": order.id}},
    )  # fmt: skip
    env = {"DATABASE_URL": db_url, **sandbox.env()}
    cli = [sys.executable, "-m", "orderflow.app.cli", "reconcile", "--since", "1h"]
    done = subprocess.run(cli, env={**os.environ, **env}, cwd=PROJECT_ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fixed: cancelled at Stripe" in done.stdout
    assert client.v1.payment_intents.retrieve(orphan.id).status == "canceled"
    # a second charge on an intent the order never recorded: a person must look
    _charge_behind_our_back(sandbox, order.id, 100)
    done = subprocess.run(cli, env={**os.environ, **env}, cwd=PROJECT_ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "for a person" in done.stdout and "money on" in done.stdout


# ---------------------------------------------------------------- refunds as Stripe makes them


def test_a_pending_refund_is_followed_until_stripe_says_succeeded(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    sandbox.faults(
        {"endpoint": "shipments.create", "mode": "error", "status": 422},
        {"endpoint": "refunds.create", "mode": "refund_pending", "settle_s": 0.5},
    )
    order = place(conn)
    run_until(worker, conn, order.id, "compensating")
    deadline = time.monotonic() + 10
    while not conn.execute(
        "SELECT 1 FROM payments WHERE order_id = %s AND kind = 'refund' AND status = 'pending'",
        (order.id,),
    ).fetchone():
        assert time.monotonic() < deadline, "the pending refund was never recorded"
        worker.run_once()
    assert states(conn)[order.id] == "compensating"  # not done while Stripe is not
    drain(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    refund = conn.execute(
        "SELECT status FROM payments WHERE order_id = %s AND kind = 'refund'", (order.id,)
    ).fetchall()
    assert [r["status"] for r in refund] == ["succeeded"]
    assert _kinds(sandbox.effects(order_id=order.id)) == {"charge": 1, "refund": 1}
    check_invariants(conn, sandbox.effects())


def test_a_failed_refund_goes_to_an_operator(conn: Any, worker: Worker, sandbox: Any) -> None:
    sandbox.faults(
        {"endpoint": "shipments.create", "mode": "error", "status": 422},
        {"endpoint": "refunds.create", "mode": "refund_fails", "settle_s": 0.2},
    )
    order = place(conn)
    drain(worker, conn)
    assert states(conn)[order.id] == "needs_attention"
    dead = conn.execute(
        "SELECT step, last_error FROM outbox WHERE order_id = %s AND status = 'dead'", (order.id,)
    ).fetchone()
    assert dead["step"] == "refund_payment" and "failed" in dead["last_error"]
    failed = conn.execute(
        "SELECT status FROM payments WHERE order_id = %s AND kind = 'refund'", (order.id,)
    ).fetchone()
    assert failed["status"] == "failed"
    assert "refund" not in _kinds(sandbox.effects(order_id=order.id))  # no money went back
