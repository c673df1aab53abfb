"""The command line: graph from the running table, demo, catalog, embedded default."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from orderflow.app.cli import main
from orderflow.services.catalog import SAMPLE_CATALOG
from orderflow.statemachine.definition import TRANSITIONS, OrderState
from tests.support.paths import PROJECT_ROOT


def _run(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orderflow.app.cli", *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "ORDERFLOW_FAILPOINTS")}
    env.update(extra)
    return env


def test_graph_draws_exactly_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("stateDiagram-v2\n")
    edges = set(re.findall(r"^\s+(\S+) --> (\S+) : (\w+)", out, re.MULTILINE))
    expected = {
        ("[*]" if t.source is None else t.source.value, t.dest.value, t.event) for t in TRANSITIONS
    }
    assert edges == expected
    declared = set(re.findall(r'^\s+state "\w+" as (\w+)$', out, re.MULTILINE))
    assert declared == {s.value for s in OrderState}


def test_demo_runs_the_whole_saga_over_http(db_url: str) -> None:
    """The README's main job, reduced to a handful of orders."""
    result = _run(["demo", "--orders", "8"], _env(DATABASE_URL=db_url), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    final = dict(
        (state, int(n))
        for n, state in (
            pair.split(" ")[::-1]
            for pair in re.search(r"^orders by state: (.*)$", out, re.MULTILINE)[1].split(", ")  # type: ignore[index]
        )
    )
    # 2 declined cards, 1 refused parcel and the customer's cancel cancel; 1 return; a
    # timed-out charge confirms
    assert final == {"confirmed": 4, "returned": 1, "cancelled": 4}
    for view in (
        "order_states", "funnel", "compensations", "daily_sales", "payments", "cancellations",
    ):  # fmt: skip
        assert f"== {view} (" in out
    # the customer cancels a held order before it ships: the hold is released, no refund
    cancel = re.search(r"^customer cancel: .*$", out, re.MULTILINE)
    assert cancel and "(held " in cancel[0] and "-> 202" in cancel[0], out[-2000:]
    assert "authorization, authorization_release" in cancel[0] and "refund" not in cancel[0]
    assert re.search(r"^money \(EUR\): held [0-9.]+ on \d+ orders, captured [0-9.]+", out, re.M)
    assert re.search(r"shipment_failed +ship_order", out)
    # the event feed, tallied per type: one creation per order, one confirmation per confirmed
    total = re.search(r"^order events \(GET /v1/events\): (\d+)$", out, re.M)
    tally = dict(re.findall(r"^  (orderflow\.order\.[a-z_]+) +(\d+)$", out, re.M))
    assert total and int(total[1]) == sum(int(n) for n in tally.values())
    assert int(tally["orderflow.order.created"]) == sum(final.values())
    assert int(tally["orderflow.order.confirmed"]) == 4 + 1  # the returned one confirmed first
    assert "/docs" in out and "/metrics" in out


def test_catalog_load_rejects_a_bad_file(db_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("sku,name,price_cents,currency,available\nX,thing,-5,EUR,1\n")
    result = _run(["catalog", "load", str(bad)], _env(DATABASE_URL=db_url))
    assert result.returncode == 2
    assert "must not be negative" in result.stderr
    assert "Traceback" not in result.stderr


def test_embedded_default_with_no_database_url(tmp_path: Path) -> None:
    """No DATABASE_URL: an embedded server under ORDERFLOW_HOME, migrated on first use."""
    home = tmp_path / "of"
    env = _env(ORDERFLOW_HOME=str(home))
    result = _run(["catalog", "load", str(SAMPLE_CATALOG)], env)
    assert result.returncode == 0, result.stderr
    assert "8 products, 32 changes" in result.stdout  # every field of 8 new SKUs
    assert (home / "pgdata" / "PG_VERSION").exists()
    assert (home / "run" / ".lockfile").exists()  # the lock lives in our folder, not /tmp


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("runuser") is None,
    reason="needs root to run a command as an ordinary user",
)
def test_embedded_default_as_an_ordinary_user_despite_a_foreign_lockfile() -> None:
    """pgserver's shared lock file, left in the temp folder by another user, must not matter."""
    python = _interpreter_for_others()
    if python is None:
        pytest.skip("no Python interpreter readable by an ordinary user")
    home = Path(tempfile.mkdtemp(prefix="orderflow-user-"))
    shutil.chown(home, "nobody")
    foreign = Path(tempfile.gettempdir()) / ".lockfile"
    created = not foreign.exists()
    if created:
        foreign.touch(mode=0o600)
    try:
        site = sysconfig.get_paths()["purelib"]
        result = subprocess.run(
            [
                "runuser",
                "-u",
                "nobody",
                "--",
                "env",
                "-u",
                "DATABASE_URL",
                f"HOME={home}",
                f"ORDERFLOW_HOME={home}/of",
                f"PYTHONPATH={PROJECT_ROOT}:{site}",
                python,
                "-m",
                "orderflow.app.cli",
                "migrate",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=home,
        )
        assert result.returncode == 0, result.stderr
        assert "migrated to head" in result.stdout
        assert (home / "of" / "pgdata").stat().st_uid != 0
    finally:
        if created:
            foreign.unlink()
        subprocess.run(["pkill", "-u", "nobody", "-f", str(home)], check=False)
        shutil.rmtree(home, ignore_errors=True)


def _interpreter_for_others() -> str | None:
    """This venv's interpreter if others may run it, else the system one of the same version."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (os.path.realpath(sys.executable), f"/usr/bin/{version}"):
        probe = subprocess.run(
            ["runuser", "-u", "nobody", "--", candidate, "-c", "pass"],
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return candidate
    return None


def test_serve_with_two_worker_processes(db_url: str) -> None:
    """`orderflow serve --workers 2`: uvicorn's worker processes each build the app
    from the environment (the resolved database included) and answer."""
    import signal
    import time

    import httpx

    from orderflow.app.serving import free_port

    port = free_port()
    env = _env(DATABASE_URL=db_url, JWT_SECRET="s" * 40, JWT_ADMIN_SECRET="a" * 40)
    server = subprocess.Popen(
        [sys.executable, "-m", "orderflow.app.cli", "serve", "--workers", "2", "--port", str(port)],
        env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        pids: set[int] = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(pids) < 2:
            assert server.poll() is None, server.communicate()[1][-2000:]
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                assert answer.status_code == 200, answer.text
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
            pids = {int(c) for c in children}
        assert len(pids) >= 2  # two worker processes under the supervisor
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
