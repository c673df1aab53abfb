"""Concurrent requests against a real uvicorn server."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from orderflow.sql.db import connect
from tests.support.api_helpers import auth, cart_body, order_headers, token


def _one(db_url: str, sql: str, *params: Any) -> Any:
    with connect(db_url) as conn:
        row = conn.execute(sql, params).fetchone()  # type: ignore[arg-type]
        assert row is not None
        return next(iter(row.values()))


def _cart(base: str, tok: str, lines: list[tuple[str, int]]) -> str:
    r = httpx.post(f"{base}/v1/carts", json=cart_body(lines), headers=auth(tok))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


@contextlib.contextmanager
def _first_request_held_at_cart_lock(
    live_server: str, db_url: str, body: dict[str, Any], headers: dict[str, str]
) -> Iterator[tuple[int, list[httpx.Response], threading.Thread]]:
    """POST the order while a blocker holds its cart: yield the waiting backend's pid."""
    first: list[httpx.Response] = []
    with connect(db_url) as blocker, blocker.transaction():
        blocker.execute("SELECT 1 FROM carts WHERE id = %s FOR UPDATE", (body["cart_id"],))
        thread = threading.Thread(
            target=lambda: first.append(
                httpx.post(f"{live_server}/v1/orders", json=body, headers=headers, timeout=30)
            )
        )
        thread.start()
        waiting = 0
        for _ in range(500):
            waiting = _one(
                db_url,
                "SELECT COALESCE(max(pid), 0) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()",
            )
            if waiting:
                break
            threading.Event().wait(0.01)
        assert waiting, "the first request never reached the cart lock"
        yield waiting, first, thread


def test_fifty_concurrent_posts_with_one_key(live_server: str, db_url: str) -> None:
    tok = token()
    cart_id = _cart(live_server, tok, [("MUG-01", 1)])
    headers = order_headers(tok, "one-key")
    body = {"cart_id": cart_id, "payment_method_id": "pm_card_visa"}
    barrier = threading.Barrier(50)

    def post(_: int) -> httpx.Response:
        with httpx.Client(timeout=30) as c:
            barrier.wait()
            return c.post(f"{live_server}/v1/orders", json=body, headers=headers)

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(post, range(50)))

    created = [a for a in answers if a.status_code == 201]
    in_use = [a for a in answers if a.status_code == 409]
    assert len(created) + len(in_use) == 50, [a.status_code for a in answers]
    assert created, "nobody got the order"
    assert len({a.content for a in created}) == 1  # every 201 is the stored answer
    assert all(a.json()["error"]["code"] == "idempotency_key_in_use" for a in in_use)
    order_id = created[0].json()["id"]
    assert _one(db_url, "SELECT count(*) FROM orders") == 1
    assert _one(db_url, "SELECT count(*) FROM reservations WHERE order_id = %s", order_id) == 1
    assert _one(db_url, "SELECT count(*) FROM outbox WHERE order_id = %s", order_id) == 1


def test_many_buyers_for_the_last_units(live_server: str, db_url: str) -> None:
    units, buyers = 4, 16
    with connect(db_url) as conn:
        # the products trigger records the adjustment in the ledger
        conn.execute("UPDATE products SET available = %s WHERE sku = 'PEN-05'", (units,))
    carts = []
    for _ in range(buyers):
        tok = token()
        carts.append((tok, _cart(live_server, tok, [("PEN-05", 1), ("NOTE-A5", 1)])))
    before_orders = _one(db_url, "SELECT count(*) FROM orders")
    barrier = threading.Barrier(buyers)

    def buy(item: tuple[str, str]) -> httpx.Response:
        tok, cart_id = item
        with httpx.Client(timeout=30) as c:
            barrier.wait()
            return c.post(
                f"{live_server}/v1/orders",
                json={"cart_id": cart_id, "payment_method_id": "pm_card_visa"},
                headers=order_headers(tok),
            )

    with ThreadPoolExecutor(buyers) as pool:
        answers = list(pool.map(buy, carts))

    codes = sorted(a.status_code for a in answers)
    assert codes == [201] * units + [409] * (buyers - units)
    for a in answers:
        if a.status_code == 409:
            assert a.json()["error"] == {
                "code": "out_of_stock",
                "message": "some items are out of stock",
                "details": {"skus": ["PEN-05"]},
            }
    assert _one(db_url, "SELECT available FROM products WHERE sku = 'PEN-05'") == 0
    assert _one(db_url, "SELECT count(*) FROM orders") == before_orders + units
    assert _one(db_url, "SELECT count(*) FROM reservations") == units
    # stock conservation: the ledger explains every unit
    assert (
        _one(
            db_url,
            "SELECT count(*) FROM products p WHERE available <>"
            " (SELECT COALESCE(sum(delta), 0) FROM stock_ledger l WHERE l.sku = p.sku)",
        )
        == 0
    )


def test_same_key_while_the_first_is_in_flight_is_409(live_server: str, db_url: str) -> None:
    """Hold the first request inside its transaction (we lock its cart), then retry the key."""
    tok = token()
    cart_id = _cart(live_server, tok, [("MUG-01", 1)])
    headers = order_headers(tok, "slow-key")
    body = {"cart_id": cart_id, "payment_method_id": "pm_card_visa"}
    with _first_request_held_at_cart_lock(live_server, db_url, body, headers) as (_, first, thread):
        second = httpx.post(f"{live_server}/v1/orders", json=body, headers=headers, timeout=30)
        assert second.status_code == 409
        assert second.json()["error"]["code"] == "idempotency_key_in_use"
        assert second.headers["retry-after"] == "1"
    thread.join(30)
    assert first[0].status_code == 201
    third = httpx.post(f"{live_server}/v1/orders", json=body, headers=headers, timeout=30)
    assert third.status_code == 201 and third.content == first[0].content
    assert third.headers["idempotent-replayed"] == "true"


def test_a_request_whose_connection_dies_frees_its_key_at_once(
    live_server: str, db_url: str
) -> None:
    """Kill the first request's backend mid-transaction: the retry must not wait for the lock."""
    tok = token()
    cart_id = _cart(live_server, tok, [("MUG-01", 1)])
    headers = order_headers(tok, "killed-key")
    body = {"cart_id": cart_id, "payment_method_id": "pm_card_visa"}
    with _first_request_held_at_cart_lock(live_server, db_url, body, headers) as held:
        victim, first, thread = held
        _one(db_url, "SELECT pg_terminate_backend(%s)", victim)
        thread.join(30)
    assert first[0].status_code == 503  # its connection died: nothing was written
    retry = httpx.post(f"{live_server}/v1/orders", json=body, headers=headers, timeout=30)
    assert retry.status_code == 201, retry.text  # not 409 key-in-use for the lock's 60 s
    assert _one(db_url, "SELECT count(*) FROM orders WHERE cart_id = %s", cart_id) == 1
