"""Talking to the sandbox from tests: reset, faults, effects; and running the worker dry."""

from __future__ import annotations

import time
from typing import Any

import httpx
import psycopg

from orderflow.outbox_worker.providers import ProviderConfig


class SandboxClient:
    def __init__(self, url: str) -> None:
        self.url = url

    def reset(self) -> None:
        httpx.post(f"{self.url}/_sandbox/reset").raise_for_status()

    def faults(self, *rules: dict[str, Any]) -> None:
        httpx.post(f"{self.url}/_sandbox/faults", json={"rules": list(rules)}).raise_for_status()

    def injected(self) -> dict[str, int]:
        """How many faults the current rules have injected so far, by mode."""
        response = httpx.get(f"{self.url}/_sandbox/faults")
        response.raise_for_status()
        counts: dict[str, int] = {}
        for rule in response.json()["rules"]:
            counts[rule["mode"]] = counts.get(rule["mode"], 0) + int(rule["injected"])
        return counts

    def effects(self, kind: str | None = None, order_id: str | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in {"kind": kind, "order_id": order_id}.items() if v}
        response = httpx.get(f"{self.url}/_sandbox/effects", params=params)
        response.raise_for_status()
        return list(response.json()["effects"])

    def config(self, **settings: Any) -> dict[str, Any]:
        """Merge settings into the sandbox's config (key window, search lag, webhooks...)."""
        response = httpx.post(f"{self.url}/_sandbox/config", json=settings)
        response.raise_for_status()
        return dict(response.json())

    def advance_clock(self, seconds: float) -> None:
        httpx.post(f"{self.url}/_sandbox/clock", json={"advance_s": seconds}).raise_for_status()

    def intents(self, order_id: str | None = None) -> list[dict[str, Any]]:
        """The sandbox's own view of its PaymentIntents (every one, for an order)."""
        params = {"order_id": order_id} if order_id else {}
        response = httpx.get(f"{self.url}/_sandbox/payment_intents", params=params)
        response.raise_for_status()
        return list(response.json()["payment_intents"])

    def authenticate(self, intent_id: str, result: str = "complete") -> httpx.Response:
        """Play the customer at the bank's 3-D Secure page."""
        return httpx.post(f"{self.url}/_sandbox/3ds/{intent_id}", data={"result": result})

    def settle(self, intent_id: str, outcome: str = "succeeded") -> httpx.Response:
        """The bank settles a processing debit now."""
        return httpx.post(
            f"{self.url}/_sandbox/payment_intents/{intent_id}/settle", json={"outcome": outcome}
        )

    def dispute(self, intent_id: str) -> None:
        httpx.post(
            f"{self.url}/_sandbox/disputes", json={"payment_intent": intent_id}
        ).raise_for_status()

    def events(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/_sandbox/events")
        response.raise_for_status()
        return list(response.json()["events"])

    def provider_config(self, timeout_s: float = 1.0) -> ProviderConfig:
        return ProviderConfig(
            stripe_api_key="sk_test_orderflow",
            stripe_api_base=self.url,
            shipping_api_base=self.url,
            email_api_base=self.url,
            timeout_s=timeout_s,
        )

    def env(self) -> dict[str, str]:
        return {
            "STRIPE_API_KEY": "sk_test_orderflow",
            "STRIPE_API_BASE": self.url,
            "SHIPPING_API_BASE": self.url,
            "EMAIL_API_BASE": self.url,
            "ORDERFLOW_PROVIDER_TIMEOUT_S": "1",
            "ORDERFLOW_BACKOFF_SCALE": "0.01",
        }


SETTLED = ("confirmed", "returned", "cancelled", "needs_attention")


def open_rows(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) AS n FROM outbox WHERE status IN ('pending', 'in_flight')"
    ).fetchone()
    assert row is not None
    return int(row["n"])


def drain(worker: Any, conn: psycopg.Connection[Any], timeout_s: float = 30.0) -> None:
    """Run the worker until no outbox row is pending or in flight."""
    deadline = time.monotonic() + timeout_s
    while open_rows(conn):
        assert time.monotonic() < deadline, "the outbox did not drain"
        if worker.run_once() == 0:
            time.sleep(0.02)


def states(conn: psycopg.Connection[Any]) -> dict[str, str]:
    return {r["id"]: r["state"] for r in conn.execute("SELECT id, state FROM orders")}


def check_invariants(conn: psycopg.Connection[Any], effects: list[dict[str, Any]]) -> None:
    """SPEC.md's invariants, as `orderflow doctor` checks them, plus the sandbox's effects."""
    from orderflow.services.doctor import report, run_checks

    checks = run_checks(conn, effects)
    assert all(c.ok for c in checks), report(checks)
