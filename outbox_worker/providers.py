"""Adapters to the outside world: Stripe (its SDK), the carrier and the e-mail API (httpx).

Each call returns a `Reply` that says only what the answer proves:

- `Ok`: the provider answered with the object;
- `Refused`: a definite no (a declined card, an invalid request): nothing happened;
- `Throttled`: 429, "not now";
- `NotSent`: the request never reached the provider (connection refused);
- `Misconfigured`: 401/403, our key or account is wrong: a person must fix it;
- `Unknown`: the answer does not say what happened: a timeout or a reset after
  the request went out, a 5xx (Stripe stores a 500 for the key and replays it),
  a 409 "same key in flight", a body we cannot read.  `ended` tells whether the
  request is known to be over (an answer came) or may still be running.

What to do with an answer is the step's business (outbox_worker/steps.py): an
adapter never guesses.  Every POST carries an idempotency key made from our
own ids; GETs (retrieve, list, search, lookups) are safe to repeat.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import certifi
import httpx
import stripe

from orderflow.config import Settings
from orderflow.outbox_worker.bridge import call_io


@dataclass(frozen=True)
class Ok:
    body: dict[str, Any]


@dataclass(frozen=True)
class Refused:
    status: int
    code: str
    message: str = ""
    body: dict[str, Any] = field(default_factory=dict)  # the error object


@dataclass(frozen=True)
class Throttled:
    retry_after_s: float | None = None


@dataclass(frozen=True)
class NotSent:
    reason: str


@dataclass(frozen=True)
class Misconfigured:
    reason: str


@dataclass(frozen=True)
class Unknown:
    reason: str
    ended: bool  # an answer came, so the request is over; False: it may still run
    # An answer we cannot read (a body without what the contract promises): asking
    # again may never help, so these are counted and, past a limit, sent to a person.
    # An outage (5xx, timeouts) is asked about for as long as it lasts.
    poison: bool = False


def unreadable(reason: str) -> Unknown:
    return Unknown(reason, ended=True, poison=True)


Reply = Ok | Refused | Throttled | NotSent | Misconfigured | Unknown


@dataclass(frozen=True)
class ProviderConfig:
    stripe_api_key: str
    stripe_api_base: str
    shipping_api_base: str
    email_api_base: str
    timeout_s: float = 10.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ProviderConfig:
        return cls(
            stripe_api_key=settings.stripe_api_key or "",
            stripe_api_base=settings.stripe_api_base,
            shipping_api_base=settings.shipping_api_base or "",
            email_api_base=settings.email_api_base or "",
            timeout_s=settings.provider_timeout_s,
        )


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    if not headers:
        return None
    value = headers.get("retry-after") or headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


# ---------------------------------------------------------------- Stripe


@functools.cache
def _tls_context(cafile: str) -> ssl.SSLContext:
    """One TLS context per CA bundle for every client (each would load it: MBs apiece)."""
    return ssl.create_default_context(cafile=cafile)


class AsyncClients:
    """httpx.AsyncClients taken in turn, for calls made on the worker's event loop.

    One client's pool admits no limit here (the bound on calls in flight is the
    worker's: a default pool of 100 would make the 101st call wait and time out
    as an unknown outcome), and httpcore's pool rescans every waiting request on
    each change, a cost that grows with the square of the calls in flight: split
    over several clients, each sees a share."""

    def __init__(self, size: int = 64, **kwargs: Any) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
        kwargs.setdefault("verify", _tls_context(certifi.where()))
        self._clients = [httpx.AsyncClient(limits=limits, **kwargs) for _ in range(size)]
        self._turn = itertools.cycle(self._clients)

    def pick(self) -> httpx.AsyncClient:
        return next(self._turn)


class StripeApi:
    """The Stripe calls the saga makes, through the official SDK (its v1 client).

    Blocking calls go through the SDK's httpx client; calls awaited on the worker's
    event loop through the SDK's aiohttp client (`stripe.AIOHTTPClient`, documented
    beside it): the same requests, and a fifth of the CPU per call, flat however
    many calls are in flight (`orderflow bench clients`: httpx's pool checks every
    kept connection on each request)."""

    def __init__(self, config: ProviderConfig) -> None:
        self._config = config
        self._client = self._make_client(
            stripe.HTTPXClient(timeout=config.timeout_s, allow_sync_methods=True)
        )
        # (loop, its client, its session): an aiohttp session is bound to its loop
        self._async: tuple[asyncio.AbstractEventLoop, Any, aiohttp.ClientSession] | None = None

    def _make_client(self, http_client: stripe.HTTPClient) -> stripe.StripeClient:
        return stripe.StripeClient(
            self._config.stripe_api_key or "sk_test_missing",
            base_addresses={"api": self._config.stripe_api_base},
            max_network_retries=0,  # retries are ours: counted, backed off, durable
            http_client=http_client,
        )

    def _async_v1(self) -> Any:
        """The aiohttp-backed client of the running loop, made on first use there."""
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            connector = aiohttp.TCPConnector(
                limit=0,  # the bound on calls in flight is the worker's
                ssl=_tls_context(stripe.ca_bundle_path),
            )
            session = aiohttp.ClientSession(connector=connector)
            timeout = aiohttp.ClientTimeout(total=self._config.timeout_s)
            http = stripe.AIOHTTPClient(timeout=timeout, session=session)
            self._async = (loop, self._make_client(http).v1, session)
        return self._async[1]

    async def aclose(self) -> None:
        """Close the running loop's aiohttp session (the daemon, as it stops)."""
        if self._async is not None and self._async[0] is asyncio.get_running_loop():
            session, self._async = self._async[2], None
            await session.close()

    def _call(self, service: str, method: str, *args: Any, **kwargs: Any) -> Reply:
        """One SDK call: its `_async` twin awaited on the worker's event loop when the
        step runs bridged (outbox_worker.bridge), the blocking one otherwise."""
        return _stripe(
            lambda: call_io(
                lambda: getattr(getattr(self._client.v1, service), method)(*args, **kwargs),
                lambda: getattr(getattr(self._async_v1(), service), f"{method}_async")(
                    *args, **kwargs
                ),
            )
        )

    def create_intent(self, params: Mapping[str, Any], key: str) -> Reply:
        return self._call(
            "payment_intents", "create", params=dict(params), options={"idempotency_key": key}
        )

    def confirm_intent(self, intent_id: str, params: Mapping[str, Any], key: str) -> Reply:
        return self._call(
            "payment_intents", "confirm", intent_id, params=dict(params),
            options={"idempotency_key": key},
        )  # fmt: skip

    def retrieve_intent(self, intent_id: str) -> Reply:
        # The charge says by when a hold must be captured (capture_before).
        return self._call(
            "payment_intents", "retrieve", intent_id, params={"expand": ["latest_charge"]}
        )

    def capture_intent(self, intent_id: str, key: str) -> Reply:
        return self._call(
            "payment_intents", "capture", intent_id, params={"expand": ["latest_charge"]},
            options={"idempotency_key": key},
        )  # fmt: skip

    def cancel_intent(self, intent_id: str, key: str) -> Reply:
        return self._call(
            "payment_intents", "cancel", intent_id,
            params={"cancellation_reason": "abandoned"}, options={"idempotency_key": key},
        )  # fmt: skip

    def search_intents(self, order_id: str) -> Reply:
        # Search lags writes (Stripe: under a minute, longer in incidents): a hit
        # is proof, an empty answer is not.
        query = f"metadata['order_id']:'{order_id}'"
        return self._call("payment_intents", "search", params={"query": query, "limit": 10})

    def list_intents(self, created_gte: int, starting_after: str | None = None) -> Reply:
        params: dict[str, Any] = {"created": {"gte": created_gte}, "limit": 100}
        if starting_after:
            params["starting_after"] = starting_after
        return self._call("payment_intents", "list", params=params)

    def create_refund(self, params: Mapping[str, Any], key: str) -> Reply:
        return self._call(
            "refunds", "create", params=dict(params), options={"idempotency_key": key}
        )

    def retrieve_refund(self, refund_id: str) -> Reply:
        return self._call("refunds", "retrieve", refund_id)

    def list_refunds(self, intent_id: str) -> Reply:
        return self._call("refunds", "list", params={"payment_intent": intent_id, "limit": 100})


def _stripe(call: Callable[[], Any]) -> Reply:
    try:
        answer = call()
    except stripe.CardError as exc:
        error = _error_body(exc)
        return Refused(
            402, str(error.get("code") or "card_declined"), str(error.get("message", "")), error
        )
    except stripe.IdempotencyError as exc:
        # The key was used with other parameters: whatever that request did exists.
        return unreadable(f"Stripe idempotency_error: {exc.user_message or ''}"[:200])
    except stripe.RateLimitError as exc:
        return Throttled(_retry_after(exc.headers))
    except (stripe.AuthenticationError, stripe.PermissionError) as exc:
        return Misconfigured(f"Stripe {exc.http_status}: check STRIPE_API_KEY")
    except stripe.InvalidRequestError as exc:
        error = _error_body(exc)
        return Refused(
            exc.http_status or 400,
            str(error.get("code") or "invalid_request"),
            str(error.get("message", ""))[:300],
            error,
        )
    except stripe.APIConnectionError as exc:
        if isinstance(exc.__cause__, _NOT_CONNECTED):
            return NotSent("could not connect to Stripe")
        return Unknown(f"no answer from Stripe ({type(exc.__cause__).__name__})", ended=False)
    except stripe.APIError as exc:
        if exc.http_status == 409:  # another request with this key is still running
            return Unknown("Stripe 409: the key is in flight", ended=False)
        return Unknown(f"Stripe {exc.http_status}: {exc.code or 'api_error'}", ended=True)
    except stripe.StripeError as exc:
        return Unknown(f"Stripe {exc.http_status}: {type(exc).__name__}", ended=True)
    body = answer.to_dict() if hasattr(answer, "to_dict") else answer
    if not isinstance(body, dict):
        return unreadable("unreadable answer from Stripe")
    return Ok(body)


# A connection that was never made: the request cannot have reached Stripe.  (A
# reset or a timeout after connecting may have: those are unknown outcomes.)
_NOT_CONNECTED = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    aiohttp.ClientConnectorError,
    aiohttp.ConnectionTimeoutError,
)


def _error_body(exc: stripe.StripeError) -> dict[str, Any]:
    body = exc.json_body if isinstance(exc.json_body, dict) else {}
    error = body.get("error")
    return error if isinstance(error, dict) else {}


# ---------------------------------------------------------------- carrier, e-mail


class HttpApi:
    """A JSON API with Stripe-like idempotency keys (the carrier's, the e-mail provider's)."""

    def __init__(self, base: str, timeout_s: float) -> None:
        self.base = base.rstrip("/")
        self._timeout_s = timeout_s
        self._http = httpx.Client(timeout=timeout_s)
        self._async_http: AsyncClients | None = None

    def close(self) -> None:
        self._http.close()

    def _request_async(self, method: str, url: str, **kwargs: Any) -> Any:
        if self._async_http is None:  # made on first use, on the worker's loop
            self._async_http = AsyncClients(timeout=self._timeout_s)
        return self._async_http.pick().request(method, url, **kwargs)

    def post(self, path: str, body: Mapping[str, Any], key: str) -> Reply:
        return self._send("POST", path, json=dict(body), headers={"Idempotency-Key": key})

    def get(self, path: str, params: Mapping[str, str] | None = None) -> Reply:
        return self._send("GET", path, params=dict(params or {}))

    def _send(self, method: str, path: str, **kwargs: Any) -> Reply:
        if not self.base:
            return Misconfigured(f"no base URL configured for {path}")
        try:
            url = f"{self.base}{path}"
            response = call_io(
                lambda: self._http.request(method, url, **kwargs),
                lambda: self._request_async(method, url, **kwargs),
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            return NotSent(f"could not connect: {type(exc).__name__}")
        except httpx.HTTPError as exc:
            # The request may have been received and acted on: only asking can tell.
            return Unknown(f"no answer: {type(exc).__name__}", ended=False)
        return _http_reply(response)


def _http_reply(response: httpx.Response) -> Reply:
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    code = str(error.get("code")) if isinstance(error, dict) and error.get("code") else "error"
    if 200 <= status < 300:
        if not isinstance(body, dict):
            return unreadable(f"HTTP {status} with a body we cannot read")
        return Ok(body)
    if status == 429:
        return Throttled(_retry_after(response.headers))
    if status == 409:
        return Unknown(f"HTTP 409 {code}: the key is in flight", ended=False)
    if status == 408:
        return NotSent("HTTP 408: the request did not arrive whole")
    if status >= 500:
        return Unknown(f"HTTP {status}", ended=True)
    if status in (401, 403):
        return Misconfigured(f"HTTP {status}: check the provider's credentials")
    if code == "idempotency_key_reused":
        # The key was used for another request: what that one did exists.
        return unreadable(f"HTTP {status} {code}")
    return Refused(status, code, str((error or {}).get("message", ""))[:300], error or {})


class CarrierApi:
    def __init__(self, config: ProviderConfig) -> None:
        self._api = HttpApi(config.shipping_api_base, config.timeout_s)

    def close(self) -> None:
        self._api.close()

    def create_shipment(self, body: Mapping[str, Any], key: str) -> Reply:
        return self._api.post("/v1/shipments", body, key)

    def find_shipments(self, order_id: str) -> Reply:
        return self._api.get("/v1/shipments", {"order_id": order_id})

    def retrieve_shipment(self, shipment_id: str) -> Reply:
        return self._api.get(f"/v1/shipments/{shipment_id}")

    def cancel_shipment(self, shipment_id: str, key: str) -> Reply:
        return self._api.post(f"/v1/shipments/{shipment_id}/cancel", {}, key)

    def create_return(self, body: Mapping[str, Any], key: str) -> Reply:
        return self._api.post("/v1/returns", body, key)

    def find_returns(self, order_id: str) -> Reply:
        return self._api.get("/v1/returns", {"order_id": order_id})


class EmailApi:
    def __init__(self, config: ProviderConfig) -> None:
        self._api = HttpApi(config.email_api_base, config.timeout_s)

    def close(self) -> None:
        self._api.close()

    def send(self, body: Mapping[str, Any], key: str) -> Reply:
        return self._api.post("/v1/messages", body, key)

    def find_messages(self, key: str) -> Reply:
        return self._api.get("/v1/messages", {"idempotency_key": key})


class Providers:
    """The three providers the steps call."""

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self.stripe = StripeApi(config)
        self.carrier = CarrierApi(config)
        self.email = EmailApi(config)

    def close(self) -> None:
        self.carrier.close()
        self.email.close()

    async def aclose(self) -> None:
        """Close what the worker's event loop opened (from that loop)."""
        await self.stripe.aclose()
