"""Structured log lines: JSON when not on a terminal, readable text when on one.

Only the fields named here are written; request headers, tokens, card
references and SQL parameters are never passed to the logger.
"""

from __future__ import annotations

import json
import logging
import sys
import time

FIELDS = ("order_id", "step", "attempt", "outcome", "duration_ms", "error")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{n}={getattr(record, n)}" for n in FIELDS if hasattr(record, n))
        return f"{record.levelname:<7} {record.getMessage()} {extras}".rstrip()


def configure(level: str = "INFO", json_lines: bool | None = None) -> None:
    use_json = not sys.stderr.isatty() if json_lines is None else json_lines
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger("orderflow")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
