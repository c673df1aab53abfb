"""What the handlers share: settings, limits and the connection pool."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from orderflow.config import Settings
from orderflow.services.service import OrderLimits

# After the database failed a request, later requests wait this long at most
# for a connection (instead of the pool's full timeout), for this many seconds:
# while Postgres is down the API answers 503 at once rather than queueing.
FAIL_FAST_WAIT_S = 0.25
FAIL_FAST_WINDOW_S = 2.0


@dataclass
class AppContext:
    settings: Settings
    limits: OrderLimits
    pool: ConnectionPool
    idempotency_lock_timeout_s: float = 60.0
    _database_failed_at: float = -FAIL_FAST_WINDOW_S

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        recently_failed = time.monotonic() - self._database_failed_at < FAIL_FAST_WINDOW_S
        try:
            with self.pool.connection(
                timeout=FAIL_FAST_WAIT_S if recently_failed else None
            ) as conn:
                yield conn
        except (PoolTimeout, psycopg.OperationalError):
            self._database_failed_at = time.monotonic()
            raise
