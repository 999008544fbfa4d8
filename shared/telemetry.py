"""Metrics through the OpenTelemetry API: one registry of names that the code, the alerts and the workbook share.

The app emits through the API only. In Azure, `configure_azure_monitor()` (called by the app when
`APPLICATIONINSIGHTS_CONNECTION_STRING` is set, see `shared.observability`) sends them to Application Insights,
where each export lands as a row of `customMetrics`: `name` is the metric's name, `customDimensions` its attributes,
`valueSum` / `valueCount` / `valueMin` / `valueMax` the aggregate of the export interval. Locally the sandbox reads
them in memory or writes the same rows to a file (`python -m sandbox demo --metrics-file F`).

`SPECS` is the registry: `docs/telemetry.md` is generated from it, and tests check that every metric, dimension and
dimension value the alert rules and the workbook query is declared here.

Why the health gauges are observable with a freshness bound: Azure Monitor's exporter reads synchronous gauges
cumulatively, so an instance that measured the DLQ depth once would send that reading every minute for as long as
it lives, and an alert taking the newest row would see a stale value from an idle instance. A `FreshGauge` reports
a reading only while it is younger than `GAUGE_MAX_AGE_S` (two default export intervals, so each reading is
exported at least once), and the instance that measures (every fan-out tick, every health call) is the only voice.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.util.types import Attributes

from shared import logs

log = logs.get_logger("shared.telemetry")

METER_NAME: Final = "billing_crm_sync"
GAUGE_MAX_AGE_S: Final = 120.0

Kind = Literal["counter", "histogram", "gauge"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric: what the code emits, what the alerts and the workbook may query."""

    name: str
    kind: Kind
    unit: str
    description: str
    dimensions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # name -> known values (empty: open)


RECORD_OUTCOMES: Final = ("written", "unchanged", "stale", "invalid", "rejected", "not_found", "failed", "deferred")
FAILURE_OUTCOMES: Final = ("failed", "invalid", "rejected")  # the failure-rate alert's numerator
BATCH_OUTCOMES: Final = ("succeeded", "failed", "deferred", "malformed")
RUN_OUTCOMES: Final = ("completed", "paused", "short", "deferred", "failed")
WEBHOOK_OUTCOMES: Final = ("accepted", "ignored", "replayed", "bad_signature", "stale", "malformed")
ENTITIES: Final = ("customers", "invoices")
SYSTEMS: Final = ("billing", "dataverse")
BREAKER_VALUES: Final = {"closed": 0, "half_open": 1, "open": 2}

RECORDS: Final = "sync_records"
BATCHES: Final = "sync_batches"
BATCH_DURATION: Final = "sync_batch_duration_ms"
API_REQUESTS: Final = "sync_api_requests"
THROTTLED: Final = "sync_throttled"
DLQ_WRITES: Final = "sync_dlq_writes"
# Why a row is in the DLQ (its `reason_kind`); docs/operations.md says what an operator does with each.
DLQ_REASONS: Final = (
    "invalid", "rejected", "dependency", "not_found", "persistent_mismatch", "malformed", "poison", "deferred_too_long",
)  # fmt: skip
DLQ_DEPTH: Final = "sync_dlq_depth"
MISMATCHES: Final = "sync_mismatches"
DRIFT: Final = "sync_drift_ratio"
# reconcile's categories (shared/reconcile/compare.py, which a test holds to this list)
MISMATCH_CATEGORIES: Final = (
    "missing_in_crm", "duplicate_in_crm", "stale", "amount_over", "amount_under", "field_mismatch", "lines_missing",
    "lines_extra", "orphan_in_crm", "invalid_in_billing",
)  # fmt: skip
POISON: Final = "sync_poison_messages"
BREAKER_STATE: Final = "sync_breaker_state"
BREAKER_OPEN: Final = "sync_breaker_open_seconds"
LAG: Final = "sync_lag_seconds"
RUNS: Final = "sync_runs"
LISTED: Final = "sync_listed"
WEBHOOKS: Final = "sync_webhooks"

SPECS: Final = (
    MetricSpec(
        RECORDS, "counter", "{record}",
        "records by outcome, counted once per delivery: a record whose delivery failed counts as failed, and again "
        "under its outcome when the redelivery syncs it",
        {"entity": ENTITIES, "outcome": RECORD_OUTCOMES},
    ),
    MetricSpec(BATCHES, "counter", "{message}", "queue messages by outcome", {"entity": ENTITIES,
                                                                             "outcome": BATCH_OUTCOMES}),
    MetricSpec(BATCH_DURATION, "histogram", "ms", "one message, end to end (successful deliveries)",
               {"entity": ENTITIES}),
    MetricSpec(API_REQUESTS, "counter", "{request}", "requests to billing and Dataverse by HTTP status",
               {"system": SYSTEMS, "status": ()}),
    MetricSpec(THROTTLED, "counter", "{event}", "429 answers and silent throttling detected", {"system": SYSTEMS}),
    MetricSpec(DLQ_WRITES, "counter", "{row}", "rows written to the DLQ",
               {"kind": ("record", "message"), "reason": DLQ_REASONS}),
    MetricSpec(DLQ_DEPTH, "gauge", "{row}", "open DLQ rows (measured by every fan-out tick and health call)"),
    MetricSpec(POISON, "counter", "{message}",
               "messages that reached the poison queue (0 is reported at start-up, so no data means no app)",
               {"queue": ()}),
    MetricSpec(BREAKER_STATE, "gauge", "{state}", "circuit breaker: 0 closed, 1 half-open, 2 open (measured by "
               "every fan-out tick and health call)", {"system": SYSTEMS}),
    MetricSpec(BREAKER_OPEN, "gauge", "s", "seconds since the breaker left closed, through every open and half-open "
               "round of the outage; 0 while closed (measured by every fan-out tick and health call)",
               {"system": SYSTEMS}),
    MetricSpec(LAG, "gauge", "s", "seconds since the start of the last complete listing", {"entity": ENTITIES}),
    MetricSpec(RUNS, "counter", "{run}", "fan-out runs by outcome (one per entity and tick that ends or pauses)",
               {"entity": ENTITIES, "outcome": RUN_OUTCOMES}),
    MetricSpec(LISTED, "counter", "{record}", "ids put on the queue by fan-out", {"entity": ENTITIES}),
    MetricSpec(WEBHOOKS, "counter", "{event}", "billing webhook events by outcome", {"outcome": WEBHOOK_OUTCOMES}),
    MetricSpec(MISMATCHES, "counter", "{record}", "differences reconcile found that were not open before (new, or back "
               "after being resolved), by category", {"entity": ENTITIES, "category": MISMATCH_CATEGORIES}),
    MetricSpec(DRIFT, "gauge", "1", "records that differ / records compared in the newest complete reconcile run "
               "(measured by every fan-out tick and health call)", {"entity": ENTITIES}),
)  # fmt: skip
ALL_METRICS: Final = tuple(s.name for s in SPECS)
SPEC_BY_NAME: Final = {s.name: s for s in SPECS}


class FreshGauge:
    """A gauge that reports each reading (per attribute set) only while it is younger than `max_age_s`.

    One per meter provider and name: instruments built again for the same provider (each worker builds its
    runtime) get the same gauge, whose `observe` is the one callback the SDK keeps for that name.
    """

    def __init__(self, max_age_s: float, clock: Callable[[], float]) -> None:
        self.max_age_s, self.clock = max_age_s, clock
        self._lock = threading.Lock()
        self._values: dict[frozenset[tuple[str, Any]], tuple[float, float]] = {}

    def set(self, amount: float, attributes: Attributes = None) -> None:
        key = frozenset((attributes or {}).items())
        with self._lock:
            self._values[key] = (amount, self.clock())

    def observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        now = self.clock()
        with self._lock:
            for key in [k for k, (_, at) in self._values.items() if now - at > self.max_age_s]:
                del self._values[key]
            current = list(self._values.items())
        return [Observation(amount, dict(key)) for key, (amount, _) in current]


_GLOBAL_GAUGES: dict[str, FreshGauge] = {}
_PROVIDER_GAUGES: weakref.WeakKeyDictionary[metrics.MeterProvider, dict[str, FreshGauge]] = weakref.WeakKeyDictionary()
_GAUGES_LOCK = threading.Lock()


def _gauge(
    meter: metrics.Meter,
    spec: MetricSpec,
    provider: metrics.MeterProvider | None,
    max_age_s: float,
    clock: Callable[[], float],
) -> FreshGauge:
    with _GAUGES_LOCK:
        # The global provider may still be a proxy that later hands its instruments to the real one: one set of
        # gauges for the global case keeps every runtime's readings behind the callback that survives.
        store = _GLOBAL_GAUGES if provider is None else _PROVIDER_GAUGES.setdefault(provider, {})
        gauge = store.get(spec.name)
        if gauge is None:
            gauge = store[spec.name] = FreshGauge(max_age_s, clock)
            meter.create_observable_gauge(
                spec.name, callbacks=[gauge.observe], unit=spec.unit, description=spec.description
            )
        gauge.max_age_s, gauge.clock = max_age_s, clock
    return gauge


@dataclass(frozen=True)
class Instruments:
    records: metrics.Counter
    batches: metrics.Counter
    batch_duration: metrics.Histogram
    api_requests: metrics.Counter
    throttled: metrics.Counter
    dlq_writes: metrics.Counter
    dlq_depth: FreshGauge
    poison: metrics.Counter
    breaker_state: FreshGauge
    breaker_open: FreshGauge
    lag: FreshGauge
    runs: metrics.Counter
    listed: metrics.Counter
    webhooks: metrics.Counter
    mismatches: metrics.Counter
    drift: FreshGauge


def instruments(
    provider: metrics.MeterProvider | None = None,
    *,
    gauge_max_age_s: float = GAUGE_MAX_AGE_S,
    clock: Callable[[], float] = time.monotonic,
) -> Instruments:
    """The instruments, from the global meter provider unless one is given (tests pass their own)."""
    meter = (provider or metrics.get_meter_provider()).get_meter(METER_NAME)

    def counter(name: str) -> metrics.Counter:
        spec = SPEC_BY_NAME[name]
        return meter.create_counter(name, unit=spec.unit, description=spec.description)

    def gauge(name: str) -> FreshGauge:
        return _gauge(meter, SPEC_BY_NAME[name], provider, gauge_max_age_s, clock)

    duration = SPEC_BY_NAME[BATCH_DURATION]
    return Instruments(
        records=counter(RECORDS),
        batches=counter(BATCHES),
        batch_duration=meter.create_histogram(BATCH_DURATION, unit=duration.unit, description=duration.description),
        api_requests=counter(API_REQUESTS),
        throttled=counter(THROTTLED),
        dlq_writes=counter(DLQ_WRITES),
        dlq_depth=gauge(DLQ_DEPTH),
        poison=counter(POISON),
        breaker_state=gauge(BREAKER_STATE),
        breaker_open=gauge(BREAKER_OPEN),
        lag=gauge(LAG),
        runs=counter(RUNS),
        listed=counter(LISTED),
        webhooks=counter(WEBHOOKS),
        mismatches=counter(MISMATCHES),
        drift=gauge(DRIFT),
    )
