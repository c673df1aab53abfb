"""Events and their delivery: at least once, asynchronous, signed as Stripe signs them.

Every PaymentIntent / refund / dispute state change is an event; with a
webhook_url configured it is POSTed there (Stripe-Signature: t=<unix>,v1=<hex
HMAC-SHA256 of "<t>.<body>">) from a background task, retried on a non-2xx
answer or a connection error after each of config webhook_retry_s, and given up
after those.  Fault rules on the endpoint "webhooks" drop, duplicate or delay
one event's delivery.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from typing import Any

import httpx

from orderflow.sandbox.core import JSON, Event, World, new_id, snapshot

API_VERSION = "2024-06-20"


def emit(
    world: World,
    type_: str,
    obj: JSON,
    key: str | None = None,
    payment_intent: str | None = None,
) -> Event:
    """Record an event (a snapshot of `obj` now) and start delivering it."""
    event_id = new_id("evt")
    payload = {
        "id": event_id,
        "object": "event",
        "api_version": API_VERSION,
        "created": int(world.now()),
        "type": type_,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": key},
        "data": {"object": snapshot(obj)},
    }
    event = Event(
        id=event_id,
        type=type_,
        object_id=str(obj.get("id")),
        payment_intent=payment_intent,
        payload=json.dumps(payload, separators=(",", ":")).encode(),
    )
    world.events[event_id] = event
    if payment_intent is not None and payment_intent in world.intents:
        world.intents[payment_intent].events.append(type_)
    if world.config.webhook_url:
        schedule(world, event, faults=True)
    return event


def schedule(world: World, event: Event, faults: bool) -> None:
    copies, delay = 1, 0.0
    if faults:
        names = {"webhooks"}
        if world.take(names, {"drop"}) is not None:
            event.dropped += 1
            return
        duplicate = world.take(names, {"duplicate"})
        if duplicate is not None:
            copies = max(1, duplicate.copies)
        delayed = world.take(names, {"delay"})
        if delayed is not None:
            delay = max(0.0, delayed.delay_s)
    for _ in range(copies):
        world.spawn(_deliver(world, event, delay))


def sign(payload: bytes, secret: str, timestamp: int) -> str:
    signed = f"{timestamp}.".encode() + payload
    mac = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


async def _deliver(world: World, event: Event, delay: float) -> None:
    if delay > 0:
        await asyncio.sleep(delay)
    waits = [0.0, *world.config.webhook_retry_s]
    for attempt, wait in enumerate(waits, start=1):
        if wait > 0:
            await asyncio.sleep(wait)
        url = world.config.webhook_url
        if not url:
            return
        status, error = await _post(world, url, event)
        event.deliveries.append(
            {"at": world.now(), "status": status, "error": error, "attempt": attempt}
        )
        if status is not None and 200 <= status < 300:
            event.delivered = True
            return


async def _post(world: World, url: str, event: Event) -> tuple[int | None, str | None]:
    if world.http is None:
        world.http = httpx.AsyncClient()
    headers = {
        "Content-Type": "application/json",
        "Stripe-Signature": sign(event.payload, world.config.webhook_secret, int(time.time())),
        "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
    }
    try:
        response = await world.http.post(
            url, content=event.payload, headers=headers, timeout=world.config.webhook_timeout_s
        )
    except httpx.HTTPError as exc:
        return None, type(exc).__name__
    return response.status_code, None


def describe(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "type": event.type,
        "object_id": event.object_id,
        "payment_intent": event.payment_intent,
        "deliveries": list(event.deliveries),
        "delivered": event.delivered,
        "dropped": event.dropped,
    }
