"""One reconcile message (`kind: reconcile`): its billing records fetched in bulk, the CRM's rows for them read by
alternate key (`$select` of the mapped columns only, 100 keys a request, an invoice's lines by their invoice), each
compared through the data dictionary (`compare.py`), and what was found written down and healed (`findings.py`).
An `orphans` message holds CRM account keys instead: those billing does not have are `orphan_in_crm`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.billing.models import Customer, Invoice, Record
from shared.dataverse.client import DataverseClient, filter_chunks
from shared.mapping import CUSTOMER_MAP, INVOICE_MAP, LINE_MAP, EntityMap, customer_row, invoice_rows
from shared.messages import SyncMessage
from shared.reconcile import findings
from shared.reconcile.compare import Mismatch, compare
from shared.runtime import Runtime

PRIMARY_ID = {"customers": "accountid", "invoices": "invoiceid"}
LINE_PARENT = "_invoiceid_value"


@dataclass
class CrmView:
    """What the CRM holds for a batch: rows by alternate key, an invoice's lines by the invoice's row id."""

    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    lines: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    requests: int = 0


def _select(entity_map: EntityMap, *extra: str) -> list[str]:
    return list(dict.fromkeys([entity_map.key.column, *extra, *(c.column for c in entity_map.owned)]))


async def read_crm(dataverse: DataverseClient, entity: str, records: Mapping[str, Record]) -> CrmView:
    """The CRM's rows for `records` (and, for invoices, their lines): a `$filter` per 100 keys, never a GET each."""
    entity_map = CUSTOMER_MAP if entity == "customers" else INVOICE_MAP
    keys = [str(entity_map.key.value(r)) for r in records.values()]
    view = CrmView()
    select = _select(entity_map, PRIMARY_ID[entity])
    for row in await dataverse.read_where(entity_map.table, entity_map.key.column, keys, select=select):
        view.rows.setdefault(str(row.get(entity_map.key.column)), []).append(row)
    view.requests += len(filter_chunks(entity_map.key.column, keys))
    if entity == "invoices":
        parents = [row[PRIMARY_ID[entity]] for rows in view.rows.values() for row in rows if row.get("invoiceid")]
        select = _select(LINE_MAP, LINE_PARENT)
        for line in await dataverse.read_where(LINE_MAP.table, LINE_PARENT, parents, select=select):
            view.lines.setdefault(str(line.get(LINE_PARENT)), []).append(line)
        view.requests += len(filter_chunks(LINE_PARENT, parents))
    return view


def compare_all(entity: str, records: Mapping[str, Record], view: CrmView) -> list[Mismatch]:
    """Every finding of the batch's valid records (pure)."""
    found: list[Mismatch] = []
    for record_id, record in records.items():
        if isinstance(record, Customer):
            found += compare(entity, record_id, customer_row(record), view.rows.get(record.id, []))
            continue
        assert isinstance(record, Invoice)  # noqa: S101 - an invoices batch holds invoices
        row, lines = invoice_rows(record)
        crm_rows = view.rows.get(record.number, [])
        crm_lines = _lines_of(crm_rows, view.lines)
        found += compare(entity, record_id, row, crm_rows, lines=(lines, crm_lines))
    return found


def _lines_of(crm_rows: Sequence[Mapping[str, Any]], lines: Mapping[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [line for row in crm_rows[:1] for line in lines.get(str(row.get("invoiceid")), [])]


async def handle(runtime: Runtime, msg: SyncMessage) -> findings.BatchFindings:
    """The whole of one reconcile (or orphans) message. Raises only when the host should redeliver."""
    fetched = await runtime.billing.fetch(msg.entity, list(dict.fromkeys(msg.ids)))
    if msg.kind == "orphans":  # CRM keys: those billing does not have (a bulk answer, then a single 404) are orphans
        found = [Mismatch(msg.entity, key, "orphan_in_crm") for key in fetched.not_found]
        return await findings.settle(runtime, msg, msg.ids, found, crm_requests=0, only={"orphan_in_crm"})
    view = await read_crm(runtime.dataverse, msg.entity, fetched.records)
    found = compare_all(msg.entity, fetched.records, view)
    found += [Mismatch(msg.entity, i.record_id or "(no id)", "invalid_in_billing") for i in fetched.invalid]
    compared = [*fetched.records, *(i.record_id for i in fetched.invalid if i.record_id)]
    return await findings.settle(runtime, msg, compared, found, crm_requests=view.requests)
