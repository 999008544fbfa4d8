"""The Azure templates, checked without a Bicep CLI (none installs here): every file parses, checkov passes with
only reasoned skips, the keyless and secret-free promises hold, and the alerts query only metrics the code emits."""

from __future__ import annotations

import json
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from pycep import BicepParser

from shared import telemetry

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
BICEP = sorted(INFRA.rglob("*.bicep"))
CHECKOV = ROOT / ".venv-iac" / "bin" / "checkov"


@cache
def parsed(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = BicepParser().parse(file_path=path)
    return result


def test_the_templates_are_all_there() -> None:
    names = {p.relative_to(INFRA).as_posix() for p in BICEP}
    assert names == {
        "main.bicep",
        *(
            f"app/{m}.bicep"
            for m in ("alerts", "function", "identity", "keyvault", "monitoring", "rbac", "storage", "workbook")
        ),
    }
    assert (INFRA / "main.bicepparam").is_file()
    assert json.loads((INFRA / "abbreviations.json").read_text())["storageAccount"] == "st"
    assert "provider: bicep" in (ROOT / "azure.yaml").read_text()


@pytest.mark.parametrize("path", BICEP, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_every_bicep_file_parses(path: Path) -> None:
    tree = parsed(path)
    assert tree.get("resources") or tree.get("modules")


def test_modules_point_at_files_that_exist() -> None:
    for module in parsed(INFRA / "main.bicep")["modules"].values():
        assert (INFRA / module["detail"]["path"]).is_file(), module["detail"]


def test_checkov_finds_nothing_but_reasoned_skips() -> None:
    assert CHECKOV.is_file(), "checkov is installed by `make test` (make deps) into .venv-iac"
    result = subprocess.run(  # noqa: S603 - our own tool, fixed arguments
        [str(CHECKOV), "--framework", "bicep", "-d", str(INFRA), "--skip-download", "--compact", "-o", "json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    report = json.loads(result.stdout)
    summary = report["summary"]
    failed = [f"{c['check_id']} {c['resource']} {c['file_path']}" for c in report["results"]["failed_checks"]]
    assert failed == []
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 30
    skips = [line for p in BICEP for line in p.read_text().splitlines() if "checkov:skip=" in line]
    assert len(skips) == summary["skipped"]
    for line in skips:
        reason = line.split("checkov:skip=", 1)[1].partition(":")[2].strip()
        assert len(reason) >= 20, f"a skip needs a reason that holds for a Functions app: {line.strip()}"


def resource(module: str, name: str) -> dict[str, Any]:
    config: dict[str, Any] = parsed(INFRA / "app" / f"{module}.bicep")["resources"][name]["config"]
    return config


def test_storage_is_keyless_tls12_and_private_to_entra_identities() -> None:
    props = resource("storage", "storage")["properties"]
    assert props["allowSharedKeyAccess"] is False
    assert props["allowBlobPublicAccess"] is False
    assert props["minimumTlsVersion"] == "TLS1_2"
    assert props["supportsHttpsTrafficOnly"] is True


def test_application_insights_has_local_auth_off_and_the_app_sends_with_its_identity() -> None:
    assert resource("monitoring", "applicationInsights")["properties"]["DisableLocalAuth"] is True
    text = (INFRA / "app" / "function.bicep").read_text()
    assert "APPLICATIONINSIGHTS_AUTHENTICATION_STRING" in text
    for setting in (
        "AzureWebJobsStorage__accountName",
        "AzureWebJobsStorage__credential",
        "AzureWebJobsStorage__clientId",
    ):
        assert setting in text


def test_the_app_runs_on_flex_consumption_python_311_with_sizing_parameters() -> None:
    plan = resource("function", "plan")
    assert plan["sku"] == {"tier": "FlexConsumption", "name": "FC1"}
    config = resource("function", "app")["properties"]["functionAppConfig"]
    assert config["runtime"] == {"name": "python", "version": "3.11"}
    assert config["scaleAndConcurrency"] == {
        "maximumInstanceCount": "maximumInstanceCount",
        "instanceMemoryMB": "instanceMemoryMB",
    }
    main = parsed(INFRA / "main.bicep")["parameters"]
    assert main["maximumInstanceCount"]["default"] == 6
    assert main["instanceMemoryMB"]["default"] == 2048


ROLE = re.compile(r"'([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})'\s*//\s*(.+)")


def test_every_role_is_a_guid_with_a_comment_naming_it() -> None:
    text = (INFRA / "app" / "rbac.bicep").read_text()
    roles = dict(ROLE.findall(text))
    assert set(roles) == {
        "b7e6dc6d-f1e8-4753-8033-0f276bb0955b",
        "974c5e8b-45b9-4653-ba55-5f855dd0fb88",
        "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3",
        "4633458b-17de-408a-b874-0445c86b69e6",
        "3913510d-42f4-4e42-8a64-420c390055eb",
    }
    assert roles["4633458b-17de-408a-b874-0445c86b69e6"].startswith("Key Vault Secrets User")
    assert "guid(storage.id, principalId, role)" in text


def test_required_parameters_have_no_default_and_secrets_have_no_value() -> None:
    params = parsed(INFRA / "main.bicep")["parameters"]
    for name in (
        "environmentName",
        "billingBaseUrl",
        "dataverseUrl",
        "alertEmails",
        "billingApiKey",
        "billingWebhookSecret",
    ):
        assert params[name]["default"] is None, name
        assert any(d["type"] == "description" for d in params[name]["decorators"]), name
    for name, param in params.items():
        if any(d["type"] == "secure" for d in param["decorators"]):
            assert param["default"] in (None, ""), name
    outputs = json.dumps(parsed(INFRA / "main.bicep")["outputs"])
    for secret in ("billingApiKey", "billingWebhookSecret", "dataverseClientSecret", "teamsWebhookUrl"):
        assert secret not in outputs
    settings = (INFRA / "main.bicep").read_text()
    for setting in ("BILLING_API_KEY", "BILLING_WEBHOOK_SECRET", "DATAVERSE_CLIENT_SECRET"):
        assert re.search(rf"{setting}: '@Microsoft\.KeyVault\(SecretUri=", settings), setting


def test_alert_thresholds_are_parameters_with_the_designed_defaults() -> None:
    params = parsed(INFRA / "main.bicep")["parameters"]
    assert params["failureRatePercent"]["default"] == "0.5"
    assert params["dlqOpenRowsThreshold"]["default"] == 50
    assert params["poisonMessagesThreshold"]["default"] == 0
    assert params["missedRunIntervals"]["default"] == 3
    assert params["breakerOpenMinutes"]["default"] == 10
    assert params["exceptionBurstThreshold"]["default"] == 10
    alerts = parsed(INFRA / "app" / "alerts.bicep")["parameters"]
    for name in ("failureRatePercent", "dlqOpenRowsThreshold", "poisonMessagesThreshold", "missedRunIntervals",
                 "breakerOpenMinutes", "exceptionBurstThreshold"):  # fmt: skip
        assert alerts[name]["default"] is None, f"{name}: the default lives in main.bicep only"


METRIC = re.compile(r'name == "([a-z_]+)"')


def test_alerts_and_the_workbook_query_only_metrics_the_code_emits() -> None:
    used = {}
    for module in ("alerts", "workbook"):
        used[module] = set(METRIC.findall((INFRA / "app" / f"{module}.bicep").read_text()))
        assert used[module], module
        assert used[module] <= set(telemetry.ALL_METRICS), used[module] - set(telemetry.ALL_METRICS)
    assert {telemetry.RECORDS, telemetry.DLQ_DEPTH, telemetry.POISON, telemetry.RUNS, telemetry.BREAKER_STATE} <= used[
        "alerts"
    ]
    assert {
        telemetry.RECORDS,
        telemetry.BATCH_DURATION,
        telemetry.DLQ_DEPTH,
        telemetry.BREAKER_STATE,
        telemetry.LAG,
    } <= used["workbook"]


def test_the_action_group_emails_and_posts_to_teams() -> None:
    group = resource("alerts", "actionGroup")["properties"]
    assert "emailReceivers" in group
    assert "webhookReceivers" in group
    assert "teamsReceiver" in (INFRA / "app" / "alerts.bicep").read_text()
