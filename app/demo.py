"""`orderflow demo`: the whole saga on one machine, with no configuration.

Embedded Postgres (unless DATABASE_URL is set), migrations, a sample catalog,
the provider sandbox, the HTTP API and an outbox worker, all started here;
then orders are placed through the HTTP API with a mix of outcomes, a progress
bar runs until every order is settled, and the reports are printed.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg

from orderflow.app.serving import free_port, serve
from orderflow.config import Settings
from orderflow.services.catalog import SAMPLE_CATALOG, load_catalog
from orderflow.sql import QUERIES
from orderflow.sql.db import connect
from orderflow.sql.reports import VIEWS, fetch, refresh, render_table

ADDRESS = {
    "name": "Ada Lovelace",
    "line1": "12 St James's Square",
    "city": "London",
    "postal_code": "SW1Y 4JH",
    "country": "GB",
}
SETTLED = ("confirmed", "returned", "cancelled", "needs_attention")
DEMO_MANDATE = {"customer_acceptance": {"ip_address": "192.0.2.1", "user_agent": "orderflow-demo"}}
SKUS = ["MUG-01", "TEE-M", "TEE-L", "CAP-01", "BAG-01", "NOTE-A5"]  # the well-stocked ones


@dataclass
class Plan:
    """Which outcome each demo order is meant to show."""

    # "ok" | "declined" | "ship_fails" | "timeout" | "return" | "3ds" | "3ds_abandoned" | "debit"
    kind: str
    card: str = "pm_card_visa"


def plans(n: int) -> list[Plan]:
    special = [
        Plan("declined", "pm_card_chargeDeclined"),
        Plan("declined", "pm_card_chargeDeclinedInsufficientFunds"),
        Plan("ship_fails"),
        Plan("return"),
        Plan("timeout"),
        Plan("3ds", "pm_card_authenticationRequired"),
        Plan("3ds_abandoned", "pm_card_authenticationRequired"),
        Plan("debit", "pm_sepaDebit"),
    ]
    out = [Plan("ok") for _ in range(max(n, len(special)))]
    step = max(1, len(out) // len(special))
    for i, plan in enumerate(special):
        out[min(i * step + 1, len(out) - 1)] = plan
    return out


def run_demo(
    settings: Settings, url: str, orders: int = 50, keep_running: bool = False
) -> dict[str, int]:
    from orderflow.app.auth import mint_token
    from orderflow.app.main import create_app
    from orderflow.outbox_worker.providers import ProviderConfig, Providers
    from orderflow.outbox_worker.runner import Worker
    from orderflow.outbox_worker.steps import StepSettings
    from orderflow.sandbox.app import create_sandbox_app

    started = time.monotonic()
    with connect(url) as conn:
        count = load_catalog(conn, SAMPLE_CATALOG).products
    print(f"catalog: {count} products from the sample catalog")
    secret = settings.jwt_secret or secrets.token_hex(32)
    admin_secret = settings.jwt_admin_secret or secrets.token_hex(32)
    webhook_secret = f"whsec_{secrets.token_hex(16)}"
    api_settings = settings.model_copy(
        update={
            "database_url": url,
            "jwt_secret": secret,
            "jwt_admin_secret": admin_secret,
            "stripe_webhook_secret": webhook_secret,
        }
    )
    with (
        serve(create_sandbox_app(), free_port()) as sandbox_url,
        serve(create_app(api_settings, database_url=url), free_port(8000)) as api_url,
    ):
        providers = Providers(
            ProviderConfig("sk_test_demo", sandbox_url, sandbox_url, sandbox_url, timeout_s=2.0)
        )
        # The sandbox sends Stripe's events to the API's webhook endpoint, signed.
        httpx.post(
            f"{sandbox_url}/_sandbox/config",
            json={"webhook_url": f"{api_url}/v1/webhooks/stripe", "webhook_secret": webhook_secret},
        ).raise_for_status()
        worker = Worker(
            url, providers, concurrency=8, lease_s=15, steps=StepSettings.from_settings(settings)
        )
        worker_thread = threading.Thread(target=worker.run_forever, daemon=True)
        worker_thread.start()
        print(f"API {api_url}   sandbox {sandbox_url}   worker: 8 calls in flight")
        print(f"capture: {settings.capture} (ORDERFLOW_CAPTURE)")
        print("webhooks: the sandbox signs Stripe's events for the API's /v1/webhooks/stripe")
        try:

            def token_for(user: uuid.UUID, admin: bool = False) -> str:
                if admin:  # an operator's token: its own key and audience
                    return mint_token(user, secret=admin_secret, admin=True,
                                      audience=settings.jwt_admin_audience)  # fmt: skip
                return mint_token(user, secret=secret, audience=settings.jwt_audience)

            result = _place_and_follow(url, api_url, sandbox_url, orders, token_for)
            with connect(url) as conn:
                refresh(conn)  # the snapshots include every order just placed
                print()
                for view in VIEWS:
                    print(render_table(view, fetch(conn, view)))
            _events_by_type(api_url, token_for(uuid.uuid4(), admin=True))
            print(f"demo finished in {time.monotonic() - started:.1f} s")
            print(f"API docs:   {api_url}/docs")
            print(f"metrics:    {api_url}/metrics")
            print(f"effects:    {sandbox_url}/_sandbox/effects")
            if keep_running:
                _keep_running(api_url, mint_token(uuid.uuid4(), secret=secret,
                                                  audience=settings.jwt_audience))  # fmt: skip
        finally:
            worker.stop.set()
            worker_thread.join(15)
            worker.close()
            providers.close()
    return result


def _place_and_follow(
    url: str,
    api_url: str,
    sandbox_url: str,
    n: int,
    token_for: Callable[..., str],
) -> dict[str, int]:
    http = httpx.Client(base_url=api_url, timeout=30)
    users = [uuid.uuid4() for _ in range(5)]
    admin = {"Authorization": f"Bearer {token_for(uuid.uuid4(), admin=True)}"}
    # The sandbox's faults are global: bound each to the orders meant to show it.
    order_ids: dict[str, str] = {}
    returns: list[tuple[str, dict[str, str]]] = []
    three_ds: list[tuple[str, dict[str, str], bool]] = []
    for i, plan in enumerate(plans(n)):
        user = users[i % len(users)]
        headers = {"Authorization": f"Bearer {token_for(user)}"}
        if plan.kind == "ship_fails":
            _faults(
                sandbox_url, {"endpoint": "shipment", "mode": "error", "status": 422, "count": 1}
            )
        if plan.kind == "timeout":
            _faults(sandbox_url, {"endpoint": "charge", "mode": "timeout_after_success",
                                  "count": 1, "hang_s": 4})  # fmt: skip
        response = http.post(
            "/v1/carts",
            headers=headers,
            json={
                "lines": [{"sku": SKUS[i % len(SKUS)], "qty": 1}],
                "shipping_address": ADDRESS,
                "email": f"customer{i % 5}@example.com",
            },
        )
        if response.status_code != 201:
            print(f"cart {i}: {response.status_code} {response.text[:200]}")
            continue
        cart = response.json()
        order = http.post(
            "/v1/orders",
            headers={**headers, "Idempotency-Key": str(uuid.uuid4())},
            json={
                "cart_id": cart["id"],
                "payment_method_id": plan.card,
                # a bank debit carries the mandate the customer accepted at checkout
                **({"mandate": DEMO_MANDATE} if plan.kind == "debit" else {}),
            },
        )
        if order.status_code != 201:
            print(f"order {i}: {order.status_code} {order.json()['error']['code']}")
            continue
        order_ids[order.json()["id"]] = plan.kind
        if plan.kind == "return":
            returns.append((order.json()["id"], headers))
        if plan.kind in ("3ds", "3ds_abandoned"):
            three_ds.append((order.json()["id"], headers, plan.kind == "3ds"))
        if plan.kind in ("ship_fails", "timeout"):
            _wait_for(url, [order.json()["id"]], SETTLED, 30)  # its fault is used up by it
    for order_id, headers, completes in three_ds:
        _three_d_secure(url, http, sandbox_url, order_id, headers, completes)
    for order_id, headers in returns:
        _wait_for(url, [order_id], ("confirmed",), 60)
        http.post(
            f"/v1/orders/{order_id}/return",
            headers={**headers, "Idempotency-Key": str(uuid.uuid4())},
            json={"reason": "the mug is too small"},
        )
        _wait_for(url, [order_id], ("awaiting_return",), 60)
        http.post(f"/v1/admin/orders/{order_id}/return-received", headers=admin)
    _progress(url, list(order_ids), timeout_s=120)
    _customer_cancel(url, http, sandbox_url, users[0], token_for)
    with connect(url) as conn:
        money = conn.execute(QUERIES["dashboard_money"]).fetchall()
        for m in money:
            held, captured, refunded = (
                int(str(m[k])) / 100 for k in ("held_cents", "captured_cents", "refunded_cents")
            )
            print(
                f"money ({m['currency']}): held {held:.2f} on {m['held_orders']} orders,"
                f" captured {captured:.2f} on {m['captured_orders']}, refunded {refunded:.2f}"
            )
        final = {
            str(row["state"]): int(str(row["orders"]))
            for row in conn.execute(QUERIES["report_order_states"])
            if row["orders"]
        }
    print("orders by state: " + ", ".join(f"{k} {v}" for k, v in final.items()))
    return final


def _three_d_secure(
    url: str,
    http: httpx.Client,
    sandbox_url: str,
    order_id: str,
    headers: dict[str, str],
    completes: bool,
) -> None:
    """Play the customer of a card that needs 3-D Secure: the storefront reads
    next_action from the order and sends them to the bank's page."""
    _wait_for(url, [order_id], ("awaiting_payment",), 30)
    payment = http.get(f"/v1/orders/{order_id}", headers=headers).json()["payment"] or {}
    page = ((payment.get("next_action") or {}).get("redirect_to_url") or {}).get("url")
    if completes and page:
        httpx.post(page, data={"result": "complete"})
        _wait_for(url, [order_id], ("confirmed",), 30)
        print(f"3-D Secure completed at the bank's page: order {order_id} confirmed")
        return
    # Abandoned: the customer never comes back.  The demo does not wait the 15
    # minutes of the hold; it moves this one reservation's expiry to now.
    with connect(url) as conn:
        conn.execute(QUERIES["demo_expire_reservation"], {"order_id": order_id})
    _wait_for(url, [order_id], ("cancelled",), 30)
    intents = httpx.get(f"{sandbox_url}/_sandbox/payment_intents", params={"order_id": order_id})
    status = [i.get("status") for i in intents.json()["payment_intents"]]
    print(f"3-D Secure abandoned: order {order_id} cancelled, its PaymentIntent {status}")


def _customer_cancel(
    url: str, http: httpx.Client, sandbox_url: str, user: uuid.UUID, token_for: Callable[..., str]
) -> None:
    """A customer cancels an order whose card is held, before it ships: the hold is
    released at Stripe and the stock put back; no money moved, so nothing is refunded.
    (The carrier answers its first call with a 503, so the parcel waits a second.)"""
    headers = {"Authorization": f"Bearer {token_for(user)}"}
    _faults(sandbox_url, {"endpoint": "shipment", "mode": "error", "status": 503, "count": 1})
    cart = http.post(
        "/v1/carts",
        headers=headers,
        json={"lines": [{"sku": "MUG-01", "qty": 1}], "shipping_address": ADDRESS},
    ).json()
    order = http.post(
        "/v1/orders",
        headers={**headers, "Idempotency-Key": str(uuid.uuid4())},
        json={"cart_id": cart["id"], "payment_method_id": "pm_card_visa"},
    ).json()
    _wait_for(url, [order["id"]], ("paid",), 30)
    shown = http.get(f"/v1/orders/{order['id']}", headers=headers).json()["payment"] or {}
    cancel = http.post(
        f"/v1/orders/{order['id']}/cancel",
        headers={**headers, "Idempotency-Key": str(uuid.uuid4())},
    )
    _wait_for(url, [order["id"]], ("cancelled",), 30)
    # its ship step, backing off after the 503, then finds the order cancelled and ends
    deadline = time.monotonic() + 15
    with connect(url) as conn:
        while time.monotonic() < deadline and any(
            r["status"] in ("pending", "in_flight")
            for r in conn.execute(QUERIES["order_outbox"], {"order_id": order["id"]})
        ):
            time.sleep(0.1)
    effects = httpx.get(f"{sandbox_url}/_sandbox/effects").json()["effects"]
    kinds = [e["kind"] for e in effects if e["order_id"] == order["id"]]
    print(
        f"customer cancel: order {order['id']} ({shown.get('funds')}"
        f" {(shown.get('held_cents') or 0) / 100:.2f}) -> {cancel.status_code},"
        f" at Stripe: {', '.join(kinds)}"
    )
    _faults(sandbox_url)


def _events_by_type(api_url: str, admin_token: str) -> None:
    """Read the whole event feed as a consumer does (no broker in the demo) and tally it."""
    counts: dict[str, int] = {}
    after: str | None = None
    with httpx.Client(base_url=api_url, timeout=10) as http:
        while True:
            params = {"limit": "1000", **({"after": after} if after else {})}
            page = http.get(
                "/v1/events", params=params, headers={"Authorization": f"Bearer {admin_token}"}
            ).json()
            for event in page["events"]:
                counts[event["type"]] = counts.get(event["type"], 0) + 1
            if not page["events"]:
                break
            after = page["next"]
    print(f"order events (GET /v1/events): {sum(counts.values())}")
    for type_, n in sorted(counts.items()):
        print(f"  {type_:<36} {n}")


def _faults(sandbox_url: str, *rules: dict[str, Any]) -> None:
    httpx.post(f"{sandbox_url}/_sandbox/faults", json={"rules": list(rules)})


def _states(conn: psycopg.Connection[Any], ids: list[str]) -> dict[str, str]:
    return {r["id"]: r["state"] for r in conn.execute(QUERIES["order_states_of"], {"ids": ids})}


def _wait_for(url: str, ids: list[str], states: tuple[str, ...], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with connect(url) as conn:
        while not all(s in states or s in SETTLED for s in _states(conn, ids).values()):
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)


def _progress(url: str, ids: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    tty = sys.stdout.isatty()
    last = -1
    with connect(url) as conn:
        while True:
            done = sum(s in SETTLED for s in _states(conn, ids).values())
            if tty:
                bar = "#" * (30 * done // len(ids))
                print(f"\rsettling [{bar:<30}] {done}/{len(ids)}", end="", flush=True)
            elif done != last:
                print(f"settled {done}/{len(ids)}")
            last = done
            if done == len(ids) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    if tty:
        print()


def _keep_running(api_url: str, token: str) -> None:
    print()
    print("Everything keeps running; try it (Ctrl-C to stop):")
    print(f"  TOKEN={token}")
    print(f'  curl -s {api_url}/v1/orders -H "Authorization: Bearer $TOKEN"')
    print(f'  curl -s {api_url}/v1/carts -H "Authorization: Bearer $TOKEN" \\')
    print("       -H 'content-type: application/json' \\")
    print("       -d '{\"lines\":[{\"sku\":\"MUG-01\",\"qty\":1}],\"shipping_address\":"
          "{\"name\":\"Ada\",\"line1\":\"1 Main St\",\"city\":\"Berlin\","
          "\"postal_code\":\"10115\",\"country\":\"DE\"}}'")  # fmt: skip
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)
