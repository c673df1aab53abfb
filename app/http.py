"""Request parsing and response rendering shared by the handlers."""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import psycopg_pool
from starlette.requests import Request
from starlette.responses import Response

from orderflow.app.errors import ApiError, dumps, to_api_error
from orderflow.metrics import HTTP_LATENCY
from orderflow.services.idempotency import MAX_KEY_LENGTH

log = logging.getLogger("orderflow.http")

MAX_BODY_BYTES = 64 * 1024
RETRY_AFTER_S = "2"

Handler = Callable[[Request], Awaitable[Response]]


def json_response(status: int, body: str, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def render(status: int, value: Any) -> Response:
    return json_response(status, dumps(value))


def error_response(exc: BaseException) -> Response:
    api = to_api_error(exc) or _infrastructure_error(exc)
    return json_response(api.status, api.body(), api.headers)


def _infrastructure_error(exc: BaseException) -> ApiError:
    if isinstance(
        exc,
        psycopg_pool.PoolTimeout
        | psycopg.OperationalError
        | psycopg.errors.QueryCanceled
        | psycopg.errors.TransactionRollback,
    ):
        # Log the class and SQLSTATE only: messages can quote row values.
        log.warning("database unavailable: %s %s", type(exc).__name__, getattr(exc, "sqlstate", ""))
        return ApiError(
            503,
            "database_unavailable",
            "the database is unavailable; retry shortly",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    log.error("unexpected error: %s", type(exc).__name__, exc_info=_safe_exc_info(exc))
    return ApiError(500, "internal_error", "an unexpected error occurred")


def _safe_exc_info(exc: BaseException) -> BaseException | bool:
    return False if isinstance(exc, psycopg.Error) else exc


def json_endpoint(handler: Handler, route: str) -> Handler:
    """Every outcome of a handler is a JSON answer (nothing escapes as a traceback),
    and its latency is observed by route template, method and status."""

    @functools.wraps(handler)
    async def wrapper(request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except Exception as exc:
            response = error_response(exc)
        HTTP_LATENCY.labels(route, request.method, str(response.status_code)).observe(
            time.perf_counter() - started
        )
        return response

    return wrapper


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def read_json(request: Request) -> Any:
    """The body as JSON: 415 unless JSON, 413 past 64 KiB (before parsing), 400 if malformed."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    return parse_json(await read_body(request, MAX_BODY_BYTES))


_DECIMAL = re.compile(r"[0-9]{1,18}")


def decimal(raw: str) -> int | None:
    """A non-negative ASCII decimal of at most 18 digits, else None: `str.isdigit` also
    takes "²" and Arabic-Indic digits, which `int` refuses, and `int` refuses
    strings past 4,300 digits."""
    return int(raw) if _DECIMAL.fullmatch(raw) else None


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 past `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    size = decimal(declared)
    if size is not None and size > limit:
        raise ApiError(413, "payload_too_large", f"the body must not exceed {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "payload_too_large", f"the body must not exceed {limit} bytes")
    return bytes(body)


def parse_json(body: bytes) -> Any:
    """JSON from a body: 400 if malformed or nested too deep."""
    if _nested_too_deep(body):
        raise ApiError(400, "invalid_json", f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from exc


MAX_JSON_DEPTH = 32  # our bodies nest 3 deep


def _nested_too_deep(body: bytes | bytearray) -> bool:
    """Refuse deep nesting before json.loads sees it: a RecursionError inside the
    C decoder leaves CPython 3.11's recursion bookkeeping off for the thread
    (later ast.parse calls fail with SystemError), so it must never happen."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return False  # the common case: a C-speed count and done
    depth, in_string, escaped = 0, False, False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


_PRINTABLE_ASCII = re.compile(r"[!-~]+")  # no spaces, controls or bytes past ASCII


def idempotency_key(request: Request) -> str:
    key = request.headers.get("idempotency-key")
    if key is None:
        raise ApiError(400, "idempotency_key_required", "send an Idempotency-Key header")
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not _PRINTABLE_ASCII.fullmatch(key):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"the Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable ASCII characters",
        )
    return key
