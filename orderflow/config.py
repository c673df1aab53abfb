"""The one settings model: every variable of the README's configuration table,
typed and validated when any command starts (tests/unit/test_settings.py checks the
model against that table).

A bad value stops the process with one line naming the variable and what it
accepts (`load_settings` raises SettingsError; the CLI prints it and exits 2).
What a command needs beyond a valid value (the API's JWT_SECRET, the worker's
provider URLs) is checked by the command with `require_*` below.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from orderflow import failpoints

MIN_SECRET_BYTES = 32


class SettingsError(SystemExit):
    """A setting is missing or wrong: one line for the operator, exit status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return value.rstrip("/")


def _postgres_url(value: str) -> str:
    if not re.match(r"^postgres(?:ql)?(\+\w+)?://", value):
        raise ValueError("must be a postgresql:// URL")
    return value


def _secret(value: str) -> str:
    if len(value.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"must be at least {MIN_SECRET_BYTES} bytes (HS256 needs a long key)")
    return value


def _webhook_secret(value: str) -> str:
    if not value.startswith("whsec_"):
        raise ValueError("must be the endpoint's signing secret, whsec_…")
    return value


def _stripe_key(value: str) -> str:
    if not re.match(r"^(sk|rk)_(test|live)_\w+$", value):
        raise ValueError("must be a Stripe secret or restricted key, sk_test_… or sk_live_…")
    return value


def _method_types(value: str) -> str:
    types = [t.strip() for t in value.split(",")]
    if not types or not all(re.fullmatch(r"[a-z][a-z_]*", t) for t in types):
        raise ValueError("must be a comma-separated list of Stripe payment method types")
    return ",".join(types)


# The brokers the events relay speaks; any other scheme stops the process at start.
EVENT_BROKER_SCHEMES = ("nats",)


def _events_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme in ("amqp", "amqps"):
        raise ValueError("RabbitMQ (amqp://) is not implemented yet: use nats://host:4222")
    if parts.scheme not in EVENT_BROKER_SCHEMES or not parts.hostname:
        raise ValueError("must be a nats://host:port URL (NATS JetStream)")
    return value


def _failpoints(value: str) -> str:
    failpoints.parse(value)  # raises ValueError naming the bad entry
    return value


HttpUrl = Annotated[str, AfterValidator(_http_url)]
Secret = Annotated[str, AfterValidator(_secret)]


def _field(
    default: Any,
    env: str,
    help: str,
    *,
    shown: str | None = None,
    bad: tuple[str, ...] = (),
    **constraints: Any,
) -> Any:
    """A setting: its variable, what it means, its default as the README shows it
    (`shown`), and values it refuses (`bad`: the settings test tries each)."""
    return Field(
        default,
        alias=env,
        description=help,
        json_schema_extra={"shown": shown, "bad": list(bad)},
        **constraints,
    )


class Settings(BaseSettings):
    """Read from the environment; a variable set to the empty string counts as unset."""

    model_config = SettingsConfigDict(
        case_sensitive=True,
        frozen=True,
        populate_by_name=True,
        extra="ignore",
        env_ignore_empty=True,
        validate_default=True,
        allow_inf_nan=False,  # "inf" seconds is no limit at all
    )

    # ---- database
    database_url: Annotated[str, AfterValidator(_postgres_url)] | None = _field(
        None,
        "DATABASE_URL",
        "Postgres URL (`postgresql://…`; a SQLAlchemy `+psycopg` suffix is accepted)",
        shown="unset: an embedded Postgres under `./.orderflow/`",
        bad=("mysql://x", "not a url"),
    )
    state_dir: Path = _field(
        Path(".orderflow"),
        "ORDERFLOW_HOME",
        "where the embedded server keeps its data and lock file",
        shown="`./.orderflow`",
        bad=(),
    )
    pool_size: int = _field(
        10,
        "ORDERFLOW_POOL_SIZE",
        "API connection pool size",
        gt=0,
        le=1000,
        bad=("0", "ten", "5000"),
    )
    pool_timeout_s: float = _field(
        3.0,
        "ORDERFLOW_POOL_TIMEOUT",
        "API wait for a pooled connection, seconds (then 503)",
        gt=0,
        le=60,
        bad=("0", "-1", "soon", "inf", "nan"),
    )
    statement_timeout_ms: int = _field(
        5000,
        "ORDERFLOW_STATEMENT_TIMEOUT_MS",
        "statement_timeout of every API and worker connection",
        gt=0,
        bad=("0", "5s"),
    )
    lock_timeout_ms: int = _field(
        2000,
        "ORDERFLOW_LOCK_TIMEOUT_MS",
        "lock_timeout of every API and worker connection: a held lock fails a statement"
        " (it is retried) instead of hanging a worker whose heartbeat keeps its lease",
        gt=0,
        bad=("-5", "x"),
    )
    refresh_timeout_ms: int = _field(
        120_000,
        "ORDERFLOW_REFRESH_TIMEOUT_MS",
        "statement_timeout of the reporting snapshots' refresh",
        gt=0,
        bad=("0",),
    )
    migration_lock_timeout_ms: int = _field(
        60_000,
        "ORDERFLOW_MIGRATION_LOCK_TIMEOUT_MS",
        "how long a migration waits for a table's lock before it fails",
        gt=0,
        bad=("0",),
    )
    # ---- orders
    reservation_ttl_seconds: int = _field(
        900,
        "RESERVATION_TTL_SECONDS",
        "how long a reservation holds stock",
        gt=0,
        bad=("0", "15m", "-900"),
    )
    order_max_qty_per_line: int = _field(
        10, "ORDER_MAX_QTY_PER_LINE", "order limit: units per line", gt=0, bad=("0", "many")
    )
    order_max_lines: int = _field(50, "ORDER_MAX_LINES", "order limit: lines", gt=0, bad=("-1",))
    order_max_total_cents: int = _field(
        1_000_000,
        "ORDER_MAX_TOTAL_CENTS",
        "order limit: total, in cents",
        gt=0,
        bad=("abc", "0", "1.5"),
    )
    idempotency_retention_h: int = _field(
        72,
        "ORDERFLOW_IDEMPOTENCY_RETENTION_H",
        "how long idempotency key rows are kept (a key that made an order answers for ever)",
        gt=0,
        bad=("0", "3d"),
    )
    # ---- access
    jwt_secret: Secret | None = _field(
        None,
        "JWT_SECRET",
        "HS256 secret of customers' bearer tokens (≥ 32 bytes)",
        shown="— (required by `serve`; `demo` makes one)",
        bad=("short",),
    )
    jwt_audience: str = _field(
        "orderflow", "JWT_AUDIENCE", "required `aud` of customers' tokens", min_length=1, bad=()
    )
    jwt_admin_secret: Secret | None = _field(
        None,
        "JWT_ADMIN_SECRET",
        "HS256 secret of operators' tokens (≥ 32 bytes; another key than JWT_SECRET)",
        shown="— (required for admin routes and `token --admin`)",
        bad=("too-short",),
    )
    jwt_admin_audience: str = _field(
        "orderflow-admin",
        "JWT_ADMIN_AUDIENCE",
        "required `aud` of operators' tokens",
        min_length=1,
        bad=(),
    )
    jwt_issuer: str | None = _field(
        None,
        "JWT_ISSUER",
        "required `iss` of every token, when set",
        min_length=1,
        shown="unset: not checked",
        bad=(),
    )
    jwt_leeway_s: int = _field(
        30,
        "JWT_LEEWAY_S",
        "clock leeway for `exp`, `nbf` and `iat`, seconds",
        ge=0,
        le=3600,
        bad=("-1", "7200", "soon"),
    )
    metrics_token: str | None = _field(
        None,
        "ORDERFLOW_METRICS_TOKEN",
        "when set, `/metrics` (API and worker) needs `Authorization: Bearer <token>`",
        min_length=16,
        shown="unset: `/metrics` is open",
        bad=("short",),
    )
    dashboard_password: str | None = _field(
        None,
        "ORDERFLOW_DASHBOARD_PASSWORD",
        "the dashboard's login password (else a token printed once at start)",
        min_length=12,
        shown="unset: only the token printed at start",
        bad=("short",),
    )
    dashboard_secret: Secret | None = _field(
        None,
        "ORDERFLOW_DASHBOARD_SECRET",
        "the key that signs dashboard session cookies (share it between dashboard processes)",
        shown="random per process",
        bad=("short",),
    )
    dashboard_secure_cookies: bool | None = _field(
        None,
        "ORDERFLOW_DASHBOARD_SECURE_COOKIES",
        "session cookies only over HTTPS (`1`/`0`; unset: on unless bound to loopback)",
        shown="on unless bound to loopback",
        bad=("maybe",),
    )
    # ---- providers
    stripe_api_key: Annotated[str, AfterValidator(_stripe_key)] | None = _field(
        None,
        "STRIPE_API_KEY",
        "Stripe's secret key",
        shown="— (the worker needs it unless every provider is on loopback)",
        bad=("pk_test_public", "hunter2-key"),
    )
    stripe_api_base: HttpUrl = _field(
        "https://api.stripe.com",
        "STRIPE_API_BASE",
        "Stripe's base URL (the SDK's api base)",
        shown="`https://api.stripe.com`",
        bad=("ftp://stripe", "api.stripe.com"),
    )
    shipping_api_base: HttpUrl | None = _field(
        None,
        "SHIPPING_API_BASE",
        "the carrier API's base URL",
        shown="— (required by `worker`)",
        bad=("carrier",),
    )
    email_api_base: HttpUrl | None = _field(
        None,
        "EMAIL_API_BASE",
        "the e-mail API's base URL",
        shown="— (required by `worker`)",
        bad=("mail://x",),
    )
    stripe_webhook_secret: Annotated[str, AfterValidator(_webhook_secret)] | None = _field(
        None,
        "STRIPE_WEBHOOK_SECRET",
        "the signing secret (`whsec_…`) of Stripe's webhook endpoint; without it"
        " `POST /v1/webhooks/stripe` answers 404",
        shown="unset: webhooks are off",
        bad=("hunter2",),
    )
    provider_timeout_s: float = _field(
        10.0,
        "ORDERFLOW_PROVIDER_TIMEOUT_S",
        "provider call timeout (past it the outcome is unknown and asked about)",
        gt=0,
        le=300,
        bad=("0", "1000", "x", "nan"),
    )
    provider_key_window_s: float = _field(
        23 * 3600,
        "ORDERFLOW_PROVIDER_KEY_WINDOW_S",
        "how long a provider keeps an idempotency key, less a margin: an unknown call older"
        " than this is reconciled, never replayed blindly",
        gt=0,
        le=24 * 3600,  # Stripe keeps a key at least 24 h: past that a replay may charge again
        shown="82800 (23 h)",
        bad=("0", "a day", "inf", "90000"),
    )
    payment_method_types: Annotated[str, AfterValidator(_method_types)] = _field(
        "card,sepa_debit",
        "ORDERFLOW_PAYMENT_METHOD_TYPES",
        "the PaymentIntent's `payment_method_types`",
        shown="`card,sepa_debit`",
        bad=("Card", "card;sepa"),
    )
    payment_return_url: HttpUrl | None = _field(
        None,
        "ORDERFLOW_PAYMENT_RETURN_URL",
        "where the bank's 3-D Secure page sends the customer back (Stripe's `return_url`)",
        shown="unset",
        bad=("shop",),
    )
    processing_hold_s: int = _field(
        14 * 24 * 3600,
        "ORDERFLOW_PROCESSING_HOLD_S",
        "how long the reservation is held while a bank debit is `processing`",
        gt=0,
        shown="1209600 (14 days)",
        bad=("0", "2w"),
    )
    capture: Literal["at_shipment", "immediate"] = _field(
        "at_shipment",
        "ORDERFLOW_CAPTURE",
        "when a card payment's money is taken: `at_shipment` holds it at checkout"
        " (`capture_method=manual`) and captures it once the carrier has the shipment;"
        " `immediate` takes it at once (other payment methods always do)",
        shown="`at_shipment`",
        bad=("later", "manual"),
    )
    hold_margin_s: int = _field(
        24 * 3600,
        "ORDERFLOW_HOLD_MARGIN_S",
        "how long before a hold's `capture_before` the worker acts on it: a shipped"
        " order's hold is captured, an unshipped one goes to `needs_attention`",
        ge=0,
        le=6 * 24 * 3600,
        shown="86400 (24 h)",
        bad=("-1", "a day", "1000000"),
    )
    # ---- order events
    events_url: Annotated[str, AfterValidator(_events_url)] | None = _field(
        None,
        "ORDERFLOW_EVENTS_URL",
        "the broker `orderflow relay` publishes order events to (`nats://host:4222`,"
        " NATS JetStream; `?stream=NAME&prefix=P` name the stream and prefix the subjects)",
        shown="unset: events stay in Postgres, served by `GET /v1/events`",
        bad=("amqp://127.0.0.1:5672", "kafka://x:9092", "nats://"),
    )
    events_retention_h: int = _field(
        168,
        "ORDERFLOW_EVENTS_RETENTION_H",
        "how long order events are kept (with a broker: once published; without one:"
        " whether read or not)",
        gt=0,
        shown="168 (7 days)",
        bad=("0", "a week"),
    )
    # ---- the worker
    backoff_scale: float = _field(
        1.0,
        "ORDERFLOW_BACKOFF_SCALE",
        "multiplies the retry backoff (tests: 0.01)",
        ge=0,
        le=100,
        bad=("-1", "fast", "nan"),
    )
    report_refresh_s: float = _field(
        60.0,
        "ORDERFLOW_REPORT_REFRESH_S",
        "how often the worker refreshes the reporting snapshots",
        gt=0,
        le=86400,
        bad=("0", "inf"),
    )
    failpoints: Annotated[str, AfterValidator(_failpoints)] | None = _field(
        None,
        "ORDERFLOW_FAILPOINTS",
        "test-only: `name=exit|raise,…` arms named failpoints",
        shown="unset (off)",
        bad=("x=explode",),
    )

    @classmethod
    def from_env(cls) -> Settings:
        """The settings of this process's environment; raises SettingsError."""
        return load_settings()

    @property
    def payment_method_type_list(self) -> tuple[str, ...]:
        return tuple(self.payment_method_types.split(","))


SECRET_FIELDS = frozenset(
    {
        "JWT_SECRET",
        "JWT_ADMIN_SECRET",
        "STRIPE_API_KEY",
        "STRIPE_WEBHOOK_SECRET",
        "ORDERFLOW_METRICS_TOKEN",
        "ORDERFLOW_DASHBOARD_PASSWORD",
        "ORDERFLOW_DASHBOARD_SECRET",
        "DATABASE_URL",  # may carry a password
    }
)


def describe(error: ValidationError) -> str:
    """One line: the first bad variable, what it accepts, and (unless secret) its value."""
    first = error.errors(include_url=False)[0]
    name = ".".join(str(p) for p in first["loc"]) or "settings"
    message = str(first["msg"]).removeprefix("Value error, ")
    shown = "" if name in SECRET_FIELDS else f" (got {first.get('input')!r})"
    return f"{name}: {message}{shown}"


@contextlib.contextmanager
def settings_errors_printed() -> Iterator[None]:
    """For an entry point the CLI does not run (uvicorn's factory, Alembic's env.py):
    a SettingsError is a SystemExit, so without this its line would go unsaid."""
    try:
        yield
    except SettingsError as exc:
        print(exc, file=sys.stderr, flush=True)
        raise


def load_settings(**overrides: Any) -> Settings:
    """The environment's settings (with `overrides`); SettingsError on a bad value."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(f"orderflow: {describe(exc)}") from None


def is_loopback_url(url: str | None) -> bool:
    if not url:
        return False
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_api(settings: Settings) -> None:
    if not settings.jwt_secret:
        raise SettingsError("orderflow: JWT_SECRET must be set to serve the API (≥ 32 bytes)")
    if settings.jwt_admin_secret and settings.jwt_admin_secret == settings.jwt_secret:
        raise SettingsError("orderflow: JWT_ADMIN_SECRET must differ from JWT_SECRET")


def require_providers(settings: Settings) -> None:
    """The worker calls every provider: their URLs are required, and Stripe's key
    unless every provider is on loopback (the sandbox)."""
    for name, value in (
        ("SHIPPING_API_BASE", settings.shipping_api_base),
        ("EMAIL_API_BASE", settings.email_api_base),
    ):
        if not value:
            raise SettingsError(f"orderflow: {name} must be set for the worker (an http(s) URL)")
    bases = (settings.stripe_api_base, settings.shipping_api_base, settings.email_api_base)
    if not settings.stripe_api_key and not all(is_loopback_url(b) for b in bases):
        raise SettingsError(
            "orderflow: STRIPE_API_KEY must be set for the worker (it may be omitted only"
            " when every provider URL is loopback, as with the sandbox)"
        )


def _default_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"`{value}`"


FREE_TEXT = frozenset({"ORDERFLOW_HOME", "JWT_AUDIENCE", "JWT_ADMIN_AUDIENCE", "JWT_ISSUER"})


def settings_table() -> str:
    """The README's configuration table, drawn from the model (a test compares them)."""
    rows = ["| variable | meaning | default |", "|---|---|---|"]
    for field in Settings.model_fields.values():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        shown = extra.get("shown") or _default_text(field.default)
        rows.append(f"| `{field.alias}` | {field.description} | {shown} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
