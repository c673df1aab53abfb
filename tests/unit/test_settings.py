"""One settings model: the README's table is drawn from it, every bad value of every
variable stops every command with one line naming it, the worker and the API
refuse to start without what they need."""

from __future__ import annotations

import pytest

from orderflow.app.cli import main
from orderflow.config import (
    FREE_TEXT,
    SECRET_FIELDS,
    Settings,
    SettingsError,
    load_settings,
    require_providers,
    settings_table,
)
from tests.support.paths import PROJECT_ROOT

FIELDS = {f.alias: f for f in Settings.model_fields.values()}
BAD = [
    (name, value)
    for name, field in FIELDS.items()
    for value in (field.json_schema_extra or {}).get("bad", [])  # type: ignore[union-attr]
]


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in FIELDS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_readme_table_is_the_model() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text()
    between = readme.split("<!-- settings:begin -->\n", 1)[1].split("\n<!-- settings:end -->")[0]
    assert between == settings_table(), "run `python -m orderflow.config` into the README"


def test_every_variable_has_values_it_refuses() -> None:
    """A new setting must say what it refuses (or be declared free text)."""
    without = {name for name, f in FIELDS.items() if not f.json_schema_extra["bad"]}  # type: ignore[index]
    assert without == FREE_TEXT


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_a_bad_value_stops_every_command_with_one_line(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str
) -> None:
    clean_env.setenv(name, value)
    assert main(["graph"]) == 2  # a command that needs nothing: it still refuses
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"orderflow: {name}: "), err
    assert "Traceback" not in err
    if name in SECRET_FIELDS:
        assert value not in err  # a secret is never echoed


def test_unset_and_empty_mean_the_default(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("ORDER_MAX_TOTAL_CENTS", "")
    settings = load_settings()
    assert settings.order_max_total_cents == 1_000_000
    assert settings.reservation_ttl_seconds == 900 and settings.jwt_leeway_s == 30


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({}, "SHIPPING_API_BASE"),
        ({"SHIPPING_API_BASE": "http://127.0.0.1:9"}, "EMAIL_API_BASE"),
        (
            {
                "SHIPPING_API_BASE": "https://carrier.example",
                "EMAIL_API_BASE": "http://127.0.0.1:9",
            },
            "STRIPE_API_KEY",
        ),
    ],
)
def test_the_worker_refuses_to_start_without_its_providers(
    clean_env: pytest.MonkeyPatch, env: dict[str, str], problem: str
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(SettingsError) as refused:
        require_providers(load_settings())
    assert problem in str(refused.value)


def test_a_missing_stripe_key_is_fine_when_every_provider_is_the_local_sandbox(
    clean_env: pytest.MonkeyPatch,
) -> None:
    for name in ("STRIPE_API_BASE", "SHIPPING_API_BASE", "EMAIL_API_BASE"):
        clean_env.setenv(name, "http://127.0.0.1:8100")
    require_providers(load_settings())


def test_serve_refuses_a_short_or_shared_secret(clean_env: pytest.MonkeyPatch) -> None:
    from orderflow.config import require_api

    with pytest.raises(SettingsError):
        require_api(load_settings())  # no JWT_SECRET
    key = "k" * 40
    clean_env.setenv("JWT_SECRET", key)
    clean_env.setenv("JWT_ADMIN_SECRET", key)
    with pytest.raises(SettingsError) as shared:
        require_api(load_settings())
    assert "JWT_ADMIN_SECRET" in str(shared.value)
