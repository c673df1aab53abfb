"""The dashboard's HTTP side: Starlette routes that check access, call dashboard.data, render.

Read-only except one action, re-driving a dead letter, which goes through
outbox_worker.operations.redrive: the same function as `orderflow outbox retry`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import psycopg
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from orderflow.app.http import decimal
from orderflow.config import Settings
from orderflow.dashboard import data, vendor
from orderflow.dashboard.security import COOKIE, SESSION_TTL_S, Access, Session, csrf_ok
from orderflow.outbox_worker.operations import RedriveError, redrive
from orderflow.sql import QUERIES
from orderflow.sql.reports import plain

HERE = Path(__file__).resolve().parent
# A handler behind the access gate: it gets the visitor's session with the request.
GuardedPage = Callable[[Request, Session], Awaitable[Response]]
REFRESH_S = 5
MAX_FORM_BYTES = 4096
SECURITY_HEADERS = {
    # Scripts only from this origin; mermaid writes inline styles into its SVG.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _age(value: timedelta | None) -> str:
    if value is None:
        return ""
    seconds = max(0, int(value.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def _ts(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _money(cents: int | None, currency: str = "") -> str:
    if cents is None:
        return ""
    return f"{cents // 100:,}.{cents % 100:02d} {currency}".strip()


def _funnel_json(rows: list[dict[str, Any]]) -> Markup:
    keys = ("day", "placed", "paid", "shipped", "confirmed", "cancelled")
    text = json.dumps([{k: plain(r[k]) for k in keys} for r in rows])
    # Inside <script type="application/json">: no "</script>" may appear.
    safe = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(safe)


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        age=_age,
        ts=_ts,
        money=_money,
        funnel_json=_funnel_json,
        compact_json=lambda v: json.dumps(v, separators=(", ", ": "), default=str),
    )
    return env


def _local_path(value: str | None, default: str = "/") -> str:
    """A redirect target only within this site (no scheme, no host, no //)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return default
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return default
    return value


def make_pool(url: str, size: int = 4) -> ConnectionPool:
    return ConnectionPool(
        url,
        min_size=1,
        max_size=size,
        timeout=3.0,
        kwargs={
            "autocommit": True,
            "row_factory": dict_row,
            "connect_timeout": 3,
            "application_name": "orderflow-dashboard",
            "options": "-c statement_timeout=5000 -c idle_in_transaction_session_timeout=30000",
        },
        open=False,
        name="orderflow-dashboard",
    )


class Dashboard:
    def __init__(self, url: str, access: Access, *, refresh_s: int = REFRESH_S) -> None:
        self.pool = make_pool(url)
        self.access = access
        self.refresh_s = refresh_s
        self.env = _environment()

    # ------------------------------------------------------------ plumbing

    def _session(self, request: Request) -> Session | None:
        return self.access.load(request.cookies.get(COOKIE))

    def _render(
        self,
        request: Request,
        template: str,
        session: Session,
        status: int = 200,
        **context: Any,
    ) -> Response:
        html = self.env.get_template(template).render(
            csrf=session.csrf,
            show_logout=session.authenticated,
            list_limit=data.LIST_LIMIT,
            **context,
        )
        response = HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)
        self._set_cookie(response, session)
        return response

    def _set_cookie(self, response: Response, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            self.access.sign(session),
            max_age=SESSION_TTL_S,
            httponly=True,
            samesite="strict",
            secure=self.access.secure_cookies,
            path="/",
        )

    def _message(
        self, request: Request, session: Session, status: int, heading: str, message: str
    ) -> Response:
        return self._render(
            request,
            "message.html",
            session,
            status=status,
            heading=heading,
            message=message,
        )

    async def _logged_in(self, session: Session | None) -> bool:
        """A session whose login still holds in the database (not logged out anywhere)."""
        if session is None or session.sid is None:
            return False
        sid = session.sid

        def live(conn: psycopg.Connection[Any]) -> bool:
            found = conn.execute(QUERIES["dashboard_session_live"], {"id": sid}).fetchone()
            return found is not None

        return bool(await self._db(live))

    async def _start_session(self) -> Session:
        session = Session.new(authenticated=True)  # a new id: no fixation

        def start(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                QUERIES["dashboard_session_start"], {"id": session.sid, "ttl_s": SESSION_TTL_S}
            )

        await self._db(start)
        return session

    async def _gate(self, request: Request) -> tuple[Session, Response | None]:
        """The visitor's session, or the response that turns them away.  Every visitor
        must have logged in: with the password, or this run's token (`?token=` on any
        page, as the URL printed at start has it)."""
        session = self._session(request)
        if await self._logged_in(session):
            assert session is not None
            return session, None
        client = request.client.host if request.client else "?"
        token = request.query_params.get("token")
        if token is not None and request.method == "GET" and self.access.password_ok(token, client):
            fresh = await self._start_session()
            # the token leaves the address bar (and the browser's history)
            rest = "&".join(
                f"{quote(k)}={quote(v)}"
                for k, v in request.query_params.multi_items()
                if k != "token"
            )
            response: Response = RedirectResponse(
                request.url.path + (f"?{rest}" if rest else ""), status_code=303
            )
            self._set_cookie(response, fresh)
            return fresh, response
        fresh = session if session is not None and session.sid is None else Session.new()
        if request.method == "GET" and request.url.path != "/overview/live":
            target = "/login?next=" + quote(request.url.path + _query(request), safe="")
            response = RedirectResponse(target, status_code=303)
        else:
            response = PlainTextResponse("log in first", status_code=401)
        self._set_cookie(response, fresh)
        return fresh, response

    def guarded(self, page: GuardedPage) -> Callable[[Request], Awaitable[Response]]:
        """The route for a page or action: it runs only for visitors the gate lets in."""

        async def endpoint(request: Request) -> Response:
            session, turned_away = await self._gate(request)
            return turned_away or await page(request, session)

        return endpoint

    def _same_origin(self, request: Request) -> bool:
        """A POST's Origin (sent by every current browser) must be this very site."""
        origin = request.headers.get("origin")
        if origin is None:
            return True  # non-browser clients; the CSRF token still has to match
        return urlsplit(origin).netloc == request.headers.get("host", "")

    async def _form(self, request: Request) -> dict[str, str]:
        """The urlencoded form, read up to MAX_FORM_BYTES; anything else is an empty form."""
        declared = decimal(request.headers.get("content-length", "0"))
        if declared is None or declared > MAX_FORM_BYTES:
            return {}
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return {}
        try:
            parsed = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
        except ValueError:  # too many fields
            return {}
        return {k: v[0] for k, v in parsed.items() if "\x00" not in v[0]}

    async def _db(self, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        def run() -> Any:
            with self.pool.connection() as conn:
                return fn(conn)

        return await run_in_threadpool(run)

    # ------------------------------------------------------------ pages

    async def overview(self, request: Request, session: Session) -> Response:
        ov = await self._db(data.overview)
        return self._render(
            request,
            "overview.html",
            session,
            ov=ov,
            states=data.STATES,
            refresh_s=self.refresh_s,
            vendor=not vendor.missing(),
            now=datetime.now().astimezone(),
            next_path="/",
            flash=_redrive_flash(request),
        )

    async def overview_live(self, request: Request, session: Session) -> Response:
        ov = await self._db(data.overview)
        return self._render(
            request, "_live.html", session, ov=ov, states=data.STATES, next_path="/"
        )

    async def search(self, request: Request, session: Session) -> Response:
        query = request.query_params.get("q", "").strip()
        results = await self._db(lambda conn: data.find_orders(conn, query)) if query else []
        if len(results) == 1 and results[0]["id"] == query:
            return RedirectResponse(f"/orders/{quote(query, safe='')}", status_code=303)
        return self._render(request, "search.html", session, query=query, results=results)

    async def order(self, request: Request, session: Session) -> Response:
        order_id = request.path_params["order_id"]
        detail = await self._db(lambda conn: data.order_detail(conn, order_id))
        if detail is None:
            return self._message(
                request, session, 404, "No such order", f"There is no order {order_id}."
            )
        return self._render(
            request,
            "order.html",
            session,
            o=detail.order,
            detail=detail,
            next_path=f"/orders/{order_id}",
            flash=_redrive_flash(request),
        )

    # ------------------------------------------------------------ the one action

    async def redrive(self, request: Request, session: Session) -> Response:
        form = await self._form(request)
        if not self._same_origin(request) or not csrf_ok(session, form.get("csrf")):
            return self._message(
                request,
                session,
                403,
                "Refused",
                "The form's security token is missing or stale: reload the page and try again.",
            )
        outbox_id = request.path_params["outbox_id"]
        try:
            await self._db(lambda conn: redrive(conn, outbox_id))
        except RedriveError as exc:
            return self._message(request, session, 409, "Not re-driven", str(exc))
        target = _local_path(form.get("next"))
        separator = "&" if "?" in target else "?"
        return RedirectResponse(f"{target}{separator}redriven={outbox_id}", status_code=303)

    # ------------------------------------------------------------ login

    async def login_page(self, request: Request) -> Response:
        session = self._session(request) or Session.new()
        return self._render(
            request,
            "login.html",
            session,
            next_path=_local_path(request.query_params.get("next")),
        )

    async def login(self, request: Request) -> Response:
        session = self._session(request)
        form = await self._form(request)
        fresh = session or Session.new()
        next_path = _local_path(form.get("next"))
        if not self._same_origin(request) or not csrf_ok(session, form.get("csrf")):
            return self._render(
                request,
                "login.html",
                fresh,
                status=403,
                next_path=next_path,
                error="The form expired: try again.",
            )
        client = request.client.host if request.client else "?"
        if self.access.locked_out(client):
            return self._render(
                request,
                "login.html",
                fresh,
                status=429,
                next_path=next_path,
                error="Too many failed attempts: wait a minute.",
            )
        if not self.access.password_ok(form.get("password", ""), client):
            return self._render(
                request,
                "login.html",
                fresh,
                status=401,
                next_path=next_path,
                error="Wrong password or token.",
            )
        response = RedirectResponse(next_path, status_code=303)
        self._set_cookie(response, await self._start_session())  # a new id: no fixation
        return response

    async def logout(self, request: Request) -> Response:
        session = self._session(request)
        form = await self._form(request)
        if not csrf_ok(session, form.get("csrf")):
            return PlainTextResponse("refused", status_code=403)
        if session is not None and session.sid is not None:
            sid = session.sid  # revoked for every dashboard process, not only this cookie
            await self._db(lambda conn: conn.execute(QUERIES["dashboard_session_end"], {"id": sid}))
        response = RedirectResponse("/login", 303)
        self._set_cookie(response, Session.new())
        return response

    async def healthz(self, request: Request) -> Response:
        try:
            await self._db(lambda conn: conn.execute("SELECT 1"))
        except (psycopg.Error, PoolTimeout):
            return PlainTextResponse("database unavailable", status_code=503)
        return PlainTextResponse("ok")

    async def bad_value(self, request: Request, exc: Exception) -> Response:
        return self._message(
            request,
            self._session(request) or Session.new(),
            400,
            "Not a valid value",
            "Postgres refused a value in this request (for example a NUL character).",
        )

    async def database_down(self, request: Request, exc: Exception) -> Response:
        return self._message(
            request,
            self._session(request) or Session.new(),
            503,
            "Database unavailable",
            "PostgreSQL did not answer; this page will work again when it does. "
            f"({type(exc).__name__})",
        )


def _redrive_flash(request: Request) -> str | None:
    """The message after a re-drive's redirect (`?redriven=ID`), built only from digits."""
    redriven = request.query_params.get("redriven", "")
    return f"Outbox row {redriven} re-driven: it is pending again." if redriven.isdigit() else None


def _query(request: Request) -> str:
    return f"?{request.url.query}" if request.url.query else ""


def create_dashboard(url: str, access: Access, *, refresh_s: int = REFRESH_S) -> Starlette:
    dash = Dashboard(url, access, refresh_s=refresh_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        dash.pool.open(wait=False)
        try:
            yield
        finally:
            dash.pool.close()

    routes = [
        Route("/", dash.guarded(dash.overview), methods=["GET"]),
        Route("/overview/live", dash.guarded(dash.overview_live), methods=["GET"]),
        Route("/orders", dash.guarded(dash.search), methods=["GET"]),
        Route("/orders/{order_id:str}", dash.guarded(dash.order), methods=["GET"]),
        Route("/outbox/{outbox_id:int}/redrive", dash.guarded(dash.redrive), methods=["POST"]),
        Route("/login", dash.login_page, methods=["GET"]),
        Route("/login", dash.login, methods=["POST"]),
        Route("/logout", dash.logout, methods=["POST"]),
        Route("/healthz", dash.healthz, methods=["GET"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            psycopg.DataError: dash.bad_value,
            psycopg.OperationalError: dash.database_down,
            PoolTimeout: dash.database_down,
        },
    )
    app.state.dashboard = dash
    return app


def access_from_settings(settings: Settings, host: str, port: int) -> tuple[Access, str]:
    return Access.for_bind(
        host,
        port,
        password=settings.dashboard_password,
        secret=settings.dashboard_secret,
        secure_cookies=settings.dashboard_secure_cookies,
    )
