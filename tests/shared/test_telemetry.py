"""The metric registry, the gauges' freshness bound, telemetry set-up (`shared.telemetry`, `shared.observability`)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, PeriodicExportingMetricReader

from sandbox.metrics_file import CustomMetricsFileExporter, read_rows
from shared import observability, telemetry
from shared.settings import SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], float]]]:
    out: dict[str, list[tuple[dict[str, Any], float]]] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for p in metric.data.data_points:
                    value = getattr(p, "value", None)
                    out.setdefault(metric.name, []).append((dict(p.attributes or {}), value if value is not None
                                                            else p.sum))  # type: ignore[union-attr]  # fmt: skip
    return out


def test_the_registry_names_each_metric_once_with_its_kind_and_dimensions() -> None:
    names = [s.name for s in telemetry.SPECS]
    assert len(names) == len(set(names))
    assert tuple(names) == telemetry.ALL_METRICS
    assert set(telemetry.FAILURE_OUTCOMES) <= set(telemetry.RECORD_OUTCOMES)
    for spec in telemetry.SPECS:
        assert spec.name.startswith("sync_"), spec.name
        assert spec.kind in ("counter", "histogram", "gauge")
        assert spec.description


def test_every_instrument_emits_under_its_registered_name() -> None:
    reader = InMemoryMetricReader()
    m = telemetry.instruments(MeterProvider(metric_readers=[reader]))
    for counter in (m.records, m.batches, m.api_requests, m.throttled, m.dlq_writes, m.poison, m.runs, m.listed,
                    m.webhooks, m.mismatches):  # fmt: skip
        counter.add(1, {"entity": "customers"})
    m.batch_duration.record(5.0, {"entity": "customers"})
    for gauge in (m.dlq_depth, m.breaker_state, m.breaker_open, m.lag, m.drift):
        gauge.set(1)
    assert set(points(reader)) == set(telemetry.ALL_METRICS)


def test_a_gauge_reading_is_reported_while_fresh_and_then_no_longer() -> None:
    """Azure Monitor's exporter reads synchronous gauges cumulatively: an idle instance would repeat its last
    reading forever. A reading older than the bound must disappear."""
    clock, reader = FakeClock(), InMemoryMetricReader()
    m = telemetry.instruments(MeterProvider(metric_readers=[reader]), gauge_max_age_s=120, clock=clock)
    m.dlq_depth.set(60)
    m.breaker_state.set(2, {"system": "billing"})
    assert points(reader)[telemetry.DLQ_DEPTH] == [({}, 60)]
    clock.now += 119
    m.breaker_state.set(0, {"system": "billing"})  # measured again: the new reading replaces the old one
    assert points(reader)[telemetry.DLQ_DEPTH] == [({}, 60)]
    clock.now += 2
    seen = points(reader)
    assert telemetry.DLQ_DEPTH not in seen
    assert seen[telemetry.BREAKER_STATE] == [({"system": "billing"}, 0)]


def test_instruments_built_again_for_one_provider_share_their_gauge_readings() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    first, second = telemetry.instruments(provider), telemetry.instruments(provider)
    first.lag.set(10, {"entity": "customers"})
    second.lag.set(20, {"entity": "invoices"})  # the SDK keeps one callback per name: it must see both
    assert sorted(points(reader)[telemetry.LAG], key=lambda p: p[1]) == [
        ({"entity": "customers"}, 10),
        ({"entity": "invoices"}, 20),
    ]


def test_the_file_exporter_writes_custommetrics_rows_with_deltas_for_counters(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    reader = PeriodicExportingMetricReader(CustomMetricsFileExporter(path), export_interval_millis=3_600_000)
    provider = MeterProvider(metric_readers=[reader])
    m = telemetry.instruments(provider)
    m.records.add(3, {"entity": "customers", "outcome": "written"})
    m.batch_duration.record(10.0, {"entity": "customers"})
    m.batch_duration.record(30.0, {"entity": "customers"})
    m.dlq_depth.set(4)
    provider.force_flush()
    m.records.add(2, {"entity": "customers", "outcome": "written"})
    provider.force_flush()
    provider.shutdown()
    rows = read_rows(path)
    written = [r for r in rows if r["name"] == telemetry.RECORDS]
    assert [r["valueSum"] for r in written] == [3, 2]  # deltas: sum(valueSum) is what happened
    assert written[0]["customDimensions"] == {"entity": "customers", "outcome": "written"}
    (duration,) = [r for r in rows if r["name"] == telemetry.BATCH_DURATION]
    assert (duration["valueSum"], duration["valueCount"], duration["valueMin"], duration["valueMax"]) == (40, 2, 10, 30)
    assert next(r["value"] for r in rows if r["name"] == telemetry.DLQ_DEPTH) == 4


# ---- settings and set-up ----


def settings_with(**extra: str) -> Any:
    return load_settings({**SAMPLE, "BILLING_API_KEY": "k", "DATAVERSE_CLIENT_SECRET": "s", **extra})


def test_without_a_connection_string_nothing_is_configured() -> None:
    assert observability.configure_telemetry(settings_with()) is False


@pytest.mark.parametrize(
    ("value", "client_id"),
    [
        ("Authorization=AAD", None),
        ("ClientId=0b3c1a52-4a8e-4a39-9a51-0d5a2f1f9a11;Authorization=AAD", "0b3c1a52-4a8e-4a39-9a51-0d5a2f1f9a11"),
        ("authorization=aad; clientid=0B3C1A52-4A8E-4A39-9A51-0D5A2F1F9A11", "0B3C1A52-4A8E-4A39-9A51-0D5A2F1F9A11"),
    ],
)
def test_the_authentication_string_names_the_identity_that_sends_telemetry(value: str, client_id: str | None) -> None:
    settings = settings_with(APPLICATIONINSIGHTS_AUTHENTICATION_STRING=value)
    assert settings.appinsights_client_id == client_id
    credential = observability.telemetry_credential(settings)
    assert type(credential).__name__ == "ManagedIdentityCredential"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "Authorization=Key", "must be 'Authorization=AAD'"),
        ("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "ClientId=abc;Authorization=AAD", "a GUID"),
        ("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "Authorization=AAD;Secret=x", "must be 'Authorization=AAD'"),
        ("APPLICATIONINSIGHTS_CONNECTION_STRING", "not a connection string", "Application Insights connection"),
    ],
)
def test_a_malformed_telemetry_setting_stops_start_up_naming_it(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        settings_with(**{name: value})
    assert f"{name}: " in str(caught.value)
    assert message in str(caught.value)
    assert value not in str(caught.value)


# ---- the real exporter, against an ingestion endpoint on loopback ----


class _Ingestion(BaseHTTPRequestHandler):
    envelopes: list[dict[str, Any]]
    paths: list[str]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        items = json.loads(body)
        self.server.envelopes.extend(items if isinstance(items, list) else [items])  # type: ignore[attr-defined]
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        answer = json.dumps({"itemsReceived": len(items), "itemsAccepted": len(items), "errors": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def ingestion() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ingestion)
    server.envelopes, server.paths = [], []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


EMIT = """
import logging, sys
from opentelemetry import metrics
from shared.settings import load_settings
from shared.observability import configure_telemetry
from shared.telemetry import instruments
import json, os
settings = load_settings(json.loads(os.environ["TEST_SETTINGS"]))
assert configure_telemetry(settings, disable_offline_storage=True)
m = instruments()
m.records.add(3, {"entity": "customers", "outcome": "written"})
m.records.add(1, {"entity": "invoices", "outcome": "failed"})
m.batch_duration.record(10.0, {"entity": "invoices"})
m.batch_duration.record(30.0, {"entity": "invoices"})
m.dlq_depth.set(7)
logging.getLogger("shared.worker").warning("a log record the worker must not send itself")
metrics.get_meter_provider().force_flush()
"""


@pytest.mark.slow
def test_configure_telemetry_sends_the_registry_s_metrics_to_application_insights_ingestion(
    ingestion: ThreadingHTTPServer,
) -> None:
    url = f"http://127.0.0.1:{ingestion.server_address[1]}/"
    values = {**SAMPLE, "BILLING_API_KEY": "k", "DATAVERSE_CLIENT_SECRET": "s",
              "APPLICATIONINSIGHTS_CONNECTION_STRING":
                  f"InstrumentationKey=00000000-0000-0000-0000-00000000c0de;IngestionEndpoint={url}"}  # fmt: skip
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "APPLICATIONINSIGHTS_"))},
        "TEST_SETTINGS": json.dumps(values),
        # Nothing leaves this machine: no SDK statistics, no remote configuration, no cloud metadata lookups.
        "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
        "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true",
        "OTEL_EXPERIMENTAL_RESOURCE_DETECTORS": "otel",
    }
    result = subprocess.run(  # noqa: S603 - this interpreter, a fixed script
        [sys.executable, "-c", EMIT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(p.startswith("/v2.1/track") for p in ingestion.paths), ingestion.paths
    kinds = {e["data"]["baseType"] for e in ingestion.envelopes}
    assert kinds == {"MetricData"}, "the worker sends metrics only; the host sends logs and requests"
    assert {e["iKey"] for e in ingestion.envelopes} == {"00000000-0000-0000-0000-00000000c0de"}
    rows = [
        {"name": point["name"], "valueSum": point["value"], "valueCount": point.get("count", 1),
         "customDimensions": e["data"]["baseData"].get("properties") or {}}
        for e in ingestion.envelopes
        for point in e["data"]["baseData"]["metrics"]
    ]  # fmt: skip
    assert {"name": "sync_records", "valueSum": 3, "valueCount": 1,
            "customDimensions": {"entity": "customers", "outcome": "written"}} in rows  # fmt: skip
    assert {"name": "sync_records", "valueSum": 1, "valueCount": 1,
            "customDimensions": {"entity": "invoices", "outcome": "failed"}} in rows  # fmt: skip
    assert {"name": "sync_batch_duration_ms", "valueSum": 40, "valueCount": 2,
            "customDimensions": {"entity": "invoices"}} in rows  # fmt: skip
    assert {"name": "sync_dlq_depth", "valueSum": 7, "valueCount": 1, "customDimensions": {}} in rows
    ours = {r["name"] for r in rows if not r["name"].startswith("Item_")}  # the exporter's own delivery counts
    assert ours == {"sync_records", "sync_batch_duration_ms", "sync_dlq_depth"}
