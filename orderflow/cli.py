"""The `orderflow` command line: thin wrappers that parse, call the core, print."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from orderflow.config import Settings


def _connect_migrated(settings: Settings):  # type: ignore[no-untyped-def]
    from orderflow import migrate
    from orderflow.db import connect, resolve_url

    url = resolve_url(settings)
    migrate.upgrade(url)
    return connect(url)


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from orderflow import migrate
    from orderflow.db import resolve_url

    migrate.upgrade(resolve_url(settings), args.revision)
    print(f"migrated to {args.revision}")
    return 0


def cmd_graph(args: argparse.Namespace, settings: Settings) -> int:
    from statemachine.graph import mermaid

    sys.stdout.write(mermaid())
    return 0


def cmd_catalog_load(args: argparse.Namespace, settings: Settings) -> int:
    from orderflow.catalog import CatalogError, load_catalog

    try:
        with _connect_migrated(settings) as conn:
            count = load_catalog(conn, Path(args.file))
    except (CatalogError, OSError) as exc:
        print(f"orderflow catalog load: {exc}", file=sys.stderr)
        return 2
    print(f"loaded {count} products")
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from orderflow.demo import run_demo

    where = (
        "DATABASE_URL" if settings.database_url else f"embedded Postgres in {settings.state_dir}"
    )
    print(f"orderflow demo on {where}")
    with _connect_migrated(settings) as conn:
        run_demo(conn, settings.reservation_ttl_seconds)
    return 0


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
    p = catalog_sub.add_parser("load", help="upsert products from a CSV file")
    p.add_argument("file")
    p.set_defaults(func=cmd_catalog_load)

    p = sub.add_parser("demo", help="run the saga on sample orders and print them")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    result: int = args.func(args, settings)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
