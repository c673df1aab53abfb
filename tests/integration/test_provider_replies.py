"""The worker's event loop and the blocking path read every answer the same way.

Bridged, a Stripe call goes through the SDK's aiohttp client and a carrier call
through httpx's async stack; blocking, both through httpx's sync one.  Each
kind of answer that depends on the transport is produced at the sandbox (or a
closed port) and read on both paths: a connection never made is `NotSent`, a
timeout after the request went out is an unknown outcome that may still run, a
stored 500 an unknown outcome that ended, a decline a refusal."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from orderflow.app.serving import free_port
from orderflow.outbox_worker.bridge import run_bridged
from orderflow.outbox_worker.providers import (
    NotSent,
    Ok,
    ProviderConfig,
    Providers,
    Refused,
    Reply,
    Unknown,
)

PATHS = ["blocking", "bridged"]


def _reply(path: str, call: Callable[[], Reply]) -> Reply:
    if path == "blocking":
        return call()

    async def main() -> Reply:
        return await run_bridged(call)

    return asyncio.run(main())


def _intent(providers: Providers, payment_method: str = "pm_card_visa") -> Callable[[], Reply]:
    params: dict[str, Any] = {
        "amount": 1000,
        "currency": "usd",
        "payment_method": payment_method,
        "confirm": True,
        "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
    }
    return lambda: providers.stripe.create_intent(params, f"t:{uuid.uuid4()}")


def _shipment(providers: Providers) -> Callable[[], Reply]:
    body = {"order_id": "o-1", "address": {"country": "US"}, "items": []}
    return lambda: providers.carrier.create_shipment(body, f"t:{uuid.uuid4()}")


@pytest.fixture
def quick(sandbox: Any) -> Any:
    providers = Providers(sandbox.provider_config(timeout_s=0.5))
    yield providers
    providers.close()


@pytest.mark.parametrize("path", PATHS)
def test_a_connection_never_made_is_not_sent(path: str) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    providers = Providers(ProviderConfig("sk_test_x", closed, closed, closed, timeout_s=2))
    assert isinstance(_reply(path, _intent(providers)), NotSent)
    assert isinstance(_reply(path, _shipment(providers)), NotSent)


@pytest.mark.parametrize("path", PATHS)
def test_a_timeout_after_the_request_went_out_is_unknown_and_may_still_run(
    path: str, sandbox: Any, quick: Providers
) -> None:
    sandbox.faults({"endpoint": "*", "mode": "timeout_after_success", "hang_s": 2})
    for call in (_intent(quick), _shipment(quick)):
        reply = _reply(path, call)
        assert isinstance(reply, Unknown) and reply.ended is False, reply


@pytest.mark.parametrize("path", PATHS)
def test_a_500_is_unknown_and_over(path: str, sandbox: Any, quick: Providers) -> None:
    sandbox.faults({"endpoint": "*", "mode": "error_after_effect", "status": 500})
    for call in (_intent(quick), _shipment(quick)):
        reply = _reply(path, call)
        assert isinstance(reply, Unknown) and reply.ended is True, reply


@pytest.mark.parametrize("path", PATHS)
def test_a_decline_is_refused_and_a_success_is_read(path: str, quick: Providers) -> None:
    declined = _reply(path, _intent(quick, "pm_card_chargeDeclined"))
    assert isinstance(declined, Refused) and declined.code == "card_declined", declined
    paid = _reply(path, _intent(quick))
    assert isinstance(paid, Ok) and paid.body["status"] == "succeeded", paid
    shipped = _reply(path, _shipment(quick))
    assert isinstance(shipped, Ok) and shipped.body["tracking_number"], shipped
