"""Races and outages around an unknown outcome, found in review and each shown red
before its fix: a lookup that meets a 429 or a refused connection proves nothing;
a capture recorded twice (by a reconciliation or a webhook, then by the step);
an expiry while a charge is in flight and then throttled; webhooks for orders we
do not have; a reconciliation meeting an intent the charge step still uses."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from orderflow.outbox_worker.core import call_step, claim, commit_step
from orderflow.outbox_worker.providers import NotSent, Reply
from orderflow.outbox_worker.runner import Worker
from orderflow.outbox_worker.steps import StepSettings
from orderflow.services import webhooks
from orderflow.services.reconcile import reconcile
from tests.support.helpers import place
from tests.support.sandbox_client import check_invariants, states

# These races were written for the immediate capture (money taken at confirmation);
# tests/integration/test_capture.py races the cancel against the ship step.
CAPTURE = "immediate"


def _kinds(sandbox: Any, order_id: str) -> list[str]:
    return sorted(e["kind"] for e in sandbox.effects(order_id=order_id))


def _spin(worker: Worker, conn: Any, rounds: int = 40) -> None:
    """Run the worker with every backoff cut short."""
    for _ in range(rounds):
        conn.execute("UPDATE outbox SET available_at = now() WHERE status = 'pending'")
        worker.run_once()
        time.sleep(0.01)


def _expire(conn: Any, order_id: str) -> None:
    conn.execute(
        "UPDATE reservations SET expires_at = created_at + interval '1 microsecond'"
        " WHERE order_id = %s",
        (order_id,),
    )


class _Outage:
    """Wraps one provider of the worker: while `on`, the named calls are refused
    (connection refused: nothing reached the provider)."""

    def __init__(self, inner: Any, calls: tuple[str, ...] = ()) -> None:
        self._inner, self.calls, self.on = inner, calls, False

    def __getattr__(self, name: str) -> Callable[..., Reply]:
        call = getattr(self._inner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Reply:
            if self.on and (not self.calls or name in self.calls):
                return NotSent("could not connect")
            reply: Reply = call(*args, **kwargs)
            return reply

        return wrapped


class _Providers:
    def __init__(self, inner: Any, **replace: Any) -> None:
        self.stripe = replace.get("stripe", inner.stripe)
        self.carrier = replace.get("carrier", inner.carrier)
        self.email = inner.email


def test_a_throttled_lookup_keeps_the_charge_unknown(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    """Money taken, answer lost, the retrieve 503 then 429: the row stays unknown, so
    the expiry that follows waits for the truth and the money is refunded."""
    sandbox.faults(
        {"endpoint": "payment_intents.confirm", "mode": "timeout_after_success", "hang_s": 3,
         "count": 1},
        {"endpoint": "payment_intents.retrieve", "mode": "rate_limit", "count": 2,
         "retry_after": 0},
    )  # fmt: skip
    order = place(conn)
    worker.run_once()  # the confirm times out (money taken); the retrieve is throttled
    _spin(worker, conn, 1)  # asked again: throttled again; still unknown
    row = conn.execute("SELECT payload FROM outbox WHERE order_id = %s", (order.id,)).fetchone()
    assert row["payload"]["unsettled"] is True
    _expire(conn, order.id)
    _spin(worker, conn)
    assert states(conn)[order.id] == "cancelled"
    assert _kinds(sandbox, order.id) == ["charge", "refund"]
    check_invariants(conn, sandbox.effects())


def test_stripe_unreachable_after_a_lost_confirm_never_fails_the_payment(
    db_url: str, conn: Any, providers: Any, sandbox: Any
) -> None:
    stripe = _Outage(providers.stripe, ("retrieve_intent", "confirm_intent"))
    worker = Worker(db_url, _Providers(providers, stripe=stripe), concurrency=1, lease_s=5,
                    backoff_scale=0.01, steps=StepSettings(capture=CAPTURE))  # fmt: skip
    try:
        sandbox.faults(
            {"endpoint": "payment_intents.confirm", "mode": "timeout_after_success", "hang_s": 3,
             "count": 1},
            {"endpoint": "payment_intents.retrieve", "mode": "error", "status": 503, "count": 1},
        )  # fmt: skip
        order = place(conn)
        worker.run_once()  # money taken, answer lost, the retrieve 503: unknown
        stripe.on = True  # Stripe unreachable for a while: more than the 3 attempts
        _spin(worker, conn, 8)
        assert states(conn)[order.id] == "reserved"  # never failed while unknown
        stripe.on = False
        _spin(worker, conn)
        assert states(conn)[order.id] == "confirmed"
        assert _kinds(sandbox, order.id) == ["charge", "email", "shipment"]
        check_invariants(conn, sandbox.effects())
    finally:
        worker.close()


def test_the_carrier_unreachable_after_a_lost_label_never_compensates(
    db_url: str, conn: Any, providers: Any, sandbox: Any
) -> None:
    carrier = _Outage(providers.carrier)
    worker = Worker(db_url, _Providers(providers, carrier=carrier), concurrency=1, lease_s=5,
                    backoff_scale=0.01, steps=StepSettings(capture=CAPTURE))  # fmt: skip
    try:
        sandbox.faults({"endpoint": "shipments.create", "mode": "timeout_after_success",
                        "hang_s": 3, "count": 1})  # fmt: skip
        order = place(conn)
        worker.run_once()  # charged
        worker.run_once()  # the label is bought, its answer lost
        carrier.on = True
        _spin(worker, conn, 8)
        assert states(conn)[order.id] == "paid"  # never compensated while a parcel may ship
        carrier.on = False
        _spin(worker, conn)
        assert states(conn)[order.id] == "confirmed"
        assert _kinds(sandbox, order.id) == ["charge", "email", "shipment"]
        check_invariants(conn, sandbox.effects())
    finally:
        worker.close()


def test_reconcile_during_the_hold_then_the_charge_settles(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    sandbox.faults(
        {"endpoint": "payment_intents.confirm", "mode": "timeout_after_success", "hang_s": 3,
         "count": 1},
        {"endpoint": "payment_intents.retrieve", "mode": "error", "status": 503, "count": 1},
    )  # fmt: skip
    order = place(conn)
    worker.run_once()  # money taken, answer lost: unknown
    _expire(conn, order.id)
    worker.expire_reservations()  # held: nothing compensates
    findings = reconcile(conn, worker.providers.stripe, 3600)
    assert [f.action for f in findings] == ["fixed: payment_captured (compensating)"]
    _spin(worker, conn)  # the charge reports the capture again: nothing new, the hold ends
    assert states(conn)[order.id] == "cancelled"
    assert _kinds(sandbox, order.id) == ["charge", "refund"]
    check_invariants(conn, sandbox.effects())


def test_a_poll_and_a_webhook_for_the_same_capture(conn: Any, worker: Worker, sandbox: Any) -> None:
    order = place(conn, payment_method="pm_card_authenticationRequired")
    for _ in range(20):
        worker.run_once()
        if states(conn)[order.id] == "awaiting_payment":
            break
    intent_id = conn.execute(
        "SELECT id FROM payment_intents WHERE order_id = %s", (order.id,)
    ).fetchone()["id"]
    sandbox.authenticate(intent_id, "complete")
    conn.execute("UPDATE outbox SET available_at = now() WHERE status = 'pending'")
    with worker.pool.connection() as c:
        [row] = claim(c, worker.config, 10)
    assert row.step == "await_payment"
    outcome = call_step(row, worker.providers, worker.config, worker.pool.connection)
    # the webhook applies the capture while the poll's answer is on its way
    intent = worker.providers.stripe.retrieve_intent(intent_id).body  # type: ignore[union-attr]
    event = {"id": "evt_race", "type": "payment_intent.succeeded", "created": int(time.time()),
             "data": {"object": intent}}  # fmt: skip
    assert webhooks.receive(conn, event)["outcome"] == "applied: payment_captured"
    with worker.pool.connection() as c:
        assert commit_step(c, row, outcome, worker.config, time.monotonic()) == "done"
    _spin(worker, conn)
    assert states(conn)[order.id] == "confirmed"
    assert (
        conn.execute("SELECT count(*) AS n FROM outbox WHERE status = 'dead'").fetchone()["n"] == 0
    )
    check_invariants(conn, sandbox.effects())


def test_an_expiry_during_a_throttled_charge_releases_the_stock(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    sandbox.faults({"endpoint": "payment_intents.create", "mode": "rate_limit", "count": 1})
    order = place(conn)
    with worker.pool.connection() as c:
        [row] = claim(c, worker.config, 10)
    outcome = call_step(row, worker.providers, worker.config, worker.pool.connection)
    _expire(conn, order.id)
    worker.expire_reservations()  # the charge is in flight: nothing compensates yet
    with worker.pool.connection() as c:
        commit_step(c, row, outcome, worker.config, time.monotonic())  # throttled
    _spin(worker, conn)
    assert states(conn)[order.id] == "cancelled"  # not stranded in compensating
    released = conn.execute(
        "SELECT released_at FROM reservations WHERE order_id = %s", (order.id,)
    ).fetchone()
    assert released["released_at"] is not None
    assert _kinds(sandbox, order.id) == []
    check_invariants(conn, sandbox.effects())


def test_a_webhook_for_an_order_we_do_not_have_is_acknowledged(conn: Any) -> None:
    intent = {"id": "pi_foreign", "object": "payment_intent", "status": "succeeded",
              "amount": 100, "amount_received": 100, "currency": "usd",
              "metadata": {"order_id": "01HZZZZZZZZZZZZZZZZZZZZZZZ"}}  # fmt: skip
    event = {"id": "evt_foreign", "type": "payment_intent.succeeded",
             "created": int(time.time()), "data": {"object": intent}}  # fmt: skip
    result = webhooks.receive(conn, event)
    assert result["outcome"].startswith("ignored")
    stored = conn.execute("SELECT order_id FROM stripe_events WHERE id = 'evt_foreign'").fetchone()
    assert stored["order_id"] is None


def test_reconcile_leaves_an_intent_the_charge_step_still_uses(
    conn: Any, worker: Worker, sandbox: Any
) -> None:
    """A create whose answer was lost: the intent exists but is not noted yet.
    Reconciling must not cancel it under the charge step's feet."""
    sandbox.faults({"endpoint": "payment_intents.create", "mode": "timeout_after_success",
                    "hang_s": 2, "count": 1})  # fmt: skip
    order = place(conn)
    worker.run_once()
    findings = reconcile(conn, worker.providers.stripe, 3600)
    assert [f.action for f in findings] == ["in progress"]
    _spin(worker, conn)
    assert states(conn)[order.id] == "confirmed"
    assert len(sandbox.intents(order.id)) == 1
    check_invariants(conn, sandbox.effects())
