"""The alert rules and the deployment's input checks, evaluated through the templates' own expressions.

`bicep_eval` evaluates the single-line params and vars of `main.bicep` and `app/alerts.bicep` (no Bicep CLI
installs here), so the window arithmetic, the schedule derivation and the `fail()` checks are run, not pattern
matched; `kql` runs the rules' queries over `customMetrics` rows.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.infra import kql
from tests.infra.bicep_eval import BicepFail, Template

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
MAIN = Template.load(INFRA / "main.bicep")
ALERTS = Template.load(INFRA / "app" / "alerts.bicep")
AZURE_WINDOWS = [5, 10, 15, 30, 45, 60, 120, 180, 240, 300, 360, 1440, 2880]  # the API's own error text
# main.bicep's parameters that reach the alerts module under the same name
PASSED_ON = ("missedRunIntervals", "breakerOpenMinutes", "lagMinutes", "webhookRejectionsThreshold",
             "reconcileDriftRatio", "reconcileNewMismatchesThreshold")  # fmt: skip


def rule_fields(name: str) -> dict[str, str]:
    """The single-line fields (window, query, threshold, ...) of one rule in alerts.bicep, as Bicep expressions."""
    text = (INFRA / "app" / "alerts.bicep").read_text()
    block = text[text.index(f"name: '{name}'") :]
    block = block[: block.index("\n  }")]
    return dict(re.findall(r"^\s+(\w+): (.+)$", block, re.M))


def deploy(**params: Any) -> dict[str, Any]:
    """What main.bicep hands the alerts module for these parameters, and the rules' windows in minutes."""
    interval = MAIN.var("intervalMinutes", **params)
    main_defaults = {name: MAIN.expression(MAIN.params[name]) for name in PASSED_ON}
    alert_params = {**main_defaults, **{k: v for k, v in params.items() if k in PASSED_ON},
                    "scheduleIntervalMinutes": interval}  # fmt: skip
    windows = {}
    for rule in ("failure-rate", "dlq-depth", "poison", "no-successful-run", "breaker-open", "lag",
                 "webhook-rejections", "exceptions", "reconcile-drift", "reconcile-new-mismatches"):  # fmt: skip
        window = ALERTS.expression(rule_fields(rule)["window"], **alert_params)
        assert re.fullmatch(r"PT\d+M|PT1H", window), window
        windows[rule] = 60 if window == "PT1H" else int(window[2:-1])
    return {"interval": interval, "windows": windows, "alert_params": alert_params,
            "failure_rate": MAIN.var("checkedFailureRate", **params)}  # fmt: skip


def test_the_template_knows_exactly_the_windows_azure_accepts() -> None:
    assert ALERTS.var("allowedWindowMinutes") == AZURE_WINDOWS


def readme_examples() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    table = text[text.index("<!-- alert-parameters") : text.index("<!-- /alert-parameters -->")]
    rows = re.findall(r"^\| `(\w+)`[^|]*\| [^|]*\| `([^`]*)` \|", table, re.M)
    assert len(rows) >= 8, rows
    return rows


@pytest.mark.parametrize(("name", "example"), readme_examples())
def test_every_parameter_change_the_readme_documents_gives_windows_azure_accepts(name: str, example: str) -> None:
    value: Any = example if name in ("syncSchedule", "failureRatePercent", "reconcileDriftRatio") else int(example)
    outcome = deploy(**{name: value})
    for rule, window in outcome["windows"].items():
        assert window in AZURE_WINDOWS, (name, example, rule, window)


def test_the_defaults_give_the_designed_windows() -> None:
    outcome = deploy()
    assert outcome["interval"] == 5
    assert outcome["windows"]["no-successful-run"] == 15  # three intervals of five minutes
    assert outcome["windows"]["breaker-open"] == 15  # two ticks, at least 15 minutes
    assert outcome["failure_rate"] == "0.5"


@pytest.mark.parametrize(
    ("params", "missed_run_window"),
    [
        ({"syncSchedule": "0 */2 * * * *"}, 10),  # 3 x 2 = 6 minutes: rounded up (Azure refuses 6)
        ({"syncSchedule": "0 */7 * * * *"}, 30),  # 21 -> 30
        ({"syncSchedule": "0 0 * * * *"}, 180),  # hourly
        ({"syncSchedule": "0 30 */2 * * *", "missedRunIntervals": 4}, 1440),  # 4 x 120 = 480 -> 1440
        ({"scheduleIntervalMinutes": 7, "syncSchedule": "0 0 9-17 * * 1-5"}, 30),
    ],
)
def test_windows_are_rounded_up_to_one_azure_accepts(params: dict[str, Any], missed_run_window: int) -> None:
    assert deploy(**params)["windows"]["no-successful-run"] == missed_run_window


def test_a_window_longer_than_azure_allows_stops_the_deployment_with_the_allowed_values() -> None:
    with pytest.raises(BicepFail, match="2880"):
        deploy(syncSchedule="0 0 */24 * * *", missedRunIntervals=3)


@pytest.mark.parametrize(
    ("schedule", "minutes"),
    [("0 */5 * * * *", 5), ("0 */2 * * * *", 2), ("0 * * * * *", 1), ("0 0 * * * *", 60), ("0 15 */3 * * *", 180)],
)
def test_the_schedule_interval_is_derived_from_the_schedule(schedule: str, minutes: int) -> None:
    assert MAIN.var("intervalMinutes", syncSchedule=schedule) == minutes


@pytest.mark.parametrize("schedule", ["0 0 9 * * 1-5", "0 0,30 * * * *", "*/5 * * * *"])
def test_a_schedule_whose_interval_cannot_be_derived_needs_the_parameter(schedule: str) -> None:
    with pytest.raises(BicepFail, match=r"syncSchedule|scheduleIntervalMinutes"):
        MAIN.var("intervalMinutes", syncSchedule=schedule)
    if len(schedule.split()) == 6:
        assert MAIN.var("intervalMinutes", syncSchedule=schedule, scheduleIntervalMinutes=30) == 30


@pytest.mark.parametrize("value", ["0.5", "1", "12.25", "99.9"])
def test_a_failure_rate_with_a_dot_is_accepted(value: str) -> None:
    assert MAIN.var("checkedFailureRate", failureRatePercent=value) == value


@pytest.mark.parametrize("value", ["0,5", "", "0", "0.0", "100", "abc", ".5", "5.", "1..2", "-1"])
def test_a_failure_rate_the_rule_could_not_compare_stops_the_deployment(value: str) -> None:
    with pytest.raises(BicepFail, match="failureRatePercent"):
        MAIN.var("checkedFailureRate", failureRatePercent=value)
    assert "failureRatePercent: checkedFailureRate" in (INFRA / "main.bicep").read_text()


def test_alert_emails_are_trimmed_and_an_empty_one_is_refused() -> None:
    assert MAIN.var("checkedEmails", alertEmails=[" ops@example.com", "fin@example.com "]) == [
        "ops@example.com",
        "fin@example.com",
    ]
    with pytest.raises(BicepFail, match="alertEmails"):
        MAIN.var("checkedEmails", alertEmails=["ops@example.com", " "])
    with pytest.raises(BicepFail, match="alertEmails"):
        MAIN.var("checkedEmails", alertEmails=[""])


def test_secrets_are_needed_only_when_seeding() -> None:
    for name, var in (("billingApiKey", "checkedBillingApiKey"), ("billingWebhookSecret", "checkedWebhookSecret")):
        assert MAIN.var(var, seedSecrets=False, **{name: ""}) == ""
        with pytest.raises(BicepFail, match=name):
            MAIN.var(var, seedSecrets=True, **{name: ""})
    assert MAIN.var("checkedClientSecret", seedSecrets=False, dataverseClientSecret="") == ""
    with pytest.raises(BicepFail, match="dataverseClientSecret"):
        MAIN.var("checkedClientSecret", seedSecrets=True, dataverseClientSecret="")
    assert MAIN.var("checkedClientSecret", seedSecrets=True, dataverseAuth="managed_identity",
                    dataverseClientSecret="") == ""  # fmt: skip


def test_the_vault_writes_secrets_only_when_seeding_and_references_name_no_version() -> None:
    text = (INFRA / "app" / "keyvault.bicep").read_text()
    for secret in ("billingKey", "webhookSecret"):
        assert re.search(rf"resource {secret} '[^']+' = if \(seedSecrets\) {{", text), secret
    assert "= if (seedSecrets && !empty(dataverseClientSecret)) {" in text
    outputs = [line for line in text.splitlines() if line.startswith("output ")]
    for line in outputs:  # no output reads a secure parameter (Bicep's secure-value-in-output lint)
        value = line.partition("=")[2]
        assert not re.search(r"\b(billingApiKey|billingWebhookSecret|dataverseClientSecret)\b", value), line
    for name in ("billing-api-key", "billing-webhook-secret", "dataverse-client-secret"):
        assert f"'${{vault.properties.vaultUri}}secrets/{name}'" in text, name
    main = (INFRA / "main.bicep").read_text()
    assert "param seedSecrets bool = false" in main
    assert "seedSecrets: seedSecrets" in main
    param = (INFRA / "main.bicepparam").read_text()
    assert "param seedSecrets = bool(readEnvironmentVariable('SEED_SECRETS', 'false'))" in param
    assert "readEnvironmentVariable('BILLING_API_KEY', '')" in param


def test_checks_on_inputs_come_before_any_resource_uses_them() -> None:
    text = (INFRA / "main.bicep").read_text()
    first_module = text.index("\nmodule ")
    for var in ("checkedEmails", "checkedClientIds", "checkedBillingApiKey", "checkedWebhookSecret",
                "checkedClientSecret", "checkedFailureRate", "intervalMinutes"):  # fmt: skip
        assert text.index(f"var {var} = ") < first_module, var
        assert not re.search(r"\b(vault|storage|identity|monitoring|rbac|function|alerts)\.outputs", MAIN.vars[var])


def test_publishing_with_passwords_is_off_and_log_analytics_takes_no_keys() -> None:
    text = (INFRA / "app" / "function.bicep").read_text()
    for kind in ("scm", "ftp"):
        block = text[text.index(f"name: '{kind}'") - 200 : text.index(f"name: '{kind}'") + 80]
        assert "basicPublishingCredentialsPolicies" in block, kind
        assert "allow: false" in block, kind
    monitoring = (INFRA / "app" / "monitoring.bicep").read_text()
    assert "features: { disableLocalAuth: true }" in monitoring


def test_the_local_azd_environment_is_never_packaged() -> None:
    ignored = (ROOT / ".funcignore").read_text().split()
    assert ".azure" in ignored
    assert "local.settings.json" in ignored


def test_readme_azd_commands_set_one_value_a_call() -> None:
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("azd env set "):
            words = re.findall(r"'[^']*'|\S+", line.split("#")[0])
            assert len(words) == 5, f"azd env set takes one name and one value: {line}"


def test_the_secret_expiry_alert_reaches_the_action_group_through_event_grid() -> None:
    text = (INFRA / "app" / "alerts.bicep").read_text()
    assert "topicType: 'Microsoft.KeyVault.vaults'" in text
    assert "source: keyVaultId" in text
    assert "includedEventTypes: ['Microsoft.KeyVault.SecretNearExpiry', 'Microsoft.KeyVault.SecretExpired']" in text
    assert "endpointType: 'MonitorAlert'" in text
    assert "eventDeliverySchema: 'CloudEventSchemaV1_0'" in text
    assert "actionGroups: [actionGroup.id]" in text
    assert "keyVaultId: vault.outputs.id" in (INFRA / "main.bicep").read_text()


def _rows(name: str, values: list[tuple[int, float]], **dims: str) -> list[dict[str, Any]]:
    return [{"timestamp": f"2026-12-01T10:{minute:02d}:00+00:00", "name": name, "value": value, "valueSum": value,
             "customDimensions": dims} for minute, value in values]  # fmt: skip


def _fires(rule: str, rows: list[dict[str, Any]], **params: Any) -> bool:
    fields = rule_fields(rule)
    alert_params = {**deploy()["alert_params"], **params}
    result = kql.run(ALERTS.expression(fields["query"], **alert_params), rows)
    measure = ALERTS.expression(fields["measure"], **alert_params)
    if not measure:
        return len(result) > 0
    threshold = ALERTS.expression(fields["threshold"], **alert_params)
    return sum(r[measure] for r in result) > threshold


def test_the_lag_rule_fires_on_the_newest_reading_above_its_threshold() -> None:
    rising = _rows("sync_lag_seconds", [(0, 3000), (5, 3500), (10, 3700)], entity="invoices")
    assert _fires("lag", rising)  # 3,700 s > 60 minutes
    recovered = _rows("sync_lag_seconds", [(0, 3700), (5, 300)], entity="invoices")
    assert not _fires("lag", recovered)  # the newest reading counts, not the worst
    assert not _fires("lag", rising, lagMinutes=120)


def test_the_webhook_rule_counts_refusals_only() -> None:
    refused = _rows("sync_webhooks", [(m, 3) for m in range(4)], outcome="bad_signature")
    accepted = _rows("sync_webhooks", [(m, 500) for m in range(4)], outcome="accepted")
    assert _fires("webhook-rejections", refused + accepted)  # 12 refused > 10
    assert not _fires("webhook-rejections", refused[:3] + accepted)  # 9 refused
    assert not _fires("webhook-rejections", refused, webhookRejectionsThreshold=20)


def test_the_drift_rule_fires_on_an_entity_whose_newest_drift_is_over_the_ratio() -> None:
    drifted = _rows("sync_drift_ratio", [(0, 0.002), (5, 0.03)], entity="invoices")
    assert _fires("reconcile-drift", drifted)  # 3 % > 1 %
    assert not _fires("reconcile-drift", _rows("sync_drift_ratio", [(0, 0.03), (5, 0.004)], entity="invoices"))
    assert not _fires("reconcile-drift", drifted, reconcileDriftRatio="0.05")


def test_the_new_mismatches_rule_counts_the_day_s_new_differences() -> None:
    found = _rows("sync_mismatches", [(m, 5) for m in range(6)], entity="invoices", category="amount_over")
    assert _fires("reconcile-new-mismatches", found)  # 30 > 25
    assert not _fires("reconcile-new-mismatches", found[:5])
    assert not _fires("reconcile-new-mismatches", found, reconcileNewMismatchesThreshold=40)
