"""The batch worker (queue trigger `sync_batch`): one message of billing IDs in, the CRM in step, every id accounted.

For each message (docs/sync.md, "The batch worker"):

1. parse it; a message that breaks the contract goes to the DLQ at once (no redelivery can fix it);
2. read the stored hash rows of its ids, *then* fetch the records from billing (the order matters: hash writes are
   conditional on what was read, so two workers writing one record at once are caught, see `state.write_hashes`);
3. validate and map them (`shared.mapping`); an invoice whose account is not yet in the CRM brings its customer along;
4. skip records whose content hash is unchanged, and records older than the version last written;
5. upsert the rest by alternate key (accounts, then invoices, then their lines, whose removed lines are deleted);
6. dead-letter invalid and rejected records with their reason, store the new hashes, write the batch's ledger row.

Transient failures after in-process retries fail the invocation (the host redelivers); an open breaker defers the
message with a visibility delay instead, without spending its dequeue budget.

The decisions are `shared.plan` (pure), the CRM writes `shared.writes`, and what is written down afterwards (DLQ
rows, hashes, repairs, the batch's ledger row) `shared.ledger`; this module runs them in order.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared import coalesce, dlq, ledger, logs, messages, plan, state
from shared.billing.models import Customer, Invoice
from shared.errors import CircuitOpenError, InvalidRecord, SyncBusy, TransientError
from shared.messages import MalformedMessage, SyncMessage
from shared.reconcile import batch as reconcile_batch
from shared.runtime import Runtime
from shared.writes import write_records

log = logs.get_logger("shared.worker")
MIN_DEFER_S = 5
MAX_DEFER_S = 300
YIELD_S = 60  # how long a reconcile batch waits while the sync is busy
SYNC_BACKLOG = 20  # messages on the sync's queue (in flight included) past which reconcile yields: more than one
# instance runs at once (host.json: batchSize 8 + newBatchThreshold 4); a webhook's trickle stays under it


@dataclass
class BatchResult:
    entity: str
    counts: Counter[str] = field(default_factory=Counter)  # ids by outcome (state.BATCH_COUNTS)
    dependencies_written: int = 0
    repaired: list[str] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)  # errors of records not written after retries
    outcome: str = "succeeded"  # succeeded, deferred, malformed

    def as_row(self) -> dict[str, Any]:
        return {k: self.counts.get(k, 0) for k in state.BATCH_COUNTS} | {
            "dependencies_written": self.dependencies_written,
            "status": "failed" if self.failed else self.outcome,
        }


class IncompleteBatch(TransientError):
    """Some records of the batch were not written after retries: the host redelivers the message."""


async def handle(runtime: Runtime, content: bytes, *, dequeue_count: int = 1) -> BatchResult:
    """The whole of one delivery (`content` as the queue holds it). Raises only when the host should redeliver."""
    started = time.perf_counter()
    try:
        body = messages.from_queue(content)
        msg = messages.parse(body)
    except MalformedMessage as exc:
        return await _malformed(runtime, content, str(exc))
    log.info(
        "batch %s of run %s: %d %s (delivery %d)", msg.batch_id, msg.run_id, len(msg.ids), msg.entity, dequeue_count
    )
    try:
        result = await _dispatch(runtime, msg)
    except CircuitOpenError as exc:
        result = await _defer(runtime, msg, exc)
    except Exception as exc:
        await _failed(runtime, msg, exc, dequeue_count, Counter({"failed": len(set(msg.ids))}))
        raise
    if result.failed:
        # Every id of a failed delivery is accounted: what it settled under its outcome, the rest as failed (the
        # failure-rate alert counts them; the redelivery counts them again under their outcome).
        error = IncompleteBatch(
            f"batch {msg.batch_id}: {len(result.failed)} record(s) not written after retries "
            f"({result.failed[0].get('message', '')}); the message will be redelivered",
            system="dataverse",
        )
        await _failed(runtime, msg, error, dequeue_count, result.counts)
        raise error
    runtime.metrics.batches.add(1, {"entity": msg.entity, "outcome": result.outcome})
    runtime.metrics.batch_duration.record((time.perf_counter() - started) * 1000, {"entity": msg.entity})
    _emit_records(runtime, msg.entity, result.counts)
    return result


async def _failed(
    runtime: Runtime, msg: SyncMessage, exc: BaseException, dequeue_count: int, counts: Mapping[str, int]
) -> None:
    await ledger.record_failure(runtime, msg, exc, dequeue_count)
    runtime.metrics.batches.add(1, {"entity": msg.entity, "outcome": "failed"})
    _emit_records(runtime, msg.entity, counts)


async def _dispatch(runtime: Runtime, msg: SyncMessage) -> BatchResult:
    if msg.kind == "sync":
        return await _sync(runtime, msg)
    if msg.kind == "webhooks":
        return await _drain(runtime, msg)
    return await _reconcile(runtime, msg)


async def _drain(runtime: Runtime, msg: SyncMessage) -> BatchResult:
    """A closed webhook window (`shared.coalesce`): its first SYNC_BATCH_SIZE ids synced here, the rest sent as sync
    messages, then its rows forgotten. Redelivered, it does it again: the rows stay until it succeeds."""
    window = msg.ids[0]
    await coalesce.settle(window, runtime.settings.webhook_coalesce_s or 1.0)
    ids = await coalesce.pending(runtime, window)
    if not ids:
        return BatchResult(msg.entity)
    first, *rest = coalesce.drain_plan(msg, ids, runtime.settings.batch_size)
    result = await _sync(runtime, first)
    if result.failed:
        return result
    for part in rest:
        await runtime.queue.send_message(part.body())
    await coalesce.forget(runtime, window, ids)
    log.info("webhook window %s: %d changed %s, %d message(s)", window, len(ids), msg.entity, 1 + len(rest))
    return result


def _emit_records(runtime: Runtime, entity: str, counts: Mapping[str, int]) -> None:
    for outcome, n in counts.items():
        if n:
            runtime.metrics.records.add(n, {"entity": entity, "outcome": outcome})


async def _malformed(runtime: Runtime, content: bytes, reason: str) -> BatchResult:
    _, batch_id, entity = messages.peek_ids(messages.readable(content))
    await dlq.put_malformed(runtime.tables, content, reason)
    log.error("malformed message (batch %s) dead-lettered: %s", batch_id or "?", reason)
    runtime.metrics.dlq_writes.add(1, {"kind": "message", "reason": "malformed"})
    runtime.metrics.batches.add(1, {"entity": entity or "unknown", "outcome": "malformed"})
    return BatchResult(entity or "unknown", outcome="malformed")


def _waited_for(exc: CircuitOpenError) -> str:
    return "the sync was busy (reconcile yields)" if isinstance(exc, SyncBusy) else f"{exc.system} was unavailable"


async def _defer(runtime: Runtime, msg: SyncMessage, exc: CircuitOpenError) -> BatchResult:
    """Send the message again with a delay and let this delivery succeed: an outage spends no dequeue budget."""
    result = BatchResult(msg.entity, outcome="deferred")
    result.counts["deferred"] = len(msg.ids)
    if msg.deferrals >= runtime.settings.max_deferrals:
        await dlq.put_message(
            runtime.tables,
            body=msg.body(),
            reason_kind="deferred_too_long",
            reason=f"deferred {msg.deferrals} times while {_waited_for(exc)}; reprocess once it is over",
            run_id=msg.run_id,
            batch_id=msg.batch_id,
            entity=msg.entity,
            attempts=msg.deferrals,
            last_error=str(exc),
            verbatim=True,
        )
        runtime.metrics.dlq_writes.add(1, {"kind": "message", "reason": "deferred_too_long"})
        await state.record_batch(runtime.tables, msg.run_id, msg.batch_id, status="dead-lettered", ids=len(msg.ids))
        return result
    delay = int(min(MAX_DEFER_S, max(MIN_DEFER_S, exc.retry_after or MIN_DEFER_S)))
    await runtime.queue_for(msg).send_message(msg.deferred().body(), visibility_timeout=delay)
    log.warning("batch %s deferred %d s (%s)", msg.batch_id, delay, exc)
    await state.record_batch(
        runtime.tables, msg.run_id, msg.batch_id, ids=len(msg.ids), deferrals=msg.deferrals + 1, **result.as_row()
    )
    return result


# ---- the sync of one message ----


async def _reconcile(runtime: Runtime, msg: SyncMessage) -> BatchResult:
    """A reconcile or orphans message (`shared.reconcile`): compared, recorded, healed through the sync; no CRM write
    here. It yields to the sync, which shares the CRM's budget and goes first: while fan-out is listing, or while
    more than SYNC_BACKLOG messages wait on the sync's queue, the batch is deferred (`_defer`)."""
    busy = await _sync_busy(runtime)
    if busy:
        raise SyncBusy(f"reconcile yields: {busy}", system="the sync", retry_after=YIELD_S)
    found = await reconcile_batch.handle(runtime, msg)
    log.info("reconcile batch %s of run %s: %d %s compared, %d differ", msg.batch_id, msg.run_id, found.compared,
             msg.entity, found.mismatched)  # fmt: skip
    return BatchResult(msg.entity)


async def _sync_busy(runtime: Runtime) -> str:
    """Why reconcile should wait for the sync now, or "" (two checkpoint reads and one queue-properties read)."""
    listing = [e for e in runtime.settings.entity_list if (await state.read_checkpoint(runtime.tables, e)).run_id]
    if listing:
        return f"fan-out is listing {', '.join(listing)}"
    waiting = int((await runtime.queue.get_queue_properties()).approximate_message_count or 0)
    if waiting > SYNC_BACKLOG:
        return f"the sync's queue holds {waiting} messages"
    return ""


async def _sync(runtime: Runtime, msg: SyncMessage) -> BatchResult:
    result = BatchResult(msg.entity)
    ids = list(dict.fromkeys(msg.ids))
    before = await state.read_hashes(runtime.tables, msg.entity, ids)  # before the fetch: see the module docstring
    fetched = await runtime.billing.fetch(msg.entity, ids)
    done = ledger.Settlement(before=before)
    done.failures = [_invalid(msg.entity, inv) for inv in fetched.invalid]
    done.failures += [_not_found(msg.entity, record_id) for record_id in fetched.not_found]
    result.counts.update(invalid=len(fetched.invalid), not_found=len(fetched.not_found))
    records = dict(fetched.records)
    if msg.entity == "invoices":
        await _ensure_accounts(runtime, records, msg, result, done)
    decided = plan.plan_records(records, before, force=msg.force)
    result.counts.update(unchanged=len(decided.unchanged), stale=len(decided.stale))
    known = {} if msg.force else {i: h.lines for i, h in before.items() if h.lines is not None}
    written = await write_records(runtime.dataverse, msg.entity, decided.write, known_lines=known)
    result.counts.update(written=len(written.written), rejected=len(written.rejected), failed=len(written.failed))
    result.failed = written.failed
    done.failures += written.rejected
    done.written = written.written
    result.repaired = await ledger.settle(runtime, msg, done)
    await ledger.record_batch(runtime, msg, result.as_row(), complete=not result.failed)
    return result


def _invalid(entity: str, invalid: InvalidRecord) -> dlq.RecordFailure:
    return dlq.RecordFailure(entity, invalid.record_id or "(no id)", "invalid", invalid.reason)


def _not_found(entity: str, record_id: str) -> dlq.RecordFailure:
    reason = f"billing has no {entity[:-1]} with this id (left out of a bulk answer, then 404 on its own)"
    return dlq.RecordFailure(entity, record_id, "not_found", reason)


async def _ensure_accounts(
    runtime: Runtime,
    records: dict[str, Customer | Invoice],
    msg: SyncMessage,
    result: BatchResult,
    done: ledger.Settlement,
) -> None:
    """Invoices bind to their account by key, so the account must exist first: customers the sync has never
    written are fetched and written here. Invoices whose account cannot be written leave `records` for the DLQ."""
    by_customer = plan.invoices_by_customer(r for r in records.values() if isinstance(r, Invoice))
    known = await state.read_hashes(runtime.tables, "customers", by_customer)
    missing = [c for c in by_customer if c not in known]
    if not missing:
        return
    fetched = await runtime.billing.fetch("customers", missing)
    accounts = await write_records(runtime.dataverse, "customers", [plan.planned(c) for c in fetched.records.values()])
    if accounts.failed:
        raise TransientError(f"batch {msg.batch_id}: accounts for its invoices not written", system="dataverse")
    reasons = {i.record_id or "": f"customer {i.record_id} is invalid in billing: {i.reason}" for i in fetched.invalid}
    reasons |= {c: f"customer {c} does not exist in billing" for c in fetched.not_found}
    reasons |= {f.record_id: f"customer {f.record_id} was rejected by Dataverse: {f.reason}" for f in accounts.rejected}
    for invoice_id, reason in plan.blocked_invoices(by_customer, reasons).items():
        records.pop(invoice_id)
        done.failures.append(dlq.RecordFailure("invoices", invoice_id, "dependency", reason))
        result.counts["invalid"] += 1
    if accounts.rejected:
        await dlq.put_records(runtime.tables, accounts.rejected, run_id=msg.run_id, batch_id=msg.batch_id)
    done.accounts = accounts.written
    result.dependencies_written = len(accounts.written)
