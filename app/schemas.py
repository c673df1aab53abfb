"""Request and response bodies.  Requests are validated with these models and
the OpenAPI document's schemas are generated from the same models."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from orderflow.statemachine.definition import OrderState

# Bidi embeddings, overrides and isolates: they make a label or a log line
# read differently from what it holds ("Trojan Source").
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _clean_text(value: str) -> str:
    # Postgres text and jsonb cannot hold NUL, and lone surrogates cannot be
    # encoded as UTF-8: refuse both here rather than fail in the database.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode text") from exc
    # Every field is one line printed on a label, an e-mail or a terminal:
    # no control characters (newlines, escapes) and no bidi controls.
    if any(ord(c) < 32 or 127 <= ord(c) < 160 or c in _BIDI_CONTROLS for c in value):
        raise ValueError("must not contain control characters")
    if not value.strip() and value:
        raise ValueError("must not be blank")
    return value


Clean = AfterValidator(_clean_text)
ULID_PATTERN = r"^[0-9A-HJKMNP-TV-Z]{26}$"

Sku = Annotated[str, StringConstraints(min_length=1, max_length=64), Clean]
Ulid = Annotated[str, StringConstraints(pattern=ULID_PATTERN), Clean]
Line200 = Annotated[str, StringConstraints(min_length=1, max_length=200), Clean]
OptionalLine200 = Annotated[str, StringConstraints(max_length=200), Clean]
City = Annotated[str, StringConstraints(min_length=1, max_length=100), Clean]
PostalCode = Annotated[str, StringConstraints(min_length=1, max_length=20), Clean]
CountryCode = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$"), Clean]
Email = Annotated[
    str, StringConstraints(max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"), Clean
]
PaymentMethodId = Annotated[
    str, StringConstraints(max_length=255, pattern=r"^pm_[A-Za-z0-9_]+$"), Clean
]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=500), Clean]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LineIn(Strict):
    sku: Sku
    qty: Annotated[int, Field(ge=1, le=10_000)]


class Address(Strict):
    name: Line200
    line1: Line200
    line2: OptionalLine200 | None = None
    city: City
    postal_code: PostalCode
    country: CountryCode = Field(description="ISO 3166-1 alpha-2 code, e.g. DE")


class CartIn(Strict):
    lines: Annotated[list[LineIn], Field(min_length=1, max_length=200)]
    shipping_address: Address
    email: Email | None = None


class OnlineAcceptance(Strict):
    ip_address: Annotated[str, StringConstraints(min_length=2, max_length=45), Clean]
    user_agent: Annotated[str, StringConstraints(min_length=1, max_length=500), Clean]


class MandateIn(Strict):
    """The customer's acceptance of a bank-debit mandate, as the storefront saw it."""

    customer_acceptance: OnlineAcceptance


class OrderIn(Strict):
    cart_id: Ulid
    payment_method_id: PaymentMethodId
    mandate: MandateIn | None = Field(
        None,
        description="For a bank debit (SEPA): the customer's acceptance of the mandate, which"
        " Stripe needs to confirm the debit",
    )


class ReturnIn(Strict):
    reason: Reason


# ---------------------------------------------------------------- responses


class CartLine(BaseModel):
    sku: str
    qty: int
    unit_price_cents: int
    currency: str


class Cart(BaseModel):
    id: str
    status: str
    lines: list[CartLine]
    shipping_address: dict[str, Any]
    email: str | None
    created_at: str
    ordered_at: str | None


class OrderLine(BaseModel):
    sku: str
    qty: int
    unit_price_cents: int


class PlacedOrder(BaseModel):
    id: str
    state: OrderState
    lines: list[OrderLine]
    total_cents: int
    currency: str
    reservation_expires_at: str | None
    created_at: str


class PaymentRef(BaseModel):
    payment_intent_id: str | None
    status: str = Field(description="The PaymentIntent's last known Stripe status")
    amount_cents: int | None = None
    amount_received_cents: int | None = None
    funds: Literal["none", "held", "captured", "released"] | None = Field(
        None,
        description="Capture at shipment: `held` (authorized at checkout), `captured` (taken"
        " at shipment, or at once), `released` (the hold cancelled: no money moved)",
    )
    held_cents: int | None = Field(None, description="Money held and not yet captured")
    captured_cents: int | None = Field(None, description="Money taken")
    capture_before: str | None = Field(
        None, description="While held: Stripe's deadline for capturing the hold"
    )
    client_secret: str | None = Field(
        None,
        description="While the customer must act (3-D Secure): for Stripe.js handleNextAction",
    )
    next_action: dict[str, Any] | None = Field(
        None, description="While the customer must act: Stripe's next_action"
    )


class RefundRef(BaseModel):
    refund_id: str | None
    status: str
    amount_cents: int


class ShipmentRef(BaseModel):
    shipment_id: str
    status: str
    tracking_number: str | None
    label_url: str | None


class HistoryEntry(BaseModel):
    from_state: OrderState | None
    to_state: OrderState
    event: str
    at: str | None


class Order(PlacedOrder):
    updated_at: str
    payment: PaymentRef | None
    refund: RefundRef | None
    shipment: ShipmentRef | None
    tracking_number: str | None
    history: list[HistoryEntry]


class OrderSummary(BaseModel):
    id: str
    state: OrderState
    total_cents: int
    currency: str
    created_at: str
    updated_at: str


class OrderPage(BaseModel):
    orders: list[OrderSummary]
    next_cursor: str | None


class OrderStateChange(BaseModel):
    id: str
    state: OrderState


class StripeEvent(BaseModel):
    """A Stripe event as Stripe sends it; the Stripe-Signature covers the raw body."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(description="evt_...: each event is stored and applied once")
    type: str
    created: int | None = None
    data: dict[str, Any] = Field(description="data.object: the PaymentIntent, refund or dispute")


class WebhookAck(BaseModel):
    id: str
    outcome: str | None = None
    duplicate: bool | None = None


class Health(BaseModel):
    status: str
    database: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class CloudEvent(BaseModel):
    """An order event: CloudEvents 1.0, structured JSON."""

    specversion: str
    id: str
    source: str
    type: str
    subject: str
    time: str
    datacontenttype: str
    data: dict[str, Any]


class EventPage(BaseModel):
    events: list[CloudEvent]
    next: str
