"""Idempotency keys for POST requests, in atomic phases (after rocket-rides-atomic).

Phase 1 (its own transaction) records the key with the request's hash and
locks it, so a concurrent request with the same key sees it in flight.  Phase 2
(one transaction) does the work and stores the answer with the key, unlocking
it.  A failure before phase 2 commits unlocks the key, so the client can retry
at once; when the failure took the connection with it, the unlock goes through
a fresh one.  Only a crash of the process leaves a lock, which expires after
`lock_timeout_s`.

Keys are scoped per user: one user's key never answers another's request.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from orderflow.sql import QUERIES
from orderflow.statemachine.errors import OrderflowError

MAX_KEY_LENGTH = 255


class KeyReused(OrderflowError):
    """The key was first used for a different request."""


class KeyInUse(OrderflowError):
    """A request with this key is still in flight."""


class LockLost(OrderflowError):
    """Our lock on the key expired and was taken over before we finished."""


@dataclass(frozen=True)
class Answer:
    status: int
    body: str
    order_id: str | None = None


@dataclass(frozen=True)
class IdempotentResult:
    status: int
    body: str
    replayed: bool


def request_fingerprint(method: str, path: str, payload: Any) -> str:
    """A hash of what the request asks for: same method, path and JSON value."""
    canonical = json.dumps(
        [method.upper(), path, payload], sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


# Given the order a key made (its key row purged since), the answer to a replay
# of the same request, or None if this request is another one.
Recover = Callable[[psycopg.Connection[Any], dict[str, Any]], Answer | None]


def run_idempotent(
    conn: psycopg.Connection[Any],
    *,
    user_id: uuid.UUID,
    key: str,
    method: str,
    path: str,
    request_hash: str,
    work: Callable[[psycopg.Connection[Any]], Answer],
    answer_error: Callable[[Exception], Answer | None],
    lock_timeout_s: float = 60.0,
    fresh_connection: Callable[[], AbstractContextManager[psycopg.Connection[Any]]] | None = None,
    recover: Recover | None = None,
) -> IdempotentResult:
    """Run `work` at most once per (user, key) and return its stored answer.

    `work` runs inside phase 2's transaction.  If it raises, that transaction
    rolls back whole; `answer_error` turns a known error into the answer to
    store (a 409 or 422: replays return it too), and None means "unexpected":
    the key is unlocked and the error propagates, storing nothing.

    Key rows are purged after their retention (72 h), but a key that made an
    order answers for ever: `recover` rebuilds the answer from that order when
    the request is the same, and a different request is refused as a reuse.
    """
    key_id, locked_at, stored = _phase_one(
        conn, user_id, key, method, path, request_hash, lock_timeout_s, recover
    )
    if stored is not None:
        return IdempotentResult(stored.status, stored.body, replayed=True)
    assert locked_at is not None
    try:
        try:
            with conn.transaction():
                answer = work(conn)
                _finish(conn, key_id, locked_at, answer)
        except LockLost:
            raise  # the work rolled back and the key is another request's now: store nothing
        except Exception as exc:
            failure = answer_error(exc)
            if failure is None:
                raise
            answer = failure
            with conn.transaction():  # the work left nothing; store only its answer
                _finish(conn, key_id, locked_at, answer)
    except BaseException:
        _unlock(conn, key_id, locked_at, fresh_connection)
        raise
    return IdempotentResult(answer.status, answer.body, replayed=False)


def _finish(
    conn: psycopg.Connection[Any], key_id: int, locked_at: datetime, answer: Answer
) -> None:
    finished = conn.execute(
        QUERIES["finish_idempotency_key"],
        {
            "id": key_id,
            "locked_at": locked_at,
            "status": answer.status,
            "body": answer.body,
            "order_id": answer.order_id,
        },
    ).fetchone()
    if finished is None:
        raise LockLost(f"idempotency key {key_id} was taken over")


def _phase_one(
    conn: psycopg.Connection[Any],
    user_id: uuid.UUID,
    key: str,
    method: str,
    path: str,
    request_hash: str,
    lock_timeout_s: float,
    recover: Recover | None = None,
) -> tuple[int, datetime | None, Answer | None]:
    params = {
        "user_id": user_id,
        "key": key,
        "method": method,
        "path": path,
        "request_hash": request_hash,
        "lock_timeout_s": lock_timeout_s,
    }
    # A purge can remove the key row between our statements: then look again.
    for _ in range(3):
        with conn.cursor(row_factory=dict_row) as cur:
            # The common case, a new key, is one autocommit statement.
            fresh = cur.execute(QUERIES["insert_idempotency_key"], params).fetchone()
        assert fresh is not None  # the statement always answers one row
        if fresh["id"] is not None:
            return fresh["id"], fresh["locked_at"], None
        with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(QUERIES["lock_idempotency_key"], params).fetchone()
            if row is None:
                if fresh["made"] is None:
                    continue  # purged just now, and no order: a new key after all
                # The key made an order and its row was purged: the same request
                # gets that order again; another one is a reuse of the key.
                answer = recover(conn, fresh["made"]) if recover is not None else None
                if answer is None:
                    raise KeyReused(key)
                return 0, None, answer
            if (row["request_method"], row["request_path"], row["request_hash"]) != (
                method,
                path,
                request_hash,
            ):
                raise KeyReused(key)
            if row["recovery_point"] == "finished":
                return row["id"], None, Answer(row["response_status"], row["response_body"])
            if row["in_flight"]:
                raise KeyInUse(key)
            relocked = cur.execute(QUERIES["relock_idempotency_key"], {"id": row["id"]}).fetchone()
            if relocked is None:
                continue  # finished or purged meanwhile: decide again
            return relocked["id"], relocked["locked_at"], None
    raise KeyInUse(key)  # the key keeps changing under us: the client retries


def _unlock(
    conn: psycopg.Connection[Any],
    key_id: int,
    locked_at: datetime,
    fresh_connection: Callable[[], AbstractContextManager[psycopg.Connection[Any]]] | None,
) -> None:
    params = {"id": key_id, "locked_at": locked_at}
    try:
        with conn.transaction():
            conn.execute(QUERIES["unlock_idempotency_key"], params)
        return
    except psycopg.Error:
        pass  # this connection died with the request (a killed backend, a cut socket)
    if fresh_connection is None:
        return  # the lock expires after lock_timeout_s instead
    try:
        with fresh_connection() as other, other.transaction():
            other.execute(QUERIES["unlock_idempotency_key"], params)
    except Exception:
        # The database is gone too (or no connection came): the lock expires instead.
        pass
