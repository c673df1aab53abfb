"""The provider sandbox plays the providers' documented contract, the ugly parts included.

Stripe is driven through the real SDK (and, where the wire format itself is the
point, raw httpx); webhooks are received by a tiny Starlette app and verified
with stripe.Webhook.construct_event.  One sandbox serves the module and is
reset before each test (reset restoring everything is itself tested).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import stripe
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orderflow.app.serving import free_port, serve
from orderflow.sandbox.app import create_sandbox_app

SECRET = "whsec_test_sandbox_secret"
WEEK = 604800


# ---------------------------------------------------------------- fixtures

HTTP = httpx.Client(timeout=5)  # one client: a new one per request costs an SSL context


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve(create_sandbox_app(), free_port()) as url:
        yield url
    HTTP.close()


@dataclass
class Sandbox:
    url: str

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return HTTP.get(self.url + path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return HTTP.post(self.url + path, **kw)

    def faults(self, *rules: dict[str, Any]) -> None:
        self.post("/_sandbox/faults", json={"rules": list(rules)}).raise_for_status()

    def config(self, **values: Any) -> dict[str, Any]:
        response = self.post("/_sandbox/config", json=values)
        response.raise_for_status()
        return dict(response.json())

    def advance(self, seconds: float) -> None:
        self.post("/_sandbox/clock", json={"advance_s": seconds}).raise_for_status()

    def effects(self, kind: str | None = None, order_id: str | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in {"kind": kind, "order_id": order_id}.items() if v}
        return list(self.get("/_sandbox/effects", params=params).json()["effects"])

    def kinds(self, order_id: str | None = None) -> list[tuple[str, Any, str]]:
        return [
            (e["kind"], e["amount"], e["idempotency_key"]) for e in self.effects(None, order_id)
        ]

    def events(self) -> list[dict[str, Any]]:
        return list(self.get("/_sandbox/events").json()["events"])

    def intent_events(self, order_id: str) -> list[str]:
        intents = self.get("/_sandbox/payment_intents", params={"order_id": order_id}).json()
        return list(intents["payment_intents"][0]["events"])

    def client(self, timeout: float = 5.0) -> stripe.StripeClient:
        return stripe.StripeClient(
            "sk_test_sandbox",
            base_addresses={"api": self.url},
            max_network_retries=0,
            http_client=stripe.HTTPXClient(timeout=timeout, allow_sync_methods=True),
        )


@pytest.fixture()
def sb(server: str) -> Iterator[Sandbox]:
    sandbox = Sandbox(server)
    sandbox.post("/_sandbox/reset").raise_for_status()
    yield sandbox
    sandbox.post("/_sandbox/reset").raise_for_status()


@pytest.fixture()
def client(sb: Sandbox) -> stripe.StripeClient:
    return sb.client()


@dataclass
class Receiver:
    """A webhook endpoint that records every delivery."""

    url: str = ""
    got: list[dict[str, Any]] = field(default_factory=list)
    attempts: Counter[str] = field(default_factory=Counter)
    fail_first: int = 0  # answer 500 to this many deliveries of each event
    status: int = 200
    sleep_s: float = 0.0

    def clear(self) -> None:
        self.got.clear()
        self.attempts.clear()
        self.fail_first, self.status, self.sleep_s = 0, 200, 0.0

    def types(self) -> list[str]:
        return [g["event"]["type"] for g in self.got if g["status"] == 200]


@pytest.fixture(scope="module")
def receiver_server() -> Iterator[Receiver]:
    receiver = Receiver()
    lock = threading.Lock()

    async def hook(request: Request) -> Response:
        body = await request.body()
        event = json.loads(body)
        with lock:
            receiver.attempts[event["id"]] += 1
            attempt = receiver.attempts[event["id"]]
        if receiver.sleep_s:
            await asyncio.sleep(receiver.sleep_s)
        status = 500 if attempt <= receiver.fail_first else receiver.status
        receiver.got.append(
            {
                "body": body,
                "event": event,
                "signature": request.headers.get("stripe-signature"),
                "content_type": request.headers.get("content-type"),
                "status": status,
                "at": time.monotonic(),
            }
        )
        return Response(status_code=status)

    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    with serve(app, free_port()) as url:
        receiver.url = url + "/hook"
        yield receiver


@pytest.fixture()
def receiver(receiver_server: Receiver, sb: Sandbox) -> Iterator[Receiver]:
    receiver_server.clear()
    sb.config(webhook_url=receiver_server.url, webhook_secret=SECRET, webhook_retry_s=[0.05])
    yield receiver_server
    receiver_server.clear()


def wait_for(check: Callable[[], Any], timeout_s: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def pay(
    client: stripe.StripeClient,
    key: str | None = "k-pay",
    order_id: str = "o-1",
    **params: Any,
) -> stripe.PaymentIntent:
    merged: dict[str, Any] = {
        "amount": 1000,
        "currency": "eur",
        "payment_method": "pm_card_visa",
        "payment_method_types": ["card"],
        "confirm": True,
        "metadata": {"order_id": order_id},
        **params,
    }
    merged = {k: v for k, v in merged.items() if v is not None}
    options: Any = {"idempotency_key": key} if key else {}
    return client.v1.payment_intents.create(params=merged, options=options)


def replayed(obj: Any) -> bool:
    return obj.last_response.headers.get("Idempotent-Replayed") == "true"


# ---------------------------------------------------------------- good cards, declines


@pytest.mark.parametrize("method", ["pm_card_visa", "pm_card_mastercard", "pm_card_amex"])
def test_good_card_confirmed_in_one_call(
    sb: Sandbox, client: stripe.StripeClient, method: str
) -> None:
    intent = pay(client, "k-1", payment_method=method, currency="EUR")
    assert intent.status == "succeeded"
    assert intent.id.startswith("pi_")
    assert intent.client_secret.startswith(f"{intent.id}_secret_")
    assert intent.amount_received == 1000 and intent.amount_capturable == 0
    assert intent.currency == "eur" and intent.capture_method == "automatic"
    assert intent.confirmation_method == "automatic" and intent.livemode is False
    assert intent.metadata["order_id"] == "o-1" and intent.next_action is None
    assert isinstance(intent.created, int)
    assert isinstance(intent.latest_charge, str) and intent.latest_charge.startswith("ch_")
    assert sb.effects() == [
        {
            "kind": "charge",
            "order_id": "o-1",
            "idempotency_key": "k-1",
            "amount": 1000,
            "ref": intent.id,
            "at": sb.effects()[0]["at"],
        }
    ]
    fetched = client.v1.payment_intents.retrieve(intent.id, params={"expand": ["latest_charge"]})
    charge = fetched.latest_charge
    assert isinstance(charge, stripe.Charge)
    assert charge.id == intent.latest_charge and charge.object == "charge"
    assert charge.captured is True and charge.amount_captured == 1000
    assert charge.amount_refunded == 0 and charge.refunded is False
    assert charge.status == "succeeded" and charge.payment_intent == intent.id
    assert charge.payment_method_details.type == "card"
    assert "capture_before" not in charge.payment_method_details.card
    assert client.v1.charges.retrieve(charge.id).amount == 1000


def test_replay_same_key_adds_no_effect(sb: Sandbox, client: stripe.StripeClient) -> None:
    first = pay(client, "k-1")
    again = pay(client, "k-1")
    assert again.id == first.id and replayed(again) and not replayed(first)
    assert len(sb.effects("charge")) == 1


@pytest.mark.parametrize(
    ("method", "decline"),
    [
        ("pm_card_chargeDeclined", "generic_decline"),
        ("pm_card_chargeDeclinedInsufficientFunds", "insufficient_funds"),
    ],
)
def test_decline_is_a_card_error_saved_for_the_key(
    sb: Sandbox, client: stripe.StripeClient, method: str, decline: str
) -> None:
    with pytest.raises(stripe.CardError) as caught:
        pay(client, "k-1", payment_method=method)
    error = caught.value
    assert error.http_status == 402 and error.code == "card_declined"
    assert error.error is not None and error.error.decline_code == decline
    intent = error.error.payment_intent
    assert intent is not None and intent.status == "requires_payment_method"
    assert intent.last_payment_error.decline_code == decline
    assert intent.last_payment_error.type == "card_error"
    assert sb.effects() == []
    with pytest.raises(stripe.CardError) as again:
        pay(client, "k-1", payment_method=method)
    assert again.value.headers is not None
    assert again.value.headers.get("Idempotent-Replayed") == "true"
    # the customer tries another card on the same intent
    with pytest.raises(stripe.InvalidRequestError) as no_method:  # the card was detached
        client.v1.payment_intents.confirm(intent.id, options={"idempotency_key": "k-2"})
    assert no_method.value.code == "payment_intent_unexpected_state"
    assert "missing a payment method" in str(no_method.value.user_message)
    retried = client.v1.payment_intents.confirm(
        intent.id, params={"payment_method": "pm_card_visa"}, options={"idempotency_key": "k-3"}
    )
    assert retried.status == "succeeded" and retried.last_payment_error is None
    assert sb.kinds() == [("charge", 1000, "k-3")]


def test_create_then_confirm(sb: Sandbox, client: stripe.StripeClient) -> None:
    intent = pay(client, "k-create", confirm=None)
    assert intent.status == "requires_confirmation" and intent.latest_charge is None
    assert sb.effects() == []
    bare = pay(client, "k-bare", confirm=None, payment_method=None)
    assert bare.status == "requires_payment_method"
    confirmed = client.v1.payment_intents.confirm(
        intent.id, params={}, options={"idempotency_key": "k-confirm"}
    )
    assert confirmed.status == "succeeded"
    assert sb.kinds() == [("charge", 1000, "k-confirm")]


def test_retrieve_unknown_is_404(sb: Sandbox, client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.payment_intents.retrieve("pi_nope")
    assert caught.value.http_status == 404 and caught.value.code == "resource_missing"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.charges.retrieve("ch_nope")


@pytest.mark.parametrize(
    ("params", "code", "text"),
    [
        ({"amount": 0}, "parameter_invalid", "amount"),
        ({"amount": "ten"}, "parameter_invalid", "Invalid integer"),
        ({"amount": None}, "parameter_missing", "amount"),
        ({"currency": None}, "parameter_missing", "currency"),
        ({"currency": "euro"}, "parameter_invalid", "currency"),
        ({"capture_method": "later"}, "parameter_invalid", "capture_method"),
        ({"payment_method": "pm_card_bogus"}, "resource_missing", "No such PaymentMethod"),
        ({"payment_method": "pm_sepaDebit"}, "parameter_invalid", "payment_method_types"),
        ({"payment_method_types": ["paypal"]}, "parameter_invalid", "paypal"),
        ({"payment_method": None}, "parameter_missing", "payment_method"),
    ],
)
def test_validation_failure_is_not_saved_for_the_key(
    sb: Sandbox, client: stripe.StripeClient, params: dict[str, Any], code: str, text: str
) -> None:
    with pytest.raises(stripe.InvalidRequestError) as caught:
        pay(client, "k-1", **params)
    assert caught.value.http_status == 400 and caught.value.code == code
    assert text in str(caught.value.user_message)
    assert sb.effects() == []
    fixed = pay(client, "k-1")  # other parameters, same key: it executes, no idempotency_error
    assert fixed.status == "succeeded" and not replayed(fixed)


def test_confirm_in_wrong_state_is_saved_for_the_key(
    sb: Sandbox, client: stripe.StripeClient
) -> None:
    intent = pay(client, "k-1")
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.payment_intents.confirm(intent.id, options={"idempotency_key": "k-c"})
    assert caught.value.http_status == 400
    assert caught.value.code == "payment_intent_unexpected_state"
    assert caught.value.error is not None and caught.value.error.payment_intent is not None
    assert caught.value.error.payment_intent.status == "succeeded"
    with pytest.raises(stripe.InvalidRequestError) as again:
        client.v1.payment_intents.confirm(intent.id, options={"idempotency_key": "k-c"})
    assert again.value.headers is not None
    assert again.value.headers.get("Idempotent-Replayed") == "true"
    assert len(sb.effects()) == 1


# ---------------------------------------------------------------- manual capture, cancel, expiry


def test_manual_capture_places_then_takes_a_hold(sb: Sandbox, client: stripe.StripeClient) -> None:
    intent = pay(client, "k-auth", capture_method="manual")
    assert intent.status == "requires_capture"
    assert intent.amount_capturable == 1000 and intent.amount_received == 0
    assert sb.kinds() == [("authorization", 1000, "k-auth")]
    charge = client.v1.charges.retrieve(intent.latest_charge)
    assert charge.captured is False and charge.amount_captured == 0
    assert charge.payment_method_details.card.capture_before == charge.created + WEEK
    captured = client.v1.payment_intents.capture(
        intent.id, params={}, options={"idempotency_key": "k-cap"}
    )
    assert captured.status == "succeeded"
    assert captured.amount_received == 1000 and captured.amount_capturable == 0
    assert sb.kinds() == [("authorization", 1000, "k-auth"), ("charge", 1000, "k-cap")]
    charge = client.v1.charges.retrieve(intent.latest_charge)
    assert charge.captured is True and charge.amount_captured == 1000
    assert "capture_before" not in charge.payment_method_details.card


def test_partial_capture_releases_the_rest(sb: Sandbox, client: stripe.StripeClient) -> None:
    intent = pay(client, "k-auth", capture_method="manual")
    with pytest.raises(stripe.InvalidRequestError) as too_much:
        client.v1.payment_intents.capture(
            intent.id, params={"amount_to_capture": 1500}, options={"idempotency_key": "k-cap"}
        )
    assert too_much.value.code == "parameter_invalid"  # a validation failure: not saved
    captured = client.v1.payment_intents.capture(
        intent.id, params={"amount_to_capture": 600}, options={"idempotency_key": "k-cap"}
    )
    assert captured.status == "succeeded" and captured.amount_received == 600
    assert sb.kinds() == [
        ("authorization", 1000, "k-auth"),
        ("charge", 600, "k-cap"),
        ("authorization_release", 400, "k-cap"),
    ]
    assert client.v1.charges.retrieve(intent.latest_charge).amount_captured == 600
    with pytest.raises(stripe.InvalidRequestError) as twice:
        client.v1.payment_intents.capture(intent.id, options={"idempotency_key": "k-cap2"})
    assert twice.value.code == "payment_intent_unexpected_state"


def test_capture_only_from_requires_capture(sb: Sandbox, client: stripe.StripeClient) -> None:
    automatic = pay(client, "k-1")
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.payment_intents.capture(automatic.id, options={"idempotency_key": "k-cap"})
    assert caught.value.code == "payment_intent_unexpected_state"
    assert len(sb.effects()) == 1


def test_cancel_releases_a_hold(sb: Sandbox, client: stripe.StripeClient) -> None:
    intent = pay(client, "k-auth", capture_method="manual")
    canceled = client.v1.payment_intents.cancel(
        intent.id,
        params={"cancellation_reason": "requested_by_customer"},
        options={"idempotency_key": "k-cancel"},
    )
    assert canceled.status == "canceled" and canceled.amount_capturable == 0
    assert canceled.cancellation_reason == "requested_by_customer"
    assert isinstance(canceled.canceled_at, int)
    assert sb.kinds() == [
        ("authorization", 1000, "k-auth"),
        ("authorization_release", 1000, "k-cancel"),
    ]
    with pytest.raises(stripe.InvalidRequestError) as again:
        client.v1.payment_intents.cancel(intent.id, options={"idempotency_key": "k-cancel2"})
    assert again.value.code == "payment_intent_unexpected_state"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.payment_intents.capture(intent.id, options={"idempotency_key": "k-cap"})
    assert len(sb.effects()) == 2


def test_cancel_allowed_and_refused_states(sb: Sandbox, client: stripe.StripeClient) -> None:
    unconfirmed = pay(client, "k-1", confirm=None)
    assert client.v1.payment_intents.cancel(unconfirmed.id).status == "canceled"
    with pytest.raises(stripe.CardError) as declined:
        pay(client, "k-2", payment_method="pm_card_chargeDeclined")
    assert declined.value.error is not None and declined.value.error.payment_intent is not None
    assert client.v1.payment_intents.cancel(declined.value.error.payment_intent.id).status == (
        "canceled"
    )
    action = pay(client, "k-3", payment_method="pm_card_authenticationRequired")
    assert client.v1.payment_intents.cancel(action.id).status == "canceled"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.payment_intents.cancel(unconfirmed.id, params={"cancellation_reason": "bored"})
    succeeded = pay(client, "k-4")
    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.payment_intents.cancel(succeeded.id, options={"idempotency_key": "k-x"})
    assert refused.value.code == "payment_intent_unexpected_state"
    sb.config(processing_s=-1)
    processing = sepa(client, "k-5")
    with pytest.raises(stripe.InvalidRequestError) as busy:
        client.v1.payment_intents.cancel(processing.id)
    assert busy.value.code == "payment_intent_unexpected_state"
    assert sb.kinds() == [("charge", 1000, "k-4")]


def test_hold_expires_when_the_clock_moves(sb: Sandbox, client: stripe.StripeClient) -> None:
    intent = pay(client, "k-auth", capture_method="manual")
    sb.advance(WEEK - 100)
    assert client.v1.payment_intents.retrieve(intent.id).status == "requires_capture"
    sb.advance(200)
    expired = client.v1.payment_intents.retrieve(intent.id)
    assert expired.status == "canceled" and expired.cancellation_reason == "automatic"
    assert expired.amount_capturable == 0
    assert sb.kinds() == [
        ("authorization", 1000, "k-auth"),
        ("authorization_release", 1000, f"auto:{intent.id}:hold_expired"),
    ]
    with pytest.raises(stripe.InvalidRequestError) as late:
        client.v1.payment_intents.capture(intent.id, options={"idempotency_key": "k-cap"})
    assert late.value.code == "payment_intent_unexpected_state"
    assert len(sb.effects()) == 2


def test_hold_expiry_is_seen_by_the_next_request(sb: Sandbox, client: stripe.StripeClient) -> None:
    sb.config(hold_s=0.3, expiry_check_s=60)  # no periodic check in this test's time
    intent = pay(client, "k-auth", capture_method="manual")
    time.sleep(0.4)
    with pytest.raises(stripe.InvalidRequestError) as late:
        client.v1.payment_intents.capture(intent.id, options={"idempotency_key": "k-cap"})
    assert late.value.code == "payment_intent_unexpected_state"
    assert [k for k, _, _ in sb.kinds()] == ["authorization", "authorization_release"]


def test_hold_expiry_by_the_periodic_check(
    sb: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    sb.config(hold_s=0.2, expiry_check_s=0.05)
    pay(client, "k-auth", capture_method="manual")
    # nothing asks the sandbox anything: the webhook shows the hold expired by itself
    wait_for(lambda: "payment_intent.canceled" in receiver.types())
    canceled = next(g for g in receiver.got if g["event"]["type"] == "payment_intent.canceled")
    assert canceled["event"]["data"]["object"]["cancellation_reason"] == "automatic"
    assert canceled["event"]["request"]["idempotency_key"] is None


@pytest.mark.parametrize("racer", ["cancel", "capture"])
def test_operations_on_one_intent_are_serialised(
    sb: Sandbox, client: stripe.StripeClient, racer: str
) -> None:
    if racer == "cancel":  # a slow confirm, a cancel arriving while it runs
        intent = pay(client, "k-1", confirm=None)
        sb.faults({"endpoint": "payment_intents.confirm", "mode": "latency", "latency_ms": 300})

        def slow() -> Any:
            return client.v1.payment_intents.confirm(intent.id)

    else:  # a slow capture, a cancel arriving while it runs
        intent = pay(client, "k-1", capture_method="manual")
        sb.faults({"endpoint": "payment_intents.capture", "mode": "latency", "latency_ms": 300})

        def slow() -> Any:
            return client.v1.payment_intents.capture(intent.id)

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(slow)
        time.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(stripe.InvalidRequestError) as caught:
            client.v1.payment_intents.cancel(intent.id)
        waited = time.monotonic() - started
        assert first.result().status == "succeeded"
    assert caught.value.code == "payment_intent_unexpected_state"
    assert caught.value.error is not None and caught.value.error.payment_intent is not None
    assert caught.value.error.payment_intent.status == "succeeded"
    assert waited > 0.1  # it waited for the lock
    assert "authorization_release" not in [k for k, _, _ in sb.kinds()]


# ---------------------------------------------------------------- 3-D Secure


def test_3ds_completed_on_the_bank_page(sb: Sandbox, client: stripe.StripeClient) -> None:
    intent = pay(
        client,
        "k-3ds",
        payment_method="pm_card_authenticationRequired",
        return_url="https://shop.example/done?x=1",
    )
    assert intent.status == "requires_action" and intent.latest_charge is None
    assert intent.next_action.type == "redirect_to_url"
    url = intent.next_action.redirect_to_url.url
    assert url == f"{sb.url}/_sandbox/3ds/{intent.id}"
    assert intent.next_action.redirect_to_url.return_url == "https://shop.example/done?x=1"
    assert sb.effects() == []
    page = HTTP.get(url)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "Complete authentication" in page.text and "Fail authentication" in page.text
    assert f'action="/_sandbox/3ds/{intent.id}"' in page.text
    done = HTTP.post(url, data={"result": "complete"})
    assert done.status_code == 303
    location = done.headers["location"]
    assert location.startswith("https://shop.example/done?x=1&")
    assert f"payment_intent={intent.id}" in location and "redirect_status=succeeded" in location
    after = client.v1.payment_intents.retrieve(intent.id)
    assert after.status == "succeeded" and after.next_action is None
    assert after.amount_received == 1000
    assert sb.kinds() == [("charge", 1000, "k-3ds")]  # the confirm's key
    again = HTTP.post(url, data={"result": "complete"})
    assert again.status_code == 409
    assert len(sb.effects()) == 1


def test_3ds_failed_then_another_card(sb: Sandbox, client: stripe.StripeClient) -> None:
    intent = pay(client, "k-3ds", payment_method="pm_card_authenticationRequired")
    assert intent.next_action.redirect_to_url.return_url is None
    failed = HTTP.post(f"{sb.url}/_sandbox/3ds/{intent.id}", json={"result": "fail"})
    assert failed.status_code == 200
    body = failed.json()
    assert body["status"] == "requires_payment_method" and body["next_action"] is None
    assert body["last_payment_error"]["type"] == "card_error"
    assert body["last_payment_error"]["code"] == "payment_intent_authentication_failure"
    assert sb.effects() == []
    retried = client.v1.payment_intents.confirm(
        intent.id, params={"payment_method": "pm_card_visa"}, options={"idempotency_key": "k-2"}
    )
    assert retried.status == "succeeded"
    assert sb.kinds() == [("charge", 1000, "k-2")]


def test_3ds_with_manual_capture_places_a_hold(sb: Sandbox, client: stripe.StripeClient) -> None:
    intent = pay(
        client, "k-3ds", payment_method="pm_card_authenticationRequired", capture_method="manual"
    )
    done = HTTP.post(f"{sb.url}/_sandbox/3ds/{intent.id}?result=complete")
    assert done.status_code == 200 and done.json()["status"] == "requires_capture"
    assert sb.kinds() == [("authorization", 1000, "k-3ds")]


def test_3ds_completion_after_cancel_is_refused(sb: Sandbox, client: stripe.StripeClient) -> None:
    intent = pay(client, "k-3ds", payment_method="pm_card_authenticationRequired")
    client.v1.payment_intents.cancel(intent.id)
    refused = HTTP.post(f"{sb.url}/_sandbox/3ds/{intent.id}", data={"result": "complete"})
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "payment_intent_unexpected_state"
    assert client.v1.payment_intents.retrieve(intent.id).status == "canceled"
    assert sb.effects() == []
    assert HTTP.post(f"{sb.url}/_sandbox/3ds/pi_nope", data={"result": "fail"}).status_code == 404
    bad = HTTP.post(f"{sb.url}/_sandbox/3ds/{intent.id}", data={"result": "maybe"})
    assert bad.status_code == 400


# ---------------------------------------------------------------- bank debits (processing)


MANDATE = {
    "customer_acceptance": {
        "type": "online",
        "online": {"ip_address": "192.0.2.1", "user_agent": "Mozilla/5.0"},
    }
}


def sepa(client: stripe.StripeClient, key: str, method: str = "pm_sepaDebit", **kw: Any) -> Any:
    return pay(
        client,
        key,
        payment_method=method,
        payment_method_types=["sepa_debit"],
        mandate_data=MANDATE,
        **kw,
    )


def test_a_bank_debit_needs_the_customers_mandate(sb: Sandbox, client: stripe.StripeClient) -> None:
    """As at Stripe, a server-side confirm of a debit without mandate_data is refused
    (a validation error: nothing saved for the key, so the corrected retry works)."""
    with pytest.raises(stripe.InvalidRequestError) as refused:
        pay(client, "k-m", payment_method="pm_sepaDebit", payment_method_types=["sepa_debit"])
    assert refused.value.code == "parameter_missing"
    assert sepa(client, "k-m").status == "processing"


def test_bank_debit_settles_by_itself(sb: Sandbox, client: stripe.StripeClient) -> None:
    sb.config(processing_s=0.2)
    intent = sepa(client, "k-sepa", capture_method="manual")  # manual capture is ignored
    assert intent.status == "processing" and intent.amount_received == 0
    charge = client.v1.charges.retrieve(intent.latest_charge)
    assert charge.status == "pending" and charge.payment_method_details.type == "sepa_debit"
    assert sb.effects() == []
    settled = wait_for(
        lambda: (i := client.v1.payment_intents.retrieve(intent.id)).status == "succeeded" and i
    )
    assert settled.amount_received == 1000
    assert sb.kinds() == [("charge", 1000, "k-sepa")]
    charge = client.v1.charges.retrieve(intent.latest_charge)
    assert charge.status == "succeeded" and charge.captured is True


def test_bank_debit_fails_by_itself(sb: Sandbox, client: stripe.StripeClient) -> None:
    sb.config(processing_s=0.2)
    intent = sepa(client, "k-sepa", "pm_sepaDebitFails")
    assert intent.status == "processing"
    failed = wait_for(
        lambda: (
            (i := client.v1.payment_intents.retrieve(intent.id)).status == "requires_payment_method"
            and i
        )
    )
    assert failed.last_payment_error.code == "insufficient_funds"
    assert client.v1.charges.retrieve(intent.latest_charge).status == "failed"
    assert sb.effects() == []


def test_bank_debit_settled_by_the_endpoint(sb: Sandbox, client: stripe.StripeClient) -> None:
    sb.config(processing_s=-1)
    one = sepa(client, "k-1", "pm_sepaDebitFails")
    two = sepa(client, "k-2")
    time.sleep(0.2)
    assert client.v1.payment_intents.retrieve(one.id).status == "processing"  # never by itself
    ok = sb.post(f"/_sandbox/payment_intents/{one.id}/settle", json={"outcome": "succeeded"})
    assert ok.status_code == 200 and ok.json()["status"] == "succeeded"
    assert sb.post(f"/_sandbox/payment_intents/{one.id}/settle", json={}).status_code == 409
    bad = sb.post(f"/_sandbox/payment_intents/{two.id}/settle", json={"outcome": "failed"})
    assert bad.json()["status"] == "requires_payment_method"
    assert sb.kinds() == [("charge", 1000, "k-1")]


def test_bank_debit_settles_when_the_clock_moves(sb: Sandbox, client: stripe.StripeClient) -> None:
    sb.config(processing_s=3600)
    intent = sepa(client, "k-sepa")
    sb.advance(3000)
    assert client.v1.payment_intents.retrieve(intent.id).status == "processing"
    sb.advance(700)
    assert client.v1.payment_intents.retrieve(intent.id).status == "succeeded"
    assert sb.kinds() == [("charge", 1000, "k-sepa")]


# ---------------------------------------------------------------- list and search


def test_list_is_consistent_newest_first_and_paginated(
    sb: Sandbox, client: stripe.StripeClient
) -> None:
    before = int(sb.get("/_sandbox/clock").json()["now"]) - 1
    ids = [pay(client, f"k-{i}", order_id=f"o-{i}").id for i in range(12)]
    page = client.v1.payment_intents.list(params={"created": {"gte": before}, "limit": 100})
    assert [i.id for i in page.data] == ids[::-1] and page.has_more is False
    assert client.v1.payment_intents.list().data[0].id == ids[-1]
    assert len(client.v1.payment_intents.list().data) == 10  # the default limit
    first = client.v1.payment_intents.list(params={"limit": 5})
    assert [i.id for i in first.data] == ids[:6:-1] and first.has_more is True
    rest = client.v1.payment_intents.list(params={"limit": 100, "starting_after": ids[7]})
    assert [i.id for i in rest.data] == ids[6::-1]
    assert client.v1.payment_intents.list(params={"created": {"gt": before + 3600}}).data == []
    assert client.v1.payment_intents.list(params={"created": {"lt": before}}).data == []
    assert len(client.v1.payment_intents.list(params={"created": {"lte": before + 60}}).data) == 10
    raw = sb.get("/v1/payment_intents", params={"limit": 1}).json()
    assert raw["object"] == "list" and raw["url"] == "/v1/payment_intents"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.payment_intents.list(params={"limit": 101})
    expanded = client.v1.payment_intents.list(params={"expand": ["data.latest_charge"]})
    assert isinstance(expanded.data[0].latest_charge, stripe.Charge)


def test_search_lags_behind_list(sb: Sandbox, client: stripe.StripeClient) -> None:
    sb.config(search_lag_s=0.4)
    intent = pay(client, "k-1", order_id="o-lag")
    query = {"query": "metadata['order_id']:'o-lag'"}
    assert [i.id for i in client.v1.payment_intents.list().data] == [intent.id]
    assert client.v1.payment_intents.search(params=query).data == []
    time.sleep(0.5)
    found = client.v1.payment_intents.search(params=query)
    assert [i.id for i in found.data] == [intent.id]
    assert found.object == "search_result" and found.has_more is False
    assert found.next_page is None


def test_search_query_forms(sb: Sandbox, client: stripe.StripeClient) -> None:
    a = pay(client, "k-a", order_id="o-a")
    b = pay(client, "k-b", order_id="o-b", confirm=None)
    pay(client, "k-c", order_id="o-c")

    def ids(query: str) -> list[str]:
        return [i.id for i in client.v1.payment_intents.search(params={"query": query}).data]

    assert ids("metadata['order_id']:'o-a'") == [a.id]
    assert ids('metadata["order_id"]:"o-b"') == [b.id]
    assert ids("status:'requires_confirmation'") == [b.id]
    assert ids("status:'succeeded' AND metadata['order_id']:'o-a'") == [a.id]
    assert ids("status:'succeeded' AND metadata['order_id']:'o-b'") == []
    assert set(ids("metadata['order_id']:'o-a' OR metadata['order_id']:'o-b'")) == {a.id, b.id}
    assert ids("-status:'succeeded'") == [b.id]
    assert len(ids("amount>999 AND currency:'eur'")) == 3
    limited = client.v1.payment_intents.search(params={"query": "amount:1000", "limit": 2})
    assert len(limited.data) == 2 and limited.has_more is True and limited.next_page
    more = client.v1.payment_intents.search(
        params={"query": "amount:1000", "limit": 2, "page": limited.next_page}
    )
    assert len(more.data) == 1 and more.has_more is False
    for bad in ("order_id:'o-a'", "status:'x' AND", "status:'a' AND amount:1 OR amount:2"):
        with pytest.raises(stripe.InvalidRequestError):
            client.v1.payment_intents.search(params={"query": bad})


def test_search_sees_status_changes_late_too(sb: Sandbox, client: stripe.StripeClient) -> None:
    intent = pay(client, "k-1", confirm=None, order_id="o-s")
    sb.config(search_lag_s=0.2)
    time.sleep(0.25)
    client.v1.payment_intents.confirm(intent.id)
    query = {"query": "status:'succeeded' AND metadata['order_id']:'o-s'"}
    assert client.v1.payment_intents.search(params=query).data == []
    time.sleep(0.25)
    assert len(client.v1.payment_intents.search(params=query).data) == 1


# ---------------------------------------------------------------- refunds


def test_refunds_partial_then_the_rest(sb: Sandbox, client: stripe.StripeClient) -> None:
    intent = pay(client, "k-pay")
    part = client.v1.refunds.create(
        params={"payment_intent": intent.id, "amount": 300}, options={"idempotency_key": "k-r1"}
    )
    assert part.id.startswith("re_") and part.status == "succeeded" and part.amount == 300
    assert part.charge == intent.latest_charge and part.payment_intent == intent.id
    assert part.currency == "eur" and isinstance(part.created, int)
    charge = client.v1.charges.retrieve(intent.latest_charge)
    assert charge.amount_refunded == 300 and charge.refunded is False
    rest = client.v1.refunds.create(
        params={"payment_intent": intent.id}, options={"idempotency_key": "k-r2"}
    )
    assert rest.amount == 700
    assert client.v1.charges.retrieve(intent.latest_charge).refunded is True
    with pytest.raises(stripe.InvalidRequestError) as over:
        client.v1.refunds.create(
            params={"payment_intent": intent.id}, options={"idempotency_key": "k-r3"}
        )
    assert over.value.code == "charge_already_refunded"
    with pytest.raises(stripe.InvalidRequestError) as again:
        client.v1.refunds.create(
            params={"payment_intent": intent.id}, options={"idempotency_key": "k-r3"}
        )
    assert again.value.headers is not None
    assert again.value.headers.get("Idempotent-Replayed") == "true"
    assert sb.kinds() == [
        ("charge", 1000, "k-pay"),
        ("refund", 300, "k-r1"),
        ("refund", 700, "k-r2"),
    ]
    assert {e["order_id"] for e in sb.effects()} == {"o-1"}
    assert client.v1.refunds.retrieve(part.id).amount == 300
    listed = client.v1.refunds.list(params={"payment_intent": intent.id, "limit": 10})
    assert [r.id for r in listed.data] == [rest.id, part.id]
    one = client.v1.refunds.list(params={"payment_intent": intent.id, "limit": 1})
    assert [r.id for r in one.data] == [rest.id] and one.has_more is True
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.refunds.retrieve("re_nope")


def test_refund_amount_too_large_and_order_from_metadata(
    sb: Sandbox, client: stripe.StripeClient
) -> None:
    intent = pay(client, "k-pay")
    with pytest.raises(stripe.InvalidRequestError) as over:
        client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 1001})
    assert over.value.code == "charge_already_refunded"
    client.v1.refunds.create(
        params={"payment_intent": intent.id, "metadata": {"order_id": "o-other"}},
        options={"idempotency_key": "k-r"},
    )
    assert sb.effects("refund")[0]["order_id"] == "o-other"


def test_refund_needs_a_succeeded_intent(sb: Sandbox, client: stripe.StripeClient) -> None:
    held = pay(client, "k-auth", capture_method="manual")
    with pytest.raises(stripe.InvalidRequestError) as caught:
        client.v1.refunds.create(
            params={"payment_intent": held.id}, options={"idempotency_key": "k-r"}
        )
    assert caught.value.http_status == 400
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        client.v1.refunds.create(
            params={"payment_intent": "pi_nope"}, options={"idempotency_key": "k-r2"}
        )
    assert unknown.value.code == "resource_missing"
    paid = pay(client, "k-pay")
    # resource_missing was a validation failure: the key k-r2 is still free
    refund = client.v1.refunds.create(
        params={"payment_intent": paid.id}, options={"idempotency_key": "k-r2"}
    )
    assert refund.status == "succeeded"


def test_refund_pending_then_succeeded(sb: Sandbox, client: stripe.StripeClient) -> None:
    intent = pay(client, "k-pay")
    sb.faults({"endpoint": "refunds.create", "mode": "refund_pending", "settle_s": 0.2})
    refund = client.v1.refunds.create(
        params={"payment_intent": intent.id}, options={"idempotency_key": "k-r"}
    )
    assert refund.status == "pending"
    assert client.v1.charges.retrieve(intent.latest_charge).amount_refunded == 0
    assert sb.effects("refund") == []
    with pytest.raises(stripe.InvalidRequestError):  # the pending amount is spoken for
        client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 1})
    wait_for(lambda: client.v1.refunds.retrieve(refund.id).status == "succeeded")
    assert client.v1.charges.retrieve(intent.latest_charge).amount_refunded == 1000
    assert sb.kinds() == [("charge", 1000, "k-pay"), ("refund", 1000, "k-r")]


def test_refund_pending_then_failed(sb: Sandbox, client: stripe.StripeClient) -> None:
    intent = pay(client, "k-pay")
    sb.faults({"endpoint": "refund", "mode": "refund_fails", "settle_s": 0.2, "count": 1})
    refund = client.v1.refunds.create(
        params={"payment_intent": intent.id}, options={"idempotency_key": "k-r"}
    )
    assert refund.status == "pending"
    failed = wait_for(lambda: (r := client.v1.refunds.retrieve(refund.id)).status == "failed" and r)
    assert failed.failure_reason == "declined"
    assert sb.effects("refund") == []
    assert client.v1.charges.retrieve(intent.latest_charge).amount_refunded == 0
    again = client.v1.refunds.create(
        params={"payment_intent": intent.id}, options={"idempotency_key": "k-r2"}
    )
    assert again.status == "succeeded" and again.amount == 1000
    assert sb.kinds()[-1] == ("refund", 1000, "k-r2")


def test_pending_refund_settles_when_the_clock_moves(
    sb: Sandbox, client: stripe.StripeClient
) -> None:
    intent = pay(client, "k-pay")
    sb.faults({"endpoint": "refunds.create", "mode": "refund_pending", "settle_s": 600})
    refund = client.v1.refunds.create(
        params={"payment_intent": intent.id}, options={"idempotency_key": "k-r"}
    )
    sb.advance(601)
    assert client.v1.refunds.retrieve(refund.id).status == "succeeded"
    assert sb.kinds()[-1] == ("refund", 1000, "k-r")


# ---------------------------------------------------------------- idempotency and faults (Stripe)


def test_other_parameters_same_key_is_an_idempotency_error(
    sb: Sandbox, client: stripe.StripeClient
) -> None:
    pay(client, "k-1")
    with pytest.raises(stripe.IdempotencyError) as caught:
        pay(client, "k-1", amount=2000)
    assert caught.value.http_status == 400
    assert "same parameters" in str(caught.value.user_message)
    with pytest.raises(stripe.IdempotencyError):  # another endpoint is other parameters too
        client.v1.refunds.create(
            params={"payment_intent": "pi_x"}, options={"idempotency_key": "k-1"}
        )
    assert len(sb.effects()) == 1


def test_error_fault_is_not_saved(sb: Sandbox, client: stripe.StripeClient) -> None:
    sb.faults({"endpoint": "charge", "mode": "error", "status": 500, "count": 2})
    for _ in range(2):
        with pytest.raises(stripe.APIError) as caught:
            pay(client, "k-1")
        assert caught.value.http_status == 500
        assert sb.effects() == []
    intent = pay(client, "k-1")  # the retry executes
    assert intent.status == "succeeded" and not replayed(intent)
    assert len(sb.effects("charge")) == 1
    assert sb.get("/_sandbox/faults").json()["rules"][0]["injected"] == 2


def test_rate_limit_is_not_saved(sb: Sandbox, client: stripe.StripeClient) -> None:
    sb.faults({"endpoint": "charge", "mode": "rate_limit", "retry_after": 2, "count": 1})
    with pytest.raises(stripe.RateLimitError) as caught:
        pay(client, "k-1")
    assert caught.value.http_status == 429
    assert caught.value.headers is not None and caught.value.headers["Retry-After"] == "2"
    assert pay(client, "k-1").status == "succeeded"
    assert len(sb.effects()) == 1


def test_error_after_effect_is_saved_and_replayed(sb: Sandbox, client: stripe.StripeClient) -> None:
    sb.faults({"endpoint": "charge", "mode": "error_after_effect", "status": 502, "count": 1})
    with pytest.raises(stripe.APIError) as caught:
        pay(client, "k-1")
    assert caught.value.http_status == 502
    assert caught.value.error is not None and caught.value.error.type == "api_error"
    assert len(sb.effects("charge")) == 1  # the money moved all the same
    with pytest.raises(stripe.APIError) as again:
        pay(client, "k-1")
    assert again.value.http_status == 502
    assert again.value.headers is not None
    assert again.value.headers.get("Idempotent-Replayed") == "true"
    assert len(sb.effects("charge")) == 1
    # only a lookup tells what happened
    found = client.v1.payment_intents.list().data
    assert len(found) == 1 and found[0].status == "succeeded"


def test_malformed_answer_is_saved(sb: Sandbox, client: stripe.StripeClient) -> None:
    sb.faults({"endpoint": "payment_intents.create", "mode": "malformed", "count": 1})
    broken = pay(client, "k-1")
    assert broken.id is None and broken.status is None and broken.object == "payment_intent"
    assert len(sb.effects("charge")) == 1
    raw = sb.post(
        "/v1/payment_intents",
        data={
            "amount": "1000",
            "currency": "eur",
            "payment_method": "pm_card_visa",
            "payment_method_types[0]": "card",
            "confirm": "true",
            "metadata[order_id]": "o-1",
        },
        headers={"Idempotency-Key": "k-1"},
    )
    assert raw.status_code == 200 and raw.headers["Idempotent-Replayed"] == "true"
    assert raw.json() == {"id": None, "object": "payment_intent", "status": None}
    assert len(sb.effects("charge")) == 1
    sb.faults({"endpoint": "payment_intents.list", "mode": "malformed", "count": 1})
    assert sb.get("/v1/payment_intents").json() == {"object": "list", "data": None}
    assert len(sb.get("/v1/payment_intents").json()["data"]) == 1
    sb.faults({"endpoint": "payment_intents.search", "mode": "malformed", "count": 1})
    searched = sb.get("/v1/payment_intents/search", params={"query": "amount:1000"})
    assert searched.json() == {"object": "list", "data": None}


def test_timeout_after_success_is_saved_before_the_hang(sb: Sandbox) -> None:
    impatient = sb.client(timeout=0.3)
    sb.faults({"endpoint": "charge", "mode": "timeout_after_success", "count": 1, "hang_s": 1})
    with pytest.raises(stripe.APIConnectionError):
        pay(impatient, "k-1")
    assert len(sb.effects("charge")) == 1
    again = pay(impatient, "k-1")  # while the first still hangs: its answer is saved
    assert again.status == "succeeded" and replayed(again)
    assert len(sb.effects("charge")) == 1


def test_key_in_use_while_the_first_request_runs(sb: Sandbox, client: stripe.StripeClient) -> None:
    sb.faults({"endpoint": "charge", "mode": "latency", "latency_ms": 400, "count": 1})
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(pay, client, "k-1")
        time.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(stripe.APIError) as caught:
            pay(client, "k-1")
        assert time.monotonic() - started < 0.25  # at once, not after the first
        assert caught.value.http_status == 409
        assert caught.value.error is not None
        assert caught.value.error.code == "idempotency_key_in_use"
        original = first.result()
    replay = pay(client, "k-1")  # the 409 was not saved: now the first answer replays
    assert replay.id == original.id and replayed(replay)
    assert len(sb.effects("charge")) == 1


def test_saved_answers_expire_with_the_clock(sb: Sandbox, client: stripe.StripeClient) -> None:
    first = pay(client, "k-1")
    sb.advance(86400 - 60)
    assert pay(client, "k-1").id == first.id
    sb.advance(120)
    second = pay(client, "k-1")
    assert second.id != first.id and not replayed(second)
    assert [e["idempotency_key"] for e in sb.effects("charge")] == ["k-1", "k-1"]
    assert len(client.v1.payment_intents.list().data) == 2
    sb.config(idempotency_window_s=0.2)
    third = pay(client, "k-2")
    time.sleep(0.3)
    assert pay(client, "k-2").id != third.id


def test_charge_alias_hits_only_the_calls_that_move_money(
    sb: Sandbox, client: stripe.StripeClient
) -> None:
    held = pay(client, "k-held", capture_method="manual")
    sb.faults({"endpoint": "charge", "mode": "error", "status": 503})
    unconfirmed = pay(client, "k-1", confirm=None)  # no money moves: not hit
    client.v1.payment_intents.retrieve(unconfirmed.id)
    client.v1.payment_intents.list()
    with pytest.raises(stripe.APIError):
        pay(client, "k-2")
    with pytest.raises(stripe.APIError):
        client.v1.payment_intents.confirm(unconfirmed.id)
    with pytest.raises(stripe.APIError):
        client.v1.payment_intents.capture(held.id)
    assert sb.get("/_sandbox/faults").json()["rules"][0]["injected"] == 3


def test_star_storm_hits_reads_too(sb: Sandbox, client: stripe.StripeClient) -> None:
    intent = pay(client, "k-1")
    sb.faults({"endpoint": "*", "mode": "error", "status": 500, "duration_s": 0.3})
    with pytest.raises(stripe.APIError):
        client.v1.payment_intents.retrieve(intent.id)
    with pytest.raises(stripe.APIError):
        client.v1.payment_intents.search(params={"query": "amount:1000"})
    assert sb.get("/v1/shipments", params={"order_id": "o-1"}).status_code == 500
    assert sb.get("/v1/messages").status_code == 500
    time.sleep(0.35)  # the storm is over
    assert client.v1.payment_intents.retrieve(intent.id).status == "succeeded"


def test_keys_are_per_family(sb: Sandbox, client: stripe.StripeClient) -> None:
    pay(client, "k-shared")
    shipped = sb.post(
        "/v1/shipments",
        json={"order_id": "o-1", "address": {"country": "DE"}},
        headers={"Idempotency-Key": "k-shared"},
    )
    mailed = sb.post(
        "/v1/messages", json={"to": "a@example.com"}, headers={"Idempotency-Key": "k-shared"}
    )
    assert shipped.status_code == 201 and mailed.status_code == 202
    assert [e["kind"] for e in sb.effects()] == ["charge", "shipment", "email"]


def test_nested_form_encoding(sb: Sandbox) -> None:
    created = sb.post(
        "/v1/payment_intents",
        data={
            "amount": "500",
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "payment_method_types[0]": "card",
            "metadata[order_id]": "o-form",
            "metadata[note]": "x y",
            "confirm": "true",
            "expand[]": "latest_charge",
        },
    )
    body = created.json()
    assert created.status_code == 200 and created.headers["request-id"].startswith("req_")
    assert body["metadata"] == {"order_id": "o-form", "note": "x y"}
    assert body["payment_method_types"] == ["card"]
    assert body["latest_charge"]["object"] == "charge"
    fetched = sb.get(f"/v1/payment_intents/{body['id']}", params={"expand[0]": "latest_charge"})
    assert fetched.json()["latest_charge"]["id"] == body["latest_charge"]["id"]
    listed = sb.get("/v1/payment_intents", params={"created[gte]": str(body["created"])})
    assert [i["id"] for i in listed.json()["data"]] == [body["id"]]
    bad = sb.post("/v1/payment_intents", data={"amount": "5", "currency": "usd", "confirm": "x"})
    assert bad.status_code == 400


# ---------------------------------------------------------------- webhooks


def verified(receiver: Receiver, secret: str = SECRET) -> list[stripe.Event]:
    return [
        stripe.Webhook.construct_event(g["body"].decode(), g["signature"], secret)
        for g in receiver.got
    ]


def test_webhooks_are_signed_events(
    sb: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    sb.advance(86400)  # the signature carries the real time, not the sandbox clock
    intent = pay(client, "k-1")
    wait_for(lambda: len(receiver.got) == 2)
    events = {e.type: e for e in verified(receiver)}
    assert set(events) == {"payment_intent.created", "payment_intent.succeeded"}
    with pytest.raises(stripe.SignatureVerificationError):
        verified(receiver, "whsec_wrong")
    got = receiver.got[0]
    assert got["content_type"] == "application/json"
    assert got["body"] == json.dumps(got["event"], separators=(",", ":")).encode()
    timestamp = int(got["signature"].split(",")[0][2:])
    assert abs(timestamp - time.time()) < 5
    created = next(g["event"] for g in receiver.got if g["event"]["type"].endswith("created"))
    assert created["id"].startswith("evt_") and created["object"] == "event"
    assert created["api_version"] == "2024-06-20" and created["livemode"] is False
    assert created["pending_webhooks"] == 1
    assert created["request"] == {"id": None, "idempotency_key": "k-1"}
    assert created["created"] > time.time() + 86000  # the sandbox clock
    # a snapshot of that moment: the intent had not been confirmed yet
    assert created["data"]["object"]["id"] == intent.id
    assert created["data"]["object"]["status"] == "requires_confirmation"
    assert events["payment_intent.succeeded"].data.object.status == "succeeded"
    listed = sb.events()
    assert {e["type"] for e in listed} == set(events) and all(e["delivered"] for e in listed)
    assert all(e["deliveries"][0]["status"] == 200 for e in listed)
    assert {e["object_id"] for e in listed} == {intent.id}


def test_webhook_retried_after_500s(
    sb: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    receiver.fail_first = 2
    sb.config(webhook_retry_s=[0.05, 0.05, 0.05])
    pay(client, "k-1", confirm=None)
    wait_for(lambda: sb.events()[0]["delivered"])
    event = sb.events()[0]
    assert [d["status"] for d in event["deliveries"]] == [500, 500, 200]
    assert receiver.attempts[event["id"]] == 3
    assert len({g["event"]["id"] for g in receiver.got}) == 1


def test_webhook_given_up_then_resent(
    sb: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    receiver.status = 503
    sb.config(webhook_retry_s=[0.02, 0.02])
    pay(client, "k-1", confirm=None)
    wait_for(lambda: len(sb.events()[0]["deliveries"]) == 3)
    time.sleep(0.1)
    event = sb.events()[0]
    assert len(event["deliveries"]) == 3 and event["delivered"] is False
    receiver.status = 200
    assert sb.post(f"/_sandbox/events/{event['id']}/resend").status_code == 202
    wait_for(lambda: sb.events()[0]["delivered"])
    assert sb.post("/_sandbox/events/evt_nope/resend").status_code == 404


def test_webhook_connection_errors_are_retried(sb: Sandbox, client: stripe.StripeClient) -> None:
    sb.config(webhook_url=f"http://127.0.0.1:{free_port()}/hook", webhook_retry_s=[0.02, 0.02])
    pay(client, "k-1", confirm=None)
    wait_for(lambda: len(sb.events()[0]["deliveries"]) == 3)
    event = sb.events()[0]
    assert all(d["status"] is None and d["error"] for d in event["deliveries"])
    assert event["delivered"] is False


def test_webhook_duplicated(sb: Sandbox, client: stripe.StripeClient, receiver: Receiver) -> None:
    sb.faults({"endpoint": "webhooks", "mode": "duplicate", "copies": 3, "count": 1})
    pay(client, "k-1")
    wait_for(lambda: len(receiver.got) == 4)
    time.sleep(0.1)
    ids = Counter(g["event"]["id"] for g in receiver.got)
    assert sorted(ids.values()) == [1, 3]
    assert len(receiver.got) == 4


def test_webhook_dropped(sb: Sandbox, client: stripe.StripeClient, receiver: Receiver) -> None:
    sb.faults({"endpoint": "webhooks", "mode": "drop", "count": 1})
    pay(client, "k-1")
    wait_for(lambda: len(receiver.got) == 1)
    time.sleep(0.2)
    assert receiver.types() == ["payment_intent.succeeded"]
    dropped = next(e for e in sb.events() if e["type"] == "payment_intent.created")
    assert dropped["delivered"] is False and dropped["dropped"] == 1
    assert dropped["deliveries"] == []
    sb.post(f"/_sandbox/events/{dropped['id']}/resend")
    wait_for(lambda: len(receiver.got) == 2)


def test_webhook_delayed_arrives_out_of_order(
    sb: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    sb.faults({"endpoint": "webhooks", "mode": "delay", "delay_s": 0.3, "count": 1})
    pay(client, "k-1")
    wait_for(lambda: len(receiver.got) == 2)
    assert receiver.types() == ["payment_intent.succeeded", "payment_intent.created"]


def test_webhook_never_blocks_the_answer(
    sb: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    receiver.sleep_s = 0.5
    started = time.monotonic()
    pay(client, "k-1")
    assert time.monotonic() - started < 0.3
    wait_for(lambda: len(receiver.got) == 2)


def test_no_webhook_url_no_delivery(sb: Sandbox, client: stripe.StripeClient) -> None:
    pay(client, "k-1")
    events = sb.events()
    assert [e["type"] for e in events] == ["payment_intent.created", "payment_intent.succeeded"]
    assert all(e["deliveries"] == [] for e in events)
    assert sb.post(f"/_sandbox/events/{events[0]['id']}/resend").status_code == 409


def test_reset_cancels_pending_deliveries(
    sb: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    sb.faults({"endpoint": "webhooks", "mode": "delay", "delay_s": 0.3})
    pay(client, "k-1")
    sb.post("/_sandbox/reset")
    time.sleep(0.5)
    assert receiver.got == []


def test_event_types_of_each_flow(sb: Sandbox, client: stripe.StripeClient) -> None:
    sb.config(processing_s=-1)
    held = pay(client, "k-1", order_id="o-manual", capture_method="manual")
    client.v1.payment_intents.capture(held.id)
    assert sb.intent_events("o-manual") == [
        "payment_intent.created",
        "payment_intent.amount_capturable_updated",
        "charge.captured",
        "payment_intent.succeeded",
    ]
    with pytest.raises(stripe.CardError):
        pay(client, "k-2", order_id="o-decline", payment_method="pm_card_chargeDeclined")
    assert sb.intent_events("o-decline") == [
        "payment_intent.created",
        "payment_intent.payment_failed",
    ]
    action = pay(client, "k-3", order_id="o-3ds", payment_method="pm_card_authenticationRequired")
    HTTP.post(f"{sb.url}/_sandbox/3ds/{action.id}", data={"result": "fail"})
    client.v1.payment_intents.cancel(action.id)
    assert sb.intent_events("o-3ds") == [
        "payment_intent.created",
        "payment_intent.requires_action",
        "payment_intent.payment_failed",
        "payment_intent.canceled",
    ]
    debit = sepa(client, "k-4", order_id="o-sepa")
    sb.post(f"/_sandbox/payment_intents/{debit.id}/settle", json={"outcome": "succeeded"})
    assert sb.intent_events("o-sepa") == [
        "payment_intent.created",
        "payment_intent.processing",
        "payment_intent.succeeded",
    ]
    paid = pay(client, "k-5", order_id="o-refund")
    client.v1.refunds.create(params={"payment_intent": paid.id, "amount": 100})
    for mode in ("refund_pending", "refund_fails"):
        sb.faults({"endpoint": "refunds.create", "mode": mode, "settle_s": 0, "count": 1})
        refund = client.v1.refunds.create(params={"payment_intent": paid.id, "amount": 100})
        wait_for(lambda r=refund: client.v1.refunds.retrieve(r.id).status != "pending")
    assert sb.intent_events("o-refund") == [
        "payment_intent.created",
        "payment_intent.succeeded",
        "refund.created",
        "charge.refunded",
        "refund.created",
        "refund.updated",
        "charge.refunded",
        "refund.created",
        "refund.updated",
        "refund.failed",
    ]
    dispute = sb.post("/_sandbox/disputes", json={"payment_intent": paid.id})
    assert dispute.status_code == 200
    body = dispute.json()
    assert body["id"].startswith("dp_") and body["object"] == "dispute"
    assert body["charge"] == paid.latest_charge and body["payment_intent"] == paid.id
    assert body["reason"] == "fraudulent" and body["status"] == "needs_response"
    assert body["amount"] == 1000
    assert sb.intent_events("o-refund")[-1] == "charge.dispute.created"
    assert [e["kind"] for e in sb.effects(order_id="o-refund")] == ["charge", "refund", "refund"]


def test_dispute_needs_a_captured_charge(sb: Sandbox, client: stripe.StripeClient) -> None:
    held = pay(client, "k-1", capture_method="manual")
    assert sb.post("/_sandbox/disputes", json={"payment_intent": held.id}).status_code == 409
    assert sb.post("/_sandbox/disputes", json={"payment_intent": "pi_nope"}).status_code == 404
    assert sb.effects("dispute") == []


def test_dispute_webhook_carries_the_dispute(
    sb: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    paid = pay(client, "k-1")
    sb.post("/_sandbox/disputes", json={"payment_intent": paid.id})
    wait_for(lambda: "charge.dispute.created" in receiver.types())
    event = next(e for e in verified(receiver) if e.type == "charge.dispute.created")
    assert event.data.object.object == "dispute" and event.data.object.payment_intent == paid.id


# ---------------------------------------------------------------- carrier and e-mail


def carrier(sb: Sandbox, path: str, body: dict[str, Any], key: str | None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return sb.post(path, json=body, headers=headers)


SHIPMENT = {"order_id": "o-1", "address": {"country": "DE"}, "items": [{"sku": "a"}, {"sku": "b"}]}


def test_shipments_created_looked_up_cancelled(sb: Sandbox) -> None:
    first = carrier(sb, "/v1/shipments", SHIPMENT, "s-1")
    assert first.status_code == 201
    a = first.json()
    assert a["id"].startswith("shp_") and a["status"] == "created" and a["pickup"] == "scheduled"
    assert a["tracking_number"].startswith("1Z") and a["label_url"]
    assert a["order_id"] == "o-1" and a["idempotency_key"] == "s-1"
    b = carrier(sb, "/v1/shipments", SHIPMENT, "s-2").json()
    cancelled = carrier(sb, f"/v1/shipments/{a['id']}/cancel", {}, "c-1")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = carrier(sb, f"/v1/shipments/{a['id']}/cancel", {}, "c-2")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert sb.kinds() == [
        ("shipment", 2, "s-1"),
        ("shipment", 2, "s-2"),
        ("shipment_cancel", None, "c-1"),
    ]
    listed = sb.get("/v1/shipments", params={"order_id": "o-1"}).json()["data"]
    assert [s["id"] for s in listed] == [a["id"], b["id"]]
    assert [s["status"] for s in listed] == ["cancelled", "created"]
    by_key = sb.get("/v1/shipments", params={"idempotency_key": "s-2"}).json()["data"]
    assert [s["id"] for s in by_key] == [b["id"]]
    assert sb.get("/v1/shipments", params={"order_id": "o-none"}).json()["data"] == []
    assert sb.get(f"/v1/shipments/{b['id']}").json()["id"] == b["id"]
    missing = sb.get("/v1/shipments/shp_nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert carrier(sb, "/v1/shipments/shp_nope/cancel", {}, "c-3").status_code == 404


def test_carrier_validation_and_keys(sb: Sandbox) -> None:
    bad = carrier(sb, "/v1/shipments", {"order_id": "o-1", "address": {}}, "s-1")
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_address"
    assert carrier(sb, "/v1/shipments", SHIPMENT, "s-1").status_code == 201  # 422 not saved
    other = carrier(sb, "/v1/shipments", {**SHIPMENT, "order_id": "o-2"}, "s-1")
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    replay = carrier(sb, "/v1/shipments", SHIPMENT, "s-1")
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    keyless = carrier(sb, "/v1/shipments", SHIPMENT, None)
    assert keyless.status_code == 400
    assert keyless.json()["error"]["code"] == "idempotency_key_required"
    assert len(sb.effects("shipment")) == 1


def test_returns_created_and_listed(sb: Sandbox) -> None:
    made = carrier(sb, "/v1/returns", {"order_id": "o-1", "shipment_id": "shp_x"}, "r-1")
    assert made.status_code == 201
    label = made.json()
    assert label["id"].startswith("ret_") and label["tracking_number"].startswith("RT")
    assert label["label_url"] and label["order_id"] == "o-1" and label["idempotency_key"] == "r-1"
    assert carrier(sb, "/v1/returns", {}, "r-2").status_code == 422
    listed = sb.get("/v1/returns", params={"order_id": "o-1"}).json()["data"]
    assert [r["id"] for r in listed] == [label["id"]]
    assert sb.kinds() == [("return_label", None, "r-1")]


def test_messages_sent_and_looked_up(sb: Sandbox) -> None:
    body = {"to": "a@example.com", "order_id": "o-1", "subject": "Hi", "text": "x"}
    sent = carrier(sb, "/v1/messages", body, "m-1")
    assert sent.status_code == 202
    message = sent.json()
    assert message["id"].startswith("msg_") and message["status"] == "queued"
    assert message["order_id"] == "o-1" and message["idempotency_key"] == "m-1"
    invalid = carrier(sb, "/v1/messages", {"order_id": "o-1"}, "m-2")
    assert invalid.status_code == 422 and invalid.json()["error"]["code"] == "invalid_recipient"
    by_key = sb.get("/v1/messages", params={"idempotency_key": "m-1"}).json()["data"]
    assert [m["id"] for m in by_key] == [message["id"]]
    by_order = sb.get("/v1/messages", params={"order_id": "o-1"}).json()["data"]
    assert [m["id"] for m in by_order] == [message["id"]]
    assert sb.get("/v1/messages", params={"idempotency_key": "m-2"}).json()["data"] == []
    assert sb.kinds() == [("email", None, "m-1")]


def test_carrier_key_in_use_is_409(sb: Sandbox) -> None:
    sb.faults({"endpoint": "shipment", "mode": "latency", "latency_ms": 400, "count": 1})
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(carrier, sb, "/v1/shipments", SHIPMENT, "s-1")
        time.sleep(0.1)
        started = time.monotonic()
        busy = carrier(sb, "/v1/shipments", SHIPMENT, "s-1")
        assert time.monotonic() - started < 0.25
        assert busy.status_code == 409
        assert busy.json()["error"]["code"] == "idempotency_key_in_use"
        original = first.result().json()
    replay = carrier(sb, "/v1/shipments", SHIPMENT, "s-1")
    assert replay.json()["id"] == original["id"]
    assert len(sb.effects("shipment")) == 1


def test_carrier_error_after_effect_and_malformed(sb: Sandbox) -> None:
    sb.faults({"endpoint": "shipments.create", "mode": "error_after_effect", "count": 1})
    failed = carrier(sb, "/v1/shipments", SHIPMENT, "s-1")
    assert failed.status_code == 500 and "code" in failed.json()["error"]
    replay = carrier(sb, "/v1/shipments", SHIPMENT, "s-1")
    assert replay.status_code == 500 and replay.headers["Idempotent-Replayed"] == "true"
    assert len(sb.effects("shipment")) == 1
    # the lookup by key finds what happened
    found = sb.get("/v1/shipments", params={"idempotency_key": "s-1"}).json()["data"]
    assert len(found) == 1 and found[0]["status"] == "created"
    sb.faults({"endpoint": "email", "mode": "malformed", "count": 1})
    body = {"to": "a@example.com", "order_id": "o-1"}
    broken = carrier(sb, "/v1/messages", body, "m-1")
    assert broken.status_code == 202
    assert broken.json() == {"id": None, "object": "message", "status": None}
    assert carrier(sb, "/v1/messages", body, "m-1").json()["id"] is None  # saved
    assert len(sb.effects("email")) == 1
    sb.faults({"endpoint": "shipments.list", "mode": "malformed", "count": 1})
    assert sb.get("/v1/shipments").json() == {"object": "list", "data": None}


def test_carrier_error_and_rate_limit_faults_are_not_saved(sb: Sandbox) -> None:
    sb.faults(
        {"endpoint": "shipment", "mode": "error", "status": 422, "count": 1},
        {"endpoint": "email", "mode": "rate_limit", "retry_after": 0.5, "count": 1},
    )
    assert carrier(sb, "/v1/shipments", SHIPMENT, "s-1").status_code == 422
    assert carrier(sb, "/v1/shipments", SHIPMENT, "s-1").status_code == 201
    limited = carrier(sb, "/v1/messages", {"to": "a@example.com"}, "m-1")
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "0.5"
    assert carrier(sb, "/v1/messages", {"to": "a@example.com"}, "m-1").status_code == 202
    assert [e["kind"] for e in sb.effects()] == ["shipment", "email"]


def test_carrier_timeout_after_success(sb: Sandbox) -> None:
    sb.faults({"endpoint": "return_label", "mode": "timeout_after_success", "hang_s": 1})
    body = {"order_id": "o-1"}
    with pytest.raises(httpx.ReadTimeout):
        HTTP.post(
            f"{sb.url}/v1/returns", json=body, headers={"Idempotency-Key": "r-1"}, timeout=0.3
        )
    assert len(sb.effects("return_label")) == 1
    sb.faults()
    replay = carrier(sb, "/v1/returns", body, "r-1")
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert len(sb.effects("return_label")) == 1


# ---------------------------------------------------------------- control


def test_effects_filters(sb: Sandbox, client: stripe.StripeClient) -> None:
    pay(client, "k-1", order_id="o-1")
    pay(client, "k-2", order_id="o-2")
    carrier(sb, "/v1/shipments", SHIPMENT, "s-1")
    assert [e["kind"] for e in sb.effects(order_id="o-1")] == ["charge", "shipment"]
    assert [e["order_id"] for e in sb.effects(kind="charge")] == ["o-1", "o-2"]
    assert sb.effects(kind="charge", order_id="o-2")[0]["idempotency_key"] == "k-2"
    assert all(e["idempotency_key"] for e in sb.effects())


def test_keyless_effects_still_have_a_key(sb: Sandbox) -> None:
    # (the SDK always sends a key on POST; a raw request may not)
    form = {"amount": "700", "currency": "eur", "payment_method": "pm_card_visa", "confirm": "true"}
    intent = sb.post("/v1/payment_intents", data=form).json()
    assert sb.effects()[0]["idempotency_key"] == f"auto:{intent['id']}:charge"


def test_fault_rules_are_checked_and_listed(sb: Sandbox) -> None:
    sb.faults({"endpoint": "email", "mode": "error"})
    rules = sb.get("/_sandbox/faults").json()["rules"]
    assert rules[0]["injected"] == 0 and rules[0]["settle_s"] == 0.5
    assert rules[0]["copies"] == 2 and rules[0]["delay_s"] == 1.0
    for bad in (
        {"endpoint": "email", "mode": "explode"},
        {"endpoint": "mail", "mode": "error"},
        {"endpoint": "email", "mode": "error", "colour": "red"},
        {"endpoint": "email", "mode": "error", "status": "500"},
        {"mode": "error"},
    ):
        response = sb.post("/_sandbox/faults", json={"rules": [bad]})
        assert response.status_code == 422, bad
    assert len(sb.get("/_sandbox/faults").json()["rules"]) == 1


def test_config_defaults_and_merge(sb: Sandbox) -> None:
    config = sb.get("/_sandbox/config").json()
    assert config["idempotency_window_s"] == 86400 and config["search_lag_s"] == 0
    assert config["processing_s"] == 1.0 and config["hold_s"] == WEEK
    assert config["webhook_url"] is None and config["webhook_secret"].startswith("whsec_")
    assert config["webhook_retry_s"] == [0.2, 0.5, 1, 2, 5]
    merged = sb.config(search_lag_s=2)
    assert merged["search_lag_s"] == 2 and merged["hold_s"] == WEEK
    for bad in ({"nope": 1}, {"hold_s": "long"}, {"webhook_url": "ftp://x"}, {"hold_s": -1}):
        assert sb.post("/_sandbox/config", json=bad).status_code == 422
    assert sb.get("/_sandbox/config").json()["search_lag_s"] == 2


def test_clock_moves_object_timestamps(sb: Sandbox, client: stripe.StripeClient) -> None:
    sb.advance(1000)
    clock = sb.get("/_sandbox/clock").json()
    assert clock["offset_s"] == 1000
    intent = pay(client, "k-1")
    assert abs(intent.created - (time.time() + 1000)) < 5
    assert sb.post("/_sandbox/clock", json={"advance_s": -5}).status_code == 422


def test_reset_restores_everything(
    sb: Sandbox, client: stripe.StripeClient, receiver: Receiver
) -> None:
    intent = pay(client, "k-1")
    carrier(sb, "/v1/shipments", SHIPMENT, "s-1")
    sb.config(search_lag_s=5, processing_s=-1)
    sb.advance(5000)
    sb.faults({"endpoint": "email", "mode": "error"})
    sb.post("/_sandbox/reset").raise_for_status()
    config = sb.get("/_sandbox/config").json()
    assert config["search_lag_s"] == 0 and config["processing_s"] == 1.0
    assert config["webhook_url"] is None and config["webhook_secret"] != SECRET
    assert sb.get("/_sandbox/clock").json()["offset_s"] == 0
    assert sb.get("/_sandbox/faults").json()["rules"] == []
    assert sb.effects() == [] and sb.events() == []
    assert sb.get("/_sandbox/payment_intents").json()["payment_intents"] == []
    assert sb.get("/v1/shipments").json()["data"] == []
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.payment_intents.retrieve(intent.id)
    fresh = pay(client, "k-1")  # the saved answer is gone with the rest
    assert fresh.id != intent.id and not replayed(fresh)
    time.sleep(0.1)
    assert [g["event"]["data"]["object"]["id"] for g in receiver.got] == [intent.id] * 2
    assert sb.get("/_sandbox/health").json()["status"] == "ok"


def test_health_counts_requests(sb: Sandbox, client: stripe.StripeClient) -> None:
    pay(client, "k-1")
    client.v1.payment_intents.list()
    health = sb.get("/_sandbox/health").json()
    assert {k: health[k] for k in ("status", "requests")} == {"status": "ok", "requests": 2}
    assert health["calls_in_flight"] == 0 and health["peak_calls_in_flight"] == 1


def test_health_reports_the_most_calls_served_at_once(sb: Sandbox) -> None:
    """What bench saga reads to show the worker keeps calls in flight under latency."""
    sb.faults({"endpoint": "*", "mode": "latency", "latency_ms": 400})
    clients = [sb.client() for _ in range(12)]
    threads = [
        threading.Thread(target=lambda c=c, i=i: pay(c, f"k-{i}")) for i, c in enumerate(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    health = sb.get("/_sandbox/health").json()
    assert health["peak_calls_in_flight"] >= 12 and health["calls_in_flight"] == 0


def test_inspect_payment_intents(sb: Sandbox, client: stripe.StripeClient) -> None:
    a = pay(client, "k-1", order_id="o-a")
    pay(client, "k-2", order_id="o-b")
    listed = sb.get("/_sandbox/payment_intents", params={"order_id": "o-a"}).json()
    assert [i["id"] for i in listed["payment_intents"]] == [a.id]
    assert listed["payment_intents"][0]["events"] == [
        "payment_intent.created",
        "payment_intent.succeeded",
    ]
    assert len(sb.get("/_sandbox/payment_intents").json()["payment_intents"]) == 2
