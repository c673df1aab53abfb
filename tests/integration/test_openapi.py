"""The OpenAPI document covers the app exactly; the docs page works offline."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from starlette.routing import Route

from tests.support.api_helpers import token


def test_document_is_openapi_31_and_covers_every_route(client: Any) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    served = {
        (route.path, method)
        for route in client.app.routes
        if isinstance(route, Route) and route.path.startswith(("/v1", "/healthz", "/metrics"))
        for method in (route.methods or set()) - {"HEAD"}
    }
    assert documented == served
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["responses"], (path, method)
            for status, response in op["responses"].items():
                if path == "/metrics" and status == "200":
                    assert "text/plain" in response["content"]
                    continue
                schema = response["content"]["application/json"]["schema"]
                ref = schema["$ref"].rsplit("/", 1)[1]
                assert ref in doc["components"]["schemas"], (path, method, status)
            bodiless = {
                "/v1/admin/orders/{order_id}/return-received",
                "/v1/admin/orders/{order_id}/cancel",
                "/v1/orders/{order_id}/cancel",
            }
            if method != "get" and path not in bodiless:
                assert "requestBody" in op, (path, method)


def test_docs_page_uses_only_local_assets(client: Any) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert not re.search(r"(src|href)=\"https?://", page.text)
    for asset in re.findall(r"(?:src|href)=\"(/docs/[^\"]+)\"", page.text):
        assert client.get(asset).status_code == 200, asset


@pytest.mark.timeout_budget(90)
def test_schemathesis_finds_no_5xx_and_no_schema_violation(
    live_server: str, tmp_path: Path
) -> None:
    """Property-based requests from the document itself, bounded in time."""
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which(
        "schemathesis"
    )
    if exe is None:
        pytest.skip("schemathesis is not installed")
    budget = os.environ.get("ORDERFLOW_SCHEMATHESIS_SECONDS", "45")
    result = subprocess.run(
        [
            exe,
            "run",
            f"{live_server}/openapi.json",
            "--header",
            f"Authorization: Bearer {token()}",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance,response_headers_conformance,negative_data_rejection,"
            "missing_required_header,ignored_auth",
            "--max-time",
            budget,
            "--workers",
            "2",
            "--request-timeout",
            "10",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=int(budget) + 120,
        cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    print(result.stdout[-2500:])  # the phases' summary (examples, coverage, fuzzing, stateful)
