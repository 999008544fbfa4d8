"""Metrics through the OpenTelemetry API: one registry of names that the code, the alerts and the workbook share.

The app emits through the API only. In Azure, `configure_azure_monitor()` (called by the app when
`APPLICATIONINSIGHTS_CONNECTION_STRING` is set) sends them to Application Insights, where they land in
`customMetrics` under these names; locally the sandbox installs an in-memory or console reader to show them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

from opentelemetry import metrics
from opentelemetry.metrics import _Gauge as Gauge  # the synchronous gauge (API 1.27+); public only as _Gauge

log = logging.getLogger("shared.telemetry")

METER_NAME: Final = "billing_crm_sync"

# The registry. Alert queries and workbook tiles may only use names listed here (a test checks it).
RECORDS: Final = "sync_records"  # counter; entity, outcome
BATCHES: Final = "sync_batches"  # counter; entity, outcome (succeeded, failed, deferred, malformed)
BATCH_DURATION: Final = "sync_batch_duration_ms"  # histogram; entity
API_REQUESTS: Final = "sync_api_requests"  # counter; system, status
THROTTLED: Final = "sync_throttled"  # counter; system (429s and silent throttling)
DLQ_WRITES: Final = "sync_dlq_writes"  # counter; kind (record, message), reason
DLQ_DEPTH: Final = "sync_dlq_depth"  # gauge; unresolved rows
POISON: Final = "sync_poison_messages"  # counter; queue
BREAKER_STATE: Final = "sync_breaker_state"  # gauge; system (0 closed, 1 half-open, 2 open)
LAG: Final = "sync_lag_seconds"  # gauge; entity: seconds since the last complete listing started
RUNS: Final = "sync_runs"  # counter; entity, outcome (completed, paused, failed)
LISTED: Final = "sync_listed"  # counter; entity: ids put on the queue by fan-out
WEBHOOKS: Final = "sync_webhooks"  # counter; outcome (accepted, bad_signature, stale, malformed)

ALL_METRICS: Final = (
    RECORDS,
    BATCHES,
    BATCH_DURATION,
    API_REQUESTS,
    THROTTLED,
    DLQ_WRITES,
    DLQ_DEPTH,
    POISON,
    BREAKER_STATE,
    LAG,
    RUNS,
    LISTED,
    WEBHOOKS,
)
RECORD_OUTCOMES: Final = ("written", "unchanged", "stale", "invalid", "rejected", "not_found", "failed", "deferred")
BREAKER_VALUES: Final = {"closed": 0, "half_open": 1, "open": 2}


@dataclass(frozen=True)
class Instruments:
    records: metrics.Counter
    batches: metrics.Counter
    batch_duration: metrics.Histogram
    api_requests: metrics.Counter
    throttled: metrics.Counter
    dlq_writes: metrics.Counter
    dlq_depth: Gauge
    poison: metrics.Counter
    breaker_state: Gauge
    lag: Gauge
    runs: metrics.Counter
    listed: metrics.Counter
    webhooks: metrics.Counter


def instruments(provider: metrics.MeterProvider | None = None) -> Instruments:
    """The instruments, from the global meter provider unless one is given (tests pass their own)."""
    meter = (provider or metrics.get_meter_provider()).get_meter(METER_NAME)
    return Instruments(
        records=meter.create_counter(RECORDS, unit="{record}", description="records by entity and outcome"),
        batches=meter.create_counter(BATCHES, unit="{message}", description="queue messages by outcome"),
        batch_duration=meter.create_histogram(BATCH_DURATION, unit="ms", description="one message, end to end"),
        api_requests=meter.create_counter(API_REQUESTS, unit="{request}", description="outside API requests"),
        throttled=meter.create_counter(THROTTLED, unit="{event}", description="429s and silent throttling"),
        dlq_writes=meter.create_counter(DLQ_WRITES, unit="{row}", description="rows written to the DLQ"),
        dlq_depth=meter.create_gauge(DLQ_DEPTH, unit="{row}", description="unresolved DLQ rows"),
        poison=meter.create_counter(POISON, unit="{message}", description="messages that reached the poison queue"),
        breaker_state=meter.create_gauge(BREAKER_STATE, description="0 closed, 1 half-open, 2 open"),
        lag=meter.create_gauge(LAG, unit="s", description="seconds since the start of the last complete listing"),
        runs=meter.create_counter(RUNS, unit="{run}", description="fan-out runs by outcome"),
        listed=meter.create_counter(LISTED, unit="{record}", description="ids enqueued by fan-out"),
        webhooks=meter.create_counter(WEBHOOKS, unit="{event}", description="billing webhook events by outcome"),
    )
