"""Loading products from CSV (`orderflow catalog load FILE.csv`)."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import psycopg

from sql import QUERIES

REQUIRED_COLUMNS = ("sku", "name", "price_cents", "currency", "available")


class CatalogError(ValueError):
    pass


def read_catalog(path: Path) -> list[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise CatalogError(f"{path}: missing columns {', '.join(missing)}")
        rows = []
        for lineno, raw in enumerate(reader, start=2):
            rows.append(_product(raw, f"{path}:{lineno}"))
    return rows


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


def load_catalog(conn: psycopg.Connection[Any], path: Path) -> int:
    """Upsert every product of the file in one transaction; return how many."""
    products = read_catalog(path)
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(QUERIES["upsert_product"], products)
    return len(products)
