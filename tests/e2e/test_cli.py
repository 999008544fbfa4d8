"""The commands a user types: `python -m sandbox demo`, `up`, and `host` on this app with bad settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sandbox.metrics_file import read_rows
from sandbox.telemetry_doc import infra_queries
from shared import telemetry
from tests.sandbox.test_host_startup import run_cli

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_syncs_checks_and_writes_its_summary(tmp_path: Path) -> None:
    out, metrics_file = tmp_path / "summary.json", tmp_path / "metrics.jsonl"
    result = run_cli(
        "demo", "--records", "200", "--faults", "realistic", "--json", str(out), "--metrics-file", str(metrics_file),
        timeout=170,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "CRM and billing agree" in result.stdout
    summary = json.loads(out.read_text())
    full, incremental = summary["phases"]
    assert full["listed"] == 250
    assert full["written"] + full["unchanged"] + full["invalid"] + full["rejected"] + full["not_found"] == 250
    assert incremental["listed"] >= 3  # 1 % of the records changed, plus what changed during the full sync
    assert summary["check"]["ok"] is True
    assert summary["check"]["duplicates"] == 0
    assert summary["check"]["sales_columns_kept"] > 0
    assert summary["metrics"]["sync_records"] > 0
    assert summary["reconcile"]["ok"] is True  # every hand edit found by name, healed, gone in the next run

    # The metrics file holds the rows Application Insights would: every metric, dimension and value the alert
    # rules and the workbook query was emitted by this run, under that name, with those dimensions.
    rows = read_rows(metrics_file)
    dimensions: dict[str, set[str]] = {}
    values: dict[str, set[str]] = {}
    for row in rows:
        dimensions.setdefault(row["name"], set()).update(row["customDimensions"])
        values.setdefault(row["name"], set()).update(row["customDimensions"].values())
    for query in infra_queries():
        if query.metric is None:
            continue  # the exceptions rule reads the host's exceptions table
        assert query.metric in dimensions, f"{query.source} {query.title!r}: {query.metric} was never emitted"
        assert query.dimensions <= dimensions[query.metric], (query.title, query.dimensions, dimensions[query.metric])
    assert {"written", "invalid", "unchanged"} <= values[telemetry.RECORDS]
    assert "completed" in values[telemetry.RUNS]
    assert sum(r["valueSum"] for r in rows if r["name"] == telemetry.RECORDS) >= summary["metrics"]["sync_records"]


def test_the_app_refuses_to_start_without_a_required_setting_and_names_it(tmp_path: Path) -> None:
    sample = json.loads((ROOT / "local.settings.sample.json").read_text())
    del sample["Values"]["BILLING_BASE_URL"]
    sample["Values"]["DATAVERSE_URL"] = "http://not-https.example.com"
    settings = tmp_path / "local.settings.json"
    settings.write_text(json.dumps(sample))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BILLING_", "DATAVERSE_"))}
    result = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "sandbox", "host", "--settings", str(settings), "--port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "BILLING_BASE_URL: required setting is missing" in result.stderr
    assert "DATAVERSE_URL: must be an https:// URL" in result.stderr


def test_up_serves_the_app_with_keys_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    metrics_file = tmp_path / "metrics.jsonl"
    command = [sys.executable, "-m", "sandbox", "up", "--records", "40", "--port", "0", "--schedule", "0 0 0 1 1 *",
               "--metrics-file", str(metrics_file)]  # fmt: skip
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as process:  # noqa: S603
        try:
            assert process.stdout is not None
            url = key = ""
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and not url:
                line = process.stdout.readline()
                if line.startswith("Functions host:"):
                    url, key = line.split()[2], line.split("x-functions-key: ")[1].rstrip(")\n")
            assert url, "no URL printed"
            assert httpx.get(f"{url}/api/health", timeout=30).status_code == 401
            health = httpx.get(f"{url}/api/health", headers={"x-functions-key": key}, timeout=30)
            assert health.status_code == 200
            assert health.json()["breakers"] == {"billing": "closed", "dataverse": "closed"}
        finally:
            process.send_signal(signal.SIGINT)
            code = process.wait(timeout=60)
    assert code == 0
    measured = {(r["name"], tuple(sorted(r["customDimensions"].items()))): r["value"] for r in read_rows(metrics_file)}
    assert measured[(telemetry.BREAKER_STATE, (("system", "billing"),))] == 0  # health measured it; Ctrl-C flushed it
    assert (telemetry.DLQ_DEPTH, ()) in measured
