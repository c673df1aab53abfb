"""The provider sandbox: Stripe's PaymentIntents/Refunds subset, a carrier and an e-mail API.

It stands in for the outside world in the demo and the tests, and plays the
providers' documented contract, the ugly parts included.  Everything is kept
in memory; POST /_sandbox/reset restores everything (state, faults, config,
clock, webhook endpoint) and cancels background tasks.

Effects (GET /_sandbox/effects?kind=&order_id=): what happened on the far side,
each with the idempotency key of the request that caused it (or that started
it: a 3-D Secure completion, a bank debit settling and a pending refund
settling carry the confirm's / refund's key; "auto:<id>:<what>" when no request
with a key started it, e.g. a hold expiring).  Kinds: charge (money taken),
authorization (a hold placed), authorization_release (a hold released: cancel,
expiry, the rest of a partial capture), refund (succeeded), shipment,
shipment_cancel, return_label, email.  A replayed answer adds no effect.

Stripe (form-encoded, nested keys as Stripe: metadata[k]=v, types[0]=card,
created[gte]=1, expand[]=x): POST /v1/payment_intents (confirm=true confirms in
the same call), GET /v1/payment_intents (list: created[gt|gte|lt|lte], limit,
starting_after, ending_before; newest first; strongly consistent), GET
/v1/payment_intents/search (metadata['k']:'v', status:'v', AND/OR; lags by
search_lag_s), GET /v1/payment_intents/{id} (expand latest_charge), POST
/v1/payment_intents/{id}/confirm|cancel|capture (amount_to_capture), GET
/v1/charges/{id}, POST /v1/refunds, GET /v1/refunds, GET /v1/refunds/{id}.
Payment methods: pm_card_visa|mastercard|amex succeed (capture_method=manual:
requires_capture, a hold that expires after hold_s); pm_card_chargeDeclined,
pm_card_chargeDeclinedInsufficientFunds: 402 card_error;
pm_card_authenticationRequired: requires_action with next_action.redirect_to_url
to GET/POST /_sandbox/3ds/{id} (result=complete|fail); pm_sepaDebit, pm_sepaDebitFails:
processing, settling after processing_s (or POST
/_sandbox/payment_intents/{id}/settle {"outcome"}).  Operations on one
PaymentIntent are serialised by a lock per intent.  Wrong state: 400
payment_intent_unexpected_state (saved for the key); validation failures: 400
parameter_invalid / parameter_missing / resource_missing (not saved).

Idempotency (all families; keys are per family stripe / carrier / email): the
first answer of an executed request is saved (a 5xx too) and replayed for the
same key and parameters (Idempotent-Replayed: true) for idempotency_window_s
of the sandbox clock; other parameters: Stripe 400 idempotency_error, carrier
and e-mail 422 idempotency_key_reused; the key in use by a request still
executing: 409 idempotency_key_in_use.  Not saved: validation failures, fault
`error`, 429s, 409s.

Carrier (JSON, Idempotency-Key required): POST /v1/shipments, GET
/v1/shipments?order_id=|idempotency_key=, GET /v1/shipments/{id}, POST
/v1/shipments/{id}/cancel, POST /v1/returns, GET /v1/returns?order_id=.
E-mail: POST /v1/messages, GET /v1/messages?order_id=|idempotency_key=.

Faults (POST /_sandbox/faults {"rules": [...]}, GET shows each rule's
"injected" count): endpoint (an endpoint name such as payment_intents.confirm,
an effect kind alias such as "charge", or "*"), mode, status, retry_after,
latency_ms, rate, count, hang_s, duration_s, settle_s, copies, delay_s.
Modes: error (answer `status` before executing), rate_limit (429 +
Retry-After), latency, timeout_after_success (executes, saves, then hangs
hang_s), error_after_effect (executes, answers and saves `status`), malformed
(executes, answers and saves a 2xx whose body breaks the contract),
refund_pending / refund_fails (on refunds.create), and for the endpoint
"webhooks": drop, duplicate (`copies` deliveries), delay (`delay_s`).

Webhooks: every PaymentIntent / refund / dispute state change is an event
(GET /_sandbox/events, POST /_sandbox/events/{id}/resend); with webhook_url
configured it is delivered asynchronously, at least once, signed with
webhook_secret exactly as Stripe signs (Stripe-Signature: t=..,v1=..), retried
after each of webhook_retry_s on a non-2xx answer or a connection error.

Control: GET/POST /_sandbox/config (idempotency_window_s, search_lag_s,
processing_s, hold_s, webhook_url, webhook_secret, webhook_retry_s,
webhook_timeout_s, expiry_check_s), GET/POST /_sandbox/clock {"advance_s"},
GET /_sandbox/payment_intents?order_id=, POST /_sandbox/disputes
{"payment_intent"}, POST /_sandbox/reset, GET /_sandbox/health.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import Route

from orderflow.sandbox import carrier_api, control, stripe_api
from orderflow.sandbox.core import Sandbox


def create_sandbox_app() -> Starlette:
    routes = [
        # Stripe
        Route("/v1/payment_intents", stripe_api.create_payment_intent, methods=["POST"]),
        Route("/v1/payment_intents", stripe_api.list_payment_intents, methods=["GET"]),
        Route("/v1/payment_intents/search", stripe_api.search_payment_intents, methods=["GET"]),
        Route(
            "/v1/payment_intents/{intent_id}",
            stripe_api.retrieve_payment_intent,
            methods=["GET"],
        ),
        Route(
            "/v1/payment_intents/{intent_id}/confirm",
            stripe_api.confirm_payment_intent,
            methods=["POST"],
        ),
        Route(
            "/v1/payment_intents/{intent_id}/cancel",
            stripe_api.cancel_payment_intent,
            methods=["POST"],
        ),
        Route(
            "/v1/payment_intents/{intent_id}/capture",
            stripe_api.capture_payment_intent,
            methods=["POST"],
        ),
        Route("/v1/charges/{charge_id}", stripe_api.retrieve_charge, methods=["GET"]),
        Route("/v1/refunds", stripe_api.create_refund, methods=["POST"]),
        Route("/v1/refunds", stripe_api.list_refunds, methods=["GET"]),
        Route("/v1/refunds/{refund_id}", stripe_api.retrieve_refund, methods=["GET"]),
        # carrier, e-mail
        Route("/v1/shipments", carrier_api.create_shipment, methods=["POST"]),
        Route("/v1/shipments", carrier_api.list_shipments, methods=["GET"]),
        Route("/v1/shipments/{shipment_id}", carrier_api.retrieve_shipment, methods=["GET"]),
        Route("/v1/shipments/{shipment_id}/cancel", carrier_api.cancel_shipment, methods=["POST"]),
        Route("/v1/returns", carrier_api.create_return, methods=["POST"]),
        Route("/v1/returns", carrier_api.list_returns, methods=["GET"]),
        Route("/v1/messages", carrier_api.send_message, methods=["POST"]),
        Route("/v1/messages", carrier_api.list_messages, methods=["GET"]),
        # the far side
        Route("/_sandbox/3ds/{intent_id}", stripe_api.three_ds_page, methods=["GET"]),
        Route("/_sandbox/3ds/{intent_id}", stripe_api.three_ds_submit, methods=["POST"]),
        Route(
            "/_sandbox/payment_intents/{intent_id}/settle",
            stripe_api.settle_payment_intent,
            methods=["POST"],
        ),
        Route("/_sandbox/payment_intents", stripe_api.inspect_payment_intents, methods=["GET"]),
        Route("/_sandbox/disputes", stripe_api.open_dispute, methods=["POST"]),
        # control
        Route("/_sandbox/effects", control.effects, methods=["GET"]),
        Route("/_sandbox/faults", control.get_faults, methods=["GET"]),
        Route("/_sandbox/faults", control.set_faults, methods=["POST"]),
        Route("/_sandbox/config", control.get_config, methods=["GET"]),
        Route("/_sandbox/config", control.set_config, methods=["POST"]),
        Route("/_sandbox/clock", control.get_clock, methods=["GET"]),
        Route("/_sandbox/clock", control.advance_clock, methods=["POST"]),
        Route("/_sandbox/events", control.list_events, methods=["GET"]),
        Route("/_sandbox/events/{event_id}/resend", control.resend_event, methods=["POST"]),
        Route("/_sandbox/reset", control.reset, methods=["POST"]),
        Route("/_sandbox/health", control.health, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    app.state.sandbox = Sandbox()
    return app
