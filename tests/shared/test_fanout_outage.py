"""A billing outage driven through fan-out ticks: the health readings the alerts need are exported on every tick,
and the breaker-open rule, run over the rows those ticks export, fires after its threshold and not before.

Real parts: Azurite holds the breakers, checkpoints and DLQ; billing is a port nobody listens on (connections
refused, as when the platform is down). The clock of the breakers and gauges is faked, so ticks five minutes apart
take milliseconds; a second breaker object on the same table plays a worker instance whose batch probes billing
while the tick runs (the half-open state the old rule missed).
"""

from __future__ import annotations

import dataclasses
import re
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from shared import fanout, telemetry
from shared.billing.client import BillingClient, BillingClientConfig
from shared.breaker import BreakerConfig, CircuitBreaker
from shared.callpolicy import RetryPolicy
from shared.errors import CircuitOpenError
from shared.runtime import Runtime, build
from shared.settings import load_settings
from tests.infra import kql
from tests.infra.bicep_eval import Template

pytestmark = pytest.mark.anyio
INFRA = Path(__file__).resolve().parents[2] / "infra"
TICK_S = 300.0  # the default schedule: every five minutes
GAUGES = (telemetry.BREAKER_STATE, telemetry.BREAKER_OPEN, telemetry.DLQ_DEPTH)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _no_wait(_seconds: float) -> None:
    """Retries against a refused connection need no back-off here: the outage lasts as long as the test."""


@dataclasses.dataclass
class Outage:
    runtime: Runtime
    worker: CircuitBreaker  # another instance's view of the billing breaker
    clock: Clock
    reader: InMemoryMetricReader
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    readings: list[dict[str, set[tuple[tuple[str, str], ...]]]] = dataclasses.field(default_factory=list)

    async def tick(self) -> None:
        """One fan-out tick while a worker's batch probes billing, then the export of that interval's gauges."""
        probing = True
        try:
            await self.worker.before_call()
        except CircuitOpenError:
            probing = False
        with pytest.raises(fanout.FanoutFailed) if await self._closed() else _nothing():
            await fanout.fan_out(self.runtime, budget_s=30)
        self._export()
        if probing:
            await self.worker.record_failure()  # the worker's batch failed too
        self.clock.now += TICK_S

    async def _closed(self) -> bool:
        return (await self.runtime.billing_breaker.read()).state == "closed"

    def _export(self) -> None:
        stamp = datetime.fromtimestamp(self.clock.now, UTC).isoformat()
        seen: dict[str, set[tuple[tuple[str, str], ...]]] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name not in GAUGES:
                        continue
                    for point in metric.data.data_points:
                        dims = {k: str(v) for k, v in (point.attributes or {}).items()}
                        seen.setdefault(metric.name, set()).add(tuple(sorted(dims.items())))
                        value = point.value  # type: ignore[union-attr]
                        self.rows.append({"timestamp": stamp, "name": metric.name, "value": value,
                                          "valueSum": value, "customDimensions": dims})  # fmt: skip
        self.readings.append(seen)


class _nothing:  # a context manager that expects nothing
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.fixture
async def outage(conn: str) -> AsyncIterator[Outage]:
    settings = load_settings({
        "AzureWebJobsStorage": conn,
        "SYNC_TABLE_PREFIX": f"t{uuid.uuid4().hex[:12]}",
        "SYNC_QUEUE": f"q{uuid.uuid4().hex[:12]}",
        "BILLING_BASE_URL": f"http://127.0.0.1:{_closed_port()}",
        "BILLING_API_KEY": "outage-test-key",
        "DATAVERSE_URL": "https://127.0.0.1:9",
        "DATAVERSE_TENANT_ID": "00000000-0000-0000-0000-000000000001",
        "DATAVERSE_CLIENT_ID": "outage-test",
        "DATAVERSE_CLIENT_SECRET": "outage-test-secret",
    })  # fmt: skip
    built = await build(settings)
    clock, reader = Clock(), InMemoryMetricReader()
    breakers = await built.tables.table("breakers")
    config = BreakerConfig(failure_threshold=5, open_for_s=30)
    billing_breaker = CircuitBreaker(breakers, "billing", config, clock=clock)
    billing = BillingClient(
        BillingClientConfig(base_url=settings.billing_url, api_key="outage-test-key",
                            retry=RetryPolicy(attempts=2, total_s=5, base_s=0, cap_s=0)),
        breaker=billing_breaker, sleep=_no_wait,
    )  # fmt: skip
    await built.billing.aclose()
    runtime = dataclasses.replace(
        built,
        billing=billing,
        billing_breaker=billing_breaker,
        dataverse_breaker=CircuitBreaker(breakers, "dataverse", config, clock=clock),
        metrics=telemetry.instruments(MeterProvider(metric_readers=[reader]), clock=clock),
    )
    try:
        yield Outage(runtime, CircuitBreaker(breakers, "billing", config, clock=clock), clock, reader)
    finally:
        await runtime.aclose()


async def test_every_tick_of_a_billing_outage_exports_the_breaker_and_dlq_readings(outage: Outage) -> None:
    for _ in range(6):
        await outage.tick()
    systems = {(("system", "billing"),), (("system", "dataverse"),)}
    for tick, seen in enumerate(outage.readings):
        assert seen.get(telemetry.BREAKER_STATE) == systems, f"tick {tick}: {seen}"
        assert seen.get(telemetry.BREAKER_OPEN) == systems, f"tick {tick}: {seen}"
        assert seen.get(telemetry.DLQ_DEPTH) == {()}, f"tick {tick}: {seen}"
    states = [r["value"] for r in outage.rows if r["name"] == telemetry.BREAKER_STATE
              and r["customDimensions"] == {"system": "billing"}]  # fmt: skip
    assert states[:2] == [0, 2]  # closed through the first tick's failures, open after the second's
    assert set(states[2:]) == {1}  # then half-open at every tick: a worker's probe is under way


async def test_one_entity_failing_skips_neither_the_other_nor_the_readings(outage: Outage) -> None:
    await outage.tick()  # customers fails to list (billing refuses connections); invoices must still be tried
    assert [r for r in outage.rows if r["name"] == telemetry.DLQ_DEPTH], "readings taken although listings failed"
    data = outage.reader.get_metrics_data()
    runs = {
        (point.attributes or {}).get("entity"): (point.attributes or {}).get("outcome")
        for resource in (data.resource_metrics if data else [])
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == telemetry.RUNS
        for point in metric.data.data_points
    }
    assert runs == {"customers": "failed", "invoices": "failed"}


def _breaker_rule(template: Template, minutes: int) -> tuple[str, int]:
    text = (INFRA / "app" / "alerts.bicep").read_text()
    block = text[text.index("name: 'breaker-open'") :]
    query = block[block.index("query: ") + len("query: ") : block.index("\n", block.index("query: "))]
    window = block[block.index("window: ") + len("window: ") : block.index("\n", block.index("window: "))]
    params = {"breakerOpenMinutes": minutes, "scheduleIntervalMinutes": int(TICK_S // 60)}
    window_text = template.expression(window, **params)
    assert re.fullmatch(r"PT\d+M", window_text), window_text
    return template.expression(query, **params), int(window_text[2:-1])


async def test_the_breaker_rule_over_the_outage_rows_fires_after_its_threshold_and_not_before(outage: Outage) -> None:
    template = Template.load(INFRA / "app" / "alerts.bicep")
    query, window_min = _breaker_rule(template, minutes=10)
    fired = []
    for _ in range(6):
        await outage.tick()
        now = datetime.fromtimestamp(outage.clock.now - TICK_S, UTC)  # the rule runs just after the tick's export
        recent = [r for r in outage.rows
                  if 0 <= (now - datetime.fromisoformat(r["timestamp"])).total_seconds() < window_min * 60]  # fmt: skip
        fired.append(bool([r for r in kql.run(query, recent) if r.get("system") == "billing"]))
    # opened at the second tick (t = 300 s); 10 minutes later is the fourth tick (t = 900 s)
    assert fired == [False, False, False, True, True, True]
