"""Validators, the cursor codec and the OpenAPI document, with no database."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pydantic
import pytest

from orderflow.app import schemas
from orderflow.app.openapi import openapi_document
from orderflow.app.routes import OPERATIONS
from orderflow.services.service import (
    OrderLimits,
    ValidationFailed,
    check_address,
    check_lines,
    decode_cursor,
    encode_cursor,
)
from tests.support.helpers import ADDRESS

LIMITS = OrderLimits(min_qty=1, max_qty=10, max_lines=3, max_total_cents=1000)


def _fields(errors: list[Any]) -> list[str]:
    return [e.field for e in errors]


def test_lines_are_checked() -> None:
    assert check_lines([("A", 1), ("B", 10)], LIMITS) == []
    assert _fields(check_lines([], LIMITS)) == ["lines"]
    assert _fields(check_lines([("A", 0), ("B", 11)], LIMITS)) == ["lines[0].qty", "lines[1].qty"]
    assert _fields(check_lines([("A", 1), ("A", 2)], LIMITS)) == ["lines[1].sku"]
    assert "lines" in _fields(check_lines([("A", 1), ("B", 1), ("C", 1), ("D", 1)], LIMITS))


def test_addresses_are_checked() -> None:
    assert check_address(ADDRESS) == []
    assert _fields(check_address({**ADDRESS, "city": "  ", "name": None})) == [
        "shipping_address.name",
        "shipping_address.city",
    ]
    assert _fields(check_address({**ADDRESS, "country": "XX"})) == ["shipping_address.country"]
    assert _fields(check_address({**ADDRESS, "country": "de"})) == ["shipping_address.country"]


def test_the_cursor_round_trips() -> None:
    at = datetime(2026, 12, 1, 9, 30, 15, 123456, tzinfo=UTC)
    cursor = encode_cursor(at, "01JABCDEF0123456789ABCDEFG")
    assert "=" not in cursor and "/" not in cursor and "+" not in cursor  # URL-safe, unpadded
    assert decode_cursor(cursor) == (at, "01JABCDEF0123456789ABCDEFG")


@pytest.mark.parametrize(
    "cursor", ["", "%%%", "bm90IGpzb24", "WzEsMiwzXQ", "WyJub3QgYSBkYXRlIiwgIngiXQ", "\x00"]
)
def test_a_cursor_we_did_not_issue_is_a_validation_error(cursor: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        decode_cursor(cursor)
    assert _fields(info.value.errors) == ["cursor"]


def test_request_bodies_refuse_what_the_api_refuses() -> None:
    good = {"lines": [{"sku": "MUG-01", "qty": 1}], "shipping_address": ADDRESS}
    schemas.CartIn.model_validate(good)
    for bad in (
        {**good, "lines": []},
        {**good, "extra": 1},  # strict: unknown fields are refused
        {**good, "shipping_address": {**ADDRESS, "country": "Germany"}},
        {**good, "lines": [{"sku": "MUG-01", "qty": "1"}]},  # no coercion
    ):
        with pytest.raises(pydantic.ValidationError):
            schemas.CartIn.model_validate(bad)
    with pytest.raises(pydantic.ValidationError):
        schemas.OrderIn.model_validate({"cart_id": "not-a-ulid", "payment_method_id": "pm_x"})


def test_the_openapi_document_is_31_and_covers_every_operation() -> None:
    doc = openapi_document()
    assert doc["openapi"] == "3.1.0"
    ids = [op.operation_id for op in OPERATIONS]
    assert len(ids) == len(set(ids))
    for op in OPERATIONS:
        assert doc["paths"][op.path][op.method.lower()]["operationId"] == op.operation_id
    text = json.dumps(doc)
    schemas_defined = doc["components"]["schemas"]
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        assert ref.startswith("#/components/schemas/")
        assert ref.removeprefix("#/components/schemas/") in schemas_defined, ref
