"""A reconcile run's report, written once its batches have all ended (by the fan-out tick's housekeeping).

- The run's CSV, `reconcile/<yyyy-mm-dd>-<run>.csv` in the blob container `reports` (`SYNC_TABLE_PREFIX` before
  it): a header row, one row per mismatch the run found (a record in two categories is two rows), ISO times, a
  decimal point, UTF-8 with a byte-order mark and CRLF line ends, so Excel opens it as it is. A text cell Excel
  would take for a formula (`=`, `+`, `-`, `@`, a tab, a carriage return) or that starts with `'` gets a leading
  `'`: CRM values are typed by people, and a report must not run what they typed (CSV injection). `read_csv` takes
  the `'` off again.
- On the first run of a month, the previous month's roll-up, `reconcile/monthly-<yyyy-mm>.csv`: per category (and
  currency, for the amount categories) the mismatches first seen that month, how many are resolved and still open,
  the amount difference summed, and the median time to resolution.
- The run's row in `reconcileruns` gains its totals (so `GET /api/reconcile/latest` and the report page read one row,
  not every batch's), `completed_at`, the columns that mismatched most, the median time to resolution over the 30
  days before, and the report's blob name.

A run whose batches have not all ended 12 hours after it started (a batch dead-lettered as poison never writes its
row) is closed as `incomplete`, and its report says how many batches ended.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import statistics
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.data.tables import UpdateMode
from azure.storage.blob import ContentSettings

from shared import clock, logs, state
from shared.odata import literal
from shared.reconcile import start
from shared.reconcile.compare import CATEGORIES
from shared.reconcile.findings import MISMATCHES, RUNS
from shared.runtime import Runtime

log = logs.get_logger("shared.reconcile")
CONTAINER: Final = "reports"  # after SYNC_TABLE_PREFIX, lower-cased (a container name's rule)
RUN_HEADER: Final = (
    "run_id",
    "entity",
    "record_id",
    "category",
    "columns",
    "billing_value",
    "crm_value",
    "difference",
    "currency",
    "first_seen",
    "last_seen",
    "resolved_at",
    "attempts",
    "in_dlq",
)
MONTH_HEADER: Final = (
    "month",
    "category",
    "currency",
    "mismatches",
    "resolved",
    "open",
    "amount_difference",
    "median_hours_to_resolution",
)
NUMBERS: Final = frozenset(
    {"difference", "attempts", "mismatches", "resolved", "open", "amount_difference", "median_hours_to_resolution"}
)
FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r", "'")
INCOMPLETE_AFTER: Final = timedelta(hours=12)
RESOLUTION_WINDOW: Final = timedelta(days=30)
TOP_COLUMNS: Final = 10
SEPARATOR: Final = " | "
BLOB_NAME: Final = re.compile(r"reconcile/[0-9A-Za-z][0-9A-Za-z._-]{0,150}\.csv")


# ---- CSV ----


def _cell(name: str, value: Any) -> str:
    text = "" if value is None else str(value)
    if name not in NUMBERS and text.startswith(FORMULA_START):
        return "'" + text
    return text


def to_csv(header: Sequence[str], rows: Iterable[dict[str, Any]]) -> bytes:
    """CSV as Excel opens it cleanly: UTF-8 with a byte-order mark, CRLF, quoted where needed, formulas defused."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(name, row.get(name)) for name in header])
    return ("\ufeff" + out.getvalue()).encode("utf-8")


def read_csv(data: bytes) -> list[dict[str, str]]:
    """The rows of a CSV `to_csv` wrote, as they were given (the defusing `'` taken off)."""
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline=""))
    return [{k: v[1:] if k not in NUMBERS and v.startswith("'") else v for k, v in row.items()} for row in reader]


# ---- what goes in ----


@dataclass(frozen=True)
class Finding:
    category: str
    columns: tuple[str, ...]
    billing: tuple[str, ...]
    crm: tuple[str, ...]
    difference: str
    currency: str


def findings_of(row: dict[str, Any]) -> list[Finding]:
    """A `mismatches` row's findings, from its `detail` (or, where that was cut, its categories and columns)."""
    try:
        entries = json.loads(str(row.get("detail") or "[]"))
        found = [
            Finding(str(e[0]), tuple(e[1]), tuple(e[2]), tuple(e[3]), *(str(x) for x in [*e[4:6], "", ""][:2]))
            for e in entries
        ]
        if found:
            return found
    except (ValueError, TypeError, IndexError):
        pass
    columns = tuple(c for c in str(row.get("columns") or "").split(",") if c)
    difference, currency = str(row.get("difference") or ""), str(row.get("currency") or "")
    out = []
    for category in (c for c in str(row.get("categories") or "").split(",") if c):
        amount = category.startswith("amount_") and bool(difference)
        out.append(Finding(category, columns, (), (), difference if amount else "", currency if amount else ""))
    return out


def finding_rows(run_id: str, rows: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    """One CSV row per finding, by entity and record."""
    out: list[dict[str, str]] = []
    for row in sorted(rows, key=lambda r: (str(r["PartitionKey"]), str(r.get("record_id") or ""))):
        for f in findings_of(row):
            out.append(
                {
                    "run_id": run_id,
                    "entity": str(row["PartitionKey"]),
                    "record_id": str(row.get("record_id") or ""),
                    "category": f.category,
                    "columns": SEPARATOR.join(f.columns),
                    "billing_value": SEPARATOR.join(f.billing),
                    "crm_value": SEPARATOR.join(f.crm),
                    "difference": f.difference,
                    "currency": f.currency,
                    "first_seen": str(row.get("first_seen") or ""),
                    "last_seen": str(row.get("last_seen") or ""),
                    "resolved_at": str(row.get("resolved_at") or ""),
                    "attempts": str(row.get("attempts") or 0),
                    "in_dlq": str(row.get("in_dlq") or ""),
                }
            )
    return out


def _hours(first_seen: str, resolved_at: str) -> float | None:
    try:
        seconds = (clock.parse_iso(resolved_at) - clock.parse_iso(first_seen)).total_seconds()
    except ValueError:
        return None
    return max(0.0, seconds) / 3600


def median_hours(rows: Iterable[dict[str, Any]]) -> float | None:
    """The median time from first seen to resolved, in hours, over the resolved rows among `rows`."""
    hours = [
        h
        for r in rows
        if r.get("resolved_at")
        if (h := _hours(str(r.get("first_seen") or ""), str(r["resolved_at"]))) is not None
    ]
    return round(statistics.median(hours), 3) if hours else None


def rollup(month: str, rows: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    """The month's roll-up over the `mismatches` rows first seen in it: a row per category (and currency)."""
    groups: dict[tuple[str, str], list[tuple[dict[str, Any], Finding]]] = {}
    for row in rows:
        for f in findings_of(row):
            groups.setdefault((f.category, f.currency if f.difference else ""), []).append((row, f))
    order: dict[str, int] = {c: i for i, c in enumerate(CATEGORIES)}
    out = []
    for (category, currency), members in sorted(groups.items(), key=lambda g: (order.get(g[0][0], 99), g[0][1])):
        resolved = [r for r, _ in members if r.get("resolved_at")]
        amounts = [_decimal(f.difference) for _, f in members if f.difference]
        median = median_hours(resolved)
        out.append(
            {
                "month": month,
                "category": category,
                "currency": currency,
                "mismatches": str(len(members)),
                "resolved": str(len(resolved)),
                "open": str(len(members) - len(resolved)),
                "amount_difference": str(sum(amounts, Decimal("0.00"))) if amounts else "",
                "median_hours_to_resolution": "" if median is None else f"{median:.3f}",
            }
        )
    return out


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        return Decimal(0)


def top_columns(rows: Iterable[dict[str, str]], limit: int = TOP_COLUMNS) -> list[tuple[str, int]]:
    """The columns named most often in a run's findings (`entity.column`), most first."""
    counts = Counter(
        f"{r['entity']}.{c}"
        for r in rows
        for c in r["columns"].split(SEPARATOR)
        if c and r["category"] != "orphan_in_crm"
    )
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]


# ---- names ----


def container(runtime: Runtime) -> str:
    return (runtime.settings.table_prefix + CONTAINER).lower()


def run_blob(run_id: str, started_at: str) -> str:
    day = started_at[:10] if re.fullmatch(r"\d{4}-\d{2}-\d{2}", started_at[:10]) else clock.iso(clock.utcnow())[:10]
    return f"reconcile/{day}-{state.row_key(run_id)}.csv"


def month_blob(month: str) -> str:
    return f"reconcile/monthly-{month}.csv"


def previous_month(moment: datetime) -> str:
    first = moment.replace(day=1)
    return (first - timedelta(days=1)).strftime("%Y-%m")


# ---- writing ----


async def write_pending(runtime: Runtime) -> list[str]:
    """Finish the newest runs whose batches have all ended (or that waited too long): their totals, their CSV and, on
    the first run of a month, last month's roll-up. The blob names written."""
    table = await runtime.tables.table(RUNS)
    written: list[str] = []
    looked = 0
    async for row in table.query_entities("PartitionKey eq 'run'", results_per_page=start.LOOK_BACK):
        looked += 1
        if not row.get("completed_at") and row.get("status") in ("listed", "short"):
            summary = await start.summary_of(table, dict(row))
            if summary["complete"] or _waited_too_long(row):
                written += await finish(runtime, dict(row), summary)
        if looked >= start.LOOK_BACK:
            break
    return written


def _waited_too_long(row: Any) -> bool:
    try:
        return clock.utcnow() - clock.parse_iso(str(row.get("started_at"))) > INCOMPLETE_AFTER
    except ValueError:
        return True


async def finish(runtime: Runtime, run: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    """Write the run's report and totals. Idempotent: a second call rewrites the same report."""
    run_id = str(run["RowKey"])
    now = clock.utcnow()
    found = [r async for r in _rows(runtime, f"last_run eq {literal(run_id)}")]
    rows = finding_rows(run_id, found)
    since = clock.iso(now - RESOLUTION_WINDOW)
    resolved = [r async for r in _rows(runtime, f"resolved_at ge {literal(since)}", ["first_seen", "resolved_at"])]
    name = run_blob(run_id, str(run.get("started_at") or ""))
    await _upload(runtime, name, to_csv(RUN_HEADER, rows))
    written = [name]
    month = previous_month(_started(run, now))
    if not await _exists(runtime, month_blob(month)):
        written.append(await write_month(runtime, month))
    median = median_hours(resolved)
    values = {
        "PartitionKey": "run",
        "RowKey": state.row_key(run_id),
        "completed_at": clock.iso(now),
        "outcome": "complete" if summary["complete"] else "incomplete",
        "batches_done": summary["batches_done"],
        "totals": json.dumps(summary["entities"]),
        "top_columns": json.dumps(top_columns(rows)),
        "median_hours_to_resolution": -1.0 if median is None else median,
        "report": name,
        "report_rows": len(rows),
    }
    table = await runtime.tables.table(RUNS)
    await table.upsert_entity(values, mode=UpdateMode.MERGE)
    log.info(
        "reconcile run %s: report %s (%d rows)%s",
        run_id,
        name,
        len(rows),
        "" if summary["complete"] else f"; closed incomplete after {INCOMPLETE_AFTER}",
    )
    return written


def _started(run: dict[str, Any], default: datetime) -> datetime:
    try:
        return clock.parse_iso(str(run.get("started_at")))
    except ValueError:
        return default


async def write_month(runtime: Runtime, month: str) -> str:
    """`month` (`yyyy-mm`)'s roll-up over the mismatches first seen in it."""
    start_at = f"{month}-01T00:00:00"
    year, number = (int(part) for part in month.split("-"))
    end_at = f"{year + number // 12:04d}-{number % 12 + 1:02d}-01T00:00:00"
    query = f"first_seen ge {literal(start_at)} and first_seen lt {literal(end_at)}"
    rows = [r async for r in _rows(runtime, query)]
    name = month_blob(month)
    await _upload(runtime, name, to_csv(MONTH_HEADER, rollup(month, rows)))
    return name


async def _rows(runtime: Runtime, query: str, select: list[str] | None = None) -> AsyncIterator[dict[str, Any]]:
    table = await runtime.tables.table(MISMATCHES)
    async for row in table.query_entities(query, select=select):
        yield dict(row)


async def _upload(runtime: Runtime, name: str, data: bytes) -> None:
    client = runtime.blobs.get_container_client(container(runtime))
    with contextlib.suppress(ResourceExistsError):
        await client.create_container()
    settings = ContentSettings(
        content_type="text/csv; charset=utf-8", content_disposition=f'attachment; filename="{name.rsplit("/", 1)[-1]}"'
    )
    await client.upload_blob(name, data, overwrite=True, content_settings=settings)


async def _exists(runtime: Runtime, name: str) -> bool:
    try:
        await runtime.blobs.get_blob_client(container(runtime), name).get_blob_properties()
    except ResourceNotFoundError:
        return False
    return True


async def download(runtime: Runtime, name: str) -> bytes | None:
    """A report's bytes by blob name (`reconcile/...csv`), or None."""
    if not BLOB_NAME.fullmatch(name):
        return None
    try:
        stream = await runtime.blobs.get_blob_client(container(runtime), name).download_blob()
    except ResourceNotFoundError:
        return None
    return bytes(await stream.readall())


async def listing(runtime: Runtime, prefix: str = "reconcile/monthly-") -> list[str]:
    """Report names under `prefix`, newest first."""
    client = runtime.blobs.get_container_client(container(runtime))
    names: list[str] = []
    try:
        async for blob in client.list_blobs(name_starts_with=prefix):
            names.append(str(blob.name))
    except ResourceNotFoundError:
        return []
    return sorted(names, reverse=True)
