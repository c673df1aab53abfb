"""Errors as JSON: {"error": {"code", "message", "details"}}, and how domain errors map to HTTP."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pydantic

from orderflow.app.auth import Unauthorized
from orderflow.services.idempotency import KeyInUse, KeyReused, LockLost
from orderflow.services.orders import (
    CartAlreadyOrdered,
    CartNotFound,
    MixedCurrency,
    OutOfStock,
    UnknownSku,
)
from orderflow.services.service import InvalidState, NotCancellable, NotFound, ValidationFailed
from orderflow.statemachine.errors import IllegalTransition, OrderNotFound


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}

    def body(self) -> str:
        return dumps(
            {"error": {"code": self.code, "message": self.message, "details": self.details}}
        )


def dumps(value: Any) -> str:
    """The one JSON encoding of every answer (stored answers replay byte for byte)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def pydantic_details(exc: pydantic.ValidationError) -> list[dict[str, str]]:
    return [
        {
            "field": ".".join(str(part) for part in err["loc"]) or "body",
            "message": err["msg"],
        }
        for err in exc.errors(include_url=False, include_input=False)
    ]


def to_api_error(exc: BaseException) -> ApiError | None:
    """The HTTP form of a known error; None for anything unexpected."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Unauthorized):
        return ApiError(401, "unauthorized", str(exc), headers={"WWW-Authenticate": "Bearer"})
    if isinstance(exc, pydantic.ValidationError):
        return ApiError(422, "validation_error", "the request is invalid", pydantic_details(exc))
    if isinstance(exc, ValidationFailed):
        details = [{"field": e.field, "message": e.message} for e in exc.errors]
        return ApiError(422, "validation_error", "the request is invalid", details)
    if isinstance(exc, UnknownSku):
        return ApiError(422, "validation_error", str(exc), {"skus": exc.skus})
    if isinstance(exc, MixedCurrency):
        return ApiError(422, "validation_error", str(exc), {"currencies": exc.currencies})
    if isinstance(exc, (NotFound, OrderNotFound, CartNotFound)):
        return ApiError(404, "not_found", "no such resource")
    if isinstance(exc, OutOfStock):
        return ApiError(409, "out_of_stock", "some items are out of stock", {"skus": exc.skus})
    if isinstance(exc, CartAlreadyOrdered):
        return ApiError(409, "cart_already_ordered", str(exc))
    if isinstance(exc, NotCancellable):
        return ApiError(409, "not_cancellable", str(exc), {"state": exc.state, "return": True})
    if isinstance(exc, InvalidState):
        return ApiError(409, "invalid_state", str(exc), {"state": exc.state})
    if isinstance(exc, IllegalTransition):
        return ApiError(409, "invalid_state", str(exc), {"state": exc.state})
    if isinstance(exc, KeyReused):
        return ApiError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different request",
        )
    if (
        isinstance(exc, psycopg.errors.UniqueViolation)
        and exc.diag.constraint_name == "uq_orders_user_id_idempotency_key"
    ):
        # One order per (user, key), enforced by the database: another request
        # that made it this far with a used key is a reuse.
        return ApiError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was used for a different request",
        )
    if isinstance(exc, LockLost):
        # Our lock on the key lapsed and the work rolled back: a retry finds the key's answer.
        return ApiError(
            409,
            "idempotency_key_in_use",
            "this request's hold on its Idempotency-Key lapsed; retry it",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, KeyInUse):
        return ApiError(
            409,
            "idempotency_key_in_use",
            "a request with this Idempotency-Key is still in progress; retry later",
            headers={"Retry-After": "1"},
        )
    return None
