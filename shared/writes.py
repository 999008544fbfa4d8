"""The batch worker's writes to the CRM: planned records upserted by alternate key, each with a typed outcome.

Accounts and invoices go as `UpsertMultiple`; an invoice's lines go as `$batch` upserts once the invoice is
written, and the CRM lines that billing no longer has are deleted. Which lines those are is known without reading
the CRM when this product wrote the invoice before: the line keys it was last written with are kept beside its hash
(`state.SyncedHash.lines`), and the keys no longer there are deleted by key. The CRM's lines are read only for an
invoice written for the first time (a first sync over an existing CRM) or forced (a reconcile heal: a line a person
added in the CRM is known only to the CRM). A record ends in exactly one of:

- `written`: its row (and every line) was upserted;
- `rejected`: Dataverse refused its row or one of its lines (a business rule, a column too long): a DLQ row;
- `failed`: a transient failure after the call policy's retries: the worker's message is redelivered.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from more_itertools import chunked

from shared import dlq, logs
from shared.dataverse.client import DataverseClient, RowOutcome
from shared.errors import TransientError
from shared.mapping import ACCOUNTS, INVOICE_LINES, INVOICES, LINE_MAP
from shared.odata import literal
from shared.plan import Planned

log = logs.get_logger("shared.writes")
LINE_QUERY_CHUNK = 25  # invoice ids per lines query: `_invoiceid_value eq ... or ...` stays a short URL


@dataclass
class Written:
    written: list[Planned] = field(default_factory=list)
    rejected: list[dlq.RecordFailure] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)  # the errors of records not written after retries
    record_ids: dict[str, str] = field(default_factory=dict)  # billing id -> the CRM's record id, where answered


async def write_records(
    dataverse: DataverseClient,
    entity: str,
    plans: Sequence[Planned],
    *,
    known_lines: Mapping[str, tuple[str, ...]] | None = None,
) -> Written:
    """Upsert the planned records (and, for invoices, their lines). `known_lines`: the line keys each invoice was last
    written with, where known (the others' CRM lines are read to find the removed ones)."""
    out = Written()
    if not plans:
        return out
    table = ACCOUNTS if entity == "customers" else INVOICES
    outcomes = await dataverse.upsert_many(table, [p.rows[0] for p in plans])
    by_key = {o.row.key_tuple: o for o in outcomes}
    for plan in plans:
        outcome = by_key.get(plan.rows[0].key_tuple)
        if outcome is None or outcome.status == "failed":
            out.failed.append((outcome.error if outcome else None) or {"message": "no outcome"})
        elif outcome.status == "rejected":
            out.rejected.append(rejection(entity, plan.record_id, outcome))
        else:
            out.written.append(plan)
            if outcome.record_id:
                out.record_ids[plan.record_id] = outcome.record_id
    if entity == "invoices" and out.written:
        await _write_lines(dataverse, out, known_lines or {})
    return out


def rejection(entity: str, record_id: str, outcome: RowOutcome) -> dlq.RecordFailure:
    error = outcome.error or {}
    code = error.get("code")
    reason = f"Dataverse refused the {entity[:-1]}" + (f" ({code})" if code else "") + f": {error.get('message', '')}"
    return dlq.RecordFailure(entity, record_id, "rejected", reason, error)


async def _write_lines(dataverse: DataverseClient, out: Written, known: Mapping[str, tuple[str, ...]]) -> None:
    """Upsert every line of the written invoices, then delete the CRM lines that billing no longer has. An invoice
    with a refused line moves from written to rejected (the line named)."""
    owner = {row.key_tuple: plan.record_id for plan in out.written for row in plan.rows[1:]}
    line_rows = [row for plan in out.written for row in plan.rows[1:]]
    outcomes = await dataverse.upsert_many(INVOICE_LINES, line_rows) if line_rows else []
    bad: dict[str, dlq.RecordFailure] = {}
    for outcome in outcomes:
        invoice_id = owner.get(outcome.row.key_tuple, "")
        if outcome.status == "rejected" and invoice_id not in bad:
            line_id = next(iter(outcome.row.key.values()))
            failure = rejection("invoices", invoice_id, outcome)
            bad[invoice_id] = dlq.RecordFailure(
                "invoices", invoice_id, "rejected", f"line {line_id}: {failure.reason}", failure.error
            )
        elif outcome.status == "failed":
            out.failed.append(outcome.error or {"message": "line not written"})
    out.failed += await _delete_known_removed(dataverse, [p for p in out.written if p.record_id in known], known)
    unknown = [p for p in out.written if p.record_id not in known and p.record_id in out.record_ids]
    out.failed += await _delete_removed_lines(dataverse, unknown, out.record_ids)
    out.written = [p for p in out.written if p.record_id not in bad]
    out.rejected += bad.values()


async def _delete_known_removed(
    dataverse: DataverseClient, invoices: list[Planned], known: Mapping[str, tuple[str, ...]]
) -> list[dict[str, Any]]:
    """Delete, by key, the lines an invoice was last written with that billing no longer has: no read."""
    removed = [line for plan in invoices for line in sorted(set(known[plan.record_id]) - set(plan.lines or ()))]
    return await _delete_lines(dataverse, removed)


async def _delete_removed_lines(
    dataverse: DataverseClient, invoices: list[Planned], record_ids: dict[str, str]
) -> list[dict[str, Any]]:
    """Read the CRM lines of `invoices` (25 invoices a query) and delete those billing does not have."""
    key_column = LINE_MAP.key.column
    keep = {str(row.key[key_column]) for plan in invoices for row in plan.rows[1:]}
    guids = [record_ids[p.record_id] for p in invoices if _is_guid(record_ids[p.record_id])]
    removed: list[str] = []
    failed: list[dict[str, Any]] = []
    for part in chunked(guids, LINE_QUERY_CHUNK):
        query = " or ".join(f"_invoiceid_value eq {literal(uuid.UUID(g))}" for g in part)
        try:
            async for page in dataverse.read_pages(INVOICE_LINES, select=[key_column], filter=query):
                removed += [str(line[key_column]) for line in page if line.get(key_column)
                            and str(line[key_column]) not in keep]  # fmt: skip
        except TransientError as exc:
            failed.append(exc.to_dict())
    return failed + await _delete_lines(dataverse, removed)


async def _delete_lines(dataverse: DataverseClient, line_ids: list[str]) -> list[dict[str, Any]]:
    """Delete lines by key, many to a `$batch` request; the errors of those not deleted (the delivery is retried)."""
    if not line_ids:
        return []
    key_column = LINE_MAP.key.column
    outcomes = await dataverse.delete_many(INVOICE_LINES, [{key_column: line_id} for line_id in line_ids])
    for outcome in outcomes:
        if outcome.status == "written":
            log.info("line %s removed at the source: deleted from the CRM", outcome.row.key[key_column])
    return [o.error or {"message": "line not deleted"} for o in outcomes if o.status != "written"]


def _is_guid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
