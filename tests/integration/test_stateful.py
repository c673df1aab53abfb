"""A stateful property test over the real system (Hypothesis RuleBasedStateMachine).

Rules place orders over HTTP (reusing idempotency keys), run the worker once,
crash it at a failpoint, advance the clock past reservation holds, leases and
backoffs, inject provider faults, let card holds lapse at Stripe, cancel orders
(the customer and an operator) and request returns.  After every step the
doctor's invariants and the sandbox's effects must agree; at the end of each
example the faults stop, the outbox drains, and every order has settled.

Sizes: ORDERFLOW_STATEFUL_EXAMPLES x ORDERFLOW_STATEFUL_STEPS (default 12 x 30;
the nightly setting is 200 x 50).
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from typing import Any

import psycopg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg.rows import dict_row
from starlette.testclient import TestClient

from orderflow import failpoints
from orderflow.app.main import create_app
from orderflow.app.serving import free_port, serve
from orderflow.outbox_worker.providers import Providers
from orderflow.outbox_worker.runner import Worker
from tests.conftest import create_database, drop_database
from tests.support.api_helpers import auth, cart_body, order_headers, token
from tests.support.helpers import MANDATE
from tests.support.processes import add_stock
from tests.support.sandbox_client import SETTLED, check_invariants, open_rows

EXAMPLES = int(os.environ.get("ORDERFLOW_STATEFUL_EXAMPLES", "12"))
STEPS = int(os.environ.get("ORDERFLOW_STATEFUL_STEPS", "30"))
SKUS = ("MUG-01", "LAMP-01", "NOTE-A5")
FAULTS = {
    "none": [],
    "server_errors": [{"endpoint": "*", "mode": "error", "status": 500, "rate": 0.5}],
    "rate_limited": [{"endpoint": "*", "mode": "rate_limit", "retry_after": 0.01, "rate": 0.5}],
    # the effect happens, the answer is lost (provider timeout is 0.3 s)
    "lost_answers": [
        {"endpoint": "*", "mode": "timeout_after_success", "hang_s": 0.5, "rate": 0.5}
    ],
    "shipping_refuses": [{"endpoint": "shipment", "mode": "error", "status": 422}],
    # the effect happens, then a 500 that Stripe stores and replays for the key
    "effect_then_500": [
        {"endpoint": "*", "mode": "error_after_effect", "status": 500, "rate": 0.5}
    ],
    # Stripe delivers at least once, in any order
    "webhooks_twice_and_late": [
        {"endpoint": "webhooks", "mode": "duplicate", "copies": 3},
        {"endpoint": "webhooks", "mode": "delay", "delay_s": 0.2, "rate": 0.5},
    ],
    "webhooks_lost": [{"endpoint": "webhooks", "mode": "drop"}],
}
CARDS = ("pm_card_visa", "pm_card_chargeDeclined", "pm_card_authenticationRequired", "pm_sepaDebit")
WEBHOOK_SECRET = "whsec_stateful"
WAITING = """
SELECT pi.id FROM payment_intents pi JOIN orders o ON o.id = pi.order_id
 WHERE o.state = 'awaiting_payment' AND pi.status = %s ORDER BY o.id
"""
CRASH_POINTS = ("before_call", "after_call", "before_commit", "after_commit")
STEPS_WITH_CALLS = (
    "charge_payment",
    "ship_order",
    "capture_payment",
    "send_confirmation",
    "refund_payment",
    "create_return_label",
    "refund_return",
    "await_payment",
)
ADVANCE_CLOCK = """
WITH leases AS (
    UPDATE outbox SET lease_until = now() - interval '1 second'
     WHERE status = 'in_flight' RETURNING 1
), backoffs AS (
    UPDATE outbox SET available_at = now()
     WHERE status = 'pending' AND available_at > now() RETURNING 1
)
UPDATE reservations SET expires_at = created_at + interval '1 microsecond'
 WHERE consumed_at IS NULL AND released_at IS NULL AND expires_at > now()
"""


def test_stateful_saga(server_url: str, template_db: str, api_settings: Any, sandbox: Any) -> None:
    class Saga(RuleBasedStateMachine):
        """One example = one fresh database and a reset sandbox, so a replay
        (Hypothesis shrinking) starts from the same world."""

        def __init__(self) -> None:
            super().__init__()
            sandbox.reset()
            self.db_name, url = create_database(server_url, template_db)
            self.conn = psycopg.connect(url, autocommit=True, row_factory=dict_row)
            for sku in SKUS:
                add_stock(self.conn, sku, STEPS * 5)
            self.providers = Providers(sandbox.provider_config(timeout_s=0.3))
            self.worker = Worker(url, self.providers, concurrency=4, lease_s=30, backoff_scale=0)
            settings = api_settings.model_copy(update={"stripe_webhook_secret": WEBHOOK_SECRET})
            self.client = TestClient(create_app(settings, database_url=url))
            self.client.__enter__()
            # Stripe's webhooks come over HTTP, signed, to a served copy of the API.
            self.server = serve(create_app(settings, database_url=url), free_port())
            webhook_api = self.server.__enter__()
            sandbox.config(
                webhook_url=f"{webhook_api}/v1/webhooks/stripe",
                webhook_secret=WEBHOOK_SECRET,
                processing_s=-1,  # the bank settles when a rule says so
            )
            self.users: dict[str, uuid.UUID] = {}  # order id -> its buyer
            self.keys: list[tuple[uuid.UUID, str, dict[str, Any], str]] = []

        @rule(
            sku=st.sampled_from(SKUS),
            qty=st.integers(1, 3),
            card=st.sampled_from(CARDS),
        )
        def place_order(self, sku: str, qty: int, card: str) -> None:
            user = uuid.uuid4()
            tok = token(user)
            r = self.client.post(
                "/v1/carts",
                json=cart_body([(sku, qty)], email="buyer@example.com"),
                headers=auth(tok),
            )
            assert r.status_code == 201, r.text
            body = {
                "cart_id": r.json()["id"],
                "payment_method_id": card,
                **({"mandate": MANDATE} if card.startswith("pm_sepa") else {}),
            }
            key = str(uuid.uuid4())
            r = self.client.post("/v1/orders", json=body, headers=order_headers(tok, key))
            assert r.status_code in (201, 409), r.text
            if r.status_code == 201:
                self.users[r.json()["id"]] = user
            self.keys.append((user, key, body, r.text))

        # Picks are indices, not sampled_from(live ids): ids are random per run
        # and Hypothesis must be able to replay a choice.
        @precondition(lambda self: self.keys)
        @rule(pick=st.integers(0, 1000))
        def replay_key(self, pick: int) -> None:
            user, key, body, first = self.keys[pick % len(self.keys)]
            r = self.client.post("/v1/orders", json=body, headers=order_headers(token(user), key))
            assert r.text == first and r.headers["idempotent-replayed"] == "true"

        @rule()
        def run_worker_once(self) -> None:
            self.worker.run_once()

        @rule(step=st.sampled_from(STEPS_WITH_CALLS), point=st.sampled_from(CRASH_POINTS))
        def worker_crashes(self, step: str, point: str) -> None:
            # In-process, a crash is a step that stops dead at the failpoint: its
            # lease is left behind, its transaction rolled back, nothing committed.
            with failpoints.armed(f"{step}.{point}", "raise"):
                self.worker.run_once()

        @rule(pick=st.integers(0, 1000), complete=st.booleans())
        def customer_at_the_bank(self, pick: int, complete: bool) -> None:
            """A customer completes (or fails) 3-D Secure on the bank's page."""
            waiting = self.conn.execute(WAITING, ("requires_action",)).fetchall()
            if waiting:
                intent = waiting[pick % len(waiting)]["id"]
                sandbox.authenticate(intent, "complete" if complete else "fail")

        def processing(self) -> list[str]:
            """The bank debits still processing at the bank, whatever the order's state
            (a compensation waits for them too)."""
            ours = {r["id"] for r in self.conn.execute("SELECT id FROM orders")}
            return sorted(
                i["id"]
                for i in sandbox.intents()
                if i["status"] == "processing" and (i.get("metadata") or {}).get("order_id") in ours
            )

        @rule(pick=st.integers(0, 1000), succeeds=st.booleans())
        def bank_settles(self, pick: int, succeeds: bool) -> None:
            waiting = self.processing()
            if waiting:
                sandbox.settle(waiting[pick % len(waiting)], "succeeded" if succeeds else "failed")

        @rule()
        def advance_clock(self) -> None:
            self.conn.execute(ADVANCE_CLOCK)

        @rule(faults=st.sampled_from(sorted(FAULTS)))
        def provider_faults(self, faults: str) -> None:
            sandbox.faults(*FAULTS[faults])

        @precondition(lambda self: self.users)
        @rule(pick=st.integers(0, 1000))
        def request_return(self, pick: int) -> None:
            order_id = list(self.users)[pick % len(self.users)]
            r = self.client.post(
                f"/v1/orders/{order_id}/return",
                json={"reason": "changed my mind"},
                headers=order_headers(token(self.users[order_id])),
            )
            assert r.status_code in (202, 409), r.text

        @precondition(lambda self: self.users)
        @rule(pick=st.integers(0, 1000), operator=st.booleans())
        def cancel(self, pick: int, operator: bool) -> None:
            """The customer (or an operator) cancels: accepted until the shipment exists."""
            order_id = list(self.users)[pick % len(self.users)]
            if operator:
                url, headers = f"/v1/admin/orders/{order_id}/cancel", auth(token(admin=True))
            else:
                url = f"/v1/orders/{order_id}/cancel"
                headers = order_headers(token(self.users[order_id]))
            r = self.client.post(url, headers=headers)
            assert r.status_code in (202, 409), r.text
            if r.status_code == 409:
                assert r.json()["error"]["code"] == "not_cancellable", r.text
            else:
                assert r.json()["state"] in ("compensating", "cancelled"), r.text

        @rule()
        def holds_lapse(self) -> None:
            """Every card hold not captured yet expires at Stripe (a week passes for them)."""
            sandbox.config(hold_s=0)
            sandbox.advance_clock(0)  # the sandbox sweeps what is due now
            sandbox.config(hold_s=7 * 24 * 3600)

        @precondition(lambda self: self.users)
        @rule(pick=st.integers(0, 1000))
        def parcel_arrives(self, pick: int) -> None:
            order_id = list(self.users)[pick % len(self.users)]
            r = self.client.post(
                f"/v1/admin/orders/{order_id}/return-received", headers=auth(token(admin=True))
            )
            assert r.status_code in (200, 409), r.text

        def effects(self) -> list[dict[str, Any]]:
            # The sandbox outlives examples: a call that timed out in an earlier
            # example can land after the reset; only this example's orders count.
            ours = {r["id"] for r in self.conn.execute("SELECT id FROM orders")}
            return [e for e in sandbox.effects() if e["order_id"] in ours]

        @invariant()
        def money_and_stock_add_up(self) -> None:
            check_invariants(self.conn, self.effects())

        def teardown(self) -> None:
            try:
                self.settle()
            finally:
                self.client.__exit__(None, None, None)
                self.server.__exit__(None, None, None)
                self.worker.close()
                self.providers.close()
                self.conn.close()
                drop_database(server_url, self.db_name)

        def settle(self) -> None:
            sandbox.faults()
            for _ in range(200):
                # the customers and the banks still waited for answer now
                for row in self.conn.execute(WAITING, ("requires_action",)).fetchall():
                    sandbox.authenticate(row["id"], "complete")
                for intent in self.processing():
                    sandbox.settle(intent, "succeeded")
                self.conn.execute(ADVANCE_CLOCK)
                self.worker.run_once()
                if not open_rows(self.conn):
                    break
            assert open_rows(self.conn) == 0
            if self.users:
                final = Counter(
                    r["state"]
                    for r in self.conn.execute(
                        "SELECT state FROM orders WHERE id = ANY(%s)", (list(self.users),)
                    )
                )
                assert set(final) <= set(SETTLED) | {"awaiting_return"}, final
            check_invariants(self.conn, self.effects())

    run_state_machine_as_test(
        Saga,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        ),
    )
