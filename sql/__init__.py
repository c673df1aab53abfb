"""Named SQL statements, loaded once from the `*.sql` files beside this module.

Each statement sits under a header line `-- name --` followed by a one-line
`-- description`, as in procrastinate.  Code calls statements by name:

    conn.execute(QUERIES["lock_orders"], {"order_ids": [...]})
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from importlib import resources
from typing import Any, LiteralString

import psycopg
from psycopg.pq import TransactionStatus

_HEADER = re.compile(r"^-- ([a-z_][a-z0-9_]*) --$", re.MULTILINE)


def parse_queries(text: str, source: str = "<sql>") -> dict[str, str]:
    """Split a .sql file into {name: statement}."""
    parts = _HEADER.split(text)
    queries: dict[str, str] = {}
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = body.strip().splitlines()
        if not lines or not lines[0].startswith("-- "):
            raise ValueError(f"{source}: query {name!r} has no one-line description")
        statement = "\n".join(lines[1:]).strip().rstrip(";")
        if not statement:
            raise ValueError(f"{source}: query {name!r} is empty")
        if name in queries:
            raise ValueError(f"{source}: query {name!r} is defined twice")
        queries[name] = statement
    return queries


def load_queries() -> dict[str, LiteralString]:
    # The statements come from files in this package, never from input.
    queries: dict[str, LiteralString] = {}
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".sql"):
            for name, statement in parse_queries(entry.read_text("utf-8"), entry.name).items():
                if name in queries:
                    raise ValueError(f"query {name!r} is defined in two files")
                queries[name] = statement
    return queries


QUERIES: dict[str, LiteralString] = load_queries()


def atomic(conn: psycopg.Connection[Any]) -> AbstractContextManager[Any]:
    """Begin a transaction, or join the caller's without a savepoint.

    Joining costs no round trip; an error anywhere then undoes the caller's
    whole unit of work, which is what every caller here wants (a domain error
    must leave nothing half-written).
    """
    if conn.info.transaction_status == TransactionStatus.IDLE:
        return conn.transaction()
    return nullcontext()
