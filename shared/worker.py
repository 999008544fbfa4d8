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
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from shared import dlq, messages, state
from shared.billing.client import FetchResult
from shared.billing.models import Customer, Invoice
from shared.dataverse.client import RowOutcome, UpsertRow
from shared.dataverse.odata import literal
from shared.errors import CircuitOpenError, InvalidRecord, SyncError, TransientError
from shared.mapping import ACCOUNTS as ACCOUNT_TABLE
from shared.mapping import INVOICE_LINES, INVOICES, LINE_MAP, content_hash, customer_row, invoice_rows
from shared.messages import MalformedMessage, SyncMessage
from shared.runtime import Runtime

log = logging.getLogger("shared.worker")
MIN_DEFER_S = 5
MAX_DEFER_S = 300
LINE_QUERY_CHUNK = 25  # invoice ids per lines query: `_invoiceid_value eq ... or ...` stays a short URL


@dataclass
class BatchResult:
    entity: str
    counts: Counter[str] = field(default_factory=Counter)
    dependencies_written: int = 0
    repaired: list[str] = field(default_factory=list)
    outcome: str = "succeeded"  # succeeded, deferred, malformed

    def as_row(self) -> dict[str, Any]:
        return {k: self.counts.get(k, 0) for k in state.BATCH_COUNTS} | {
            "dependencies_written": self.dependencies_written,
            "status": self.outcome,
        }


@dataclass
class _Planned:
    record_id: str
    version: int
    hash: str
    rows: list[UpsertRow]  # the record's own row first, then its lines


async def handle(runtime: Runtime, body: bytes, *, dequeue_count: int = 1) -> BatchResult:
    """The whole of one delivery. Raises only when the host should redeliver the message."""
    started = time.perf_counter()
    try:
        msg = messages.parse(body)
    except MalformedMessage as exc:
        return await _malformed(runtime, body, str(exc))
    log.info(
        "batch %s of run %s: %d %s (delivery %d)", msg.batch_id, msg.run_id, len(msg.ids), msg.entity, dequeue_count
    )
    try:
        result = await _sync(runtime, msg)
    except CircuitOpenError as exc:
        result = await _defer(runtime, msg, exc)
    except Exception as exc:
        await _record_failure(runtime, msg, exc, dequeue_count)
        runtime.metrics.batches.add(1, {"entity": msg.entity, "outcome": "failed"})
        # Every id of a failed delivery is accounted: what this delivery settled under its outcome, the rest as
        # failed (the failure-rate alert counts them; the redelivery counts them again under their outcome).
        counts = exc.counts if isinstance(exc, _Incomplete) else Counter({"failed": len(set(msg.ids))})
        _emit_records(runtime, msg.entity, counts)
        raise
    runtime.metrics.batches.add(1, {"entity": msg.entity, "outcome": result.outcome})
    runtime.metrics.batch_duration.record((time.perf_counter() - started) * 1000, {"entity": msg.entity})
    _emit_records(runtime, msg.entity, result.counts)
    return result


class _Incomplete(TransientError):
    """Some records of the batch were not written after retries; `counts` says what happened to each id."""

    def __init__(self, message: str, *, counts: Counter[str], system: str) -> None:
        super().__init__(message, system=system)
        self.counts = counts


def _emit_records(runtime: Runtime, entity: str, counts: Counter[str]) -> None:
    for outcome, n in counts.items():
        if n:
            runtime.metrics.records.add(n, {"entity": entity, "outcome": outcome})


async def _malformed(runtime: Runtime, body: bytes, reason: str) -> BatchResult:
    run_id, batch_id, entity = messages.peek_ids(body)
    text = body.decode("utf-8", "replace")
    await dlq.put_message(
        runtime.tables,
        body=text,
        reason_kind="malformed",
        reason=reason,
        run_id=run_id,
        batch_id=batch_id,
        entity=entity,
        attempts=1,
    )
    log.error("malformed message (batch %s) dead-lettered: %s", batch_id or "?", reason)
    runtime.metrics.dlq_writes.add(1, {"kind": "message", "reason": "malformed"})
    runtime.metrics.batches.add(1, {"entity": entity or "unknown", "outcome": "malformed"})
    return BatchResult(entity or "unknown", outcome="malformed")


async def _defer(runtime: Runtime, msg: SyncMessage, exc: CircuitOpenError) -> BatchResult:
    """Send the message again with a delay and let this delivery succeed: an outage spends no dequeue budget."""
    result = BatchResult(msg.entity, outcome="deferred")
    result.counts["deferred"] = len(msg.ids)
    if msg.deferrals >= runtime.settings.max_deferrals:
        await dlq.put_message(
            runtime.tables,
            body=msg.body(),
            reason_kind="deferred_too_long",
            reason=f"deferred {msg.deferrals} times while {exc.system} was unavailable; reprocess once it is back",
            run_id=msg.run_id,
            batch_id=msg.batch_id,
            entity=msg.entity,
            attempts=msg.deferrals,
            last_error=str(exc),
        )
        runtime.metrics.dlq_writes.add(1, {"kind": "message", "reason": "deferred_too_long"})
        await state.record_batch(runtime.tables, msg.run_id, msg.batch_id, status="dead-lettered", ids=len(msg.ids))
        return result
    delay = int(min(MAX_DEFER_S, max(MIN_DEFER_S, exc.retry_after or MIN_DEFER_S)))
    await runtime.queue.send_message(msg.deferred().body(), visibility_timeout=delay)
    log.warning("batch %s deferred %d s (%s)", msg.batch_id, delay, exc)
    await state.record_batch(
        runtime.tables, msg.run_id, msg.batch_id, ids=len(msg.ids), deferrals=msg.deferrals + 1, **result.as_row()
    )
    return result


async def _record_failure(runtime: Runtime, msg: SyncMessage, exc: BaseException, dequeue_count: int) -> None:
    """Keep the last error of the batch where the poison handler will look for it."""
    error = exc.to_dict() if isinstance(exc, SyncError) else {"type": type(exc).__name__, "message": str(exc)[:500]}
    existing = await state.read_batch(runtime.tables, msg.run_id, msg.batch_id)
    first = (existing or {}).get("first_failed") or state.iso(state.utcnow())
    await state.record_batch(
        runtime.tables,
        msg.run_id,
        msg.batch_id,
        ids=len(msg.ids),
        status="failed",
        attempts=dequeue_count,
        first_failed=first,
        last_failed=state.iso(state.utcnow()),
        last_error=dlq.mask(f"{error.get('type')}: {error.get('message')}")[:1000],
    )
    log.error("batch %s failed on delivery %d: %s", msg.batch_id, dequeue_count, error.get("message"))


# ---- the sync of one message ----


async def _sync(runtime: Runtime, msg: SyncMessage) -> BatchResult:
    result = BatchResult(msg.entity)
    ids = list(dict.fromkeys(msg.ids))
    before = await state.read_hashes(runtime.tables, msg.entity, ids)  # before the fetch: see the module docstring
    fetched = await runtime.billing.fetch(msg.entity, ids)
    failures: list[dlq.RecordFailure] = [_invalid(msg.entity, inv) for inv in fetched.invalid]
    result.counts["invalid"] += len(fetched.invalid)
    result.counts["not_found"] += len(fetched.not_found)
    for record_id in fetched.not_found:
        log.info("batch %s: %s %s no longer exists in billing", msg.batch_id, msg.entity, record_id)

    records = dict(fetched.records)
    dependency_hashes: list[state.SyncedHash] = []
    if msg.entity == "invoices":
        blocked, dependency_hashes, result.dependencies_written = await _ensure_accounts(runtime, records, msg)
        for invoice_id, reason in blocked.items():
            records.pop(invoice_id)
            failures.append(dlq.RecordFailure("invoices", invoice_id, "dependency", reason))
            result.counts["invalid"] += 1

    plans = _plan(records, before, result, force=msg.force)
    written, rejected, failed = await _write(runtime, msg.entity, plans)
    result.counts["written"] += len(written)
    result.counts["rejected"] += len(rejected)
    result.counts["failed"] += len(failed)
    failures += rejected

    if failures:
        await dlq.put_records(runtime.tables, failures, run_id=msg.run_id, batch_id=msg.batch_id)
        for f in failures:
            runtime.metrics.dlq_writes.add(1, {"kind": "record", "reason": f.reason_kind})
    new_hashes = [state.SyncedHash(p.record_id, p.hash, p.version) for p in written]
    conflicts = await state.write_hashes(runtime.tables, msg.entity, new_hashes, before)
    if dependency_hashes:
        await state.write_hashes(runtime.tables, "customers", dependency_hashes, {})
    if conflicts:
        await _repair(runtime, msg, conflicts)
        result.repaired = conflicts
    if msg.source == "reprocess":
        not_done = {f.record_id for f in failures} | set(fetched.not_found)
        done = [i for i in ids if i not in not_done]
        await dlq.mark(runtime.tables, [(f"record-{msg.entity}", state.row_key(i)) for i in done], "resolved")
    if failed:
        await state.record_batch(runtime.tables, msg.run_id, msg.batch_id, ids=len(ids), **result.as_row())
        raise _Incomplete(
            f"batch {msg.batch_id}: {len(failed)} record(s) not written after retries "
            f"({failed[0].get('message', '') if failed else ''}); the message will be redelivered",
            counts=result.counts,
            system="dataverse",
        )
    if msg.source == "reprocess":
        await dlq.mark(runtime.tables, [("message", state.row_key(msg.batch_id))], "resolved")
    await state.record_batch(runtime.tables, msg.run_id, msg.batch_id, ids=len(ids), last_error="", **result.as_row())
    return result


def _plan(
    records: dict[str, Customer | Invoice], before: dict[str, state.SyncedHash], result: BatchResult, *, force: bool
) -> list[_Planned]:
    """What to write: records whose content changed, at a version not older than the one last written."""
    plans: list[_Planned] = []
    for record_id, record in records.items():
        rows = _rows(record)
        plan = _Planned(record_id, record.version, content_hash(rows), rows)
        stored = before.get(record_id)
        if stored is not None and record.version < stored.version:
            result.counts["stale"] += 1  # billing answered an older version than the one last written
        elif stored is not None and stored.hash == plan.hash and not force:
            result.counts["unchanged"] += 1
        else:
            plans.append(plan)
    return plans


def _invalid(entity: str, invalid: InvalidRecord) -> dlq.RecordFailure:
    return dlq.RecordFailure(entity, invalid.record_id or "(no id)", "invalid", invalid.reason)


def _rows(record: Customer | Invoice) -> list[UpsertRow]:
    if isinstance(record, Customer):
        return [customer_row(record)]
    invoice, lines = invoice_rows(record)
    return [invoice, *lines]


async def _ensure_accounts(
    runtime: Runtime, invoices: dict[str, Customer | Invoice], msg: SyncMessage
) -> tuple[dict[str, str], list[state.SyncedHash], int]:
    """Invoices bind to their account by key, so the account must exist first: customers the sync has never
    written are fetched and written here. Returns the invoices that cannot be written (with why), the new hashes
    of the customers written, and how many were written."""
    by_customer: dict[str, list[str]] = {}
    for invoice in invoices.values():
        assert isinstance(invoice, Invoice)  # noqa: S101
        by_customer.setdefault(invoice.customer_id, []).append(invoice.id)
    known = await state.read_hashes(runtime.tables, "customers", by_customer)
    missing = [c for c in by_customer if c not in known]
    blocked: dict[str, str] = {}
    if not missing:
        return blocked, [], 0
    fetched: FetchResult = await runtime.billing.fetch("customers", missing)
    for invalid in fetched.invalid:
        for invoice_id in by_customer.get(invalid.record_id or "", []):
            blocked[invoice_id] = f"customer {invalid.record_id} is invalid in billing: {invalid.reason}"
    for customer_id in fetched.not_found:
        for invoice_id in by_customer.get(customer_id, []):
            blocked[invoice_id] = f"customer {customer_id} does not exist in billing"
    plans = []
    for customer in fetched.records.values():
        rows = _rows(customer)
        plans.append(_Planned(customer.id, customer.version, content_hash(rows), rows))
    written, rejected, failed = await _write(runtime, "customers", plans)
    if failed:
        raise TransientError(f"batch {msg.batch_id}: accounts for its invoices not written", system="dataverse")
    for failure in rejected:
        for invoice_id in by_customer.get(failure.record_id, []):
            blocked[invoice_id] = f"customer {failure.record_id} was rejected by Dataverse: {failure.reason}"
    if rejected:
        await dlq.put_records(runtime.tables, rejected, run_id=msg.run_id, batch_id=msg.batch_id)
    hashes = [state.SyncedHash(p.record_id, p.hash, p.version) for p in written]
    return blocked, hashes, len(written)


async def _write(
    runtime: Runtime, entity: str, plans: Sequence[_Planned]
) -> tuple[list[_Planned], list[dlq.RecordFailure], list[dict[str, Any]]]:
    """Upsert the planned records. Returns (written, rejected with reasons, transient failures)."""
    if not plans:
        return [], [], []
    table = ACCOUNT_TABLE if entity == "customers" else INVOICES
    outcomes = await runtime.dataverse.upsert_many(table, [p.rows[0] for p in plans])
    by_key = {o.row.key_tuple: o for o in outcomes}
    written: list[_Planned] = []
    rejected: list[dlq.RecordFailure] = []
    failed: list[dict[str, Any]] = []
    guids: dict[str, str] = {}
    for plan in plans:
        outcome = by_key.get(plan.rows[0].key_tuple)
        if outcome is None or outcome.status == "failed":
            failed.append((outcome.error if outcome else None) or {"message": "no outcome"})
        elif outcome.status == "rejected":
            rejected.append(_rejection(entity, plan.record_id, outcome))
        else:
            written.append(plan)
            if outcome.record_id:
                guids[plan.record_id] = outcome.record_id
    if entity == "invoices" and written:
        written, line_rejected, line_failed = await _write_lines(runtime, written, guids)
        rejected += line_rejected
        failed += line_failed
    return written, rejected, failed


def _rejection(entity: str, record_id: str, outcome: RowOutcome) -> dlq.RecordFailure:
    error = outcome.error or {}
    code = error.get("code")
    reason = f"Dataverse refused the {entity[:-1]}" + (f" ({code})" if code else "") + f": {error.get('message', '')}"
    return dlq.RecordFailure(entity, record_id, "rejected", reason, error)


async def _write_lines(
    runtime: Runtime, invoices: list[_Planned], guids: dict[str, str]
) -> tuple[list[_Planned], list[dlq.RecordFailure], list[dict[str, Any]]]:
    """Upsert every line of the written invoices, then delete the CRM lines that billing no longer has."""
    line_rows = [row for plan in invoices for row in plan.rows[1:]]
    owner = {row.key_tuple: plan.record_id for plan in invoices for row in plan.rows[1:]}
    outcomes = await runtime.dataverse.upsert_many(INVOICE_LINES, line_rows) if line_rows else []
    bad: dict[str, dlq.RecordFailure] = {}
    failed: list[dict[str, Any]] = []
    for outcome in outcomes:
        invoice_id = owner.get(outcome.row.key_tuple, "")
        if outcome.status == "rejected":
            line_id = next(iter(outcome.row.key.values()))
            failure = _rejection("invoices", invoice_id, outcome)
            bad.setdefault(invoice_id, dlq.RecordFailure(
                "invoices", invoice_id, "rejected", f"line {line_id}: {failure.reason}", failure.error
            ))  # fmt: skip
        elif outcome.status == "failed":
            failed.append(outcome.error or {"message": "line not written"})
    removed_failed = await _delete_removed_lines(runtime, [p for p in invoices if p.record_id in guids], guids)
    failed += removed_failed
    ok = [p for p in invoices if p.record_id not in bad]
    return ok, list(bad.values()), failed


async def _delete_removed_lines(
    runtime: Runtime, invoices: list[_Planned], guids: dict[str, str]
) -> list[dict[str, Any]]:
    key_column = LINE_MAP.key.column
    keep = {str(row.key[key_column]) for plan in invoices for row in plan.rows[1:]}
    failed: list[dict[str, Any]] = []
    ids = [guids[p.record_id] for p in invoices if _is_guid(guids[p.record_id])]
    for i in range(0, len(ids), LINE_QUERY_CHUNK):
        chunk = ids[i : i + LINE_QUERY_CHUNK]
        query = " or ".join(f"_invoiceid_value eq {literal(uuid.UUID(g))}" for g in chunk)
        try:
            async for page in runtime.dataverse.read_pages(INVOICE_LINES, select=[key_column], filter=query):
                for line in page:
                    line_id = line.get(key_column)
                    if line_id and str(line_id) not in keep:
                        await runtime.dataverse.delete(INVOICE_LINES, {key_column: line_id})
                        log.info("line %s removed at the source: deleted from the CRM", line_id)
        except TransientError as exc:
            failed.append(exc.to_dict())
    return failed


async def _repair(runtime: Runtime, msg: SyncMessage, ids: list[str]) -> None:
    """Another worker wrote some of these records at the same time: sync them again, forced, so the latest wins."""
    log.warning("batch %s: %d record(s) written concurrently elsewhere; re-syncing them", msg.batch_id, len(ids))
    run_id = f"repair-{state.utcnow():%Y%m%d}"  # its own ledger: the original run's counts stay those of its listing
    for repair in messages.split(msg.entity, ids, size=runtime.settings.batch_size, run_id=run_id, source="repair"):
        await runtime.queue.send_message(repair.model_copy(update={"force": True}).body())


def _is_guid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
