"""Settings read from the environment (see the README's configuration table)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise SystemExit(f"{name} must be an integer, got {raw!r}") from exc
    if value <= 0:
        raise SystemExit(f"{name} must be positive, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    state_dir: Path
    reservation_ttl_seconds: int
    jwt_secret: str | None
    jwt_audience: str
    stripe_webhook_secret: str | None = None

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            database_url=os.environ.get("DATABASE_URL") or None,
            state_dir=Path(os.environ.get("ORDERFLOW_HOME", ".orderflow")).resolve(),
            reservation_ttl_seconds=_int_env("RESERVATION_TTL_SECONDS", 900),
            jwt_secret=os.environ.get("JWT_SECRET") or None,
            jwt_audience=os.environ.get("JWT_AUDIENCE") or "orderflow",
            stripe_webhook_secret=os.environ.get("STRIPE_WEBHOOK_SECRET") or None,
        )
