"""Adapters to the outside world: Stripe (its SDK), the carrier and the e-mail API (httpx).

Every call carries the outbox row's idempotency key, `{order_id}:{step}`, made
from our own ids, so a replay after a crash has no second effect.  Each adapter
turns the answer into a StepOutcome: success, permanent, transient or unknown
(the request went out and no answer came back).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import stripe

from outbox_worker.outcomes import StepOutcome


@dataclass(frozen=True)
class ProviderConfig:
    stripe_api_key: str
    stripe_api_base: str
    shipping_api_base: str
    email_api_base: str
    timeout_s: float = 10.0

    @classmethod
    def from_env(cls) -> ProviderConfig:
        return cls(
            stripe_api_key=os.environ.get("STRIPE_API_KEY", ""),
            stripe_api_base=os.environ.get("STRIPE_API_BASE", "https://api.stripe.com"),
            shipping_api_base=os.environ.get("SHIPPING_API_BASE", ""),
            email_api_base=os.environ.get("EMAIL_API_BASE", ""),
            timeout_s=float(os.environ.get("ORDERFLOW_PROVIDER_TIMEOUT_S", "10")),
        )


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    if not headers:
        return None
    value = headers.get("retry-after") or headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Providers:
    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self._stripe = stripe.StripeClient(
            config.stripe_api_key or "sk_test_missing",
            base_addresses={"api": config.stripe_api_base},
            max_network_retries=0,  # retries are ours: counted, backed off, durable
            http_client=stripe.HTTPXClient(timeout=config.timeout_s, allow_sync_methods=True),
        )
        self._http = httpx.Client(timeout=config.timeout_s)

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------ Stripe

    def charge(self, ctx: Mapping[str, Any], key: str) -> StepOutcome:
        params: dict[str, Any] = {
            "amount": ctx["total_cents"],
            "currency": str(ctx["currency"]).lower(),
            "payment_method": ctx["payment_method_id"],
            "payment_method_types": ["card"],
            "confirm": True,
            "metadata": {"order_id": ctx["id"]},
        }

        def call() -> StepOutcome:
            intent = self._stripe.v1.payment_intents.create(
                params=params,  # type: ignore[arg-type]
                options={"idempotency_key": key},
            )
            if intent.status != "succeeded":
                return StepOutcome.permanent(f"payment intent {intent.status}", code=intent.status)
            return StepOutcome.success(
                payment_intent_id=intent.id, amount_cents=intent.amount_received or intent.amount
            )

        return self._stripe_call(call)

    def refund(self, ctx: Mapping[str, Any], key: str) -> StepOutcome:
        if not ctx.get("payment_intent_id"):
            return StepOutcome.permanent("no captured payment to refund")

        def call() -> StepOutcome:
            refund = self._stripe.v1.refunds.create(
                params={
                    "payment_intent": ctx["payment_intent_id"],
                    "metadata": {"order_id": ctx["id"]},
                },
                options={"idempotency_key": key},
            )
            return StepOutcome.success(refund_id=refund.id, amount_cents=refund.amount)

        return self._stripe_call(call)

    def _stripe_call(self, call: Callable[[], StepOutcome]) -> StepOutcome:
        try:
            return call()
        except stripe.CardError as exc:
            error = exc.error
            return StepOutcome.permanent(
                f"card declined: {getattr(error, 'decline_code', None) or exc.code}",
                code=exc.code,
                decline_code=getattr(error, "decline_code", None),
            )
        except stripe.RateLimitError as exc:
            return StepOutcome.throttled(_retry_after(exc.headers))
        except stripe.APIConnectionError as exc:
            if isinstance(exc.__cause__, httpx.ConnectError | httpx.ConnectTimeout):
                return StepOutcome.transient("could not connect to Stripe")
            return StepOutcome.unknown(f"no answer from Stripe ({type(exc.__cause__).__name__})")
        except (stripe.APIError, stripe.AuthenticationError) as exc:
            return StepOutcome.transient(f"Stripe {exc.http_status}: {exc.code or 'error'}")
        except stripe.StripeError as exc:
            return StepOutcome.permanent(f"Stripe {exc.http_status}: {exc.code or 'error'}")

    # ------------------------------------------------------------ carrier, e-mail

    def ship(self, ctx: Mapping[str, Any], key: str) -> StepOutcome:
        body = {"order_id": ctx["id"], "address": ctx["shipping_address"], "items": ctx["lines"]}
        return self._post(
            f"{self.config.shipping_api_base}/v1/shipments",
            body,
            key,
            _label_facts,
        )

    def cancel_shipment(self, ctx: Mapping[str, Any], key: str) -> StepOutcome:
        if not ctx.get("shipment_id"):
            return StepOutcome.success(note="no shipment to cancel")
        return self._post(
            f"{self.config.shipping_api_base}/v1/shipments/{ctx['shipment_id']}/cancel",
            {},
            key,
            lambda r: StepOutcome.success(status=r.get("status")),
        )

    def return_label(self, ctx: Mapping[str, Any], key: str) -> StepOutcome:
        body = {"order_id": ctx["id"], "shipment_id": ctx.get("shipment_id")}
        return self._post(
            f"{self.config.shipping_api_base}/v1/returns",
            body,
            key,
            _label_facts,
        )

    def send_confirmation(self, ctx: Mapping[str, Any], key: str) -> StepOutcome:
        if not ctx.get("email"):
            return StepOutcome.success(note="no e-mail address on the order")
        body = {
            "to": ctx["email"],
            "order_id": ctx["id"],
            "subject": f"Your order {ctx['id']} is on its way",
            "text": f"Tracking number: {ctx.get('tracking_number') or 'pending'}",
        }
        return self._post(
            f"{self.config.email_api_base}/v1/messages",
            body,
            key,
            lambda r: StepOutcome.success(message_id=r.get("id")),
        )

    def _post(
        self,
        url: str,
        body: Mapping[str, Any],
        key: str,
        on_success: Callable[[dict[str, Any]], StepOutcome],
    ) -> StepOutcome:
        try:
            response = self._http.post(url, json=body, headers={"Idempotency-Key": key})
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            return StepOutcome.transient(f"could not connect: {type(exc).__name__}")
        except httpx.HTTPError as exc:
            # The request may have been received and acted on: only a replay can tell.
            return StepOutcome.unknown(f"no answer: {type(exc).__name__}")
        status = response.status_code
        if 200 <= status < 300:
            try:
                return on_success(response.json())
            except (ValueError, KeyError) as exc:
                return StepOutcome.unknown(f"unreadable answer: {type(exc).__name__}")
        if status == 429:
            return StepOutcome.throttled(_retry_after(response.headers))
        if status >= 500 or status == 408:
            return StepOutcome.transient(f"HTTP {status}")
        return StepOutcome.permanent(f"HTTP {status}: {_error_code(response)}")


def _label_facts(answer: dict[str, Any]) -> StepOutcome:
    """A shipment or a return label: the carrier answers both the same way."""
    return StepOutcome.success(
        shipment_id=answer["id"],
        tracking_number=answer.get("tracking_number"),
        label_url=answer.get("label_url"),
    )


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "error"
