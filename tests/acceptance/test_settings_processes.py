"""Settings checked at start, in real processes: the CLI, uvicorn's factory and
alembic each stop with one line."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from orderflow.config import Settings
from tests.support.paths import PROJECT_ROOT

FIELDS = {f.alias for f in Settings.model_fields.values()}


def test_a_bad_value_is_exit_2_in_a_real_process() -> None:
    env = {**os.environ, "ORDER_MAX_TOTAL_CENTS": "abc", "ORDERFLOW_POOL_TIMEOUT": "1.5x"}
    done = subprocess.run([sys.executable, "-m", "orderflow.app.cli", "migrate"], env=env,
                          capture_output=True, text=True, cwd=PROJECT_ROOT)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("orderflow: ORDER") and "Traceback" not in done.stderr


UVICORN = ["uvicorn", "--factory", "orderflow.app.main:create_app"]


@pytest.mark.parametrize(
    ("entry", "env", "named"),
    [
        (UVICORN, {"ORDER_MAX_TOTAL_CENTS": "abc"}, "ORDER_MAX_TOTAL_CENTS"),
        (UVICORN, {"JWT_SECRET": ""}, "JWT_SECRET"),
        (["alembic", "current"], {"ORDERFLOW_POOL_TIMEOUT": "inf"}, "ORDERFLOW_POOL_TIMEOUT"),
    ],
)  # fmt: skip
def test_entry_points_outside_the_cli_say_what_is_wrong(
    entry: list[str], env: dict[str, str], named: str
) -> None:
    """uvicorn's factory and the alembic command stop with the same one line."""
    environ = {**os.environ, "JWT_SECRET": "s" * 32, **env}
    environ.pop("DATABASE_URL", None)
    done = subprocess.run([sys.executable, "-m", *entry], env=environ, capture_output=True,
                          text=True, cwd=PROJECT_ROOT, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"orderflow: {named}"), done.stderr
    assert "Traceback" not in done.stderr


def test_the_worker_command_exits_2_naming_what_is_missing(tmp_path: Any) -> None:
    env = {k: v for k, v in os.environ.items() if k not in FIELDS}
    env["DATABASE_URL"] = "postgresql://postgres@127.0.0.1:1/none"
    done = subprocess.run([sys.executable, "-m", "orderflow.app.cli", "worker"], env=env,
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "SHIPPING_API_BASE" in done.stderr, done.stderr
