"""Health: `GET /api/health`, and the gauges the alerts read (breaker states, DLQ depth, lag), measured by every
fan-out tick and every health call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import azure.functions as func

from shared import __version__, clock, dlq, inputs, logs, state
from shared.reconcile import start as reconcile_start
from shared.responses import json_response
from shared.runtime import Runtime
from shared.telemetry import BREAKER_VALUES

log = logs.get_logger("shared.health")


@dataclass
class Observed:
    entities: dict[str, dict[str, Any]]
    breakers: dict[str, str]
    dlq_depth: int


async def observe(runtime: Runtime) -> Observed:
    """Measure breaker states, DLQ depth and lag, and record them as gauges (health and every fan-out tick call
    this, so the alerts on them have fresh values even when nobody looks at health). Breakers first: in an outage
    they are the readings that matter, and they need nothing but the breakers' own table."""
    breakers: dict[str, str] = {}
    for breaker in (runtime.billing_breaker, runtime.dataverse_breaker):
        current = await breaker.read()
        breakers[breaker.system] = current.state
        runtime.metrics.breaker_state.set(BREAKER_VALUES[current.state], {"system": breaker.system})
        runtime.metrics.breaker_open.set(round(current.open_seconds(breaker.clock())), {"system": breaker.system})
    depth = await dlq.depth(runtime.tables)
    runtime.metrics.dlq_depth.set(depth)
    await _drift(runtime)
    entities: dict[str, dict[str, Any]] = {}
    for entity in runtime.settings.entity_list:
        cp = await state.read_checkpoint(runtime.tables, entity)
        lag = None
        if cp.watermark:
            lag = round((clock.utcnow() - clock.parse_iso(cp.watermark)).total_seconds())
            runtime.metrics.lag.set(lag, {"entity": entity})
        entities[entity] = {
            "watermark": cp.watermark or None,
            "lag_seconds": lag,
            "last_completed": cp.last_completed or None,
            "listing": _listing(cp),
        }
    return Observed(entities, breakers, depth)


async def _drift(runtime: Runtime) -> None:
    """The drift score of the newest complete reconcile run, per entity (a dry run's counts too: it compared)."""
    try:
        latest = await reconcile_start.summary(runtime, complete_only=True)
    except Exception as exc:  # noqa: BLE001 - one reading missing must not cost the others (or a fan-out tick)
        log.warning("health: the reconcile drift could not be read (%s: %s)", type(exc).__name__, exc)
        return
    for entity, counts in (latest or {}).get("entities", {}).items():
        runtime.metrics.drift.set(float(counts["drift"]), {"entity": entity})


def _listing(cp: state.Checkpoint) -> dict[str, Any] | None:
    return {"run_id": cp.run_id, "listed": cp.listing.listed, "expected": cp.listing.expected} if cp.run_id else None


@inputs.guarded
async def health(runtime: Runtime) -> func.HttpResponse:
    seen = await observe(runtime)
    runs = [
        {
            k: r.get(k)
            for k in ("RowKey", "entity", "status", "started_at", "listing_completed_at", "listed", "messages")
        }
        for r in await state.recent_runs(runtime.tables, limit=10)
    ]
    status = "degraded" if any(s != "closed" for s in seen.breakers.values()) else "ok"
    return json_response(
        {
            "status": status,
            "version": __version__,
            "entities": seen.entities,
            "dlq_depth": seen.dlq_depth if seen.dlq_depth < dlq.DEPTH_CAP else f"{dlq.DEPTH_CAP}+",
            "breakers": seen.breakers,
            "recent_runs": [{"run_id": r.pop("RowKey"), **r} for r in runs],
        }
    )
