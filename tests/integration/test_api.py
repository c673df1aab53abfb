"""The HTTP API against a real database: carts, orders, idempotency, auth, reads, returns."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import httpx
import jwt
import psycopg
import pytest

from orderflow import failpoints
from orderflow.sql.db import connect
from orderflow.statemachine.engine import advance
from tests.support.api_helpers import (
    JWT_SECRET,
    auth,
    cart_body,
    new_cart,
    order_headers,
    token,
)


def _count(db_url: str, table: str) -> int:
    with connect(db_url) as conn:
        row = conn.execute(f"SELECT count(*) AS n FROM {table}").fetchone()
        assert row is not None
        return int(row["n"])


def _counts(db_url: str) -> dict[str, int]:
    return {
        t: _count(db_url, t)
        for t in ("carts", "orders", "reservations", "outbox", "order_history", "stock_ledger")
    }


def _available(db_url: str, sku: str) -> int:
    with connect(db_url) as conn:
        row = conn.execute("SELECT available FROM products WHERE sku = %s", (sku,)).fetchone()
        assert row is not None
        return int(row["available"])


def _place(client: Any, tok: str, cart_id: str, key: str | None = None) -> Any:
    return client.post(
        "/v1/orders",
        json={"cart_id": cart_id, "payment_method_id": "pm_card_visa"},
        headers=order_headers(tok, key),
    )


# ---------------------------------------------------------------- carts


def test_cart_roundtrip_and_isolation(client: Any) -> None:
    alice, bob = token(), token()
    r = client.post(
        "/v1/carts", json=cart_body([("MUG-01", 2)], email="a@example.com"), headers=auth(alice)
    )
    assert r.status_code == 201
    cart = r.json()
    assert cart["status"] == "open"
    assert cart["lines"] == [
        {"sku": "MUG-01", "qty": 2, "unit_price_cents": 1200, "currency": "EUR"}
    ]
    assert client.get(f"/v1/carts/{cart['id']}", headers=auth(alice)).json() == cart
    r = client.get(f"/v1/carts/{cart['id']}", headers=auth(bob))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (cart_body([("MUG-01", 0)]), "lines.0.qty"),
        (cart_body([("MUG-01", 11)]), "lines[0].qty"),
        (cart_body([("NOPE", 1)]), "lines[0].sku"),
        (cart_body([("MUG-01", 1), ("MUG-01", 2)]), "lines[1].sku"),
        (cart_body([]), "lines"),
        (
            {
                **cart_body(),
                "shipping_address": {**cart_body()["shipping_address"], "country": "XX"},
            },
            "shipping_address.country",
        ),
        (
            {
                **cart_body(),
                "shipping_address": {**cart_body()["shipping_address"], "country": "gb"},
            },
            "shipping_address.country",
        ),
        ({**cart_body(), "shipping_address": {"name": "x"}}, "shipping_address.line1"),
        ({**cart_body(), "price_cents": 1}, "price_cents"),
        ({**cart_body(), "lines": [{"sku": "MUG-01", "qty": "2"}]}, "lines.0.qty"),
        ({**cart_body(), "lines": [{"sku": "MUG-01", "qty": True}]}, "lines.0.qty"),
        ({**cart_body(), "lines": [{"sku": "MUG\x00", "qty": 1}]}, "lines.0.sku"),
        ({**cart_body(), "email": "not-an-email"}, "email"),
    ],
)
def test_invalid_cart_is_422_with_field_details_and_writes_nothing(
    client: Any, db_url: str, body: dict[str, Any], field: str
) -> None:
    before = _counts(db_url)
    r = client.post("/v1/carts", json=body, headers=auth(token()))
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "validation_error"
    assert field in [d["field"] for d in error["details"]]
    assert _counts(db_url) == before


# ---------------------------------------------------------------- placing orders


def test_place_order(client: Any, db_url: str) -> None:
    tok = token()
    stock = _available(db_url, "TEE-M")
    cart_id = new_cart(client, tok, [("TEE-M", 2), ("MUG-01", 1)])
    r = _place(client, tok, cart_id)
    assert r.status_code == 201, r.text
    order = r.json()
    assert order["state"] == "reserved"
    assert order["total_cents"] == 2 * 2500 + 1200
    assert order["currency"] == "EUR"
    assert order["reservation_expires_at"] > order["created_at"]
    assert {line["sku"] for line in order["lines"]} == {"TEE-M", "MUG-01"}
    assert _available(db_url, "TEE-M") == stock - 2
    assert client.get(f"/v1/carts/{cart_id}", headers=auth(tok)).json()["status"] == "ordered"
    # the cart cannot be ordered twice, whatever the key
    r = _place(client, tok, cart_id)
    assert r.status_code == 409 and r.json()["error"]["code"] == "cart_already_ordered"


def test_replay_returns_the_first_answer_byte_for_byte(client: Any, db_url: str) -> None:
    tok = token()
    cart_id = new_cart(client, tok)
    first = _place(client, tok, cart_id, key="key-1")
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    counts = _counts(db_url)
    again = _place(client, tok, cart_id, key="key-1")
    assert again.status_code == 201
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert _counts(db_url) == counts


def test_same_key_other_body_is_422(client: Any, db_url: str) -> None:
    tok = token()
    cart_id, other_cart = new_cart(client, tok), new_cart(client, tok)
    assert _place(client, tok, cart_id, key="k").status_code == 201
    counts = _counts(db_url)
    r = _place(client, tok, other_cart, key="k")
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "idempotency_key_reused"
    assert _counts(db_url) == counts


@pytest.mark.parametrize(
    ("headers", "code"),
    [({}, "idempotency_key_required"), ({"Idempotency-Key": "x" * 256}, "invalid_idempotency_key")],
)
def test_idempotency_key_is_required_and_bounded(
    client: Any, headers: dict[str, str], code: str
) -> None:
    tok = token()
    cart_id = new_cart(client, tok)
    r = client.post(
        "/v1/orders",
        json={"cart_id": cart_id, "payment_method_id": "pm_card_visa"},
        headers={**auth(tok), **headers},
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == code


def test_replay_after_out_of_stock_is_the_same_409(client: Any, db_url: str) -> None:
    tok = token()
    cart_id = new_cart(client, tok, [("LAMP-01", 5)])
    with connect(db_url) as conn:
        conn.execute("UPDATE products SET available = 4 WHERE sku = 'LAMP-01'")
    counts = _counts(db_url)
    first = _place(client, tok, cart_id, key="oos")
    assert first.status_code == 409
    assert first.json()["error"] == {
        "code": "out_of_stock",
        "message": "some items are out of stock",
        "details": {"skus": ["LAMP-01"]},
    }
    assert {k: v for k, v in _counts(db_url).items()} == counts
    with connect(db_url) as conn:  # stock arrives: a replay still answers what it answered
        conn.execute("UPDATE products SET available = 50 WHERE sku = 'LAMP-01'")
    again = _place(client, tok, cart_id, key="oos")
    assert again.status_code == 409 and again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert _place(client, tok, cart_id).status_code == 201  # a new key places it


def test_replay_after_a_422_is_the_same_422(client: Any, db_url: str) -> None:
    tok = token()
    with connect(db_url) as conn:
        conn.execute(
            "INSERT INTO products (sku, name, price_cents, currency, available)"
            " VALUES ('GOLD-1', 'gold bar', 200000, 'EUR', 100)"
        )
    cart_id = new_cart(client, tok, [("GOLD-1", 6)])  # 1,200,000 cents > the 1,000,000 limit
    first = _place(client, tok, cart_id, key="big")
    assert first.status_code == 422
    assert first.json()["error"]["details"][0]["field"] == "total_cents"
    assert _available(db_url, "GOLD-1") == 100
    again = _place(client, tok, cart_id, key="big")
    assert again.content == first.content and again.status_code == 422
    bad = client.post(
        "/v1/orders",
        json={"cart_id": "nope", "payment_method_id": 7},
        headers=order_headers(tok, "bad"),
    )
    assert bad.status_code == 422
    assert {d["field"] for d in bad.json()["error"]["details"]} == {"cart_id", "payment_method_id"}


def test_retry_after_a_failure_before_commit_succeeds(client: Any, db_url: str) -> None:
    tok = token()
    cart_id = new_cart(client, tok)
    counts = _counts(db_url)
    with failpoints.armed("create_order.after_write"):
        r = _place(client, tok, cart_id, key="retry-me")
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error"
    assert _counts(db_url) == counts
    r = _place(client, tok, cart_id, key="retry-me")
    assert r.status_code == 201, r.text
    assert "idempotent-replayed" not in r.headers


def test_keys_are_scoped_per_user(client: Any) -> None:
    alice, bob = token(), token()
    a = _place(client, alice, new_cart(client, alice), key="shared-key")
    b = _place(client, bob, new_cart(client, bob), key="shared-key")
    assert a.status_code == b.status_code == 201
    assert a.json()["id"] != b.json()["id"]
    assert "idempotent-replayed" not in b.headers


def test_idor_is_404_everywhere(client: Any, db_url: str) -> None:
    alice, bob = token(), token()
    cart_id = new_cart(client, alice)
    order = _place(client, alice, cart_id).json()
    assert client.get(f"/v1/orders/{order['id']}", headers=auth(bob)).status_code == 404
    r = client.post(
        f"/v1/orders/{order['id']}/return", json={"reason": "mine now"}, headers=order_headers(bob)
    )
    assert r.status_code == 404
    other_cart = new_cart(client, alice)
    r = _place(client, bob, other_cart)
    assert r.status_code == 404
    assert client.get(f"/v1/carts/{other_cart}", headers=auth(alice)).json()["status"] == "open"
    assert client.get("/v1/orders", headers=auth(bob)).json()["orders"] == []


# ---------------------------------------------------------------- hardening


def test_body_limits_and_parsing(client: Any, db_url: str) -> None:
    tok = token()
    before = _counts(db_url)
    big = b'{"lines": [' + b'{"sku": "MUG-01", "qty": 1},' * 3000 + b'{"sku": "MUG-01", "qty": 1}]}'
    r = client.post(
        "/v1/carts", content=big, headers={**auth(tok), "content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    r = client.post(
        "/v1/carts", content=b"{not json", headers={**auth(tok), "content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = client.post(
        "/v1/carts", content=b"lines=1", headers={**auth(tok), "content-type": "text/plain"}
    )
    assert r.status_code == 415
    r = client.post(
        "/v1/carts",
        content=b'{"lines": NaN}',
        headers={**auth(tok), "content-type": "application/json"},
    )
    assert r.status_code == 400
    r = client.post(
        "/v1/carts",
        content=b'{"lines": [{"sku": "\\ud800", "qty": 1}], "shipping_address": {}}',
        headers={**auth(tok), "content-type": "application/json"},
    )
    assert r.status_code == 422
    assert _counts(db_url) == before


def _tokens() -> dict[str, str]:
    user = str(uuid.uuid4())
    now = int(time.time())
    good = {"sub": user, "aud": "orderflow", "exp": now + 60}
    none_alg = jwt.encode(good, key=None, algorithm="none")  # type: ignore[arg-type]
    return {
        "alg none": none_alg,
        "wrong signature": jwt.encode(
            good, "another-secret-of-at-least-32-bytes!!", algorithm="HS256"
        ),
        # past the 30 s leeway (JWT_LEEWAY_S)
        "expired": jwt.encode({**good, "exp": now - 60}, JWT_SECRET, algorithm="HS256"),
        "not yet valid": jwt.encode({**good, "nbf": now + 60}, JWT_SECRET, algorithm="HS256"),
        "no exp": jwt.encode({"sub": user, "aud": "orderflow"}, JWT_SECRET, algorithm="HS256"),
        "wrong aud": jwt.encode({**good, "aud": "someone-else"}, JWT_SECRET, algorithm="HS256"),
        "no aud": jwt.encode({"sub": user, "exp": now + 60}, JWT_SECRET, algorithm="HS256"),
        "sub not a uuid": jwt.encode({**good, "sub": "admin"}, JWT_SECRET, algorithm="HS256"),
        "HS512": jwt.encode(good, JWT_SECRET, algorithm="HS512"),
        "garbage": "not.a.token",
    }


@pytest.mark.parametrize("case", list(_tokens()))
def test_bad_tokens_are_401(client: Any, case: str) -> None:
    bad = _tokens()[case]
    r = client.get("/v1/orders", headers=auth(bad))
    assert r.status_code == 401, case
    assert r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"


def test_the_clock_leeway_is_honoured(client: Any) -> None:
    """Clocks drift: a token a few seconds past its exp, or not quite valid yet, passes."""
    now = int(time.time())
    claims = {"sub": str(uuid.uuid4()), "aud": "orderflow"}
    for extra in ({"exp": now - 10}, {"exp": now + 60, "nbf": now + 10, "iat": now + 10}):
        tok = jwt.encode({**claims, **extra}, JWT_SECRET, algorithm="HS256")
        assert client.get("/v1/orders", headers=auth(tok)).status_code == 200, extra


def test_a_customers_key_cannot_mint_an_operators_token(client: Any, conn: Any) -> None:
    """Admin tokens have their own key and audience: whoever mints storefront tokens
    cannot mint one, whatever claims they write."""
    order = client.post("/v1/carts", json=cart_body(), headers=auth(token()))
    assert order.status_code == 201
    path = "/v1/admin/orders/01HZZZZZZZZZZZZZZZZZZZZZZZ/return-received"
    now = int(time.time())
    forged = [
        jwt.encode(
            {"sub": str(uuid.uuid4()), "aud": aud, "exp": now + 60, "role": "admin"},
            JWT_SECRET,
            algorithm="HS256",
        )
        for aud in ("orderflow", "orderflow-admin")
    ]
    for tok in forged:
        assert client.post(path, headers=auth(tok)).status_code == 401
    assert client.post(path, headers=auth(token(admin=True))).status_code == 404  # let in
    # and an operator's token is no customer's
    assert client.get("/v1/orders", headers=auth(token(admin=True))).status_code == 401


def test_the_issuer_is_checked_when_set(db_url: str, api_settings: Any) -> None:
    from starlette.testclient import TestClient

    from orderflow.app.main import create_app

    settings = api_settings.model_copy(update={"jwt_issuer": "https://shop.example"})
    with TestClient(create_app(settings, database_url=db_url)) as c:
        assert c.get("/v1/orders", headers=auth(token())).status_code == 401  # no iss
        other = token(issuer="https://evil.example")
        assert c.get("/v1/orders", headers=auth(other)).status_code == 401
        good = token(issuer="https://shop.example")
        assert c.get("/v1/orders", headers=auth(good)).status_code == 200


def test_missing_or_malformed_authorization_is_401(client: Any) -> None:
    assert client.get("/v1/orders").status_code == 401
    assert client.get("/v1/orders", headers={"Authorization": token()}).status_code == 401
    assert client.get("/v1/orders", headers={"Authorization": "Basic eDp5"}).status_code == 401


def test_database_unreachable_is_503_quickly(api_settings: Any) -> None:
    from starlette.testclient import TestClient

    from orderflow.app.main import create_app

    app = create_app(api_settings, database_url="postgresql://postgres@127.0.0.1:1/none")
    with TestClient(app) as c:
        started = time.monotonic()
        r = c.post("/v1/carts", json=cart_body(), headers=auth(token()))
        elapsed = time.monotonic() - started
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "database_unavailable"
        assert r.headers["retry-after"] == "2"
        assert elapsed < 10  # bounded by the pool timeout, never a hang
        health = c.get("/healthz")
        assert health.status_code == 503 and health.json()["database"] == "unreachable"


# ---------------------------------------------------------------- reads


def test_order_detail_and_listing(client: Any, db_url: str) -> None:
    tok = token()
    ids = [_place(client, tok, new_cart(client, tok)).json()["id"] for _ in range(5)]
    with connect(db_url) as conn:
        advance(conn, ids[0], "payment_captured")
        advance(conn, ids[1], "payment_failed")
    detail = client.get(f"/v1/orders/{ids[0]}", headers=auth(tok)).json()
    assert detail["state"] == "paid"
    assert [(h["from_state"], h["to_state"], h["event"]) for h in detail["history"]] == [
        (None, "reserved", "place"),
        ("reserved", "paid", "payment_captured"),
    ]
    assert (
        detail["payment"] is None
        and detail["shipment"] is None
        and detail["tracking_number"] is None
    )

    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/orders", params=params, headers=auth(tok)).json()
        seen += [o["id"] for o in page["orders"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first, every order once
    reserved = client.get("/v1/orders", params={"state": "reserved"}, headers=auth(tok)).json()
    assert {o["id"] for o in reserved["orders"]} == set(ids[2:])
    bad = ({"state": "bogus"}, {"limit": "0"}, {"limit": "x"}, {"cursor": "!!"},
           {"limit": "²"}, {"limit": "٣"}, {"limit": "9" * 5000})  # fmt: skip
    for params in bad:
        r = client.get("/v1/orders", params=params, headers=auth(tok))
        assert r.status_code == 422, params
    assert client.get("/v1/orders/not-a-ulid", headers=auth(tok)).status_code == 404


# ---------------------------------------------------------------- returns


def _confirmed_order(client: Any, db_url: str, tok: str) -> str:
    order_id = str(_place(client, tok, new_cart(client, tok)).json()["id"])
    with connect(db_url) as conn:
        for event in ("payment_captured", "shipment_created", "confirmation_sent"):
            advance(conn, order_id, event)
    return order_id


def test_return_flow(client: Any, db_url: str) -> None:
    tok, admin = token(), token(admin=True)
    reserved = _place(client, tok, new_cart(client, tok)).json()["id"]
    r = client.post(
        f"/v1/orders/{reserved}/return", json={"reason": "x"}, headers=order_headers(tok)
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_state"

    order_id = _confirmed_order(client, db_url, tok)
    headers = order_headers(tok, "return-1")
    r = client.post(f"/v1/orders/{order_id}/return", json={"reason": "too small"}, headers=headers)
    assert r.status_code == 202
    assert r.json() == {"id": order_id, "state": "return_requested"}
    again = client.post(
        f"/v1/orders/{order_id}/return", json={"reason": "too small"}, headers=headers
    )
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"

    with connect(db_url) as conn:
        advance(conn, order_id, "return_label_created")
    url = f"/v1/admin/orders/{order_id}/return-received"
    # a customer's token is no operator's: signed with another key for another audience
    assert client.post(url, headers=auth(tok)).status_code == 401
    r = client.post(url, headers=auth(admin))
    assert r.status_code == 200 and r.json()["state"] == "returned"
    assert client.post(url, headers=auth(admin)).status_code == 409
    history = client.get(f"/v1/orders/{order_id}", headers=auth(tok)).json()["history"]
    assert [h["event"] for h in history][-3:] == [
        "return_requested",
        "return_label_created",
        "return_received",
    ]


# ---------------------------------------------------------------- logs


def test_no_secret_in_logs(client: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    tok = token()
    cart_id = new_cart(client, tok)
    _place(client, tok, cart_id)
    client.get("/v1/orders", headers=auth("Bearer-garbage." + tok))
    with failpoints.armed("create_order.after_write"):
        _place(client, tok, new_cart(client, tok))
    text = caplog.text
    assert tok not in text and tok.split(".")[2] not in text
    assert "pm_card_visa" not in text


def test_psycopg_error_is_not_a_traceback_or_5xx_for_bad_input(client: Any, db_url: str) -> None:
    """A string the database cannot store is refused at the edge, not by a DB error."""
    tok = token()
    body = cart_body()
    body["shipping_address"]["name"] = "nul\x00byte"
    r = client.post("/v1/carts", json=body, headers=auth(tok))
    assert r.status_code == 422
    with pytest.raises(psycopg.errors.UntranslatableCharacter), connect(db_url) as conn:
        conn.execute("SELECT %s::jsonb", ('"\\u0000"',))


def test_metrics(client: Any, db_url: str) -> None:
    tok = token()
    order = _place(client, tok, new_cart(client, tok)).json()
    client.get("/v1/orders/01ZZZZZZZZZZZZZZZZZZZZZZZZ", headers=auth(tok))
    with connect(db_url) as conn:  # its card held, to be captured within the hour
        conn.execute(
            "INSERT INTO payment_intents (order_id, id, status, amount_cents,"
            " amount_capturable_cents, currency, held_at, capture_before)"
            " VALUES (%s, 'pi_held', 'requires_capture', %s, %s, 'EUR', now(),"
            " now() + interval '1 hour')",
            (order["id"], order["total_cents"], order["total_cents"]),
        )
    text = client.get("/metrics").text
    assert 'orderflow_payment_holds{currency="EUR"} 1.0' in text
    assert f'orderflow_payment_held_cents{{currency="EUR"}} {float(order["total_cents"])}' in text
    soonest = re.search(
        r'orderflow_payment_hold_soonest_expiry_seconds\{currency="EUR"\} ([0-9.e+]+)', text
    )
    assert soonest and 3000 < float(soonest[1]) <= 3600
    assert 'orderflow_orders{state="reserved"} 1.0' in text
    assert 'orderflow_outbox_rows{status="pending",step="charge_payment"} 1.0' in text
    assert 'route="/v1/orders",status="201"' in text
    assert 'route="/v1/orders/{order_id}",status="404"' in text
    assert "orderflow_database_up 1.0" in text


def test_metrics_behind_a_token_when_one_is_set(db_url: str, api_settings: Any) -> None:
    from starlette.testclient import TestClient

    from orderflow.app.main import create_app

    token = "metrics-token-0123456789"
    settings = api_settings.model_copy(update={"metrics_token": token})
    with TestClient(create_app(settings, database_url=db_url)) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = c.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and b"orderflow_orders" in ok.content


def test_the_workers_metrics_server_checks_the_token_too() -> None:
    from orderflow.app.serving import free_port
    from orderflow.metrics import serve_metrics

    port = free_port()
    serve_metrics("127.0.0.1", port, "metrics-token-0123456789")
    url = f"http://127.0.0.1:{port}/metrics"
    for _ in range(50):
        try:
            refused = httpx.get(url)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    assert refused.status_code == 401
    ok = httpx.get(url, headers={"Authorization": "Bearer metrics-token-0123456789"})
    assert ok.status_code == 200
