"""What the batch worker writes down after its writes: DLQ rows, content hashes, repairs, the batch's ledger row.

- records that failed for good (invalid in billing, refused by Dataverse, blocked by their account) get a DLQ row;
- the hashes of the records written are stored, each on condition that its row is as it was read before the fetch
  (`state.write_hashes`); a row that moved meanwhile means another worker wrote the same record at the same time,
  and those records are synced again, forced, under a repair run of their own, so the latest version wins;
- a reprocessed batch marks the DLQ rows it settled `resolved`: only rows requeued under the token it carries;
- one ledger row per batch (`syncruns`, PartitionKey the run id), overwritten by each delivery, so a redelivered
  batch is counted once, as it last ended; a failed delivery keeps its last error there for the poison handler.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared import clock, dlq, logs, messages, redact, state
from shared.errors import SyncError
from shared.messages import SyncMessage
from shared.plan import Planned
from shared.runtime import Runtime

log = logs.get_logger("shared.ledger")


@dataclass
class Settlement:
    failures: list[dlq.RecordFailure] = field(default_factory=list)  # to the DLQ
    written: list[Planned] = field(default_factory=list)  # hashes stored, conditional on `before`
    before: Mapping[str, state.SyncedHash] = field(default_factory=dict)
    accounts: list[Planned] = field(default_factory=list)  # customers written for the batch's invoices


async def settle(runtime: Runtime, msg: SyncMessage, done: Settlement) -> list[str]:
    """DLQ rows, hashes, repairs and reprocess marks for one delivery; the ids sent for repair."""
    if done.failures:
        await dlq.put_records(runtime.tables, done.failures, run_id=msg.run_id, batch_id=msg.batch_id)
        for failure in done.failures:
            runtime.metrics.dlq_writes.add(1, {"kind": "record", "reason": failure.reason_kind})
    new = [p.synced for p in done.written]
    conflicts = await state.write_hashes(runtime.tables, msg.entity, new, done.before)
    if done.accounts:
        await state.write_hashes(runtime.tables, "customers", [p.synced for p in done.accounts], {})
    if conflicts:
        await _repair(runtime, msg, conflicts)
    if msg.source == "reprocess":
        not_done = {f.record_id for f in done.failures}
        settled = [i for i in dict.fromkeys(msg.ids) if i not in not_done]
        await dlq.resolve(runtime.tables, f"record-{msg.entity}", map(state.row_key, settled), msg.dlq_token)
    return conflicts


async def _repair(runtime: Runtime, msg: SyncMessage, ids: Sequence[str]) -> None:
    log.warning("batch %s: %d record(s) written concurrently elsewhere; re-syncing them", msg.batch_id, len(ids))
    run_id = f"repair-{clock.utcnow():%Y%m%d}"  # its own ledger: the original run's counts stay those of its listing
    for repair in messages.split(msg.entity, list(ids), size=runtime.settings.batch_size, run_id=run_id,
                                 source="repair"):  # fmt: skip
        await runtime.queue.send_message(repair.model_copy(update={"force": True}).body())


async def record_batch(runtime: Runtime, msg: SyncMessage, counts: Mapping[str, Any], *, complete: bool) -> None:
    """The batch's row as this delivery ended; a complete one clears the last error and resolves a reprocessed
    message's DLQ row."""
    extra: dict[str, Any] = {"last_error": ""} if complete else {}
    if complete and msg.source == "reprocess":
        await dlq.resolve(runtime.tables, "message", [state.row_key(msg.batch_id)], msg.dlq_token)
    await state.record_batch(runtime.tables, msg.run_id, msg.batch_id, ids=len(set(msg.ids)), **counts, **extra)


async def record_failure(runtime: Runtime, msg: SyncMessage, exc: BaseException, dequeue_count: int) -> None:
    """Keep the last error of the batch where the poison handler will look for it."""
    error = exc.to_dict() if isinstance(exc, SyncError) else {"type": type(exc).__name__, "message": str(exc)[:500]}
    existing = await state.read_batch(runtime.tables, msg.run_id, msg.batch_id)
    first = (existing or {}).get("first_failed") or clock.iso(clock.utcnow())
    await state.record_batch(
        runtime.tables,
        msg.run_id,
        msg.batch_id,
        ids=len(msg.ids),
        status="failed",
        attempts=dequeue_count,
        first_failed=first,
        last_failed=clock.iso(clock.utcnow()),
        last_error=redact.mask(f"{error.get('type')}: {error.get('message')}")[:1000],
    )
    log.error("batch %s failed on delivery %d: %s", msg.batch_id, dequeue_count, error.get("message"))
