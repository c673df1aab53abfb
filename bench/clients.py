"""`orderflow bench clients`: the provider clients' own CPU per call.

The worker's CPU per saga includes what the real clients (the stripe SDK, httpx)
spend on each call: building the request, the HTTP stack, parsing the answer into
objects.  This measures that share alone, in this process, against the sandbox in
its own process (whose CPU is not counted), so `bench saga` can print the worker's
CPU per saga with and without it.  Each client runs the same calls a saga makes:
a PaymentIntent created with `confirm=true` (the SDK), a shipment and an e-mail
(httpx), blocking and on an event loop with calls in flight at once.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from bench.common import CHECKOUT, emit
from orderflow.app.serving import free_port, wait_until_up
from orderflow.outbox_worker.bridge import run_bridged
from orderflow.outbox_worker.providers import Ok, ProviderConfig, Providers, Reply

INTENT = {
    "amount": 4200,
    "currency": "usd",
    "payment_method": "pm_card_visa",
    "confirm": True,
    "metadata": {"order_id": "bench"},
    "automatic_payment_methods": {"enabled": True, "allow_redirects": "never"},
}
ADDRESS = {"name": "B", "line1": "1 Main St", "city": "X", "postal_code": "1", "country": "US"}
SHIPMENT = {"order_id": "bench", "address": ADDRESS, "items": [{"sku": "SKU-1", "quantity": 1}]}
MESSAGE = {"to": "b@example.com", "template": "order_confirmed", "data": {"order_id": "bench"}}


def _calls(providers: Providers) -> dict[str, Callable[[str], Reply]]:
    return {
        "stripe_create_confirm": lambda key: providers.stripe.create_intent(INTENT, key),
        "carrier_create_shipment": lambda key: providers.carrier.create_shipment(SHIPMENT, key),
        "email_send": lambda key: providers.email.send(MESSAGE, key),
    }


def _blocking(call: Callable[[str], Reply], n: int) -> float:
    began = time.process_time()
    for _ in range(n):
        reply = call(f"bench:{uuid.uuid4()}")
        assert isinstance(reply, Ok), reply
    return (time.process_time() - began) * 1000 / n


def _on_loop(providers: Providers, name: str, n: int, in_flight: int) -> float:
    """n calls bridged on one event loop (as the asyncio daemon makes them), in_flight at once."""
    call = _calls(providers)[name]

    async def main() -> float:
        gate = asyncio.Semaphore(in_flight)

        async def one() -> None:
            async with gate:
                reply = await run_bridged(call, f"bench:{uuid.uuid4()}")
                assert isinstance(reply, Ok), reply

        await asyncio.gather(*(one() for _ in range(min(n, in_flight))))  # warm the pools
        began = time.process_time()
        await asyncio.gather(*(one() for _ in range(n)))
        spent = time.process_time() - began
        await providers.aclose()
        return spent * 1000 / n

    return asyncio.run(main())


def measure(base: str, calls_per_client: int, in_flight: int) -> dict[str, Any]:
    """Client CPU per call against the sandbox at `base`, blocking and on a loop."""
    config = ProviderConfig("sk_test_bench", base, base, base)
    result: dict[str, Any] = {"calls_per_client": calls_per_client, "in_flight": in_flight}
    blocking = Providers(config)
    for name, call in _calls(blocking).items():
        call(f"bench:warm:{uuid.uuid4()}")
        result[f"{name}_blocking_cpu_ms"] = round(_blocking(call, calls_per_client), 3)
    blocking.close()
    for name in _calls(blocking):  # fresh clients, made on each loop
        cpu_ms = _on_loop(Providers(config), name, calls_per_client, in_flight)
        result[f"{name}_async_cpu_ms"] = round(cpu_ms, 3)
    for mode in ("blocking", "async"):
        per_call = [v for k, v in result.items() if k.endswith(f"_{mode}_cpu_ms")]
        result[f"mean_{mode}_cpu_ms_per_call"] = round(sum(per_call) / len(per_call), 3)
    return result


def run(calls_per_client: int, in_flight: int) -> dict[str, Any]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sandbox = subprocess.Popen(
        [sys.executable, "-m", "orderflow.app.cli", "sandbox", "--port", str(port)], cwd=CHECKOUT
    )
    try:
        wait_until_up(f"{base}/_sandbox/health")
        return measure(base, calls_per_client, in_flight)
    finally:
        sandbox.terminate()
        sandbox.wait(10)


def main(calls_per_client: int, in_flight: int) -> int:
    result = run(calls_per_client, in_flight)
    for key, value in result.items():
        if "cpu_ms" in key:
            print(f"{key:>40}: {value} ms of client CPU per call")
    emit(result)
    return 0
