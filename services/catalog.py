"""Loading products from CSV (`orderflow catalog load FILE.csv [--dry-run]`).

A file's stock is applied as its change since the SKU's last load (see
plan_product); prices, names and currencies are set as the file says.  Every
change of stock is written to the ledger by the database's trigger.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from orderflow.sql import QUERIES

REQUIRED_COLUMNS = ("sku", "name", "price_cents", "currency", "available")

# The sample catalog ships beside this module (the demo and `catalog load --sample` use it).
SAMPLE_CATALOG = Path(
    str(resources.files(__package__ or "orderflow.services") / "sample-catalog.csv")
)


class CatalogError(ValueError):
    pass


def read_catalog(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise CatalogError(f"{path}: missing columns {', '.join(missing)}")
        rows: dict[str, dict[str, Any]] = {}
        for lineno, raw in enumerate(reader, start=2):
            product = _product(raw, f"{path}:{lineno}")
            if product["sku"] in rows:
                raise CatalogError(f"{path}:{lineno}: sku {product['sku']} is listed twice")
            rows[product["sku"]] = product
    # SKU order: the order reservations lock products in (no deadlock between them)
    return [rows[sku] for sku in sorted(rows)]


def _product(raw: dict[str, str], where: str) -> dict[str, Any]:
    sku = (raw["sku"] or "").strip()
    if not 1 <= len(sku) <= 64:
        raise CatalogError(f"{where}: sku must be 1-64 characters")
    currency = (raw["currency"] or "").strip().upper()
    if not re.fullmatch(r"[A-Z]{3}", currency):
        raise CatalogError(f"{where}: currency must be an ISO 4217 code")
    try:
        price, available = int(raw["price_cents"]), int(raw["available"])
    except ValueError as exc:
        raise CatalogError(f"{where}: price_cents and available must be integers") from exc
    if price < 0 or available < 0:
        raise CatalogError(f"{where}: price_cents and available must not be negative")
    return {
        "sku": sku,
        "name": (raw["name"] or sku).strip(),
        "price_cents": price,
        "currency": currency,
        "available": available,
    }


@dataclass(frozen=True)
class Change:
    sku: str
    field: str
    old: str
    new: str


@dataclass(frozen=True)
class ProductPlan:
    """What loading one SKU of a file does."""

    sku: str
    is_new: bool
    values: dict[str, Any]  # the row to write
    changes: tuple[Change, ...]
    short_by: int = 0  # units the file takes away that are no longer available


@dataclass(frozen=True)
class CatalogLoad:
    plans: tuple[ProductPlan, ...]
    applied: bool

    @property
    def products(self) -> int:
        return len(self.plans)

    @property
    def changes(self) -> list[Change]:
        return [c for p in self.plans for c in p.changes]


def plan_product(current: Mapping[str, Any] | None, row: Mapping[str, Any]) -> ProductPlan:
    """How one catalog line applies to the SKU as it stands (pure).

    The file's `available` is the warehouse's sellable count; it is applied as its
    change since the count this SKU was last loaded with.  An unchanged file changes
    nothing; a count going from 10 to 8 takes 2 units away; units reserved or sold
    since the last load stay reserved or sold.  A SKU that exists but was never
    loaded from a file (created by another writer) compares the file with the stock
    put in so far (its ledger's `load` and `adjust` rows), so units sold since are
    not sold again; a new SKU takes the file's count.  A count that would take away
    more than is available leaves 0 and reports the shortfall."""
    sku = str(row["sku"])
    if current is None:
        values = {**row, "loaded_available": row["available"]}
        changes = [Change(sku, f, "-", str(row[f])) for f in ("name", "price_cents", "currency",
                                                                "available")]  # fmt: skip
        return ProductPlan(sku, True, values, tuple(changes))
    baseline = current["loaded_available"]
    if baseline is None:
        baseline = current["put_in"]
    wanted = int(current["available"]) + int(row["available"]) - int(baseline)
    available = max(0, wanted)
    values = {**row, "available": available, "loaded_available": row["available"]}
    changes = [
        Change(sku, f, str(current[f]), str(row[f]))
        for f in ("name", "price_cents", "currency")
        if current[f] != row[f]
    ]
    if available != current["available"]:
        changes.append(
            Change(
                sku,
                "available",
                str(current["available"]),
                f"{available} (file {baseline} -> {row['available']})",
            )
        )
    elif current["loaded_available"] is None or row["available"] != baseline:
        # The count loaded is kept even when the stock does not move.
        old = "-" if current["loaded_available"] is None else str(baseline)
        changes.append(Change(sku, "loaded_available", old, str(row["available"])))
    return ProductPlan(sku, False, values, tuple(changes), short_by=max(0, -wanted))


def load_catalog(
    conn: psycopg.Connection[Any], path: Path, *, dry_run: bool = False
) -> CatalogLoad:
    """Apply a catalog file in one transaction, its SKUs locked in order; with
    dry_run, say what it would change and change nothing."""
    rows = read_catalog(path)
    with conn.transaction(force_rollback=dry_run), conn.cursor(row_factory=dict_row) as cur:
        plans = []
        for row in rows:
            plans.append(_apply(cur, row, dry_run))
    return CatalogLoad(tuple(plans), applied=not dry_run)


def _apply(cur: psycopg.Cursor[Any], row: dict[str, Any], dry_run: bool) -> ProductPlan:
    """Plan one line on its locked SKU, and apply it unless dry_run.  A SKU that
    another writer creates between the look and the insert is planned again."""
    for _ in range(3):
        current = cur.execute(QUERIES["catalog_lock_product"], {"sku": row["sku"]}).fetchone()
        plan = plan_product(current, row)
        if dry_run or not plan.changes:
            return plan
        if not plan.is_new:
            cur.execute(QUERIES["catalog_update_product"], plan.values)
            return plan
        if cur.execute(QUERIES["catalog_insert_product"], plan.values).fetchone() is not None:
            return plan
    raise CatalogError(f"{row['sku']}: the product keeps changing under the load; try again")


def render_changes(load: CatalogLoad) -> str:
    """The changes as a table: SKU, field, old -> new."""
    if not load.changes:
        verb = "would change" if not load.applied else "changed"
        return f"{load.products} products: nothing {verb}"
    width = max(len(c.sku) for c in load.changes)
    lines = [f"{'sku':<{width}}  {'field':<16}  old -> new"]
    lines += [f"{c.sku:<{width}}  {c.field:<16}  {c.old} -> {c.new}" for c in load.changes]
    for plan in load.plans:
        if plan.short_by:
            lines.append(
                f"warning: {plan.sku}: the file takes away {plan.short_by} more units than are"
                " available (they are reserved or sold): available stays 0"
            )
    verb = "changes" if load.applied else "changes (dry run: nothing written)"
    lines.append(f"{load.products} products, {len(load.changes)} {verb}")
    return "\n".join(lines)
