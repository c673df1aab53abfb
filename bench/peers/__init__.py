"""Peers run beside our benches in the same session: pgqueuer's drain and DBOS's
four-step workflow, in their own virtualenv (`.venv-peers` in the checkout, made on
first use from PyPI), so a comparison never makes a peer a dependency of orderflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import CHECKOUT, scratch_database

PEERS_VENV = CHECKOUT / ".venv-peers"
PEERS = ["pgqueuer[psycopg,asyncpg]==1.6.0", "dbos==3.4.0"]


def peer_python() -> Path:
    python = PEERS_VENV / "bin" / "python"
    stamp = PEERS_VENV / "installed.txt"  # what it holds: made again when PEERS changes
    wanted = "\n".join(PEERS)
    if not stamp.exists() or stamp.read_text() != wanted:
        print(f"bench: making {PEERS_VENV} with {', '.join(PEERS)} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS], check=True)
        stamp.write_text(wanted)
    return python


def _run_peer(script: str, *args: str) -> dict[str, Any]:
    """The peer's script on a scratch database of this server; its JSON line."""
    python = peer_python()
    with scratch_database("orderflow_bench_peer") as url:
        out = subprocess.run(
            [str(python), str(Path(__file__).with_name(script)), url, *args],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def pgqueuer_drain(jobs: int, driver: str) -> dict[str, Any]:
    """pgqueuer draining `jobs` no-op jobs (its benchmark's drain): psy or apg."""
    return _run_peer("pgqueuer_drain.py", str(jobs), driver)


def dbos_workflows(workflows: int) -> dict[str, Any]:
    """DBOS running `workflows` durable workflows of four no-op steps."""
    return _run_peer("dbos_workflows.py", str(workflows))
