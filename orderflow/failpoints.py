"""Named failpoints for crash and atomicity tests.

Off by default and free when off: `hit()` is one truthiness check of an empty
dict.  `ORDERFLOW_FAILPOINTS="advance.after_write=exit,other=raise"` arms them
for a process; tests may arm them in-process with `armed()`.

Actions: `exit` ends the process at once with os._exit (no cleanup, no commit),
`raise` raises FailpointHit.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

_ACTIONS = ("exit", "raise")


class FailpointHit(RuntimeError):
    pass


def parse(spec: str) -> dict[str, str]:
    armed: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        action = action or "exit"
        if action not in _ACTIONS:
            raise ValueError(f"failpoint {name!r}: unknown action {action!r}")
        armed[name] = action
    return armed


def _from_env() -> dict[str, str]:
    try:
        return parse(os.environ.get("ORDERFLOW_FAILPOINTS", ""))
    except ValueError:
        return {}  # the settings model reports it when the command starts


_armed: dict[str, str] = _from_env()


def hit(name: str) -> None:
    if not _armed:
        return
    action = _armed.get(name)
    if action == "exit":
        os._exit(77)
    if action == "raise":
        raise FailpointHit(name)


@contextmanager
def armed(name: str, action: str = "raise") -> Iterator[None]:
    if action not in _ACTIONS:
        raise ValueError(action)
    _armed[name] = action
    try:
        yield
    finally:
        _armed.pop(name, None)
