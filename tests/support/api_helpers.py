"""Helpers for the HTTP tests."""

from __future__ import annotations

import uuid
from typing import Any

from orderflow.app.auth import mint_token

JWT_SECRET = "test-secret-that-is-at-least-32-bytes-long!"
JWT_ADMIN_SECRET = "test-admin-secret-another-key-of-32-bytes!"

ADDRESS = {
    "name": "Ada Lovelace",
    "line1": "12 St James's Square",
    "city": "London",
    "postal_code": "SW1Y 4JH",
    "country": "GB",
}


def token(user: uuid.UUID | None = None, *, admin: bool = False, **claims: Any) -> str:
    """A customer's token, or with admin=True an operator's (its own key and audience)."""
    if admin:
        return mint_token(user or uuid.uuid4(), secret=JWT_ADMIN_SECRET,
                          audience="orderflow-admin", admin=True, **claims)  # fmt: skip
    return mint_token(user or uuid.uuid4(), secret=JWT_SECRET, audience="orderflow", **claims)


def auth(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def cart_body(lines: list[tuple[str, int]] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "lines": [
            {"sku": s, "qty": q} for s, q in (lines if lines is not None else [("MUG-01", 1)])
        ],
        "shipping_address": dict(ADDRESS),
        **extra,
    }


def new_cart(client: Any, tok: str, lines: list[tuple[str, int]] | None = None) -> str:
    r = client.post("/v1/carts", json=cart_body(lines), headers=auth(tok))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def order_headers(tok: str, key: str | None = None) -> dict[str, str]:
    return {**auth(tok), "Idempotency-Key": key or str(uuid.uuid4())}
