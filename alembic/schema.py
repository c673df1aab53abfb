"""The declared schema (SQLAlchemy Core).

Alembic migrations build the database; a test checks that Alembic's head equals
this declaration.  CHECK lists of states and steps come from the saga tables in
`statemachine.definition`, so Python and SQL cannot drift apart unnoticed.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, TIMESTAMP, UUID

from orderflow.statemachine.definition import STEP_NAMES, OrderState

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING)


def _in_list(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join("'" + v.replace("'", "''") + "'" for v in values)
    return f"{column} IN ({quoted})"


ORDER_STATES: tuple[str, ...] = tuple(s.value for s in OrderState)
OUTBOX_STATUSES = ("pending", "in_flight", "done", "dead")
CART_STATUSES = ("open", "ordered")
LEDGER_KINDS = ("load", "adjust", "reserve", "release", "restock")
PAYMENT_KINDS = ("charge", "refund")
# A refund Stripe has not finished yet is `pending`; only `succeeded` is money back.
PAYMENT_STATUSES = ("succeeded", "failed", "pending")
# The statuses of a Stripe PaymentIntent (its last known one is kept).
INTENT_STATUSES = (
    "requires_payment_method",
    "requires_confirmation",
    "requires_action",
    "processing",
    "requires_capture",
    "succeeded",
    "canceled",
)
SHIPMENT_KINDS = ("outbound", "return")
SHIPMENT_STATUSES = ("created", "cancelled")
RECOVERY_POINTS = ("started", "finished")

NOW = text("now()")
CURRENCY_CHECK = "currency ~ '^[A-Z]{3}$'"


def _ts(name: str, *, nullable: bool = True, default_now: bool = False) -> Column[object]:
    return Column(
        name,
        TIMESTAMP(timezone=True),
        nullable=nullable,
        server_default=NOW if default_now else None,
    )


products = Table(
    "products",
    metadata,
    Column("sku", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("price_cents", Integer, nullable=False),
    Column("currency", Text, nullable=False),
    Column("available", Integer, nullable=False),
    _ts("created_at", nullable=False, default_now=True),
    _ts("updated_at", nullable=False, default_now=True),
    # Names the next change of `available` for the ledger trigger (`kind` or
    # `kind:order_id`); the trigger resets it, so it is NULL at rest.
    Column("ledger_note", Text),
    # The stock this SKU was last loaded with from a catalog file: a reload applies
    # the file's change from it, never its absolute value.
    Column("loaded_available", Integer),
    CheckConstraint("ledger_note IS NULL", name="ledger_note_transient"),
    CheckConstraint("price_cents >= 0", name="price_nonnegative"),
    CheckConstraint("available >= 0", name="available_nonnegative"),
    CheckConstraint(CURRENCY_CHECK, name="currency_iso"),
    CheckConstraint("char_length(sku) BETWEEN 1 AND 64", name="sku_length"),
)

carts = Table(
    "carts",
    metadata,
    Column("id", Text, primary_key=True),  # ULID
    Column("user_id", UUID(as_uuid=True), nullable=False),
    Column("status", Text, nullable=False, server_default="open"),
    Column("shipping_address", JSONB, nullable=False),
    Column("email", Text),
    _ts("created_at", nullable=False, default_now=True),
    _ts("ordered_at"),
    CheckConstraint(_in_list("status", CART_STATUSES), name="status_known"),
    CheckConstraint(
        "(status = 'ordered') = (ordered_at IS NOT NULL)", name="ordered_at_iff_ordered"
    ),
    Index(None, "user_id", "created_at"),
)

cart_lines = Table(
    "cart_lines",
    metadata,
    Column("cart_id", Text, ForeignKey("carts.id", ondelete="CASCADE"), nullable=False),
    Column("sku", Text, ForeignKey("products.sku"), nullable=False),
    Column("qty", Integer, nullable=False),
    PrimaryKeyConstraint("cart_id", "sku"),
    CheckConstraint("qty > 0", name="qty_positive"),
    Index(None, "sku"),
)

orders = Table(
    "orders",
    metadata,
    Column("id", Text, primary_key=True),  # ULID: sorts by creation time
    Column("user_id", UUID(as_uuid=True), nullable=False),
    Column("cart_id", Text, ForeignKey("carts.id"), unique=True),
    Column("state", Text, nullable=False),
    Column("total_cents", Integer, nullable=False),
    Column("currency", Text, nullable=False),
    Column("payment_method_id", Text, nullable=False),
    # A bank debit's mandate as the customer accepted it (Stripe's customer_acceptance)
    Column("payment_mandate", JSONB),
    Column("shipping_address", JSONB, nullable=False),
    Column("email", Text),
    Column("idempotency_key", Text, nullable=False),
    _ts("created_at", nullable=False, default_now=True),
    _ts("updated_at", nullable=False, default_now=True),
    CheckConstraint(_in_list("state", ORDER_STATES), name="state_known"),
    CheckConstraint("total_cents >= 0", name="total_nonnegative"),
    CheckConstraint(CURRENCY_CHECK, name="currency_iso"),
    CheckConstraint("char_length(idempotency_key) BETWEEN 1 AND 255", name="key_length"),
    UniqueConstraint("user_id", "idempotency_key"),
    Index("ix_orders_user_id_created_at", "user_id", text("created_at DESC")),
    Index(None, "state", "updated_at"),
    # The dashboard finds an order by the key a storefront logged, without the user.
    Index(None, "idempotency_key"),
)

order_lines = Table(
    "order_lines",
    metadata,
    Column("order_id", Text, ForeignKey("orders.id", ondelete="CASCADE"), nullable=False),
    Column("sku", Text, ForeignKey("products.sku"), nullable=False),
    Column("qty", Integer, nullable=False),
    Column("unit_price_cents", Integer, nullable=False),
    PrimaryKeyConstraint("order_id", "sku"),
    CheckConstraint("qty > 0", name="qty_positive"),
    CheckConstraint("unit_price_cents >= 0", name="price_nonnegative"),
    Index(None, "sku"),
)

# A reservation holds stock for an order until payment (consumed: the stock is
# sold) or until it is released by the compensation.  Live = neither.
reservations = Table(
    "reservations",
    metadata,
    Column("order_id", Text, ForeignKey("orders.id", ondelete="CASCADE"), primary_key=True),
    _ts("expires_at", nullable=False),
    _ts("consumed_at"),
    _ts("released_at"),
    _ts("created_at", nullable=False, default_now=True),
    CheckConstraint("expires_at > created_at", name="expires_after_creation"),
    Index(
        "ix_reservations_live_expires_at",
        "expires_at",
        postgresql_where=text("consumed_at IS NULL AND released_at IS NULL"),
    ),
)

# Every change to products.available, so stock can be audited:
# available = sum(delta) per SKU.  Written by a trigger on products (migration
# 0012) for every writer, and append-only.  One row per (order, sku, kind) makes
# each reserve / release / restock happen at most once, enforced by the database.
stock_ledger = Table(
    "stock_ledger",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    # Checked at commit: a reservation's row is written before its order's.
    Column(
        "sku",
        Text,
        ForeignKey("products.sku", deferrable=True, initially="DEFERRED"),
        nullable=False,
    ),
    Column(
        "order_id",
        Text,
        ForeignKey("orders.id", ondelete="CASCADE", deferrable=True, initially="DEFERRED"),
    ),
    Column("kind", Text, nullable=False),
    Column("delta", Integer, nullable=False),
    _ts("at", nullable=False, default_now=True),
    CheckConstraint(_in_list("kind", LEDGER_KINDS), name="kind_known"),
    CheckConstraint(
        "(kind = 'reserve' AND delta < 0) OR (kind IN ('release', 'restock') AND delta > 0)"
        " OR kind IN ('load', 'adjust')",
        name="delta_sign",
    ),
    CheckConstraint(
        "(order_id IS NULL) = (kind IN ('load', 'adjust'))", name="order_iff_order_kind"
    ),
    Index(
        "uq_stock_ledger_order_sku_kind",
        "order_id",
        "sku",
        "kind",
        unique=True,
        postgresql_where=text("order_id IS NOT NULL"),
    ),
    Index(None, "sku"),
)

order_history = Table(
    "order_history",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("order_id", Text, ForeignKey("orders.id", ondelete="CASCADE"), nullable=False),
    Column("from_state", Text),
    Column("to_state", Text, nullable=False),
    Column("event", Text, nullable=False),
    Column("detail", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column(
        "at", TIMESTAMP(timezone=True), nullable=False, server_default=text("clock_timestamp()")
    ),
    CheckConstraint(
        "from_state IS NULL OR " + _in_list("from_state", ORDER_STATES), name="from_state_known"
    ),
    CheckConstraint(_in_list("to_state", ORDER_STATES), name="to_state_known"),
    Index(None, "order_id", "id"),
    Index("ix_order_history_to_state", "to_state", "order_id"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("order_id", Text, ForeignKey("orders.id", ondelete="CASCADE"), nullable=False),
    Column("step", Text, nullable=False),
    Column("payload", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("idempotency_key", Text, nullable=False, unique=True),
    Column("status", Text, nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    _ts("available_at", nullable=False, default_now=True),
    Column("lease_owner", Text),
    _ts("lease_until"),
    Column("fence", BigInteger, nullable=False, server_default="0"),
    Column("last_error", Text),
    _ts("created_at", nullable=False, default_now=True),
    _ts("done_at"),
    _ts("claimed_at"),  # first claim: pickup latency is claimed_at - created_at
    CheckConstraint(_in_list("step", STEP_NAMES), name="step_known"),
    CheckConstraint(_in_list("status", OUTBOX_STATUSES), name="status_known"),
    CheckConstraint("attempts >= 0", name="attempts_nonnegative"),
    CheckConstraint("fence >= 0", name="fence_nonnegative"),
    CheckConstraint(
        "(status = 'in_flight') = (lease_owner IS NOT NULL AND lease_until IS NOT NULL)",
        name="lease_iff_in_flight",
    ),
    CheckConstraint("(status = 'done') = (done_at IS NOT NULL)", name="done_at_iff_done"),
    # A step runs once per order: a second row for it would be a second effect.
    UniqueConstraint("order_id", "step"),
    Index(
        "ix_outbox_claimable",
        "available_at",
        "id",
        postgresql_where=text("status = 'pending'"),
    ),
    Index(
        "ix_outbox_leases",
        "lease_until",
        postgresql_where=text("status = 'in_flight'"),
    ),
    Index("ix_outbox_dead", "id", postgresql_where=text("status = 'dead'")),
    Index("ix_outbox_done_at", "done_at", postgresql_where=text("status = 'done'")),
    Index("ix_outbox_open_step", "step", "status", postgresql_where=text("status <> 'done'")),
)

payments = Table(
    "payments",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("order_id", Text, ForeignKey("orders.id", ondelete="CASCADE"), nullable=False),
    Column("kind", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("provider_ref", Text),  # PaymentIntent or Refund id
    Column("amount_cents", Integer, nullable=False),
    Column("currency", Text, nullable=False),
    Column("idempotency_key", Text, nullable=False),
    Column("failure_code", Text),
    _ts("created_at", nullable=False, default_now=True),
    CheckConstraint(_in_list("kind", PAYMENT_KINDS), name="kind_known"),
    CheckConstraint(_in_list("status", PAYMENT_STATUSES), name="status_known"),
    CheckConstraint("amount_cents > 0", name="amount_positive"),
    CheckConstraint(CURRENCY_CHECK, name="currency_iso"),
    CheckConstraint("status <> 'succeeded' OR provider_ref IS NOT NULL", name="succeeded_has_ref"),
    # At most one captured charge and one refund per order, enforced here.
    Index(
        "uq_payments_order_kind_succeeded",
        "order_id",
        "kind",
        unique=True,
        postgresql_where=text("status = 'succeeded'"),
    ),
    Index(None, "idempotency_key"),
    Index("ix_payments_order_kind_status", "order_id", "kind", "status"),
)

# The order's PaymentIntent at Stripe, as last seen (by the worker, a poll or a
# webhook).  One per order, enforced here: money can only ever be taken through
# the one PaymentIntent the order recorded before it confirmed it.
payment_intents = Table(
    "payment_intents",
    metadata,
    Column("order_id", Text, ForeignKey("orders.id", ondelete="CASCADE"), primary_key=True),
    Column("id", Text, nullable=False, unique=True),  # Stripe's pi_...
    Column("status", Text, nullable=False),
    Column("amount_cents", Integer, nullable=False),
    Column("amount_received_cents", Integer, nullable=False, server_default="0"),
    Column("amount_capturable_cents", Integer, nullable=False, server_default="0"),
    Column("currency", Text, nullable=False),
    # Shown to the order's owner only while the customer must act (3-D Secure).
    Column("client_secret", Text),
    Column("next_action", JSONB),
    Column("last_error_code", Text),
    _ts("created_at", nullable=False, default_now=True),
    _ts("updated_at", nullable=False, default_now=True),
    # Capture at shipment: when the hold was placed, and by when Stripe says to
    # capture it (the charge's payment_method_details.card.capture_before).
    _ts("held_at"),
    _ts("capture_before"),
    CheckConstraint(_in_list("status", INTENT_STATUSES), name="status_known"),
    CheckConstraint("amount_cents > 0", name="amount_positive"),
    CheckConstraint(
        "amount_received_cents >= 0 AND amount_capturable_cents >= 0", name="amounts_nonnegative"
    ),
    # The worker's sweep of holds near their capture deadline reads only these.
    Index(
        "ix_payment_intents_held",
        "capture_before",
        postgresql_where=text("status = 'requires_capture'"),
    ),
)

# Stripe's webhook events, each stored once (the inbox), in the transaction of
# the state change it causes; a redelivery finds its row and changes nothing.
stripe_events = Table(
    "stripe_events",
    metadata,
    Column("id", Text, primary_key=True),  # evt_...
    Column("type", Text, nullable=False),
    Column("object_id", Text),
    Column("order_id", Text, ForeignKey("orders.id", ondelete="SET NULL")),
    _ts("stripe_created"),
    _ts("received_at", nullable=False, default_now=True),
    Column("outcome", Text, nullable=False),  # what it did: an event applied, or why ignored
    Column("data", JSONB, nullable=False),  # the object, without its client secret
    Index(None, "order_id"),
)

shipments = Table(
    "shipments",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("order_id", Text, ForeignKey("orders.id", ondelete="CASCADE"), nullable=False),
    Column("kind", Text, nullable=False),
    Column("status", Text, nullable=False, server_default="created"),
    Column("carrier_ref", Text, nullable=False),
    Column("tracking_number", Text),
    Column("label_url", Text),
    Column("idempotency_key", Text, nullable=False),
    _ts("created_at", nullable=False, default_now=True),
    _ts("cancelled_at"),
    CheckConstraint(_in_list("kind", SHIPMENT_KINDS), name="kind_known"),
    CheckConstraint(_in_list("status", SHIPMENT_STATUSES), name="status_known"),
    CheckConstraint(
        "(status = 'cancelled') = (cancelled_at IS NOT NULL)", name="cancelled_at_iff_cancelled"
    ),
    UniqueConstraint("order_id", "kind"),
)

# Stripe-style idempotency keys for POST requests, scoped per user.  The row
# records how far the request got (recovery point) and the first answer, which
# a replay returns byte for byte.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    Column("user_id", UUID(as_uuid=True), nullable=False),
    Column("key", Text, nullable=False),
    Column("request_method", Text, nullable=False),
    Column("request_path", Text, nullable=False),
    Column("request_hash", Text, nullable=False),
    Column("recovery_point", Text, nullable=False, server_default="started"),
    Column("locked_at", TIMESTAMP(timezone=True)),
    Column("response_status", Integer),
    Column("response_body", Text),
    Column("order_id", Text, ForeignKey("orders.id", ondelete="SET NULL")),
    _ts("created_at", nullable=False, default_now=True),
    _ts("last_run_at", nullable=False, default_now=True),
    CheckConstraint("char_length(key) BETWEEN 1 AND 255", name="key_length"),
    CheckConstraint(_in_list("recovery_point", RECOVERY_POINTS), name="recovery_point_known"),
    CheckConstraint(
        "(recovery_point = 'finished') = (response_status IS NOT NULL)",
        name="finished_has_response",
    ),
    CheckConstraint(
        "response_status IS NULL OR response_status BETWEEN 100 AND 599", name="status_http"
    ),
    UniqueConstraint("user_id", "key"),
    Index(None, "created_at"),
)

# The dashboard's logins: a cookie names its row, and logout revokes it for every
# dashboard process at once.
dashboard_sessions = Table(
    "dashboard_sessions",
    metadata,
    Column("id", Text, primary_key=True),
    _ts("created_at", nullable=False, default_now=True),
    _ts("expires_at", nullable=False),
    _ts("revoked_at"),
)

# Order events (CloudEvents 1.0), one per order_history row, written by the
# history table's trigger in the transaction of the state change; a relay
# publishes them to a broker (published_at) or GET /v1/events serves them.
order_events = Table(
    "order_events",
    metadata,
    # the keyset of the feed is (txid, position): txid is the writing transaction's
    # id (xid8 as a number), so a late commit never lands behind a served cursor
    Column("position", BigInteger, Identity(always=True), primary_key=True),
    Column("id", Text, nullable=False, unique=True),  # ULID, the CloudEvents id
    Column("order_id", Text, nullable=False),
    Column("sequence", Integer, nullable=False),
    Column("history_id", BigInteger, nullable=False, unique=True),
    Column("type", Text, nullable=False),
    _ts("time", nullable=False),
    Column("data", JSONB, nullable=False),
    Column("txid", BigInteger, nullable=False),
    _ts("published_at"),
    CheckConstraint("sequence > 0", name="sequence_positive"),
    CheckConstraint("type LIKE 'orderflow.order.%'", name="type_namespaced"),
    UniqueConstraint("order_id", "sequence"),
    Index(None, "txid", "position"),
    Index("ix_order_events_unpublished", "position", postgresql_where=text("published_at IS NULL")),
    Index(None, "time"),
)

# How far the retention purge has gone (one row): a feed cursor before it may
# have missed purged events and answers 410.
order_events_purged = Table(
    "order_events_purged",
    metadata,
    Column("singleton", Integer, primary_key=True, server_default="1"),
    Column("txid", BigInteger, nullable=False),
    Column("position", BigInteger, nullable=False),
    _ts("purged_at", nullable=False, default_now=True),
    CheckConstraint("singleton = 1", name="one_row"),
)
