"""The Starlette application: routes from app.routes, the pool owned by the lifespan."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from orderflow.app.context import AppContext
from orderflow.app.errors import ApiError, dumps
from orderflow.app.http import error_response, json_response
from orderflow.app.openapi import openapi_document
from orderflow.app.routes import route_handlers
from orderflow.config import Settings, require_api, settings_errors_printed
from orderflow.services.service import OrderLimits
from orderflow.sql.db import connection_options, resolve_url
from orderflow.sql.gauges import install_database_gauges

DOCS_HTML = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>orderflow API</title>
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script src="/docs/init.js"></script>
</body>
</html>
"""
DOCS_INIT_JS = """window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});\n"""


def make_pool(url: str, settings: Settings, *, max_size: int | None = None) -> ConnectionPool:
    return ConnectionPool(
        url,
        min_size=1,
        max_size=max_size or settings.pool_size,
        # Waiting for a connection is bounded: past it the request gets a 503.
        timeout=settings.pool_timeout_s,
        kwargs={
            "autocommit": True,
            "row_factory": dict_row,
            "connect_timeout": 3,
            "options": connection_options(settings),
        },
        # No check on checkout (it costs a round trip per request): a connection
        # broken by a server restart fails its request with a 503 and is then
        # discarded by the pool, which reconnects.
        open=False,
        name="orderflow-api",
    )


def create_app(
    settings: Settings | None = None,
    *,
    database_url: str | None = None,
    limits: OrderLimits | None = None,
) -> Starlette:
    if settings is None:  # uvicorn's factory: the CLI is not there to say what is wrong
        with settings_errors_printed():
            settings = Settings.from_env()
            require_api(settings)
    require_api(settings)
    url = database_url or resolve_url(settings)
    pool = make_pool(url, settings)
    ctx = AppContext(
        settings=settings, limits=limits or OrderLimits.from_settings(settings), pool=pool
    )
    install_database_gauges(lambda: pool.connection(timeout=1.0))
    document = dumps(openapi_document())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool.open(wait=False)  # serve (with 503s) even while the database is down
        try:
            yield
        finally:
            pool.close()

    async def openapi(request: Request) -> Response:
        return json_response(200, document)

    async def docs(request: Request) -> Response:
        return HTMLResponse(DOCS_HTML)

    async def docs_init(request: Request) -> Response:
        return Response(DOCS_INIT_JS, media_type="text/javascript")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        return error_response(ApiError(exc.status_code, code, str(exc.detail), headers=headers))

    routes: list[BaseRoute] = [
        Route(path, handler, methods=[method]) for path, method, handler in route_handlers()
    ]
    routes += [
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/docs/init.js", docs_init, methods=["GET"]),
        Mount("/docs/assets", app=StaticFiles(directory=str(swagger_ui_path)), name="docs-assets"),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error}
    )
    app.state.ctx = ctx
    return app
