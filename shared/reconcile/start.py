"""Starting a reconcile run (the `reconcile` timer, `POST /api/reconcile`) and reading the latest one back.

A run pages billing ids onto the sync's queue as `reconcile` messages (the same versioned contract, `kind:
reconcile`), through the same listing engine as fan-out: every record, those changed since a time, or the ids given.
A run over all customers also pages the CRM's account keys onto the queue as `orphans` messages: keys billing no
longer has are `orphan_in_crm`. The batches do the comparing (`batch.py`); the run's row in `reconcileruns`
(PartitionKey `run`) holds its scope, what was listed and sent, and the repairs it spent; `summary` sums its
batches' rows until its report is written (`report.py`), and reads the totals stored on the row after that.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

from azure.data.tables import UpdateMode
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, model_validator

from shared import clock, logs, messages, state
from shared.billing.listing import ChangeListing, ListingPosition
from shared.mapping import CUSTOMER_MAP
from shared.messages import Entity
from shared.odata import literal
from shared.reconcile.compare import CATEGORIES
from shared.reconcile.findings import RUNS
from shared.runtime import Runtime

log = logs.get_logger("shared.reconcile")
MAX_IDS = 10_000
LOOK_BACK = 5  # runs `summary(complete_only=True)` looks through


def _listed(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class ReconcileRequest(BaseModel):
    """`POST /api/reconcile`: `{"entity": "invoices" | [...], "ids": [...], "since": "<ISO time>", "dry_run": true}`;
    every field optional (an empty body reconciles everything)."""

    model_config = ConfigDict(extra="forbid")

    entity: Annotated[list[Entity], BeforeValidator(_listed)] = []
    ids: Annotated[list[Annotated[str, Field(pattern=messages.RECORD_ID_PATTERN)]], Field(max_length=MAX_IDS)] = []
    since: datetime | None = None
    dry_run: StrictBool = False

    @model_validator(mode="after")
    def _one_entity_for_ids(self) -> ReconcileRequest:
        if self.ids and len(self.entity) != 1:
            raise ValueError("entity: name exactly one entity for the ids")
        return self


@dataclass
class Started:
    run_id: str
    dry_run: bool
    listed: Counter[str] = field(default_factory=Counter)
    messages: int = 0
    status: str = "listed"  # or "short": the time budget ran out before every id was listed


async def start(runtime: Runtime, request: ReconcileRequest, *, trigger: str) -> Started:
    """List the run's ids onto the queue; returns when everything is sent (or the time budget is spent)."""
    run = Started(state.run_id_for("reconcile"), request.dry_run)
    scope = {"entity": request.entity, "ids": len(request.ids), "since": request.since, "trigger": trigger}
    await _run_row(runtime, run, status="listing", started_at=clock.iso(clock.utcnow()), scope=str(scope)[:1000])
    deadline = time.monotonic() + runtime.settings.fanout_budget_s
    entities: list[Entity] = request.entity or list(runtime.settings.entity_list)
    for entity in entities:
        if request.ids:
            await _send(runtime, run, entity, request.ids)
            continue
        since = clock.iso(request.since) if request.since else ""
        await _list(runtime, run, entity, since, deadline)
        if entity == "customers" and not since and run.status == "listed":
            await _crm_keys(runtime, run, deadline)
    await _run_row(runtime, run, status=run.status, messages=run.messages,
                   **{f"listed_{e}": n for e, n in run.listed.items()})  # fmt: skip
    log.info("reconcile run %s (%s%s): %d messages", run.run_id, trigger, ", dry run" * run.dry_run, run.messages)
    return run


async def _list(runtime: Runtime, run: Started, entity: Entity, since: str, deadline: float) -> None:
    position = ListingPosition(since=since, expected=await runtime.billing.count(entity, since))
    listing = ChangeListing(runtime.billing, entity, position)
    while not listing.finished:
        if time.monotonic() > deadline:
            run.status = "short"
            log.error("reconcile run %s: the time budget ran out listing %s after %d ids", run.run_id, entity,
                      position.listed)  # fmt: skip
            return
        page = await listing.next_page()
        await _send(runtime, run, entity, [i for i in page.ids if messages.is_record_id(i)])


async def _crm_keys(runtime: Runtime, run: Started, deadline: float) -> None:
    """Every account key the CRM holds, as `orphans` messages: those billing does not have are orphans."""
    table, key = CUSTOMER_MAP.table, CUSTOMER_MAP.key.column
    async for page in runtime.dataverse.read_pages(table, select=[key], filter=f"{key} ne null"):
        keys = [str(row[key]) for row in page if messages.is_record_id(str(row.get(key) or ""))]
        await _send(runtime, run, "customers", keys, kind="orphans")
        if time.monotonic() > deadline:
            run.status = "short"
            return


async def _send(runtime: Runtime, run: Started, entity: Entity, ids: list[str], *, kind: str = "reconcile") -> None:
    for msg in messages.split(entity, ids, size=runtime.settings.batch_size, run_id=run.run_id, source="reconcile",
                              kind=kind, dry_run=run.dry_run):  # fmt: skip
        await runtime.reconcile_queue.send_message(msg.body())
        run.messages += 1
    if kind == "reconcile":
        run.listed[entity] += len(ids)


async def _run_row(runtime: Runtime, run: Started, **values: Any) -> None:
    table = await runtime.tables.table(RUNS)
    row = {"PartitionKey": "run", "RowKey": state.row_key(run.run_id), "dry_run": run.dry_run, **values}
    await table.upsert_entity(row, mode=UpdateMode.MERGE)


async def summary(runtime: Runtime, run_id: str | None = None, *, complete_only: bool = False) -> dict[str, Any] | None:
    """A run (the newest without `run_id`; with `complete_only`, the newest whose batches have all ended, among the
    last few) as `GET /api/reconcile/latest` shows it: its row, and its batches summed by entity and category, with
    the drift score (records that differ / records compared) per entity."""
    table = await runtime.tables.table(RUNS)
    query = "PartitionKey eq 'run'" + (f" and RowKey eq {literal(state.row_key(run_id))}" if run_id else "")
    looked = 0
    async for row in table.query_entities(query, results_per_page=LOOK_BACK):
        shaped = await summary_of(table, dict(row))
        if not complete_only or shaped["complete"]:
            return shaped
        looked += 1
        if looked >= LOOK_BACK:
            break
    return None


async def summary_of(table: Any, run: dict[str, Any]) -> dict[str, Any]:
    """One run's summary: its stored totals once its report is written (`report.py`), else its batches summed."""
    if run.get("totals"):
        return _shape(run, {}, int(run.get("batches_done") or 0), stored=json.loads(str(run["totals"])))
    totals: dict[str, Counter[str]] = {}
    batches = 0
    async for row in table.query_entities(f"PartitionKey eq {literal(run['RowKey'])}"):
        batches += 1
        counts = totals.setdefault(str(row.get("entity")), Counter())
        for name in ("compared", "mismatched", "new", "resolved", "healed", "persistent", "crm_requests"):
            counts[name] += int(row.get(name) or 0)
        for category in CATEGORIES:
            counts[category] += int(row.get(f"n_{category}") or 0)
    return _shape(run, totals, batches)


def _shape(
    run: dict[str, Any], totals: dict[str, Counter[str]], batches: int, *, stored: dict[str, Any] | None = None
) -> dict[str, Any]:
    entities: dict[str, Any] = dict(stored or {})
    for entity, counts in sorted(totals.items()):
        compared = counts["compared"]
        entities[entity] = {
            **{k: counts[k] for k in ("compared", "mismatched", "new", "resolved", "healed", "persistent")},
            "drift": round(counts["mismatched"] / compared, 6) if compared else 0.0,
            "categories": {c: counts[c] for c in CATEGORIES if counts[c]},
            "crm_requests": counts["crm_requests"],
        }
    return {
        "run_id": run["RowKey"],
        "status": run.get("status"),
        "dry_run": bool(run.get("dry_run")),
        "started_at": run.get("started_at"),
        "messages": int(run.get("messages") or 0),
        "batches_done": batches,
        "complete": batches >= int(run.get("messages") or 0) and run.get("status") in ("listed", "short"),
        "repairs": int(run.get("repairs") or 0),
        "entities": entities,
        "completed_at": run.get("completed_at"),  # set with the report, once the batches have all ended
        "report": run.get("report"),
        "report_rows": run.get("report_rows"),
        "top_columns": json.loads(str(run["top_columns"])) if run.get("top_columns") else [],
        "median_hours_to_resolution": _median(run.get("median_hours_to_resolution")),
    }


def _median(value: Any) -> float | None:
    return None if value is None or float(value) < 0 else float(value)
