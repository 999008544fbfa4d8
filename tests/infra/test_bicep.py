"""The Azure templates, checked without a Bicep CLI (none installs here): every file parses, checkov passes with
only reasoned skips, the keyless and secret-free promises hold, and the alerts query only metrics the code emits."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from pycep import BicepParser

from sandbox.telemetry_doc import infra_queries
from shared import telemetry
from shared.settings import load_settings

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
    assert json.loads((INFRA / "app" / "teams-relay.json").read_text())["triggers"]
    assert json.loads((INFRA / "abbreviations.json").read_text())["storageAccount"] == "st"
    assert "provider: bicep" in (ROOT / "azure.yaml").read_text()


@pytest.mark.parametrize("path", BICEP, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_every_bicep_file_parses(path: Path) -> None:
    tree = parsed(path)
    assert tree.get("resources") or tree.get("modules")


def test_modules_point_at_files_that_exist() -> None:
    for module in parsed(INFRA / "main.bicep")["modules"].values():
        assert (INFRA / module["detail"]["path"]).is_file(), module["detail"]


def test_checkov_finds_nothing_but_reasoned_skips(tmp_path: Path) -> None:
    assert CHECKOV.is_file(), "checkov is installed by `make test` (make deps) into .venv-iac"
    # checkov's bundled Bicep parser (pycep 0.5) predates Bicep's fail(); fail() only stops a deployment with a
    # message and is in no resource property, so checkov reads a copy where it is an ordinary function call.
    copy = tmp_path / "infra"
    shutil.copytree(INFRA, copy)
    for path in copy.rglob("*.bicep"):
        path.write_text(re.sub(r"\bfail\(", "string(", path.read_text()))
    result = subprocess.run(  # noqa: S603 - our own tool, fixed arguments
        [str(CHECKOV), "--framework", "bicep", "-d", str(copy), "--skip-download", "--compact", "-o", "json"],
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
    settings = _app_settings()
    assert settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == "ClientId=${identityClientId};Authorization=AAD"
    assert settings["AzureWebJobsStorage__credential"] == "managedidentity"
    assert settings["AzureWebJobsStorage__clientId"] == "identityClientId"
    for service in ("blob", "queue", "table"):  # the host (blob, queue) and the app's state tables (table)
        assert settings[f"AzureWebJobsStorage__{service}ServiceUri"] == f"{service}ServiceUri"
    assert "AzureWebJobs" + "Storage" not in settings, "no connection string: shared keys are off"


def _object(path: Path, opening: str, closing: str = "\n}") -> dict[str, str]:
    """The `key: value` lines of the Bicep object that starts at `opening` (comments skipped)."""
    text = path.read_text()
    block = text[text.index(opening) + len(opening) :]
    block = block[: block.index(closing)]
    return dict(re.findall(r"^\s*([A-Za-z_]+): '?(.*?)'?$", block, re.M))


def _app_settings() -> dict[str, str]:
    return _object(INFRA / "app" / "function.bicep", "properties: union(syncSettings, {", "})")


def test_the_settings_the_deployment_gives_the_app_pass_its_start_up_validation() -> None:
    client = "0b3c1a52-4a8e-4a39-9a51-0d5a2f1f9a11"
    main = INFRA / "main.bicep"
    deployed = {**_object(main, "var syncBaseSettings = {"), **_object(main, "var clientSecretSettings = {"),
                **_app_settings()}  # fmt: skip
    values = {  # what the platform hands the app, Key Vault references resolved
        "AzureWebJobsStorage__blobServiceUri": "https://stabc.blob.core.windows.net/",
        "AzureWebJobsStorage__queueServiceUri": "https://stabc.queue.core.windows.net/",
        "AzureWebJobsStorage__tableServiceUri": "https://stabc.table.core.windows.net/",
        "AzureWebJobsStorage__credential": "managedidentity",
        "AzureWebJobsStorage__clientId": client,
        "APPLICATIONINSIGHTS_CONNECTION_STRING": "InstrumentationKey=00000000-0000-0000-0000-000000000001;"
        "IngestionEndpoint=https://westeurope-5.in.applicationinsights.azure.com/",
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": f"ClientId={client};Authorization=AAD",
        "SYNC_SCHEDULE": "0 */5 * * * *",
        "RECONCILE_SCHEDULE": "0 0 2 * * *",
        "SYNC_QUEUE": "billing-sync",
        "SYNC_ENTITIES": "customers,invoices",
        "BILLING_BASE_URL": "https://api.billing.example.com",
        "BILLING_PAGINATION": "cursor",
        "BILLING_RATE_LIMIT_RPS": "10",
        "BILLING_API_KEY": "resolved-from-key-vault",
        "BILLING_WEBHOOK_SECRET": "resolved-from-key-vault",
        "DATAVERSE_URL": "https://contoso.crm4.dynamics.com",
        "DATAVERSE_AUTH": "client_secret",
        "DATAVERSE_MAX_CONCURRENCY": "8",
        "DATAVERSE_FLEET_SIZE": "40",
        "DATAVERSE_TENANT_ID": "00000000-0000-0000-0000-000000000002",
        "DATAVERSE_CLIENT_ID": "app-1",
        "DATAVERSE_CLIENT_SECRET": "resolved-from-key-vault",
    }
    assert set(values) == set(deployed), "a setting the deployment sets is not checked here (or the reverse)"
    settings = load_settings(values)
    assert settings.queue_service_url == "https://stabc.queue.core.windows.net"
    assert settings.table_service_url == "https://stabc.table.core.windows.net"
    assert settings.appinsights_client_id == settings.storage_client_id == client
    assert settings.storage_connection is None


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
    assert main["maximumInstanceCount"]["default"] == 40  # deploys whether Flex's lowest maximum is 40 or 1
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
    for name in ("environmentName", "billingBaseUrl", "dataverseUrl", "alertEmails"):
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
    assert params["lagMinutes"]["default"] == 60
    assert params["webhookRejectionsThreshold"]["default"] == 10
    assert params["reconcileDriftRatio"]["default"] == "0.01"
    assert params["reconcileNewMismatchesThreshold"]["default"] == 25
    alerts = parsed(INFRA / "app" / "alerts.bicep")["parameters"]
    for name in ("failureRatePercent", "dlqOpenRowsThreshold", "poisonMessagesThreshold", "missedRunIntervals",
                 "breakerOpenMinutes", "exceptionBurstThreshold", "lagMinutes",
                 "webhookRejectionsThreshold", "reconcileDriftRatio", "reconcileNewMismatchesThreshold"):  # fmt: skip
        assert alerts[name]["default"] is None, f"{name}: the default lives in main.bicep only"


METRIC = re.compile(r'name == "([a-z_]+)"')


def test_alerts_and_the_workbook_query_only_metrics_the_code_emits() -> None:
    used = {}
    for module in ("alerts", "workbook"):
        used[module] = set(METRIC.findall((INFRA / "app" / f"{module}.bicep").read_text()))
        assert used[module], module
        assert used[module] <= set(telemetry.ALL_METRICS), used[module] - set(telemetry.ALL_METRICS)
    assert {telemetry.RECORDS, telemetry.DLQ_DEPTH, telemetry.POISON, telemetry.RUNS, telemetry.BREAKER_OPEN,
            telemetry.LAG, telemetry.WEBHOOKS} <= used["alerts"]  # fmt: skip
    assert {
        telemetry.RECORDS,
        telemetry.BATCH_DURATION,
        telemetry.DLQ_DEPTH,
        telemetry.BREAKER_STATE,
        telemetry.LAG,
    } <= used["workbook"]


# ---- what the alerts and the workbook query, held against the registry in shared/telemetry.py ----


def test_every_alert_and_tile_queries_a_registered_metric_its_dimensions_and_their_values() -> None:
    queries = infra_queries()
    assert {q.title for q in queries if q.source == "alert"} == {
        "failure-rate", "dlq-depth", "poison", "no-successful-run", "breaker-open", "lag", "webhook-rejections",
        "exceptions", "reconcile-drift", "reconcile-new-mismatches",
    }  # fmt: skip
    assert len([q for q in queries if q.source == "workbook"]) >= 6
    for q in queries:
        if q.metric is None:
            assert q.kql.startswith("exceptions |"), q.title  # the only rule on another table
            continue
        spec = telemetry.SPEC_BY_NAME.get(q.metric)
        assert spec is not None, f"{q.title}: {q.metric} is not in shared/telemetry.py"
        assert q.dimensions <= set(spec.dimensions), (q.title, q.dimensions - set(spec.dimensions))
        known = {v for name in q.dimensions for v in spec.dimensions[name]}
        assert q.literals <= known, f"{q.title}: {sorted(q.literals - known)} are values the code never emits"


def test_the_failure_rate_counts_the_failure_outcomes_the_code_emits() -> None:
    (rule,) = [q for q in infra_queries() if q.title == "failure-rate"]
    assert set(telemetry.FAILURE_OUTCOMES) <= rule.literals
    assert rule.metric == telemetry.RECORDS


def test_the_missed_run_alert_watches_each_synced_entity() -> None:
    (rule,) = [q for q in infra_queries() if q.title == "no-successful-run"]
    assert "datatable(entity: string) [${expectedEntities}]" in rule.kql
    assert "kind=leftouter" in rule.kql, "an entity with no completed run has no row: it must still alert"
    main = parsed(INFRA / "main.bicep")["parameters"]["syncEntities"]
    assert main["default"] == "customers,invoices"
    assert "SYNC_ENTITIES: syncEntities" in (INFRA / "main.bicep").read_text()


def test_the_teams_relay_posts_an_adaptive_card_with_the_url_kept_secret() -> None:
    group = resource("alerts", "actionGroup")["properties"]
    assert "emailReceivers" in group
    text = (INFRA / "app" / "alerts.bicep").read_text()
    assert "logicAppReceivers: teams ? [teamsReceiver] : []" in text
    assert "callbackUrl: teamsTrigger!.listCallbackUrl().value" in text
    relay = json.loads((INFRA / "app" / "teams-relay.json").read_text())
    assert relay["parameters"]["teamsWebhookUrl"]["type"] == "securestring"
    assert relay["triggers"]["alert"]["type"] == "Request"
    (action,) = relay["actions"].values()
    assert action["type"] == "Http"
    assert action["inputs"]["uri"] == "@parameters('teamsWebhookUrl')"
    assert action["runtimeConfiguration"]["secureData"]["properties"] == ["inputs"], "run history hides the URL"
    (attachment,) = action["inputs"]["body"]["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = json.dumps(attachment["content"])
    for field in ("alertRule", "severity", "monitorCondition", "firedDateTime", "description", "alertId"):
        assert f"['essentials']?['{field}']" in card, field
    assert not any(isinstance(v, str) and v.startswith("[") for v in _strings(relay)), "ARM would evaluate '[...'"


def _strings(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value]


def test_inputs_no_decorator_can_check_fail_the_deployment_naming_the_parameter() -> None:
    text = (INFRA / "main.bicep").read_text()
    for name, setting in (
        ("alertEmails", "ALERT_EMAILS"),
        ("billingBaseUrl", "BILLING_BASE_URL"),
        ("dataverseUrl", "DATAVERSE_URL"),
        ("dataverseClientIds", "DATAVERSE_CLIENT_ID"),
        ("dataverseClientSecret", "DATAVERSE_CLIENT_SECRET"),
    ):
        assert re.search(rf"fail\('{name} \({setting}\): ", text), name
    # and the checked values are the ones used
    assert "alertEmails: checkedEmails" in text
    assert "BILLING_BASE_URL: checkedBillingUrl" in text
    assert "DATAVERSE_URL: checkedDataverseUrl" in text


def test_every_alert_rule_links_its_runbook() -> None:
    text = (INFRA / "app" / "alerts.bicep").read_text()
    assert "description: '${rule.display}. ${runbook}.'" in text
    assert "docs/operations.md" in text
