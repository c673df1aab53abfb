"""What must never appear in a log line: tokens, API keys, payment methods, e-mail addresses."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

SECRET_PATTERNS = {
    "bearer token": re.compile(r"Bearer\s+\S+", re.IGNORECASE),
    "JWT": re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    "API key": re.compile(r"\b[sr]k_(?:test|live)_\w+"),
    "payment method": re.compile(r"\bpm_\w+"),
    "e-mail address": re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),
}


def find_secrets(text: str) -> list[tuple[str, str]]:
    return [
        (name, match.group(0))
        for name, pattern in SECRET_PATTERNS.items()
        for match in pattern.finditer(text)
    ]


def assert_no_secrets(logs: Iterable[Path | str]) -> int:
    """Scan log files (or captured text); return how many bytes were scanned."""
    scanned = 0
    found: list[tuple[str, str, str]] = []
    for log in logs:
        text = log.read_text(errors="replace") if isinstance(log, Path) else log
        scanned += len(text)
        found += [(str(log)[:80], name, hit) for name, hit in find_secrets(text)]
    assert not found, found[:10]
    return scanned
