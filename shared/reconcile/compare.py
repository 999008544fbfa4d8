"""What reconcile finds when it holds a billing record and the CRM's rows for it: pure, no I/O.

Comparison is the data dictionary's (`shared.mapping`): only billing-owned columns, each normalised as its column
declares (text trimmed, a null equal to an empty string, case folded where the column says so, money rounded to the
cent and compared within the column's tolerance, datetimes in UTC to the second, dates as `YYYY-MM-DD`), and invoice
lines compared as a set per invoice. The source version and update time are not compared as values: a billing
version that changes nothing the CRM shows is not written (`mapping.content_hash`), so they only tell a stale row
(the CRM holds an older version, and it shows) from a row someone edited.

Each finding is a `Mismatch` in one category, naming the record and the columns:

| category | the CRM ... |
|---|---|
| `missing_in_crm` | has no row with the record's key |
| `duplicate_in_crm` | has more than one row with the record's key |
| `stale` | holds an older source version, and its values show it |
| `amount_over` / `amount_under` | shows more / less than billing in an amount column (difference and currency) |
| `field_mismatch` | shows another value in other billing-owned columns (an invoice's lines included) |
| `lines_missing` / `lines_extra` | lacks lines billing has / holds lines billing does not |
| `orphan_in_crm` | holds a billing key billing no longer has (found by paging the CRM's keys) |
| `invalid_in_billing` | cannot be compared: the billing record breaks the contract (it is in the DLQ) |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Final, Literal

from shared.dataverse.client import UpsertRow
from shared.mapping import CUSTOMER_MAP, INVOICE_MAP, LINE_MAP, Column, EntityMap
from shared.redact import mask, printable

Category = Literal[
    "missing_in_crm", "duplicate_in_crm", "stale", "amount_over", "amount_under", "field_mismatch", "lines_missing",
    "lines_extra", "orphan_in_crm", "invalid_in_billing",
]  # fmt: skip
CATEGORIES: Final[tuple[Category, ...]] = (
    "missing_in_crm", "duplicate_in_crm", "stale", "amount_over", "amount_under", "field_mismatch", "lines_missing",
    "lines_extra", "orphan_in_crm", "invalid_in_billing",
)  # fmt: skip
VERSION: Final = "bcs_sourceversion"
AS_OF_LAST_WRITE: Final = frozenset({VERSION, "bcs_sourceupdatedon"})
CENT: Final = Decimal("0.01")
MAPS: Final[dict[str, EntityMap]] = {"customers": CUSTOMER_MAP, "invoices": INVOICE_MAP}
MAX_SHOWN = 80


@dataclass(frozen=True)
class Mismatch:
    """One finding about one record. `billing` and `crm` are the values as shown to people (masked where the column
    holds personal data), one per column; `difference` is the CRM's amount less billing's."""

    entity: str
    record_id: str
    category: Category
    columns: tuple[str, ...] = ()
    billing: tuple[str, ...] = ()
    crm: tuple[str, ...] = ()
    difference: Decimal | None = None
    currency: str | None = None

    @property
    def healable(self) -> bool:
        """A forced write of billing's record puts it right (orphans, duplicates and invalid records it cannot)."""
        return self.category not in ("orphan_in_crm", "duplicate_in_crm", "invalid_in_billing")


# ---- normalisation ----


def normalise(column: Column, value: Any) -> Any:
    """The value as the comparison sees it. A CRM value that cannot be read as the column's type is kept as text, so
    that it differs from billing's."""
    kind = column.transform if column.source else "text"
    value = value.strip() if isinstance(value, str) else value
    if kind == "money":
        return _cents(value)
    if kind == "integer":
        return _whole(value)
    if kind == "utc datetime":
        return _utc_second(value)
    if kind == "date":
        return _day(value)
    text = "" if value is None else str(value).strip()
    return text.casefold() if column.casefold else text


def _cents(value: Any) -> Decimal | str | None:
    if value is None or value == "":
        return None
    try:
        return Decimal(str(value)).quantize(CENT, rounding=ROUND_HALF_EVEN)
    except (InvalidOperation, ValueError):
        return str(value)


def _whole(value: Any) -> int | str | None:
    if value is None or value == "":
        return None
    try:
        return int(Decimal(str(value)))
    except (InvalidOperation, ValueError):
        return str(value)


def _utc_second(value: Any) -> str | None:
    if value is None or value == "":
        return None
    try:
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _day(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime | date):
        return (value.date() if isinstance(value, datetime) else value).isoformat()
    text = str(value)
    try:
        return date.fromisoformat(text[:10]).isoformat()
    except ValueError:
        return text


def same(column: Column, billing: Any, crm: Any) -> bool:
    ours, theirs = normalise(column, billing), normalise(column, crm)
    if isinstance(ours, Decimal) and isinstance(theirs, Decimal):
        return abs(ours - theirs) <= column.tolerance
    return bool(ours == theirs)


def shown(column: Column, value: Any) -> str:
    """A value as a report shows it: normalised, masked when personal, printable and short."""
    normal = normalise(column, value)
    text = "" if normal is None else str(normal)
    if column.personal and text:
        masked = mask(text)
        text = masked if masked != text else text[:1] + "***"
    return printable(text, MAX_SHOWN)


# ---- one record ----


def differing(entity_map: EntityMap, expected: UpsertRow, actual: Mapping[str, Any]) -> list[Column]:
    """The billing-owned columns whose CRM value is not billing's (the version columns aside)."""
    return [
        c
        for c in entity_map.owned
        if c.column not in AS_OF_LAST_WRITE and not same(c, expected.values.get(c.column), actual.get(c.column))
    ]


def compare(
    entity: str,
    record_id: str,
    expected: UpsertRow,
    crm_rows: Sequence[Mapping[str, Any]],
    *,
    lines: tuple[Sequence[UpsertRow], Sequence[Mapping[str, Any]]] | None = None,
) -> list[Mismatch]:
    """The findings for one billing record: `expected` is its row as the sync would write it, `crm_rows` the CRM's
    rows with its key, and for an invoice `lines` its expected line rows and the CRM's lines of it."""
    if not crm_rows:
        return [Mismatch(entity, record_id, "missing_in_crm")]
    if len(crm_rows) > 1:
        return [Mismatch(entity, record_id, "duplicate_in_crm", billing=(str(len(crm_rows)),))]
    entity_map, actual = MAPS[entity], crm_rows[0]
    columns = differing(entity_map, expected, actual)
    found: list[Mismatch] = []
    if lines is not None:
        found += _lines(record_id, *lines)
    if not columns and not any(m.category == "field_mismatch" for m in found):
        return found
    if _older(actual.get(VERSION), expected.values.get(VERSION)):
        names = tuple(c.column for c in columns) + tuple(n for m in found for n in m.columns)
        return [_values(Mismatch(entity, record_id, "stale"), columns, expected, actual, names=names)]
    return found + _by_kind(entity, record_id, columns, expected, actual)


def _older(crm_version: Any, billing_version: Any) -> bool:
    crm, billing = _whole(crm_version), _whole(billing_version)
    return isinstance(billing, int) and (crm is None or (isinstance(crm, int) and crm < billing))


def _by_kind(
    entity: str, record_id: str, columns: list[Column], expected: UpsertRow, actual: Mapping[str, Any]
) -> list[Mismatch]:
    out: list[Mismatch] = []
    currency = str(expected.values.get("bcs_currencycode") or "") or None
    for column in (c for c in columns if c.amount):
        ours = normalise(column, expected.values.get(column.column))
        theirs = normalise(column, actual.get(column.column))
        if isinstance(ours, Decimal) and isinstance(theirs, Decimal):
            category: Category = "amount_over" if theirs > ours else "amount_under"
            head = Mismatch(entity, record_id, category, difference=theirs - ours, currency=currency)
            out.append(_values(head, [column], expected, actual))
    plain = [c for c in columns if not (c.amount and any(c.column in m.columns for m in out))]
    if plain:
        out.append(_values(Mismatch(entity, record_id, "field_mismatch"), plain, expected, actual))
    return out


def _values(
    head: Mismatch,
    columns: Sequence[Column],
    expected: UpsertRow,
    actual: Mapping[str, Any],
    *,
    names: tuple[str, ...] = (),
) -> Mismatch:
    """`head` with the columns named and both sides' values shown."""
    return replace(
        head,
        columns=names or tuple(c.column for c in columns),
        billing=tuple(shown(c, expected.values.get(c.column)) for c in columns),
        crm=tuple(shown(c, actual.get(c.column)) for c in columns),
    )


def _lines(invoice_id: str, expected: Sequence[UpsertRow], crm: Sequence[Mapping[str, Any]]) -> list[Mismatch]:
    """An invoice's lines as a set: missing, extra, and lines on both sides whose values differ."""
    key = LINE_MAP.key.column
    ours = {str(row.key[key]): row for row in expected}
    theirs = {str(row.get(key)): row for row in crm if row.get(key) is not None}
    out: list[Mismatch] = []
    if missing := sorted(set(ours) - set(theirs)):
        out.append(Mismatch("invoices", invoice_id, "lines_missing", columns=tuple(missing)))
    if extra := sorted(set(theirs) - set(ours)):
        out.append(Mismatch("invoices", invoice_id, "lines_extra", columns=tuple(extra)))
    columns, billing, crm_values = [], [], []
    for line_id in sorted(set(ours) & set(theirs)):
        for column in differing(LINE_MAP, ours[line_id], theirs[line_id]):
            columns.append(f"lines.{line_id}.{column.column}")
            billing.append(shown(column, ours[line_id].values.get(column.column)))
            crm_values.append(shown(column, theirs[line_id].get(column.column)))
    if columns:
        out.append(
            Mismatch("invoices", invoice_id, "field_mismatch", tuple(columns), tuple(billing), tuple(crm_values))
        )
    return out


def orphans(entity: str, crm_keys: Sequence[str], billing_ids: set[str]) -> list[Mismatch]:
    """CRM rows carrying a billing key that billing does not have."""
    return [Mismatch(entity, key, "orphan_in_crm") for key in crm_keys if key not in billing_ids]
