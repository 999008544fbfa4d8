"""The data dictionary: one declarative mapping from billing records to Dataverse columns.

It drives the transform (`to_row`), the content hash (only mapped, billing-owned columns count), and the generated
`docs/data-dictionary.md` (`python -m sandbox data-dictionary --write`; a test fails when the file is stale).
Columns that sales own are listed so that everyone can see the sync never writes them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Literal

from shared.billing.models import Customer, Invoice, InvoiceLine
from shared.dataverse.client import TableRef, UpsertRow
from shared.odata import bind

Owner = Literal["billing", "sales"]
Transform = Callable[[Any], Any]


def _text(value: Any) -> Any:
    return None if value is None else str(value)


def _money(value: Any) -> Any:
    """Billing's amount exactly (a `Decimal`; `shared.jsontext` writes it to the CRM digit for digit)."""
    return None if value is None else Decimal(value)


def _integer(value: Any) -> Any:
    return None if value is None else int(value)


def _iso_utc(value: Any) -> Any:
    return None if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _date(value: Any) -> Any:
    if value is None:
        return None
    return (value.date() if isinstance(value, datetime) else value).isoformat()


def _joined(value: Any) -> Any:
    return ",".join(value) if value else None


TRANSFORMS: dict[str, Transform] = {
    "text": _text,
    "money": _money,
    "integer": _integer,
    "utc datetime": _iso_utc,
    "date": _date,
    "comma-joined": _joined,
}


TRANSFORM_NOTES = {
    "text": "the value as text",
    "money": "billing's decimal string as a JSON number, digit for digit (never through a float); Dataverse holds four"
    " decimal places up to ±922,337,203,685,477 and rejects a larger amount, which is dead-lettered with its reason",
    "integer": "a whole number",
    "utc datetime": "ISO 8601 in UTC, to the second (`2026-01-31T09:30:00Z`)",
    "date": "`YYYY-MM-DD`",
    "comma-joined": "the list joined with commas, empty as null",
}


@dataclass(frozen=True)
class Column:
    """One Dataverse column. What reconcile compares is declared here too: `casefold` (the CRM may change the case:
    emails), `tolerance` (money: how far apart two amounts may be, after both are rounded to the cent), `amount`
    (a difference is money shown wrong, `amount_over` / `amount_under`, not a plain `field_mismatch`) and `personal`
    (reports show the value masked)."""

    column: str
    source: str | None  # dotted path in the billing record; None for columns billing does not own
    transform: str = "text"
    description: str = ""
    owner: Owner = "billing"
    default: Any = None
    casefold: bool = False
    tolerance: Decimal = Decimal(0)
    amount: bool = False
    personal: bool = False

    def value(self, record: Any) -> Any:
        current = record
        for part in (self.source or "").split("."):
            current = None if current is None else getattr(current, part, None)
        out = TRANSFORMS[self.transform](current)
        return self.default if out is None else out


@dataclass(frozen=True)
class Lookup:
    navigation: str  # single-valued navigation property, bound with @odata.bind
    target: TableRef
    target_key: str
    source: str
    description: str

    def value(self, record: Any) -> str | None:
        key = getattr(record, self.source, None)
        return None if key is None else bind(self.target.entity_set, {self.target_key: key})


@dataclass(frozen=True)
class EntityMap:
    name: str  # billing entity
    table: TableRef
    key: Column
    columns: tuple[Column, ...]
    lookups: tuple[Lookup, ...] = ()

    @property
    def owned(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.owner == "billing")

    def to_row(self, record: Any) -> UpsertRow:
        """The Dataverse row for a validated billing record: billing-owned columns and lookups only."""
        values: dict[str, Any] = {c.column: c.value(record) for c in self.owned}
        for lookup in self.lookups:
            values[f"{lookup.navigation}@odata.bind"] = lookup.value(record)
        version = getattr(record, "version", 0) or 0
        return UpsertRow({self.key.column: self.key.value(record)}, values, int(version))


ACCOUNTS = TableRef("account", "accounts")
INVOICES = TableRef("invoice", "invoices")
INVOICE_LINES = TableRef("invoicedetail", "invoicedetails", bulk=False)

CUSTOMER_MAP = EntityMap(
    name="customers",
    table=ACCOUNTS,
    key=Column("accountnumber", "id", description="billing customer id (alternate key)"),
    columns=(
        Column("name", "name", description="customer name, at most 160 characters"),
        Column("emailaddress1", "email", description="billing contact email", casefold=True, personal=True),
        Column("telephone1", "phone", description="billing contact phone", personal=True),
        Column("address1_line1", "address.line1", personal=True),
        Column("address1_city", "address.city"),
        Column("address1_postalcode", "address.postal_code"),
        Column("address1_country", "address.country", description="ISO 3166-1 alpha-2"),
        Column("bcs_billingstatus", "status", description="active, suspended or churned"),
        Column("bcs_currencycode", "currency", description="ISO 4217", casefold=True),
        Column("bcs_balance", "balance", "money", amount=True),
        Column("bcs_mrr", "mrr", "money", description="monthly recurring revenue"),
        Column("bcs_golivedate", "go_live_date", "date"),
        Column("bcs_providercount", "provider_count", "integer"),
        Column("bcs_productflags", "product_flags", "comma-joined"),
        Column("bcs_sourceversion", "version", "integer", description="billing version last synced"),
        Column("bcs_sourceupdatedon", "updated_at", "utc datetime", description="billing updated_at last synced"),
        Column("description", None, owner="sales", description="account notes kept by sales"),
        Column("websiteurl", None, owner="sales"),
    ),
)

INVOICE_MAP = EntityMap(
    name="invoices",
    table=INVOICES,
    key=Column("invoicenumber", "number", description="billing invoice number (alternate key)"),
    columns=(
        Column("name", "number", description="shown as the invoice's name"),
        Column("bcs_billingstatus", "status", description="draft, open, paid, void or uncollectible"),
        Column("bcs_currencycode", "currency", description="ISO 4217", casefold=True),
        Column("bcs_issuedon", "issued_at", "utc datetime"),
        Column("duedate", "due_at", "date"),
        Column("bcs_paidon", "paid_at", "utc datetime"),
        Column("bcs_subtotal", "subtotal", "money"),
        Column("totaltax", "tax", "money"),
        Column("totalamount", "total", "money", amount=True),
        Column("bcs_amountpaid", "amount_paid", "money"),
        Column("bcs_amountdue", "amount_due", "money", amount=True),
        Column("bcs_sourceversion", "version", "integer"),
        Column("bcs_sourceupdatedon", "updated_at", "utc datetime"),
        Column("description", None, owner="sales"),
    ),
    lookups=(
        Lookup("customerid_account", ACCOUNTS, "accountnumber", "customer_id", "the invoice's account, by billing id"),
    ),
)


@dataclass(frozen=True)
class LineRecord:
    """An invoice line with what it needs of its invoice (lines are rows of their own in Dataverse)."""

    line: InvoiceLine
    invoice_number: str
    version: int

    def __getattr__(self, name: str) -> Any:
        return getattr(self.line, name)


LINE_MAP = EntityMap(
    name="invoice lines",
    table=INVOICE_LINES,
    key=Column("bcs_billinglineid", "id", description="billing line id (alternate key)"),
    columns=(
        Column("lineitemnumber", "position", "integer"),
        Column("productdescription", "description"),
        Column("bcs_productcode", "product_code"),
        Column("quantity", "quantity", "money", description="decimal quantity, at least 0"),
        Column("priceperunit", "unit_price", "money"),
        Column("extendedamount", "amount", "money"),
    ),
    lookups=(Lookup("invoiceid", INVOICES, "invoicenumber", "invoice_number", "the line's invoice, by number"),),
)
MAPS: tuple[EntityMap, ...] = (CUSTOMER_MAP, INVOICE_MAP, LINE_MAP)


def customer_row(customer: Customer) -> UpsertRow:
    return CUSTOMER_MAP.to_row(customer)


def invoice_rows(invoice: Invoice) -> tuple[UpsertRow, list[UpsertRow]]:
    """The invoice's row and one row per line (lines removed at the source are the caller's to delete)."""
    lines = [LINE_MAP.to_row(LineRecord(line, invoice.number, invoice.version)) for line in invoice.lines]
    return INVOICE_MAP.to_row(invoice), lines


def content_hash(rows: Sequence[UpsertRow]) -> str:
    """A stable hash of what the sync would write: mapped, billing-owned values only (source version excluded,
    so that a version bump that changes nothing the CRM shows is not a write)."""
    payload = [
        {
            "key": dict(sorted(r.key.items())),
            "values": {
                k: v for k, v in sorted(r.values.items()) if k not in ("bcs_sourceversion", "bcs_sourceupdatedon")
            },
        }
        for r in rows
    ]
    text = json.dumps(payload, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        # as the float it was hashed as before amounts stayed exact (so upgrading rewrites nothing), unless the
        # float would lose digits: then the exact text, so that a change beyond a float's digits still counts
        as_float = float(value)
        return as_float if Decimal(repr(as_float)) == value else str(value)
    if isinstance(value, date | datetime):
        return str(value)
    raise TypeError(type(value).__name__)


def _reconcile_rule(column: Column) -> str:
    """How reconcile compares the column (`shared/reconcile/compare.py`), in the dictionary's words."""
    if column.owner != "billing" or column.source is None:
        return "not compared"
    if column.column in ("bcs_sourceversion", "bcs_sourceupdatedon"):
        return "tells a stale row"
    rule = {"money": f"to the cent, ±{column.tolerance}", "utc datetime": "in UTC, to the second", "date": "the day",
            "integer": "as a whole number"}  # fmt: skip
    parts = [rule.get(column.transform, "trimmed, null = empty")]
    parts += (
        ["case-folded"] * column.casefold
        + ["amount over/under"] * column.amount
        + ["masked in reports"] * column.personal
    )
    return "; ".join(parts)


def render_markdown() -> str:
    """docs/data-dictionary.md, generated from the maps above."""
    out = [
        "# Data dictionary",
        "",
        "Generated from `shared/mapping.py` by `python -m sandbox data-dictionary --write`; a test fails when this",
        "file is stale. The sync writes only the columns billing owns; columns sales own are listed so nobody wonders.",
        "The reconcile column says how reconcile compares each column with billing (`shared/reconcile/compare.py`).",
        "",
    ]
    for m in MAPS:
        out += [
            f"## {m.name} → `{m.table.logical_name}` (`{m.table.entity_set}`)",
            "",
            f"Alternate key: `{m.key.column}` ← `{m.key.source}`. "
            + ("Written with `UpsertMultiple`." if m.table.bulk else "Written with `$batch` (no bulk messages)."),
            "",
            "| Dataverse column | billing field | transform | owner | reconcile | notes |",
            "|---|---|---|---|---|---|",
        ]
        for c in (m.key, *m.columns):
            source = f"`{c.source}`" if c.source else "—"
            transform = c.transform if c.source else "—"
            out.append(
                f"| `{c.column}` | {source} | {transform} | {c.owner} | {_reconcile_rule(c)} | {c.description} |"
            )
        for lookup in m.lookups:
            out.append(
                f"| `{lookup.navigation}@odata.bind` | `{lookup.source}` | lookup to `{lookup.target.entity_set}` by "
                f"`{lookup.target_key}` | billing | — | {lookup.description} |"
            )
        out.append("")
    out += ["## Transforms", "", "| transform | what the CRM receives |", "|---|---|"]
    out += [f"| {name} | {TRANSFORM_NOTES[name]} |" for name in TRANSFORMS]
    out.append("")
    return "\n".join(out)
