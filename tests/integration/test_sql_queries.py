"""Named SQL: the loader's rules, and every statement is valid on the real schema."""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest

from bench.common import QUERIES  # the production statements and the benches' own


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_every_statement_prepares_on_the_schema(conn: psycopg.Connection[Any], name: str) -> None:
    """PREPARE parses and plans the statement without running it (types are inferred)."""
    statement = re.sub(r"%\((\w+)\)s", lambda m: _placeholder(name, m.group(1)), QUERIES[name])
    statement = statement.replace("%%", "%")  # psycopg's escape for a literal %
    if name.startswith("bench_"):  # the bench's own table is not part of the schema
        conn.execute(QUERIES["bench_create_table"])
    if "pg_stat_statements" in statement:  # the benches read it where the server preloads it
        preloaded = conn.execute("SHOW shared_preload_libraries").fetchone()
        if "pg_stat_statements" not in str(preloaded):
            pytest.skip("this server does not preload pg_stat_statements")
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    verb = statement.lstrip().split(None, 1)[0].upper()
    if verb == "VACUUM":  # cannot run in a transaction; harmless on a test database
        conn.execute(statement)  # type: ignore[call-overload]
        return
    if verb in ("CREATE", "ANALYZE", "LISTEN", "REFRESH", "SET"):  # utility: run it, undo it
        with pytest.raises(_Undo), conn.transaction():
            conn.execute(statement)  # type: ignore[call-overload]
            raise _Undo
        return
    conn.execute("PREPARE probe AS " + statement)  # type: ignore[operator]
    conn.execute("DEALLOCATE probe")


class _Undo(Exception):
    pass


_numbers: dict[tuple[str, str], int] = {}


def _placeholder(query: str, param: str) -> str:
    key = (query, param)
    if key not in _numbers:
        _numbers[key] = 1 + sum(1 for k in _numbers if k[0] == query)
    return f"${_numbers[key]}"
