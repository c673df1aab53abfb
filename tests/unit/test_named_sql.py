"""Named SQL: the loader's rules; no statement built in Python; the benches'
statements stay out of production."""

from __future__ import annotations

import re

import pytest

from orderflow.sql import QUERIES as PRODUCTION_QUERIES
from orderflow.sql import parse_queries
from tests.support.paths import PROJECT_ROOT


def test_parse_named_queries() -> None:
    text = "-- one --\n-- the first\nSELECT 1;\n\n-- two --\n-- the second\nSELECT 2\n"
    assert parse_queries(text) == {"one": "SELECT 1", "two": "SELECT 2"}


@pytest.mark.parametrize(
    "text",
    [
        "-- one --\nSELECT 1",  # no description
        "-- one --\n-- only a description\n",  # no statement
        "-- one --\n-- a\nSELECT 1\n-- one --\n-- b\nSELECT 2",  # twice
    ],
)
def test_parse_rejects_malformed_files(text: str) -> None:
    with pytest.raises(ValueError):
        parse_queries(text)


def test_no_sql_built_with_fstrings() -> None:
    """Statements live in sql/*.sql; Python code only names them."""
    offenders = []
    for folder in (
        "orderflow",
        "app",
        "services",
        "statemachine",
        "outbox_worker",
        "sql",
        "dashboard",
        "sandbox",
        "alembic",
        "bench",
    ):
        for path in (PROJECT_ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            if re.search(r'f"""?\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\b', text, re.IGNORECASE):
                offenders.append(str(path))
    assert offenders == []


def test_the_benches_statements_stay_out_of_production() -> None:
    assert not [name for name in PRODUCTION_QUERIES if name.startswith("bench_")]
