"""The `orderflow` command line: thin wrappers that parse, call the core, print."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orderflow.config import Settings, SettingsError, load_settings


def _bench(name: str) -> Any:
    """A module of bench/, the benchmarks: a checkout tool, never in the wheel, so it
    is found beside the code folders of the checkout this command runs from."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "bench" / "__init__.py").is_file() and str(checkout) not in sys.path:
        sys.path.append(str(checkout))
    try:
        return importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as exc:
        raise SettingsError(
            "orderflow bench: the benchmarks run from a checkout of orderflow"
            " (bench/ is not installed)"
        ) from exc


def _migrate(url: str, settings: Settings) -> None:
    from orderflow.sql import migrate

    migrate.upgrade(url, lock_timeout_ms=settings.migration_lock_timeout_ms)


def _connect_migrated(settings: Settings):  # type: ignore[no-untyped-def]
    from orderflow.sql.db import connect, resolve_url

    url = resolve_url(settings)
    _migrate(url, settings)
    return connect(url)


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from orderflow.sql import migrate
    from orderflow.sql.db import resolve_url

    migrate.upgrade(
        resolve_url(settings), args.revision, lock_timeout_ms=settings.migration_lock_timeout_ms
    )
    print(f"migrated to {args.revision}")
    return 0


def cmd_graph(args: argparse.Namespace, settings: Settings) -> int:
    from orderflow.statemachine.graph import mermaid

    sys.stdout.write(mermaid())
    return 0


def cmd_catalog_load(args: argparse.Namespace, settings: Settings) -> int:
    from orderflow.services.catalog import (
        SAMPLE_CATALOG,
        CatalogError,
        load_catalog,
        render_changes,
    )

    if (args.file is None) == (not args.sample):
        print("orderflow catalog load: give a FILE or --sample (not both)", file=sys.stderr)
        return 2
    path = SAMPLE_CATALOG if args.sample else Path(args.file)
    try:
        with _connect_migrated(settings) as conn:
            load = load_catalog(conn, path, dry_run=args.dry_run)
    except (CatalogError, OSError) as exc:
        print(f"orderflow catalog load: {exc}", file=sys.stderr)
        return 2
    print(render_changes(load))
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from orderflow.app.demo import run_demo

    where = (
        "DATABASE_URL" if settings.database_url else f"embedded Postgres in {settings.state_dir}"
    )
    print(f"orderflow demo on {where}")
    from orderflow.sql.db import resolve_url

    url = resolve_url(settings)
    _migrate(url, settings)
    run_demo(settings, url, orders=args.orders, keep_running=args.keep_running)
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from orderflow.app.main import create_app
    from orderflow.config import require_api
    from orderflow.sql.db import resolve_url

    require_api(settings)
    url = resolve_url(settings)
    _migrate(url, settings)
    common = {"host": args.host, "port": args.port, "log_level": args.log_level,
              "access_log": not args.no_access_log}  # fmt: skip
    if args.workers > 1:
        # Each worker process builds its own app (and pool) from the environment.
        os.environ["DATABASE_URL"] = url
        uvicorn.run("orderflow.app.main:create_app", factory=True, workers=args.workers, **common)
    else:
        uvicorn.run(create_app(settings, database_url=url), **common)
    return 0


def cmd_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from orderflow.dashboard import vendor
    from orderflow.dashboard.web import access_from_settings, create_dashboard
    from orderflow.sql.db import resolve_url

    url = resolve_url(settings)
    _migrate(url, settings)
    access, token = access_from_settings(settings, args.host, args.port)
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    login_url = f"http://{shown_host}:{args.port}/?token={token}"
    if sys.stdout.isatty():
        # Shown once, on the terminal that started it (as Jupyter does); never logged.
        print(f"orderflow dashboard: open {login_url}", flush=True)
    else:
        # Not a terminal (a service's log): the token goes to a file only its owner reads.
        path = settings.state_dir / "dashboard-token"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(login_url + "\n")
        print(f"orderflow dashboard: the login URL (this run's token) is in {path}", flush=True)
    if settings.dashboard_password:
        print("orderflow dashboard: ORDERFLOW_DASHBOARD_PASSWORD logs in too", flush=True)
    if vendor.missing():
        print(
            "orderflow dashboard: browser assets missing"
            " (run `python -m orderflow.dashboard.vendor`);"
            " the diagram shows as text and the funnel as a table",
            file=sys.stderr,
        )
    print(f"orderflow dashboard on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(
        create_dashboard(url, access),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
    )
    return 0


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    import uuid

    from orderflow.app.auth import mint_token

    secret = settings.jwt_admin_secret if args.admin else settings.jwt_secret
    if not secret:
        name = "JWT_ADMIN_SECRET" if args.admin else "JWT_SECRET"
        raise SettingsError(f"orderflow token: set {name} (at least 32 bytes)")
    try:
        user = uuid.UUID(args.user)
    except ValueError:
        print("orderflow token: --user must be a UUID", file=sys.stderr)
        return 2
    token = mint_token(
        user,
        secret=secret,
        audience=settings.jwt_admin_audience if args.admin else settings.jwt_audience,
        issuer=settings.jwt_issuer,
        admin=args.admin,
        ttl_s=args.ttl,
        scope=args.scope,
    )
    print(token)
    return 0


def cmd_bench_http(args: argparse.Namespace, settings: Settings) -> int:
    return int(_bench("http").main(args.seconds, args.concurrency, args.workers))


def _wait_for_database(attempt: Callable[[], None], stop: threading.Event) -> bool:
    """Run `attempt` until the database answers (a worker started while Postgres
    restarts waits for it rather than exit); False if told to stop meanwhile."""
    import logging

    import psycopg
    import sqlalchemy.exc

    delay = 0.5
    while True:
        try:
            attempt()
            return True
        except (psycopg.OperationalError, sqlalchemy.exc.OperationalError) as exc:
            logging.getLogger("orderflow.worker").warning(
                "database unavailable at start-up (%s); retrying in %.1f s",
                type(getattr(exc, "orig", exc)).__name__,
                delay,
            )
        if stop.wait(delay):
            return False
        delay = min(delay * 2, 10.0)


def cmd_relay(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.events_url:
        raise SettingsError(
            "ORDERFLOW_EVENTS_URL is not set: events stay in Postgres, served by GET /v1/events"
        )
    from orderflow.outbox_worker.logs import configure
    from orderflow.outbox_worker.relay import run_relay
    from orderflow.sql.db import resolve_url

    configure(args.log_level)
    url = resolve_url(settings)
    _migrate(url, settings)
    run_relay(url, settings.events_url)
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    from orderflow.config import require_providers

    require_providers(settings)  # a missing URL or key stops the worker, not its orders
    # A SIGTERM during start-up (imports, migration, connecting) is a clean stop too.
    stop_early = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop_early.set())

    from orderflow.outbox_worker.logs import configure
    from orderflow.outbox_worker.providers import ProviderConfig, Providers
    from orderflow.outbox_worker.runner import Worker
    from orderflow.outbox_worker.steps import StepSettings
    from orderflow.sql.db import connection_options, resolve_url

    configure(args.log_level)
    url = resolve_url(settings)
    if not _wait_for_database(lambda: _migrate(url, settings), stop_early):
        return 0
    providers = Providers(ProviderConfig.from_settings(settings))
    worker = Worker(
        url,
        providers,
        steps=StepSettings.from_settings(settings),
        concurrency=args.concurrency,
        lease_s=args.lease,
        backoff_scale=settings.backoff_scale,
        report_refresh_s=settings.report_refresh_s,
        idempotency_retention_h=settings.idempotency_retention_h,
        events_retention_h=settings.events_retention_h,
        events_relayed=settings.events_url is not None,
        connection_options=connection_options(settings),
        refresh_timeout_ms=settings.refresh_timeout_ms,
        asyncio_steps=not args.threads,
    )
    worker.install_signal_handlers()
    if stop_early.is_set():
        worker.stop.set()
    if args.metrics_port:
        from orderflow.metrics import serve_metrics
        from orderflow.sql.gauges import install_database_gauges

        install_database_gauges(lambda: worker.pool.connection(timeout=1.0))
        try:
            serve_metrics(args.metrics_host, args.metrics_port, settings.metrics_token)
        except OSError as exc:
            print(f"orderflow worker: metrics port {args.metrics_port}: {exc}", file=sys.stderr)
    try:
        worker.run_forever(grace_s=args.grace)
    finally:
        worker.close()
        providers.close()
    return 0


def cmd_sandbox(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from orderflow.sandbox.app import create_sandbox_app

    uvicorn.run(create_sandbox_app(), host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_outbox_list(args: argparse.Namespace, settings: Settings) -> int:
    from orderflow.sql import QUERIES

    with _connect_migrated(settings) as conn:
        rows = conn.execute(
            QUERIES["list_outbox"],
            {"dead_only": args.dead, "include_done": args.all, "limit": args.limit},
        ).fetchall()
    print(f"{'id':>8}  {'order':<26}  {'step':<20} {'status':<10} {'tries':>5}  last error")
    for r in rows:
        error = (r["last_error"] or "")[:60]
        print(
            f"{r['id']:>8}  {r['order_id']:<26}  {r['step']:<20} {r['status']:<10}"
            f" {r['attempts']:>5}  {error}"
        )
    return 0


def cmd_outbox_retry(args: argparse.Namespace, settings: Settings) -> int:
    from orderflow.outbox_worker.operations import RedriveError, redrive

    with _connect_migrated(settings) as conn:
        try:
            result = redrive(conn, args.id)
        except RedriveError as exc:
            print(f"orderflow outbox retry: {exc}", file=sys.stderr)
            return 2
    print(result)
    return 0


def cmd_order_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from orderflow.services.service import NotCancellable, NotFound, cancel_order

    with _connect_migrated(settings) as conn:
        try:
            result = cancel_order(conn, order_id=args.id, user_id=None)
        except NotFound:
            print(f"orderflow order cancel: no order {args.id}", file=sys.stderr)
            return 2
        except NotCancellable as exc:
            print(f"orderflow order cancel: {exc}", file=sys.stderr)
            return 2
    print(f"{result['id']} {result['state']}")
    return 0


PRELOAD_HELP = "first load this many finished orders with their history (flat-cost runs)"


def cmd_bench_dispatch(args: argparse.Namespace, settings: Settings) -> int:
    return int(
        _bench("dispatch").main(
            args.rows, args.concurrency, args.preload, args.backlog, args.threads, args.peers
        )
    )


def cmd_bench_events(args: argparse.Namespace, settings: Settings) -> int:
    return int(_bench("events").main(args.events, args.saga_orders))


def cmd_bench_clients(args: argparse.Namespace, settings: Settings) -> int:
    return int(_bench("clients").main(args.calls, args.in_flight))


def cmd_bench_saga(args: argparse.Namespace, settings: Settings) -> int:
    run = _bench("saga").main
    return int(
        run(args.orders, args.workers, args.concurrency, args.pgbench_seconds, args.preload,
            args.provider_latency_ms, args.backlog_first, args.worker_checkout, args.peers,
            args.capture)
    )  # fmt: skip


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    from orderflow.sql.reports import VIEWS, fetch, refresh, render_csv, render_json, render_table

    names = [args.name] if args.name else list(VIEWS)
    if args.name and args.name not in VIEWS:
        print(f"orderflow report: unknown report {args.name!r}; one of: {', '.join(VIEWS)}",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.format == "csv" and len(names) != 1:
        print("orderflow report: --format csv needs one report NAME", file=sys.stderr)
        return 2
    with _connect_migrated(settings) as conn:
        if args.refresh:
            refresh(conn)
        reports = {name: fetch(conn, name) for name in names}
    if args.format == "json":
        print(render_json(reports))
    elif args.format == "csv":
        sys.stdout.write(render_csv(reports[names[0]]))
    else:
        print("\n".join(render_table(name, rows) for name, rows in reports.items()))
    return 0


def cmd_bench_reports(args: argparse.Namespace, settings: Settings) -> int:
    return int(_bench("reports").main_reports(args.orders))


def cmd_bench_dashboard(args: argparse.Namespace, settings: Settings) -> int:
    return int(_bench("dashboard").main(args.orders, args.dead_letters, args.repeat))


def cmd_bench_seed(args: argparse.Namespace, settings: Settings) -> int:
    from orderflow.sql.db import resolve_url

    url = resolve_url(settings)
    _migrate(url, settings)
    return int(_bench("reports").main_seed(url, args.orders))


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from orderflow.outbox_worker.providers import ProviderConfig, StripeApi
    from orderflow.services.doctor import report, run_checks

    effects = None
    stripe = None
    if args.sandbox:
        import httpx

        effects = httpx.get(f"{args.sandbox}/_sandbox/effects", timeout=10).json()["effects"]
    elif settings.stripe_api_key:
        stripe = StripeApi(ProviderConfig.from_settings(settings))  # ask Stripe itself
    with _connect_migrated(settings) as conn:
        checks = run_checks(conn, effects, stripe)
    print(report(checks))
    return 0 if all(c.ok for c in checks) else 1


def parse_duration(text: str) -> float:
    """'90s', '30m', '24h', '7d' or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    factor = units.get(text[-1:])
    number = text[:-1] if factor else text
    try:
        value = float(number) * (factor or 1)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (e.g. 90s, 30m, 24h, 7d)"
        ) from exc
    if value <= 0:
        raise argparse.ArgumentTypeError("the duration must be positive")
    return value


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from orderflow.outbox_worker.providers import ProviderConfig, StripeApi
    from orderflow.services.reconcile import StripeUnavailable, reconcile, render

    if not settings.stripe_api_key:
        raise SettingsError("orderflow reconcile: set STRIPE_API_KEY (and STRIPE_API_BASE)")
    stripe = StripeApi(ProviderConfig.from_settings(settings))
    with _connect_migrated(settings) as conn:
        try:
            findings = reconcile(
                conn,
                stripe,
                args.since,
                fix=not args.dry_run,
                processing_hold_s=settings.processing_hold_s,
            )
        except StripeUnavailable as exc:
            print(f"orderflow reconcile: {exc}", file=sys.stderr)
            return 2
    print(render(findings))
    return 1 if any(f.for_a_person for f in findings) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orderflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="apply the database migrations")
    p.add_argument("revision", nargs="?", default="head")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("graph", help="print the state machine as a Mermaid diagram")
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("catalog", help="manage the product catalog")
    catalog_sub = p.add_subparsers(dest="catalog_command", required=True)
    p = catalog_sub.add_parser(
        "load", help="apply a CSV catalog (stock as its change since the last load)"
    )
    p.add_argument("file", nargs="?", help="the CSV file (sku,name,price_cents,currency,available)")
    p.add_argument(
        "--sample", action="store_true", help="the sample catalog shipped in the package"
    )
    p.add_argument("--dry-run", action="store_true", help="show the changes, write nothing")
    p.set_defaults(func=cmd_catalog_load)

    p = sub.add_parser("serve", help="serve the HTTP API with uvicorn")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    p.add_argument("--no-access-log", action="store_true")
    p.add_argument("--workers", type=int, default=1, help="API processes (uvicorn's workers)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("dashboard", help="serve the operations dashboard (read-mostly web UI)")
    p.add_argument("--host", default="127.0.0.1", help="off loopback a login is required")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--log-level", default="warning")
    p.set_defaults(func=cmd_dashboard)
    p = sub.add_parser("token", help="mint a bearer token for local use")
    p.add_argument("--user", required=True, help="the user's UUID (the token's sub)")
    p.add_argument(
        "--admin", action="store_true", help="an operator's token (JWT_ADMIN_SECRET, its audience)"
    )
    p.add_argument("--scope", help="a scope claim, e.g. events (with --admin's key)")
    p.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("worker", help="run the outbox worker daemon")
    p.add_argument("--concurrency", type=int, default=256, help="provider calls in flight")
    p.add_argument(
        "--threads", action="store_true", help="a thread per call in flight instead of asyncio"
    )
    p.add_argument("--lease", type=float, default=30.0, help="lease of a claimed row, seconds")
    p.add_argument("--grace", type=float, default=10.0, help="drain time on SIGTERM, seconds")
    p.add_argument("--metrics-port", type=int, default=0, help="serve /metrics here (0: off)")
    p.add_argument("--metrics-host", default="127.0.0.1")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "relay", help="publish order events to the broker of ORDERFLOW_EVENTS_URL (NATS JetStream)"
    )
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_relay)

    p = sub.add_parser("sandbox", help="serve the provider sandbox (Stripe, carrier, e-mail)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.set_defaults(func=cmd_sandbox)

    p = sub.add_parser("outbox", help="inspect and re-drive outbox rows")
    outbox_sub = p.add_subparsers(dest="outbox_command", required=True)
    p = outbox_sub.add_parser("list", help="outbox rows, newest first")
    p.add_argument("--dead", action="store_true", help="only dead letters")
    p.add_argument("--all", action="store_true", help="include done rows")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_outbox_list)
    p = outbox_sub.add_parser("retry", help="re-drive a dead letter")
    p.add_argument("id", type=int)
    p.set_defaults(func=cmd_outbox_retry)

    p = sub.add_parser("order", help="act on an order as an operator")
    order_sub = p.add_subparsers(dest="order_command", required=True)
    p = order_sub.add_parser(
        "cancel", help="cancel an order before it ships (reason operator_cancelled)"
    )
    p.add_argument("id", help="the order's id")
    p.set_defaults(func=cmd_order_cancel)

    p = sub.add_parser("report", help="print the reporting views")
    p.add_argument("name", nargs="?", help="one view (default: all)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--refresh", action="store_true", help="refresh the snapshots first")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("doctor", help="check the invariants on the live database")
    p.add_argument("--sandbox", help="also check the provider sandbox's effects at this URL")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("reconcile", help="compare orders with Stripe; fix what the machine allows")
    p.add_argument(
        "--since",
        type=parse_duration,
        default=7 * 86400,
        help="the window: PaymentIntents created this long ago or later (default 7d)",
    )
    p.add_argument("--dry-run", action="store_true", help="report only, change nothing")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("bench", help="benchmarks; the last line of output is JSON")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    p = bench_sub.add_parser("http", help="POST /v1/orders against a bare INSERT endpoint")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="API processes")
    p.set_defaults(func=cmd_bench_http)
    p = bench_sub.add_parser("saga", help="sagas/s and pickup latency, against pgbench -N")
    p.add_argument("--orders", type=int, default=5000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=16, help="calls in flight per worker")
    p.add_argument("--pgbench-seconds", type=int, default=15)
    p.add_argument("--preload", type=int, default=0, help=PRELOAD_HELP)
    p.add_argument(
        "--provider-latency-ms", type=float, default=0.0, help="the sandbox delays every call"
    )
    p.add_argument(
        "--backlog-first", action="store_true", help="place every order before the workers start"
    )
    p.add_argument(
        "--worker-checkout", type=Path, default=None,
        help="run the workers from this checkout (an earlier commit's worktree), same bench",
    )  # fmt: skip
    p.add_argument(
        "--peers", action="store_true", help="then DBOS's four-step workflow, as many of them"
    )
    p.add_argument(
        "--capture", choices=("at_shipment", "immediate"), default=None,
        help="the workers' ORDERFLOW_CAPTURE (default: the environment's, else at_shipment)",
    )  # fmt: skip
    p.set_defaults(func=cmd_bench_saga)
    p = bench_sub.add_parser(
        "dispatch", help="ready outbox rows drained by one worker, no-op steps"
    )
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--preload", type=int, default=0, help=PRELOAD_HELP)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument(
        "--backlog", type=int, default=0, help="this many more ready rows, due first, in the table"
    )
    p.add_argument("--threads", action="store_true", help="the threaded daemon (worker --threads)")
    p.add_argument(
        "--peers",
        action="store_true",
        help="then pgqueuer's drain of as many jobs (psycopg, asyncpg)",
    )
    p.set_defaults(func=cmd_bench_dispatch)
    p = bench_sub.add_parser(
        "events", help="order events relayed to NATS JetStream: events/s, commit → publish"
    )
    p.add_argument("--events", type=int, default=20000)
    p.add_argument(
        "--saga-orders", type=int, default=3000,
        help="then bench saga (x256, --backlog-first) without and with a relay; 0: skip",
    )  # fmt: skip
    p.set_defaults(func=cmd_bench_events)
    p = bench_sub.add_parser("clients", help="the provider clients' own CPU per call")
    p.add_argument("--calls", type=int, default=2000, help="calls per client and mode")
    p.add_argument("--in-flight", type=int, default=64, help="calls at once on the event loop")
    p.set_defaults(func=cmd_bench_clients)
    p = bench_sub.add_parser("reports", help="time every reporting view on synthetic history")
    p.add_argument("--orders", type=int, default=1_000_000)
    p.set_defaults(func=cmd_bench_reports)
    p = bench_sub.add_parser("dashboard", help="time the dashboard's pages on synthetic history")
    p.add_argument("--orders", type=int, default=1_000_000)
    p.add_argument("--dead-letters", type=int, default=1_000)
    p.add_argument("--repeat", type=int, default=20)
    p.set_defaults(func=cmd_bench_dashboard)
    p = bench_sub.add_parser("seed", help="load synthetic orders into the configured database")
    p.add_argument("--orders", type=int, default=1_000_000)
    p.set_defaults(func=cmd_bench_seed)

    p = sub.add_parser("demo", help="the whole saga on sample orders over HTTP, then the reports")
    p.add_argument("--orders", type=int, default=50)
    p.add_argument("--keep-running", action="store_true", help="leave API, worker, sandbox up")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # Every command validates every setting first: a bad value stops it here,
        # with one line naming the variable, before it touches anything.
        settings = load_settings()
        result: int = args.func(args, settings)
    except SettingsError as exc:
        print(exc.message, file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    raise SystemExit(main())
