"""The API plus a bare endpoint, served by uvicorn for `orderflow bench http`."""

from __future__ import annotations

import argparse
import os

import uvicorn
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.common import QUERIES
from orderflow.app.context import AppContext
from orderflow.app.main import create_app


async def bare_insert(request: Request) -> Response:
    """One INSERT transaction on the API's own pool: what a request costs at least."""
    body = await request.body()
    ctx: AppContext = request.app.state.ctx

    def insert() -> int:
        with (
            ctx.pool.connection() as conn,
            conn.transaction(),
            conn.cursor(row_factory=tuple_row) as cur,
        ):
            cur.execute(QUERIES["bench_insert"], {"payload": Jsonb({"n": len(body)})})
            row = cur.fetchone()
            assert row is not None
            return int(row[0])

    row_id = await run_in_threadpool(insert)
    return Response(f'{{"id":{row_id}}}', status_code=201, media_type="application/json")


def create_bench_app() -> Starlette:
    """The API with the bare endpoint beside it (a factory: each uvicorn worker
    process builds its own, on BENCH_DATABASE_URL)."""
    app = create_app(database_url=os.environ["BENCH_DATABASE_URL"])
    app.router.routes.append(Route("/_bench/insert", bare_insert, methods=["POST"]))
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db-url", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("JWT_SECRET", "bench-secret-bench-secret-bench-secret!")
    os.environ["BENCH_DATABASE_URL"] = args.db_url
    uvicorn.run(
        "bench.http_server:create_bench_app",
        factory=True,
        workers=args.workers,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
