"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright).

Open the overview over a few orders in several states, check the counts the
browser shows equal the database's, watch the auto-refresh pick up a new order
without a reload, open an order page, re-drive a dead letter and see it leave
the list.  A screenshot of the overview is saved under test-artifacts/.

Skipped, saying why, only where no Chromium is installed (`.ci/run` installs
Debian's `chromium` where it can).  Playwright never downloads a browser here.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest

from orderflow.app.serving import free_port, serve
from orderflow.dashboard import vendor
from orderflow.dashboard.security import Access
from orderflow.dashboard.web import create_dashboard
from orderflow.sql import reports as reporting
from tests.conftest import Saga
from tests.support.helpers import place
from tests.support.paths import PROJECT_ROOT

ARTIFACTS = PROJECT_ROOT / "test-artifacts"


def chromium_path() -> str | None:
    configured = os.environ.get("ORDERFLOW_CHROMIUM")
    if configured:
        return configured
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    if executable is None:
        pytest.skip(
            "no Chromium on this machine: install Debian's `chromium` package "
            "(`.ci/run` does where it can) or set ORDERFLOW_CHROMIUM to a Chromium binary"
        )
    if vendor.missing():
        pytest.fail(
            f"dashboard assets missing ({', '.join(vendor.missing())}): "
            "run `python -m orderflow.dashboard.vendor` (the Makefile does on install)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root in a container, where Chromium's sandbox cannot start.
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture()
def site(db_url: str) -> Iterator[tuple[str, str]]:
    """The dashboard's address and the token it printed at start."""
    port = free_port()
    access, token = Access.for_bind("127.0.0.1", port, password=None, secret=None)
    with serve(create_dashboard(db_url, access, refresh_s=1), port) as url:
        yield url, token


def db_counts(conn: Any) -> dict[str, int]:
    rows = conn.execute("SELECT state, count(*) AS n FROM orders GROUP BY state")
    return {r["state"]: r["n"] for r in rows}


def shown_counts(page: Any) -> dict[str, int]:
    rows = page.eval_on_selector_all(
        "#state-counts tr[data-state]",
        "rows => rows.map(r => [r.dataset.state, Number(r.children[1].textContent)])",
    )
    return {state: n for state, n in rows if n}


def test_overview_order_page_and_redrive_in_chromium(
    browser: Any, site: tuple[str, str], conn: Any, saga: Saga
) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda msg: (
            problems.append(f"console {msg.type}: {msg.text}")
            if msg.type in ("error", "warning")
            else None
        ),
    )

    # Overview: the diagram is drawn as SVG, with the database's counts in its labels.
    reporting.refresh(conn)  # the funnel snapshot, as a worker does every minute
    site, token = site
    page.goto(f"{site}/?token={token}")  # the URL the dashboard printed at start
    assert "token=" not in page.url  # the token left the address bar
    page.wait_for_selector("body[data-drawn='1']", state="attached")
    assert shown_counts(page) == db_counts(conn)
    labels = page.text_content("#state-diagram svg")
    assert "confirmed: 3" in labels and "needs_attention: 1" in labels
    assert page.evaluate("Chart.getChart('funnel-chart') !== undefined")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard-overview.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Auto-refresh: a new order shows up without the page being reloaded.
    page.evaluate("window.__sameDocument = true")
    place(conn)
    deadline = time.monotonic() + 15
    while shown_counts(page).get("reserved") != 2:  # (wait_for_function would need unsafe-eval)
        assert time.monotonic() < deadline, "the overview did not refresh"
        page.wait_for_timeout(200)
    assert page.evaluate("window.__sameDocument === true")
    assert "reserved: 2" in page.text_content("#state-diagram svg")
    assert shown_counts(page) == db_counts(conn)

    # Order page, reached from the dead letter's link.
    page.click(f"#dead-letters a[href='/orders/{saga.attention}']")
    page.wait_for_selector("#timeline")
    history = conn.execute(
        "SELECT count(*) AS n FROM order_history WHERE order_id = %s", (saga.attention,)
    ).fetchone()
    assert page.locator("#timeline li").count() == history["n"]
    assert page.inner_text("#order-state") == "needs_attention"
    dead_row = page.locator(f"#outbox tr[data-outbox-id='{saga.dead_id}']")
    assert "dead" in dead_row.inner_text() and "500" in dead_row.inner_text()

    # Re-drive from the overview: the dead letter leaves the list.
    page.goto(site + "/")
    page.wait_for_selector("body[data-drawn='1']", state="attached")
    page.click(f"button.redrive[data-outbox-id='{saga.dead_id}']")
    page.wait_for_selector("#flash")
    assert f"Outbox row {saga.dead_id} re-driven" in page.inner_text("#flash")
    assert page.locator("#dead-empty").is_visible()
    assert page.locator(f"#dead-letters tr[data-outbox-id='{saga.dead_id}']").count() == 0
    row = conn.execute("SELECT status FROM outbox WHERE id = %s", (saga.dead_id,)).fetchone()
    assert row["status"] == "pending"
    page.wait_for_selector("body[data-drawn='1']", state="attached")
    assert shown_counts(page) == db_counts(conn)

    assert problems == [], problems
    page.close()
