"""`orderflow demo`: the saga end to end with the real worker and the provider sandbox.

The sandbox (Stripe, carrier, e-mail stand-ins) runs in this process on a free
port; the outbox worker drains the orders exactly as the daemon does.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import psycopg

from orderflow import PROJECT_ROOT
from orderflow.catalog import load_catalog
from orderflow.orders import LineRequest, create_order
from sql import QUERIES
from statemachine.engine import advance
from statemachine.errors import OrderflowError, OutOfStock

ADDRESS = {
    "name": "Ada Lovelace",
    "line1": "12 St James's Square",
    "city": "London",
    "postal_code": "SW1Y 4JH",
    "country": "GB",
}


def start_sandbox() -> tuple[str, Callable[[], None]]:
    """The provider sandbox on a free local port, in a background thread."""
    import uvicorn

    from sandbox.app import create_sandbox_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_sandbox_app(), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)

    def stop() -> None:
        server.should_exit = True
        thread.join(5)

    return f"http://127.0.0.1:{port}", stop


def run_demo(conn: psycopg.Connection[Any], url: str, ttl_seconds: int) -> list[str]:
    from outbox_worker.providers import ProviderConfig, Providers
    from outbox_worker.runner import Worker

    count = load_catalog(conn, PROJECT_ROOT / "catalog" / "sample.csv")
    print(f"catalog: {count} products loaded")
    sandbox_url, stop_sandbox = start_sandbox()
    print(f"provider sandbox: {sandbox_url}")
    providers = Providers(
        ProviderConfig("sk_test_demo", sandbox_url, sandbox_url, sandbox_url, timeout_s=2.0)
    )
    worker = Worker(url, providers, concurrency=4, lease_s=10, backoff_scale=0.01)
    user = uuid.uuid4()

    def place(lines: list[LineRequest], card: str = "pm_card_visa") -> str:
        return create_order(
            conn,
            user_id=user,
            lines=lines,
            shipping_address=ADDRESS,
            email="ada@example.com",
            payment_method_id=card,
            idempotency_key=str(uuid.uuid4()),
            ttl_seconds=ttl_seconds,
        ).id

    def faults(*rules: dict[str, Any]) -> None:
        httpx.post(f"{sandbox_url}/_sandbox/faults", json={"rules": list(rules)})

    def drain() -> None:
        while _open_rows(conn):
            if worker.run_once() == 0:
                time.sleep(0.02)

    order_ids: list[str] = []
    try:
        print("\n1. a happy order")
        order_ids.append(place([LineRequest("MUG-01", 2), LineRequest("TEE-M", 1)]))
        drain()
        print("2. a declined card")
        order_ids.append(place([LineRequest("CAP-01", 1)], "pm_card_chargeDeclined"))
        drain()
        print("3. the carrier refuses the parcel after the charge: refund, then release")
        faults({"endpoint": "shipment", "mode": "error", "status": 422})
        order_ids.append(place([LineRequest("LAMP-01", 1)]))
        drain()
        faults()
        print("4. Stripe times out after charging: the worker replays the key, one charge")
        faults({"endpoint": "charge", "mode": "timeout_after_success", "count": 1, "hang_s": 4})
        order_ids.append(place([LineRequest("BAG-01", 1)]))
        drain()
        faults()
        print("5. a return, taken through to `returned`")
        returned = place([LineRequest("PEN-05", 1)])
        order_ids.append(returned)
        drain()
        advance(conn, returned, "return_requested", {"reason": "too small"})
        drain()
        advance(conn, returned, "return_received", {})
        drain()
        try:
            place([LineRequest("LAMP-01", 1000)])
        except OutOfStock as exc:
            print(f"6. refused an order for 1000 desk lamps: {exc} (nothing written)")
        except OrderflowError as exc:  # pragma: no cover - the demo should not get here
            print(f"refused: {exc}")
        print()
        effects = httpx.get(f"{sandbox_url}/_sandbox/effects").json()["effects"]
        for order_id in order_ids:
            print_order(conn, order_id, [e for e in effects if e["order_id"] == order_id])
    finally:
        worker.close()
        providers.close()
        stop_sandbox()
    return order_ids


def _open_rows(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(QUERIES["open_outbox_rows"]).fetchone()
    assert row is not None
    return int(row["n"])


def print_order(
    conn: psycopg.Connection[Any], order_id: str, effects: list[dict[str, Any]]
) -> None:
    state = conn.execute(QUERIES["get_order"], {"order_id": order_id}).fetchone()
    assert state is not None
    print(f"order {order_id}: {state['state']}")
    for h in conn.execute(QUERIES["order_history"], {"order_id": order_id}):
        source = h["from_state"] or "(new)"
        step = f"  [{h['detail']['step']}]" if "step" in h["detail"] else ""
        print(f"    {h['at']:%H:%M:%S.%f}  {source:>16} -> {h['to_state']:<16} {h['event']}{step}")
    seen = ", ".join(f"{e['kind']}" + (f" {e['amount']}" if e["amount"] else "") for e in effects)
    print(f"    provider effects: {seen or 'none'}")
    print()
