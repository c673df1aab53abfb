"""Idempotency keys answer the same for ever within the contract: after the key
row's 72 h purge, a replay of a create gets the order it made, another body with
the same key is a reuse (422), and no path answers 5xx while the purge races."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from typing import Any

import httpx

from orderflow.sql import QUERIES
from tests.support.api_helpers import auth, new_cart, order_headers, token

PURGE = QUERIES["purge_idempotency_keys"]  # the worker's housekeeping; here with a 0 h retention
PURGE_ALL = {"hours": 0, "limit": 100_000}


def _order_body(cart: str) -> dict[str, str]:
    return {"cart_id": cart, "payment_method_id": "pm_card_visa"}


def test_a_create_replayed_after_the_purge_gets_the_order_it_made(conn: Any, client: Any) -> None:
    user = uuid.uuid4()
    tok = token(user)
    cart = new_cart(client, tok)
    first = client.post("/v1/orders", json=_order_body(cart), headers=order_headers(tok, "k-1"))
    assert first.status_code == 201
    conn.execute(PURGE, PURGE_ALL)
    again = client.post("/v1/orders", json=_order_body(cart), headers=order_headers(tok, "k-1"))
    assert again.status_code == 201, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert set(again.json()) == set(first.json())  # the create's shape
    orders = conn.execute("SELECT count(*) AS n FROM orders").fetchone()["n"]
    assert orders == 1


def test_the_same_key_with_another_body_after_the_purge_is_a_reuse(conn: Any, client: Any) -> None:
    tok = token(uuid.uuid4())
    cart = new_cart(client, tok)
    assert (
        client.post(
            "/v1/orders", json=_order_body(cart), headers=order_headers(tok, "k-2")
        ).status_code
        == 201
    )
    conn.execute(PURGE, PURGE_ALL)
    other = new_cart(client, tok)
    reused = client.post("/v1/orders", json=_order_body(other), headers=order_headers(tok, "k-2"))
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"
    mandate = {"customer_acceptance": {"ip_address": "192.0.2.9", "user_agent": "x"}}
    with_mandate = {**_order_body(cart), "mandate": mandate}
    assert (
        client.post("/v1/orders", json=with_mandate, headers=order_headers(tok, "k-2")).status_code
        == 422
    )
    assert conn.execute("SELECT count(*) AS n FROM orders").fetchone()["n"] == 1
    # the key still answers the first request
    assert (
        client.post(
            "/v1/orders", json=_order_body(cart), headers=order_headers(tok, "k-2")
        ).status_code
        == 201
    )


def test_a_return_replayed_after_the_purge_gets_its_answer(conn: Any, client: Any) -> None:
    from orderflow.statemachine.engine import advance

    user = uuid.uuid4()
    tok = token(user)
    cart = new_cart(client, tok)
    order = client.post("/v1/orders", json=_order_body(cart), headers=order_headers(tok)).json()
    for event in ("payment_captured", "shipment_created", "confirmation_sent"):
        advance(conn, order["id"], event, {})
    path = f"/v1/orders/{order['id']}/return"
    body = {"reason": "too small"}
    first = client.post(path, json=body, headers=order_headers(tok, "r-1"))
    assert first.status_code == 202
    conn.execute(PURGE, PURGE_ALL)
    again = client.post(path, json=body, headers=order_headers(tok, "r-1"))
    assert again.status_code == 202 and again.json()["id"] == order["id"]
    # another key for a second return is refused: the state does not allow it
    assert client.post(path, json=body, headers=order_headers(tok, "r-2")).status_code == 409


def _post_while_purging(
    live_server: str, db_url: str, posts: list[tuple[str, str, dict[str, Any]]], repeats: int
) -> Counter[int]:
    """Each (token, key, body) posted `repeats` times from a thread of its own while
    the purge runs over and over; the statuses the API answered."""
    from orderflow.sql.db import connect

    stop = threading.Event()

    def purge() -> None:
        with connect(db_url) as c:
            while not stop.is_set():
                c.execute(PURGE, PURGE_ALL)

    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def post(tok: str, key: str, body: dict[str, Any]) -> None:
        with httpx.Client(base_url=live_server, timeout=30) as http:
            for _ in range(repeats):
                r = http.post(
                    "/v1/orders", json=body, headers={**auth(tok), "Idempotency-Key": key}
                )
                with lock:
                    statuses[r.status_code] += 1

    purger = threading.Thread(target=purge)
    purger.start()
    threads = [threading.Thread(target=post, args=args) for args in posts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    purger.join(10)
    return statuses


def test_replays_racing_the_purge_never_answer_5xx(
    live_server: str, db_url: str, conn: Any
) -> None:
    """200 replays of 10 keys (half with another body) while the purge runs
    over and over: only 201, 409 (in flight) and 422 (reuse)."""

    with httpx.Client(base_url=live_server, timeout=30) as http:
        keys = []
        for i in range(10):
            tok = token(uuid.uuid4())
            cart = new_cart(http, tok)
            other = new_cart(http, tok)
            r = http.post("/v1/orders", json=_order_body(cart), headers=order_headers(tok, f"k{i}"))
            assert r.status_code == 201
            keys.append((tok, f"k{i}", cart, other))
    posts = []
    for n in range(20):  # half of the replays with the key's first body, half with another
        tok, key, cart, other = keys[n % len(keys)]
        posts.append((tok, key, _order_body(other if n % 2 else cart)))
    statuses = _post_while_purging(live_server, db_url, posts, repeats=10)
    assert sum(statuses.values()) == 200
    assert set(statuses) <= {201, 409, 422}, statuses
    assert statuses[201] > 0 and statuses[422] > 0
    assert conn.execute("SELECT count(*) AS n FROM orders").fetchone()["n"] == 10


def test_new_keys_racing_the_purge_never_answer_5xx(
    live_server: str, db_url: str, conn: Any
) -> None:
    """The purge removing a key row while its request is in phase 2 (or two
    requests with one key, each after a purge): only 201, 409 and 422, and one
    order per key at most."""

    with httpx.Client(base_url=live_server, timeout=30) as http:
        keys = []
        for i in range(8):
            tok = token(uuid.uuid4())
            keys.append((tok, f"new{i}", [new_cart(http, tok) for _ in range(3)]))
    posts = []
    for n in range(3 * len(keys)):  # three carts per key, each from its own thread
        tok, key, carts = keys[n % len(keys)]
        posts.append((tok, key, _order_body(carts[n // len(keys)])))
    statuses = _post_while_purging(live_server, db_url, posts, repeats=5)
    assert sum(statuses.values()) == 5 * 3 * len(keys)
    assert set(statuses) <= {201, 409, 422}, statuses
    made = conn.execute(
        "SELECT idempotency_key, count(*) AS n FROM orders GROUP BY idempotency_key"
    ).fetchall()
    assert len(made) == len(keys) and all(r["n"] == 1 for r in made)


def test_a_key_purged_between_phase_ones_statements_is_a_new_key(
    live_server: str, db_url: str, conn: Any
) -> None:
    """Phase 1 finds the key's row, then the purge deletes it before phase 1 can
    lock it: the request starts over with the key free (no assert, no 5xx)."""
    from orderflow.sql.db import connect

    tok = token(uuid.uuid4())
    with httpx.Client(base_url=live_server, timeout=30) as http:
        cart = new_cart(http, tok, [("MUG-01", 1)])
        conn.execute("UPDATE products SET available = 0 WHERE sku = 'MUG-01'")
        first = http.post("/v1/orders", json=_order_body(cart), headers=order_headers(tok, "p1"))
        assert first.status_code == 409  # out_of_stock, stored: it made nothing
        conn.execute("UPDATE products SET available = 5 WHERE sku = 'MUG-01'")
        answers: list[httpx.Response] = []
        with connect(db_url) as purger, purger.transaction():
            purger.execute("SELECT 1 FROM idempotency_keys WHERE key = 'p1' FOR UPDATE")
            replay = threading.Thread(
                target=lambda: answers.append(
                    http.post(
                        "/v1/orders", json=_order_body(cart), headers=order_headers(tok, "p1")
                    )
                )
            )
            replay.start()
            _wait_until_blocked(conn, "lock_idempotency_key")  # seen from outside the transaction
            purger.execute(PURGE, PURGE_ALL)  # the row goes while phase 1 waits for it
        replay.join(30)
    assert [a.status_code for a in answers] == [201], [a.text for a in answers]


def _wait_until_blocked(conn: Any, what: str) -> None:
    import time

    for _ in range(200):
        waiting = conn.execute(
            "SELECT count(*) AS n FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND query LIKE '%%FROM idempotency_keys%%FOR UPDATE%%'"
        ).fetchone()["n"]
        if waiting:
            return
        time.sleep(0.02)
    raise AssertionError(f"no request waited at {what}")
