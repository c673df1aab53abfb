"""What the handlers share: settings, limits and the connection pool."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg_pool import ConnectionPool

from orderflow.config import Settings
from orderflow.service import OrderLimits


@dataclass
class AppContext:
    settings: Settings
    limits: OrderLimits
    pool: ConnectionPool
    idempotency_lock_timeout_s: float = 60.0
