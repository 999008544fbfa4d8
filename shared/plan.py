"""The batch worker's decisions, as pure functions: what to write, what to skip, what cannot be written and why.

No I/O here: the worker (`shared.worker`) reads the stored hashes and fetches the records, asks this module what
to do, and hands the answer to the writes (`shared.writes`). Invariants (property-tested in
`tests/shared/test_plan.py`):

- every fetched record ends in exactly one of `write`, `unchanged` or `stale`;
- a record is `stale` when billing answered an older version than the one last written, whatever `force` says
  (an older version must never overwrite a newer one);
- it is `unchanged` only when its content hash equals the stored one and the batch is not forced;
- an invoice whose account cannot be written is blocked with the account's reason, and is not written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from shared.billing.models import Customer, Invoice
from shared.dataverse.client import UpsertRow
from shared.mapping import LINE_MAP, content_hash, customer_row, invoice_rows
from shared.state import SyncedHash


@dataclass(frozen=True)
class Planned:
    """A record to write: its rows (its own row first, then its lines) and the hash they will be stored under."""

    record_id: str
    version: int
    hash: str
    rows: tuple[UpsertRow, ...]
    lines: tuple[str, ...] | None = None  # an invoice's line keys (None for an account)

    @property
    def synced(self) -> SyncedHash:
        return SyncedHash(self.record_id, self.hash, self.version, lines=self.lines)


@dataclass
class Plan:
    write: list[Planned] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # billing answered an older version than the one last written


def planned(record: Customer | Invoice) -> Planned:
    if isinstance(record, Customer):
        rows: tuple[UpsertRow, ...] = (customer_row(record),)
        return Planned(record.id, record.version, content_hash(list(rows)), rows)
    invoice, lines = invoice_rows(record)
    rows = (invoice, *lines)
    keys = tuple(str(line.key[LINE_MAP.key.column]) for line in lines)
    return Planned(record.id, record.version, content_hash(list(rows)), rows, keys)


def plan_records(records: Mapping[str, Customer | Invoice], stored: Mapping[str, SyncedHash], *, force: bool) -> Plan:
    """Records whose content changed, at a version not older than the one last written, are to be written."""
    out = Plan()
    for record_id, record in records.items():
        candidate = planned(record)
        before = stored.get(record_id)
        if before is not None and record.version < before.version:
            out.stale.append(record_id)
        elif before is not None and before.hash == candidate.hash and not force:
            out.unchanged.append(record_id)
        else:
            out.write.append(candidate)
    return out


def invoices_by_customer(invoices: Iterable[Invoice]) -> dict[str, list[str]]:
    """Each customer the invoices bind to, with the ids of its invoices."""
    by_customer: dict[str, list[str]] = {}
    for invoice in invoices:
        by_customer.setdefault(invoice.customer_id, []).append(invoice.id)
    return by_customer


def blocked_invoices(by_customer: Mapping[str, list[str]], reasons: Mapping[str, str]) -> dict[str, str]:
    """The invoices that cannot be written because their account cannot: invoice id -> the account's reason."""
    return {
        invoice_id: reason for customer_id, reason in reasons.items() for invoice_id in by_customer.get(customer_id, [])
    }
