"""What a reconcile batch writes down and does about what it found.

- `mismatches` (PartitionKey the entity, RowKey the record id): one row per record that differs or differed, with
  its categories and columns, `first_seen`, `last_seen`, `resolved_at` (empty while open) and `attempts`, the
  consecutive runs that found it; `detail` is JSON, one entry per finding: `[category, columns, billing values, CRM
  values, difference, currency]` (what the run's CSV report lists, `report.py`). A record compared and found in
  step resolves its open row. Trends and time to resolution are queries over it.
- healing: a healable record is sent through the sync again with `force` (the hash check bypassed), unless the
  sync's DLQ already holds it (its reason is kept in the row's `in_dlq`: reprocess is how it is retried), at most
  `RECONCILE_MAX_REPAIRS` a run (counted on the run's row, so a mapping bug cannot storm the CRM); a record still
  differing after `RECONCILE_MAX_ATTEMPTS` runs is dead-lettered as `persistent_mismatch` naming the columns instead
  (something in the CRM keeps changing it). A dry run records and reports, and heals nothing.
- `reconcileruns` (PartitionKey the run id, RowKey the batch id): what the batch compared and found, by category.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from azure.data.tables import UpdateMode

from shared import dlq, logs, messages, state
from shared.clock import iso, utcnow
from shared.messages import SyncMessage
from shared.reconcile.compare import CATEGORIES, Mismatch
from shared.runtime import Runtime

log = logs.get_logger("shared.reconcile")
MISMATCHES = "mismatches"
RUNS = "reconcileruns"
MAX_COLUMNS_TEXT = 1000
MAX_CLAIMS = 50  # compare-and-swap rounds on the run's repair count before a batch gives up healing this run


@dataclass
class BatchFindings:
    entity: str
    compared: int = 0
    mismatched: int = 0
    by_category: Counter[str] = field(default_factory=Counter)
    new: int = 0
    resolved: int = 0
    healed: int = 0
    persistent: int = 0
    crm_requests: int = 0

    def as_row(self) -> dict[str, Any]:
        counts = {f"n_{c}": self.by_category.get(c, 0) for c in CATEGORIES}
        return {"entity": self.entity, "compared": self.compared, "mismatched": self.mismatched, "new": self.new,
                "resolved": self.resolved, "healed": self.healed, "persistent": self.persistent,
                "crm_requests": self.crm_requests, **counts}  # fmt: skip


async def settle(
    runtime: Runtime,
    msg: SyncMessage,
    compared: Sequence[str],
    found: Sequence[Mismatch],
    *,
    crm_requests: int,
    only: set[str] | None = None,
) -> BatchFindings:
    """Record `found` for the `compared` records, resolve what is in step again, heal or dead-letter the rest. With
    `only`, the batch looked for those categories alone: it resolves a row only if the row holds no other, and its
    records do not count as compared (the drift score is the comparing batches')."""
    result = BatchFindings(msg.entity, crm_requests=crm_requests)
    by_record: dict[str, list[Mismatch]] = {}
    for mismatch in found:
        by_record.setdefault(mismatch.record_id, []).append(mismatch)
        result.by_category[mismatch.category] += 1
    invalid = {m.record_id for m in found if m.category == "invalid_in_billing"}
    if only is None:
        result.compared = len(set(compared) - invalid)  # drift is over records that could be compared
        result.mismatched = len(set(by_record) - invalid)
    heal, persistent = await _each_record(runtime, msg, [*compared, *by_record], by_record, result, only=only)
    result.persistent = len(persistent)
    if persistent and not msg.dry_run:
        await dlq.put_records(runtime.tables, persistent, run_id=msg.run_id, batch_id=msg.batch_id)
        runtime.metrics.dlq_writes.add(len(persistent), {"kind": "record", "reason": "persistent_mismatch"})
    result.healed = 0 if msg.dry_run else await _heal(runtime, msg, heal)
    await _write_batch(runtime, msg, result)
    return result


async def _each_record(
    runtime: Runtime,
    msg: SyncMessage,
    ids: list[str],
    by_record: dict[str, list[Mismatch]],
    result: BatchFindings,
    *,
    only: set[str] | None,
) -> tuple[list[str], list[dlq.RecordFailure]]:
    """Each record's row written or resolved; the ids to heal and the records to dead-letter as persistent."""
    table = await runtime.tables.table(MISMATCHES)
    existing = await state.query_keys(table, msg.entity, [state.row_key(i) for i in dict.fromkeys(ids)])
    known = await _in_dlq(runtime, msg.entity, list(by_record))
    heal: list[str] = []
    persistent: list[dlq.RecordFailure] = []
    for record_id in dict.fromkeys(ids):
        row = existing.get(state.row_key(record_id))
        mine = by_record.get(record_id)
        if not mine:
            if only is None or set(str((row or {}).get("categories") or "").split(",")) <= only:
                result.resolved += await _resolve(table, msg.entity, record_id, row)
            continue
        attempts = await _record(table, msg, record_id, mine, row, in_dlq=known.get(record_id, ""))
        if row is None or row.get("resolved_at"):
            result.new += 1
            for category in {m.category for m in mine}:
                runtime.metrics.mismatches.add(1, {"entity": msg.entity, "category": category})
        if any(m.healable for m in mine) and record_id not in known:
            if attempts >= runtime.settings.reconcile_max_attempts:
                persistent.append(_persistent(msg.entity, record_id, mine, attempts))
            else:
                heal.append(record_id)
    return heal, persistent


async def _resolve(table: Any, entity: str, record_id: str, row: dict[str, Any] | None) -> int:
    if row is None or row.get("resolved_at"):
        return 0
    now = iso(utcnow())
    await table.update_entity({"PartitionKey": entity, "RowKey": state.row_key(record_id), "resolved_at": now,
                               "last_seen": now, "attempts": 0}, mode=UpdateMode.MERGE)  # fmt: skip
    return 1


async def _record(
    table: Any, msg: SyncMessage, record_id: str, found: list[Mismatch], row: dict[str, Any] | None, *, in_dlq: str
) -> int:
    """The record's row as this run found it; its consecutive runs found differing (a dry run does not count)."""
    still_open = row is not None and not row.get("resolved_at")
    attempts = int(row.get("attempts") or 0) if row is not None and still_open else 0
    if not msg.dry_run and (row is None or row.get("last_run") != msg.run_id or not still_open):
        attempts += 1
    now = iso(utcnow())
    amount = next((m for m in found if m.difference is not None), None)
    values = {
        "PartitionKey": msg.entity,
        "RowKey": state.row_key(record_id),
        "record_id": record_id,
        "categories": ",".join(sorted({m.category for m in found})),
        "columns": ",".join(dict.fromkeys(c for m in found for c in m.columns))[:MAX_COLUMNS_TEXT],
        "detail": json.dumps(
            [[m.category, m.columns, m.billing, m.crm, _text(m.difference), m.currency or ""] for m in found]
        )[: dlq.MAX_TEXT * 4],
        "difference": str(amount.difference) if amount else "",
        "currency": (amount.currency or "") if amount else "",
        "first_seen": str(row["first_seen"]) if still_open and row else now,
        "last_seen": now,
        "resolved_at": "",
        "attempts": attempts,
        "last_run": msg.run_id,
        "in_dlq": in_dlq,
    }
    await table.upsert_entity(values, mode=UpdateMode.REPLACE)
    return attempts


def _text(value: object) -> str:
    return "" if value is None else str(value)


async def _in_dlq(runtime: Runtime, entity: str, record_ids: list[str]) -> dict[str, str]:
    """The records among `record_ids` with an open DLQ row from the sync (invalid, rejected, blocked by their
    account...), by id: their reason. The DLQ already holds them for an operator: reconcile reports them and leaves
    healing to reprocess (a forced write would fail the same way, run after run)."""
    if not record_ids:
        return {}
    table = await runtime.tables.table("deadletters")
    rows = await state.query_keys(table, f"record-{entity}", [state.row_key(i) for i in record_ids],
                                  select=["RowKey", "record_id", "status", "reason_kind"])  # fmt: skip
    return {
        str(r["record_id"]): str(r["reason_kind"])
        for r in rows.values()
        if r.get("status") in ("open", "requeued") and r.get("reason_kind") != "persistent_mismatch"
    }


def _persistent(entity: str, record_id: str, found: list[Mismatch], attempts: int) -> dlq.RecordFailure:
    columns = ", ".join(dict.fromkeys(c for m in found if m.healable for c in m.columns)) or "the record"
    reason = (f"still differs from billing after {attempts} reconcile runs, each healed by a forced write: {columns}"
              "; something in the CRM (a plugin, a workflow, a person) keeps changing it")  # fmt: skip
    return dlq.RecordFailure(entity, record_id, "persistent_mismatch", reason)


async def _heal(runtime: Runtime, msg: SyncMessage, ids: list[str]) -> int:
    """Send `ids` through the sync again, forced, within the run's repair budget; how many were sent."""
    granted = await _claim_repairs(runtime, msg.run_id, len(ids))
    if granted < len(ids):
        log.warning("reconcile run %s: repair budget (RECONCILE_MAX_REPAIRS %d) spent; %d record(s) left unhealed",
                    msg.run_id, runtime.settings.reconcile_max_repairs, len(ids) - granted)  # fmt: skip
    chosen = ids[:granted]
    for heal in messages.split(msg.entity, chosen, size=runtime.settings.batch_size, run_id=f"heal-{msg.run_id}",
                               source="reconcile", force=True):  # fmt: skip
        await runtime.queue.send_message(heal.body())
    return len(chosen)


async def _claim_repairs(runtime: Runtime, run_id: str, wanted: int) -> int:
    """Take up to `wanted` repairs from the run's budget (a compare-and-swap on the run's row); how many."""
    if wanted == 0:
        return 0
    table = await runtime.tables.table(RUNS)
    cap = runtime.settings.reconcile_max_repairs
    for _ in range(MAX_CLAIMS):
        row = (await state.query_keys(table, "run", [state.row_key(run_id)])).get(state.row_key(run_id))
        used = int((row or {}).get("repairs") or 0)
        granted = max(0, min(wanted, cap - used))
        if granted == 0:
            return 0
        values = {**(row or {}), "PartitionKey": "run", "RowKey": state.row_key(run_id), "repairs": used + granted}
        values.pop("__etag", None)
        try:
            await state.write_if_unchanged(table, values, (row or {}).get("__etag"))
        except state.RowMoved:
            continue  # another batch took some meanwhile: read again
        return granted
    return 0


async def _write_batch(runtime: Runtime, msg: SyncMessage, result: BatchFindings) -> None:
    table = await runtime.tables.table(RUNS)
    row = {"PartitionKey": state.row_key(msg.run_id), "RowKey": state.row_key(msg.batch_id), **result.as_row(),
           "dry_run": msg.dry_run, "finished_at": iso(utcnow())}  # fmt: skip
    await table.upsert_entity(row, mode=UpdateMode.REPLACE)
