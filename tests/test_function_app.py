"""The app's registrations, read the way the host reads them; start-up refuses bad settings by name."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from shared.settings import SettingsError

VALID = {
    "AzureWebJobsStorage": "UseDevelopmentStorage=true",
    "SYNC_QUEUE": "billing-sync",
    "SYNC_SCHEDULE": "0 */5 * * * *",
    "BILLING_BASE_URL": "https://billing.example.com",
    "BILLING_API_KEY": "test-key-value",
    "DATAVERSE_URL": "https://org.crm.dynamics.com",
    "DATAVERSE_TENANT_ID": "00000000-0000-0000-0000-000000000001",
    "DATAVERSE_CLIENT_ID": "app-1",
    "DATAVERSE_CLIENT_SECRET": "s3cret-value",
}


@pytest.fixture
def app_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for key, value in VALID.items():
        monkeypatch.setenv(key, value)
    sys.modules.pop("function_app", None)
    yield importlib.import_module("function_app")
    sys.modules.pop("function_app", None)


def test_functions_are_registered_with_their_triggers(app_module: Any) -> None:
    functions = {f.get_function_name(): json.loads(f.get_function_json()) for f in app_module.app.get_functions()}
    trigger = {name: spec["bindings"][0] for name, spec in functions.items()}
    assert trigger["fan_out"]["type"] == "timerTrigger"
    assert trigger["fan_out"]["schedule"] == "%SYNC_SCHEDULE%"
    assert trigger["sync_batch"]["queueName"] == "%SYNC_QUEUE%"
    assert trigger["poison_to_dlq"]["queueName"] == "%SYNC_QUEUE%-poison"
    assert trigger["reconcile_batch"]["queueName"] == "%SYNC_QUEUE%-reconcile"
    assert trigger["reconcile_poison_to_dlq"]["queueName"] == "%SYNC_QUEUE%-reconcile-poison"
    assert (trigger["reconcile"]["type"], trigger["reconcile"]["schedule"]) == ("timerTrigger", "%RECONCILE_SCHEDULE%")
    routes = {
        name: (t["route"], t["methods"], t["authLevel"]) for name, t in trigger.items() if t["type"] == "httpTrigger"
    }
    assert routes == {
        "dlq_list": ("dlq", ["GET"], "FUNCTION"),
        "dlq_reprocess": ("dlq/reprocess", ["POST"], "FUNCTION"),
        "health_check": ("health", ["GET"], "FUNCTION"),
        "reconcile_start": ("reconcile", ["POST"], "FUNCTION"),
        "reconcile_latest": ("reconcile/latest", ["GET"], "FUNCTION"),
        "report_page": ("report", ["GET"], "FUNCTION"),
        "report_csv": ("report/csv", ["GET"], "FUNCTION"),
        "billing_webhook": ("webhooks/billing", ["POST"], "ANONYMOUS"),  # HMAC-verified instead
    }


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"BILLING_BASE_URL": None}, "BILLING_BASE_URL: required setting is missing"),
        ({"DATAVERSE_URL": "http://org.crm.dynamics.com"}, "DATAVERSE_URL: must be an https:// URL"),
        ({"SYNC_BATCH_SIZE": "0"}, "SYNC_BATCH_SIZE"),
        ({"DATAVERSE_CLIENT_SECRET": None}, "DATAVERSE_CLIENT_SECRET"),
        ({"SYNC_ENTITIES": "contacts"}, "SYNC_ENTITIES"),
    ],
)
def test_a_missing_or_invalid_setting_stops_start_up_naming_it(
    monkeypatch: pytest.MonkeyPatch, change: dict[str, str | None], named: str
) -> None:
    for key, value in {**VALID, **change}.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    sys.modules.pop("function_app", None)
    with pytest.raises(SettingsError, match="invalid settings") as info:
        importlib.import_module("function_app")
    assert named in str(info.value)
    assert "s3cret-value" not in str(info.value)
    assert "test-key-value" not in str(info.value)
    sys.modules.pop("function_app", None)
