"""Test databases: one migrated template per session, copied for each test.

With TEST_DATABASE_URL set, every database is created on that server; without
it, on an embedded server under ./.orderflow/test/.  Tests only ever touch
databases they created (named of_test_*), and drop them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from orderflow.services.catalog import SAMPLE_CATALOG, load_catalog
from orderflow.sql import db, migrate
from orderflow.sql.db import connect, libpq_url
from orderflow.sql.embedded import embedded_url
from tests.support.paths import PROJECT_ROOT

Conn = psycopg.Connection[dict[str, Any]]


@pytest.fixture(scope="session")
def server_url() -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        return libpq_url(url)
    return embedded_url(PROJECT_ROOT / ".orderflow" / "test")


def create_database(server_url: str, template: str | None = None) -> tuple[str, str]:
    name = f"of_test_{uuid.uuid4().hex[:12]}"
    return name, db.create_database(server_url, name, template)


def drop_database(server_url: str, name: str) -> None:
    assert name.startswith("of_test_"), name  # never drop anything we did not create
    db.drop_database(server_url, name)


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    name, url = create_database(server_url)
    try:
        migrate.upgrade(url)
        with connect(url) as conn:
            load_catalog(conn, SAMPLE_CATALOG)
        yield name
    finally:
        drop_database(server_url, name)


@pytest.fixture()
def empty_db_url(server_url: str) -> Iterator[str]:
    """A database with nothing in it (for migration tests)."""
    name, url = create_database(server_url)
    try:
        yield url
    finally:
        drop_database(server_url, name)


@pytest.fixture()
def db_url(server_url: str, template_db: str) -> Iterator[str]:
    """A fresh migrated database with the sample catalog."""
    name, url = create_database(server_url, template_db)
    try:
        yield url
    finally:
        drop_database(server_url, name)


@pytest.fixture(scope="module")
def module_db_url(server_url: str, template_db: str) -> Iterator[str]:
    name, url = create_database(server_url, template_db)
    try:
        yield url
    finally:
        drop_database(server_url, name)


@pytest.fixture()
def conn(db_url: str) -> Iterator[Conn]:
    with connect(db_url) as c:
        yield c


@pytest.fixture(scope="session")
def sample_catalog() -> Path:
    return SAMPLE_CATALOG


# ---------------------------------------------------------------- HTTP


@pytest.fixture()
def api_settings() -> Any:
    from orderflow.config import Settings
    from tests.support.api_helpers import JWT_ADMIN_SECRET, JWT_SECRET

    base = Settings.from_env()
    return Settings(
        database_url=None,
        state_dir=base.state_dir,
        reservation_ttl_seconds=900,
        jwt_secret=JWT_SECRET,
        jwt_audience="orderflow",
        jwt_admin_secret=JWT_ADMIN_SECRET,
    )


@pytest.fixture()
def client(db_url: str, api_settings: Any) -> Iterator[Any]:
    from starlette.testclient import TestClient

    from orderflow.app.main import create_app

    with TestClient(create_app(api_settings, database_url=db_url)) as c:
        yield c


@pytest.fixture()
def live_server(db_url: str, api_settings: Any) -> Iterator[str]:
    """A real uvicorn server on a free port, in a thread of this process."""
    from orderflow.app.main import create_app
    from orderflow.app.serving import free_port, serve

    with serve(create_app(api_settings, database_url=db_url), free_port()) as url:
        yield url


# ---------------------------------------------------------------- worker and sandbox


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[str]:
    from orderflow.app.serving import free_port, serve
    from orderflow.sandbox.app import create_sandbox_app

    with serve(create_sandbox_app(), free_port()) as url:
        yield url


@pytest.fixture()
def sandbox(sandbox_server: str) -> Iterator[Any]:
    """The sandbox, reset for this test; `.url`, `.effects()`, `.faults(...)`."""
    from tests.support.sandbox_client import SandboxClient

    client = SandboxClient(sandbox_server)
    client.reset()
    yield client
    client.reset()


@pytest.fixture()
def providers(sandbox: Any) -> Iterator[Any]:
    from orderflow.outbox_worker.providers import Providers

    p = Providers(sandbox.provider_config())
    yield p
    p.close()


@pytest.fixture()
def worker(request: pytest.FixtureRequest, db_url: str, providers: Any) -> Iterator[Any]:
    """A worker on the test's database.  Its capture policy (default at_shipment) is
    the test's `capture` parameter, or the module's CAPTURE (the policy its tests
    were written for)."""
    from tests.support.helpers import new_worker

    params = getattr(getattr(request.node, "callspec", None), "params", {})
    capture = params.get("capture") or getattr(request.module, "CAPTURE", "at_shipment")
    w = new_worker(db_url, providers, capture)
    yield w
    w.close()


# ---------------------------------------------------------------- dashboard


@dataclass
class Saga:
    confirmed: list[str]
    declined: str
    attention: str
    reserved: str
    user_id: uuid.UUID
    key: str
    dead_id: int


@pytest.fixture()
def saga(conn: Any, worker: Any, sandbox: Any) -> Saga:
    """Orders in several states, through the real worker and sandbox: three confirmed
    (one user, keys k-0..k-2), one declined, one in needs_attention with a dead
    letter (its e-mail failed for good), one still reserved."""
    from tests.support.helpers import place
    from tests.support.sandbox_client import drain, states

    user = uuid.uuid4()
    confirmed = [place(conn, user_id=user, key=f"k-{i}").id for i in range(3)]
    declined = place(conn, payment_method="pm_card_chargeDeclined").id
    drain(worker, conn)
    sandbox.faults({"endpoint": "email", "mode": "error", "status": 500})
    attention = place(conn).id
    drain(worker, conn, timeout_s=60)
    sandbox.faults()
    reserved = place(conn).id  # no worker run after this one: it stays reserved
    dead = conn.execute("SELECT id FROM outbox WHERE status = 'dead'").fetchone()
    assert states(conn)[attention] == "needs_attention"
    return Saga(confirmed, declined, attention, reserved, user, "k-1", dead["id"])
