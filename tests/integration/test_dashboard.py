"""The dashboard's pages, access rules and its one action, through Starlette's test client.

The fixture `saga` (conftest) puts real orders through the real worker and sandbox: some
confirmed, one declined (cancelled), one whose confirmation e-mail failed for
good (needs_attention, with a dead letter), one still reserved.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from orderflow.dashboard.security import COOKIE, Access, Session
from orderflow.dashboard.web import create_dashboard
from orderflow.statemachine.definition import OrderState
from tests.conftest import Saga
from tests.support.sandbox_client import drain, states

BASE = "http://127.0.0.1:8090"


def loopback_client(db_url: str) -> tuple[TestClient, str]:
    access, token = Access.for_bind("127.0.0.1", 8090, password=None, secret="s" * 32)
    return TestClient(create_dashboard(db_url, access), base_url=BASE), token


@pytest.fixture()
def client(db_url: str) -> Iterator[TestClient]:
    """A visitor who opened the URL the dashboard printed at start (with its token)."""
    dashboard, token = loopback_client(db_url)
    with dashboard as c:
        assert c.get(f"/?token={token}").status_code == 200
        yield c


def shown_counts(html: str) -> dict[str, int]:
    rows = re.findall(r'<tr data-state="([a-z_]+)" data-count="(\d+)"', html)
    return {state: int(n) for state, n in rows}


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


def outbox_row(conn: Any, outbox_id: int) -> dict[str, Any]:
    row = conn.execute("SELECT status, attempts FROM outbox WHERE id = %s", (outbox_id,)).fetchone()
    assert row is not None
    return dict(row)


# ---------------------------------------------------------------- overview


def test_overview_shows_the_databases_counts_on_the_diagram(
    client: TestClient, conn: Any, saga: Saga
) -> None:
    page = client.get("/")
    assert page.status_code == 200
    in_db = {
        r["state"]: r["n"]
        for r in conn.execute("SELECT state, count(*) AS n FROM orders GROUP BY state")
    }
    shown = shown_counts(page.text)
    assert set(shown) == {s.value for s in OrderState}  # every state, zero included
    assert {s: n for s, n in shown.items() if n} == in_db
    assert in_db == {"confirmed": 3, "cancelled": 1, "needs_attention": 1, "reserved": 1}
    # the Mermaid source is drawn from the machine's table with the live counts in the labels
    assert "state &#34;confirmed: 3&#34; as confirmed" in page.text
    assert "class needs_attention alarm" in page.text
    assert 'id="dead-total">1<' in page.text


def test_overview_lists_the_dead_letter_needs_attention_and_backlog(
    client: TestClient, saga: Saga
) -> None:
    html = client.get("/").text
    dead = html.split('id="dead-letters"')[1].split("</table>")[0]
    assert f'data-outbox-id="{saga.dead_id}"' in dead
    assert saga.attention in dead and "send_confirmation" in dead and "500" in dead
    attention = html.split('id="needs-attention"')[1].split("</section>")[0]
    assert saga.attention in attention
    backlog = html.split('id="backlog"')[1].split("</table>")[0]
    # the reserved order's charge waits; the dead e-mail counts as dead
    charge = r'data-step="charge_payment"><td>charge_payment</td><td class="num">1<'
    assert re.search(charge, backlog)
    assert re.search(r'data-step="send_confirmation">.*?<td class="num bad">1</td>', backlog, re.S)


def test_overview_shows_money_held_and_captured_holds_near_expiry_and_cancellations(
    client: TestClient, saga: Saga, conn: Any, worker: Any, sandbox: Any
) -> None:
    from tests.support.helpers import place

    sandbox.faults({"endpoint": "shipments.create", "mode": "error", "status": 503})
    held = place(conn)
    deadline = time.monotonic() + 20
    while states(conn)[held.id] != "paid":
        assert time.monotonic() < deadline
        worker.run_once()
    html = client.get("/").text
    money = html.split('id="money-totals"')[1].split("</table>")[0]
    holding = conn.execute(
        "SELECT count(*) AS n, sum(amount_capturable_cents) AS c FROM payment_intents"
        " WHERE status = 'requires_capture'"
    ).fetchone()
    assert holding["n"] >= 1  # ours (and the saga's reserved order, which ran too)
    assert f'data-held-cents="{holding["c"]}"' in money
    captured = conn.execute(
        "SELECT sum(amount_received_cents) AS c FROM payment_intents WHERE status = 'succeeded'"
    ).fetchone()["c"]
    assert captured > 0 and f'data-captured-cents="{captured}"' in money
    cancellations = html.split('id="cancellations"')[1].split("</table>")[0]
    assert 'data-reason="payment_failed"' in cancellations  # the declined card
    assert re.search(r'id="holds-near-expiry-total">0<', html)
    # the hold must be captured within the hour: flagged
    conn.execute(
        "UPDATE payment_intents SET capture_before = now() + interval '1 hour' WHERE order_id = %s",
        (held.id,),
    )
    html = client.get("/").text
    assert re.search(r'id="holds-near-expiry-total">1<', html)
    page = client.get(f"/orders/{held.id}").text
    assert re.search(r'data-status="requires_capture">.*<b>held</b> 12\.00 EUR', page, re.S)
    assert held.id in html.split('id="holds-near-expiry"')[1].split("</table>")[0]


def test_overview_shows_the_event_relays_lag(client: TestClient, saga: Saga, conn: Any) -> None:
    def card() -> str:
        return client.get("/").text.split('id="events"')[1].split("</div>")[0]

    pending = conn.execute("SELECT count(*) AS n FROM order_events").fetchone()["n"]
    assert pending > 0
    shown = card()
    assert f'data-pending="{pending}"' in shown and 'data-published="0"' in shown
    assert 'id="events-no-relay"' in shown  # events kept for the feed, nobody relays them
    # a relay publishes all but the newest three, each two seconds after it was written
    conn.execute(
        "UPDATE order_events SET published_at = time + interval '2 seconds'"
        " WHERE position <= (SELECT max(position) - 3 FROM order_events)"
    )
    shown = card()
    assert 'data-pending="3"' in shown and f'data-published="{pending - 3}"' in shown
    assert re.search(r'id="events-lag">2 s / 2 s<', shown)
    assert 'id="events-no-relay"' not in shown


def test_live_fragment_is_the_overview_without_the_page(client: TestClient, saga: Saga) -> None:
    live = client.get("/overview/live")
    assert live.status_code == 200
    assert "<html" not in live.text
    assert shown_counts(live.text)["confirmed"] == 3


def test_assets_come_from_this_site_never_a_cdn(client: TestClient) -> None:
    import shutil

    from orderflow.dashboard import vendor

    if vendor.missing() and shutil.which("npm") is None:
        pytest.skip("no npm here: the dashboard runs without its vendored assets")
    assert vendor.missing() == [], "run `python -m orderflow.dashboard.vendor`"
    page = client.get("/")
    assert '<script src="/static/vendor/mermaid.min.js">' in page.text
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(s.startswith(("/", "#", "data:")) for s in sources), sources
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert client.get("/static/dashboard.js").status_code == 200


# ---------------------------------------------------------------- order page and search


def test_order_page_has_timeline_outbox_and_references(
    client: TestClient, conn: Any, saga: Saga
) -> None:
    order_id = saga.confirmed[0]
    html = client.get(f"/orders/{order_id}").text
    history = conn.execute(
        "SELECT to_state FROM order_history WHERE order_id = %s ORDER BY id", (order_id,)
    ).fetchall()
    assert re.findall(r'<li data-to-state="([a-z_]+)"', html) == [h["to_state"] for h in history]
    outbox = conn.execute(
        "SELECT id, step, attempts FROM outbox WHERE order_id = %s ORDER BY id", (order_id,)
    ).fetchall()
    assert re.findall(r'<tr data-outbox-id="(\d+)"', html) == [str(r["id"]) for r in outbox]
    charge = conn.execute(
        "SELECT provider_ref FROM payments WHERE order_id = %s AND kind = 'charge'", (order_id,)
    ).fetchone()
    shipment = conn.execute(
        "SELECT carrier_ref, tracking_number FROM shipments WHERE order_id = %s", (order_id,)
    ).fetchone()
    assert charge["provider_ref"] in html
    assert shipment["carrier_ref"] in html and shipment["tracking_number"] in html
    # the PaymentIntent: held at checkout, captured at shipment
    assert re.search(r'id="intent" data-status="succeeded">.*captured 12\.00 EUR', html, re.S)


def test_order_page_of_a_dead_letter_offers_the_redrive(client: TestClient, saga: Saga) -> None:
    html = client.get(f"/orders/{saga.attention}").text
    assert f'action="/outbox/{saga.dead_id}/redrive"' in html
    assert html.count('class="redrive"') == 1
    confirmed = client.get(f"/orders/{saga.confirmed[0]}").text
    assert 'class="redrive"' not in confirmed


def test_search_by_order_id_user_id_and_idempotency_key(client: TestClient, saga: Saga) -> None:
    by_id = client.get("/orders", params={"q": saga.declined}, follow_redirects=False)
    assert by_id.status_code == 303 and by_id.headers["location"] == f"/orders/{saga.declined}"
    by_user = client.get("/orders", params={"q": str(saga.user_id)}).text
    assert sorted(re.findall(r'<a href="/orders/([0-9A-Z]{26})"', by_user)) == sorted(
        saga.confirmed
    )
    by_key = client.get("/orders", params={"q": saga.key}).text
    assert re.findall(r'<a href="/orders/([0-9A-Z]{26})"', by_key) == [saga.confirmed[1]]
    nothing = client.get("/orders", params={"q": "no-such-thing"})
    assert nothing.status_code == 200 and 'id="no-results"' in nothing.text
    assert client.get("/orders/01ZZZZZZZZZZZZZZZZZZZZZZZZ").status_code == 404


def test_text_from_providers_and_search_is_escaped(
    client: TestClient, conn: Any, saga: Saga
) -> None:
    conn.execute(
        "UPDATE outbox SET last_error = %s WHERE id = %s",
        ("<script>alert(1)</script>", saga.dead_id),
    )
    html = client.get("/").text
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    found = client.get("/orders", params={"q": '"><img src=x onerror=alert(1)>'}).text
    assert "<img src=x" not in found


# ---------------------------------------------------------------- the one action


def test_redrive_goes_through_the_cli_code_path(
    client: TestClient, conn: Any, saga: Saga, worker: Any, sandbox: Any
) -> None:
    csrf = csrf_of(client.get("/").text)
    done = client.post(
        f"/outbox/{saga.dead_id}/redrive",
        data={"csrf": csrf, "next": "/"},
        follow_redirects=False,
    )
    assert done.status_code == 303 and done.headers["location"] == f"/?redriven={saga.dead_id}"
    assert outbox_row(conn, saga.dead_id) == {"status": "pending", "attempts": 0}
    assert states(conn)[saga.attention] == "shipped"  # the redrive event, as the CLI does
    page = client.get(done.headers["location"]).text
    assert f"Outbox row {saga.dead_id} re-driven" in page
    assert 'id="dead-empty"' in page
    drain(worker, conn)
    assert states(conn)[saga.attention] == "confirmed"
    mails = [e for e in sandbox.effects(kind="email") if e["order_id"] == saga.attention]
    assert len(mails) == 1  # the failed attempts had no effect; the re-driven one had one


def test_redrive_without_the_csrf_token_changes_nothing(
    client: TestClient, conn: Any, saga: Saga
) -> None:
    before = outbox_row(conn, saga.dead_id)
    client.get("/")  # the session cookie exists, but the form does not echo its token
    for data in ({}, {"csrf": "forged"}):
        refused = client.post(f"/outbox/{saga.dead_id}/redrive", data=data)
        assert refused.status_code == 403
    cross_site = client.post(
        f"/outbox/{saga.dead_id}/redrive",
        data={"csrf": csrf_of(client.get("/").text)},
        headers={"Origin": "https://evil.example"},
    )
    assert cross_site.status_code == 403
    assert outbox_row(conn, saga.dead_id) == before
    assert states(conn)[saga.attention] == "needs_attention"
    assert client.get(f"/outbox/{saga.dead_id}/redrive").status_code == 405


def test_redrive_of_a_row_that_is_not_dead_is_refused(
    client: TestClient, conn: Any, saga: Saga
) -> None:
    live = conn.execute(
        "SELECT id FROM outbox WHERE order_id = %s AND status = 'pending'", (saga.reserved,)
    ).fetchone()
    csrf = csrf_of(client.get("/").text)
    refused = client.post(f"/outbox/{live['id']}/redrive", data={"csrf": csrf})
    assert refused.status_code == 409 and "not a dead letter" in refused.text
    assert outbox_row(conn, live["id"])["status"] == "pending"


BAD_TARGETS = ("//evil.example/x", "https://evil.example/", "/\\evil.example", "\tjavascript:1", "")


def test_redirect_after_redrive_stays_on_this_site(
    client: TestClient, conn: Any, saga: Saga
) -> None:
    for target in BAD_TARGETS:
        conn.execute("UPDATE outbox SET status = 'dead' WHERE id = %s", (saga.dead_id,))
        csrf = csrf_of(client.get("/").text)
        done = client.post(
            f"/outbox/{saga.dead_id}/redrive",
            data={"csrf": csrf, "next": target},
            follow_redirects=False,
        )
        assert done.headers["location"] == f"/?redriven={saga.dead_id}", target


def test_the_dashboard_redrives_with_the_cli_function() -> None:
    from orderflow.dashboard import web
    from orderflow.outbox_worker import operations

    assert web.redrive is operations.redrive  # one code path, not a copy


def test_only_the_redrive_and_the_session_routes_accept_post(db_url: str) -> None:
    access, _ = Access.for_bind("127.0.0.1", 8090, password=None, secret=None)
    app = create_dashboard(db_url, access)
    writers = sorted(
        route.path for route in app.routes if "POST" in (getattr(route, "methods", None) or ())
    )
    assert writers == ["/login", "/logout", "/outbox/{outbox_id:int}/redrive"]


# ---------------------------------------------------------------- access


def test_a_login_is_required_and_no_default_credential_exists(db_url: str) -> None:
    access, token = Access.for_bind("0.0.0.0", 8090, password=None, secret="k" * 32)
    assert access.require_login and len(token) >= 24 and access.secure_cookies
    # off loopback the cookies are Secure: the site is served over TLS (a proxy in front)
    with TestClient(create_dashboard(db_url, access), base_url="https://ops.example:8090") as c:
        first = c.get("/orders/whatever", follow_redirects=False)
        assert first.status_code == 303
        assert first.headers["location"] == "/login?next=%2Forders%2Fwhatever"
        assert c.get("/overview/live").status_code == 401
        login_page = c.get("/login")
        csrf = csrf_of(login_page.text)
        for guess in ("", "admin", "password", "orderflow"):
            wrong = c.post("/login", data={"csrf": csrf, "password": guess, "next": "/"})
            assert wrong.status_code == 401
        ok = c.post(
            "/login", data={"csrf": csrf, "password": token, "next": "/"}, follow_redirects=False
        )
        assert ok.status_code == 303 and ok.headers["location"] == "/"
        page = c.get("/")
        assert page.status_code == 200 and "Log out" in page.text
        assert csrf_of(page.text) != csrf  # a fresh session after login: no fixation
        c.post("/logout", data={"csrf": csrf_of(page.text)})
        assert c.get("/", follow_redirects=False).status_code == 303


@pytest.mark.parametrize(
    ("host", "headers"),
    [
        ("127.0.0.1:8090", {}),  # what a default reverse proxy on the same host sends
        ("localhost:8090", {}),
        ("ops.example", {"X-Forwarded-For": "203.0.113.9"}),
    ],
)
def test_loopback_is_not_enough_without_the_runs_token(
    db_url: str, host: str, headers: dict[str, str]
) -> None:
    access, token = Access.for_bind("127.0.0.1", 8090, password=None, secret=None)
    assert not access.secure_cookies  # loopback: plain HTTP is fine
    with TestClient(create_dashboard(db_url, access), base_url=f"http://{host}") as c:
        assert c.get("/", headers=headers, follow_redirects=False).status_code == 303
        assert c.get("/?token=wrong", headers=headers, follow_redirects=False).status_code == 303
        redrive = c.post("/outbox/1/redrive", data={"csrf": "x"}, headers=headers)
        assert redrive.status_code == 401
        opened = c.get("/?token=" + token + "&x=1", headers=headers, follow_redirects=False)
        assert opened.status_code == 303 and opened.headers["location"] == "/?x=1"  # token gone
        assert c.get("/", headers=headers).status_code == 200


def test_logout_revokes_the_session_in_every_dashboard_process(db_url: str) -> None:
    secret = "shared-secret-" * 3
    one, token = Access.for_bind("127.0.0.1", 8090, password=None, secret=secret)
    two, _ = Access.for_bind("127.0.0.1", 8091, password=None, secret=secret)
    with (
        TestClient(create_dashboard(db_url, one), base_url=BASE) as a,
        TestClient(create_dashboard(db_url, two), base_url=BASE) as b,
    ):
        assert a.get(f"/?token={token}").status_code == 200
        b.cookies.set(COOKIE, a.cookies[COOKIE])
        assert b.get("/").status_code == 200  # the session is shared through the database
        a.post("/logout", data={"csrf": csrf_of(a.get("/").text)})
        assert b.get("/", follow_redirects=False).status_code == 303  # revoked there too


def test_configured_password_logins_are_rate_limited(db_url: str) -> None:
    access, _ = Access.for_bind("127.0.0.1", 8090, password="correct horse", secret=None)
    with TestClient(create_dashboard(db_url, access), base_url=BASE) as c:
        csrf = csrf_of(c.get("/login").text)
        for _ in range(5):
            c.post("/login", data={"csrf": csrf, "password": "wrong"})
        locked = c.post("/login", data={"csrf": csrf, "password": "correct horse"})
        assert locked.status_code == 429
        assert c.get("/", follow_redirects=False).status_code == 303


def test_forged_or_expired_session_cookies_are_ignored(db_url: str) -> None:
    access, _ = Access.for_bind("0.0.0.0", 8090, password="pw", secret="k" * 32)
    other, _ = Access.for_bind("0.0.0.0", 8090, password="pw", secret="x" * 32)
    good = access.sign(Session.new(authenticated=True))
    assert access.load(good) is not None
    assert other.load(good) is None  # signed with another secret
    body, mac = good.split(".")
    assert access.load(body[:-2] + "xx." + mac) is None
    expired = Session("sid", "c", 1)
    assert access.load(access.sign(expired)) is None
    with TestClient(create_dashboard(db_url, access), base_url="http://ops.example") as c:
        c.cookies.set(COOKIE, other.sign(Session.new(authenticated=True)))
        assert c.get("/", follow_redirects=False).status_code == 303
        # well signed, but no login made it: its id is in no dashboard_sessions row
        c.cookies.set(COOKIE, good)
        assert c.get("/", follow_redirects=False).status_code == 303


def test_database_down_is_a_503_page_not_a_traceback() -> None:
    access, token = Access.for_bind("127.0.0.1", 8090, password=None, secret=None)
    app = create_dashboard("postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=1", access)
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as c:
        page = c.get(f"/?token={token}")
        assert page.status_code == 503
        assert "Database unavailable" in page.text and "Traceback" not in page.text
        assert c.get("/healthz").status_code == 503


def test_cli_keeps_the_runs_token_off_its_log(db_url: str, tmp_path: Path) -> None:
    """Not on a terminal (a service's log), the login URL goes to a file only its
    owner can read, never to the output."""
    import os
    import stat
    import subprocess
    import sys

    import httpx

    from orderflow.app.serving import free_port

    port = free_port()
    env = {**os.environ, "DATABASE_URL": db_url, "ORDERFLOW_HOME": str(tmp_path)}
    env.pop("ORDERFLOW_DASHBOARD_PASSWORD", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "orderflow.app.cli", "dashboard", "--host", "0.0.0.0",
         "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        path = tmp_path / "dashboard-token"
        assert str(path) in first and "token=" not in first, first
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        url = path.read_text().strip()
        token = url.rsplit("token=", 1)[1]
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=10) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    page = http.get("/")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the dashboard did not come up"
                    time.sleep(0.1)
            assert page.status_code == 303 and page.headers["location"].startswith("/login")
            # off loopback the cookie is Secure: a plain-HTTP client does not send it back,
            # so log in with the token on each request here
            opened = http.get(f"/?token={token}", follow_redirects=False)
            assert opened.status_code == 303 and "secure" in opened.headers["set-cookie"].lower()
    finally:
        proc.terminate()
        proc.wait(10)


def test_funnel_json_cannot_close_its_script_element() -> None:
    from datetime import date

    from orderflow.dashboard.web import _funnel_json

    row = {"day": date(2026, 1, 2), "placed": "</script><script>alert(1)</script>"}
    row |= {"paid": 0, "shipped": 0, "confirmed": 0, "cancelled": 0}
    text = str(_funnel_json([row]))
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text)[0]["placed"] == row["placed"]


def test_hostile_requests_get_a_clear_4xx_never_a_500(client: TestClient, saga: Saga) -> None:
    assert client.get("/orders/%00").status_code == 404
    assert client.get("/orders", params={"q": "a\x00b"}).status_code == 200
    assert client.get("/orders", params={"q": "x" * 10_000}).status_code == 200
    csrf = csrf_of(client.get("/").text)
    many = {f"f{i}": "1" for i in range(20)} | {"csrf": csrf}
    assert client.post(f"/outbox/{saga.dead_id}/redrive", data=many).status_code == 403
    huge = {"csrf": csrf, "pad": "x" * 10_000}
    assert client.post(f"/outbox/{saga.dead_id}/redrive", data=huge).status_code == 403
    assert client.post("/logout", data={"csrf": "forged"}).status_code == 403
    assert client.get("/outbox/abc/redrive").status_code in (404, 405)


def test_login_checks_origin_and_counts_failures_per_client(db_url: str) -> None:
    access, _ = Access.for_bind("0.0.0.0", 8090, password="pw", secret=None)
    with TestClient(create_dashboard(db_url, access), base_url="https://ops.example") as c:
        csrf = csrf_of(c.get("/login").text)
        cross = c.post(
            "/login",
            data={"csrf": csrf, "password": "pw"},
            headers={"Origin": "https://evil.example"},
        )
        assert cross.status_code == 403
        for target in BAD_TARGETS:
            fresh = csrf_of(c.get("/login").text)
            ok = c.post(
                "/login",
                data={"csrf": fresh, "password": "pw", "next": target},
                follow_redirects=False,
            )
            assert ok.headers["location"] == "/", target
    for _ in range(5):
        assert not access.password_ok("wrong", "198.51.100.1")
    assert access.locked_out("198.51.100.1")
    assert not access.password_ok("pw", "198.51.100.1")  # locked even with the right one
    assert access.password_ok("pw", "198.51.100.2")  # another client is not
