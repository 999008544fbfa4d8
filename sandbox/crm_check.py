"""Record-by-record check of the CRM against billing, after a sync (the demo's verdict and the end-to-end tests').

Billing's records are read from the billing simulator's store (the truth), mapped with the data dictionary, and
compared column by column with the Dataverse simulator's rows. A record may differ only if it sits in the DLQ with
a reason (invalid in billing, rejected by Dataverse, or blocked by its account); anything else is a difference.
Also checked: no alternate key twice, no line that billing removed, every invalid billing record dead-lettered, and
the columns sales own left as they were.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sandbox.billing_sim.store import ENTITIES, Store, to_api
from sandbox.dataverse_sim.schema import TABLES
from sandbox.dataverse_sim.store import DataverseStore, decoded
from shared.billing.models import Customer, Invoice, parse_record
from shared.dataverse.client import UpsertRow
from shared.errors import InvalidRecord
from shared.mapping import CUSTOMER_MAP, INVOICE_MAP, LINE_MAP, customer_row, invoice_rows

# "as of the last write": a new billing version that changes nothing mapped is not written (shared.mapping's hash)
AS_OF_LAST_WRITE = frozenset({"bcs_sourceversion", "bcs_sourceupdatedon"})


@dataclass
class CheckReport:
    checked: Counter[str] = field(default_factory=Counter)
    matched: Counter[str] = field(default_factory=Counter)
    excused: Counter[str] = field(default_factory=Counter)  # by DLQ reason kind
    invalid_in_dlq: int = 0
    differences: list[str] = field(default_factory=list)
    duplicates: int = 0
    sales_columns_kept: int = 0

    @property
    def ok(self) -> bool:
        return not self.differences and not self.duplicates


def _same(expected: Any, actual: Any) -> bool:
    """Equal values; amounts exactly (the CRM keeps billing's amount digit for digit, or it is a difference)."""
    if isinstance(expected, Decimal) or isinstance(actual, Decimal):
        return expected is not None and actual is not None and Decimal(expected) == Decimal(actual)
    return bool(expected == actual)


class CrmCheck:
    def __init__(
        self, billing: Store, crm: DataverseStore, dlq_open: dict[tuple[str, str], str], sales_notes: dict[str, str]
    ) -> None:
        self.billing = billing
        self.crm = crm
        self.dlq = dlq_open  # (entity, record id) -> reason kind
        self.sales_notes = sales_notes  # account number -> the description sales wrote before the sync
        self.report = CheckReport()
        self._guid: dict[str, dict[str, str]] = {}
        self._rows: dict[str, dict[str, dict[str, Any]]] = {}

    def run(self) -> CheckReport:
        for logical, key in (
            ("account", "accountnumber"),
            ("invoice", "invoicenumber"),
            ("invoicedetail", "bcs_billinglineid"),
        ):
            table = TABLES[logical]
            rows = [decoded(table, r) for r in self.crm.query(table)]
            keys = Counter(r[key] for r in rows if r[key] is not None)
            self.report.duplicates += sum(n - 1 for n in keys.values() if n > 1)
            self._rows[logical] = {str(r[key]): r for r in rows if r[key] is not None}
            self._guid[logical] = {str(r[key]): str(r[table.primary_id]) for r in rows if r[key] is not None}
        lines_by_invoice: dict[str, set[str]] = {}
        for line in self._rows["invoicedetail"].values():
            lines_by_invoice.setdefault(str(line["invoiceid"]), set()).add(str(line["bcs_billinglineid"]))
        for entity in ENTITIES:
            ids = self.billing.all_ids(entity)
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                found = self.billing.get_many(entity, chunk)
                lines = self.billing.lines_of(chunk) if entity == "invoices" else {}
                for row in found:
                    self._one(entity, parse_record(entity, to_api(entity, row, lines.get(row["id"]))), row["id"],
                              lines_by_invoice)  # fmt: skip
        for number, note in self.sales_notes.items():
            account = self._rows["account"].get(number)
            if account is not None and account["description"] == note:
                self.report.sales_columns_kept += 1
            elif account is not None:
                self.report.differences.append(f"account {number}: the sales-owned description was overwritten")
        return self.report

    def _one(
        self, entity: str, record: Customer | Invoice | InvalidRecord, record_id: str, lines: dict[str, set[str]]
    ) -> None:
        self.report.checked[entity] += 1
        dlq_reason = self.dlq.get((entity, record_id))
        if isinstance(record, InvalidRecord):
            if dlq_reason is None:
                self.report.differences.append(f"{entity} {record_id}: invalid in billing but not in the DLQ")
            else:
                self.report.invalid_in_dlq += 1
            return
        problems = self._compare(record)
        if isinstance(record, Invoice) and not problems:
            invoice_guid = self._guid["invoice"].get(record.number, "")
            expected = {line.id for line in record.lines}
            actual = lines.get(invoice_guid, set())
            if actual - expected:
                problems.append(f"lines removed in billing still in the CRM: {sorted(actual - expected)[:3]}")
        if not problems:
            self.report.matched[entity] += 1
        elif dlq_reason is not None:
            self.report.excused[dlq_reason] += 1
        else:
            self.report.differences.append(f"{entity} {record_id}: " + "; ".join(problems[:3]))

    def _compare(self, record: Customer | Invoice) -> list[str]:
        if isinstance(record, Customer):
            return self._compare_row("account", customer_row(record), CUSTOMER_MAP.key.column)
        invoice, lines = invoice_rows(record)
        problems = self._compare_row("invoice", invoice, INVOICE_MAP.key.column)
        for line in lines:
            problems += self._compare_row("invoicedetail", line, LINE_MAP.key.column)
        return problems

    def _compare_row(self, logical: str, expected: UpsertRow, key_column: str) -> list[str]:
        key = str(expected.key[key_column])
        actual = self._rows[logical].get(key)
        if actual is None:
            return [f"{logical} {key} missing in the CRM"]
        problems = []
        table = TABLES[logical]
        for name, value in expected.values.items():
            if name.endswith("@odata.bind"):
                column = table.lookup_by_navigation(name.removesuffix("@odata.bind"))
                assert column is not None  # noqa: S101 - the schema declares every lookup the mapping binds
                assert column.target is not None  # noqa: S101
                target_key = value[value.index("'") + 1 : value.rindex("'")].replace("''", "'")
                wanted = self._guid[column.target].get(target_key)
                if wanted is None or actual[column.name] != wanted:
                    problems.append(f"{logical} {key}: {column.name} does not point at {target_key}")
            elif name not in AS_OF_LAST_WRITE and not _same(value, actual[name]):
                problems.append(f"{logical} {key}: {name} is {actual[name]!r} in the CRM, {value!r} in billing")
        return problems
