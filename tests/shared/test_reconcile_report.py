"""A reconcile run's report (`shared.reconcile.report`): the CSV Excel opens (round trip, formulas defused), the
monthly roll-up, and the fan-out tick's housekeeping writing both to blob storage (Azurite) once a run has ended."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from typing import Any

import pytest
from azure.data.tables import UpdateMode
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import clock, state
from shared.reconcile import report, start
from shared.reconcile.findings import MISMATCHES, RUNS
from shared.runtime import Runtime
from tests.shared.runtimes import runtime_for

pytestmark = pytest.mark.anyio
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
NUMBER = st.decimals(min_value=-(10**9), max_value=10**9, places=2, allow_nan=False).map(str) | st.just("")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.fixed_dictionaries({name: NUMBER if name in report.NUMBERS else TEXT
                                       for name in report.RUN_HEADER}), max_size=6))  # fmt: skip
def test_a_report_csv_reads_back_as_written_and_no_text_cell_starts_a_formula(rows: list[dict[str, str]]) -> None:
    data = report.to_csv(report.RUN_HEADER, rows)
    assert data.startswith("\ufeff".encode())  # Excel reads UTF-8 only with the byte-order mark
    assert report.read_csv(data) == rows
    raw = list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))
    assert raw[0] == list(report.RUN_HEADER)
    for line in raw[1:]:
        for name, cell in zip(report.RUN_HEADER, line, strict=True):
            if name not in report.NUMBERS:
                assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (name, cell)


def test_a_report_csv_has_crlf_line_ends_and_a_decimal_point() -> None:
    rows = [{"run_id": "r1", "entity": "invoices", "record_id": "in_1", "category": "amount_over",
             "difference": "10.50", "currency": "EUR", "billing_value": "=HYPERLINK(\"x\")"}]  # fmt: skip
    data = report.to_csv(report.RUN_HEADER, rows).decode("utf-8-sig")
    assert data.count("\r\n") == 2
    assert "\n" not in data.replace("\r\n", "")
    assert ",10.50,EUR," in data
    assert "'=HYPERLINK" in data  # shown as text in Excel, never run


def mismatch_row(entity: str, record_id: str, findings: list[list[Any]], *, first_seen: str, resolved_at: str = "",
                 last_run: str = "run-1") -> dict[str, Any]:  # fmt: skip
    return {
        "PartitionKey": entity, "RowKey": state.row_key(record_id), "record_id": record_id,
        "categories": ",".join(sorted({f[0] for f in findings})),
        "columns": ",".join(c for f in findings for c in f[1]),
        "detail": json.dumps(findings), "first_seen": first_seen, "last_seen": first_seen, "resolved_at": resolved_at,
        "attempts": 1, "last_run": last_run, "in_dlq": "",
    }  # fmt: skip


def test_the_monthly_roll_up_counts_sums_by_currency_and_takes_the_median_time_to_resolution() -> None:
    rows = [
        mismatch_row("invoices", "in_1", [["amount_over", ["totalamount"], ["100.00"], ["110.00"], "10.00", "EUR"]],
                     first_seen="2026-11-02T00:00:00.000000Z", resolved_at="2026-11-02T02:00:00.000000Z"),
        mismatch_row("invoices", "in_2", [["amount_over", ["totalamount"], ["5.00"], ["7.50"], "2.50", "EUR"]],
                     first_seen="2026-11-03T00:00:00.000000Z", resolved_at="2026-11-03T06:00:00.000000Z"),
        mismatch_row("invoices", "in_3", [["amount_over", ["totalamount"], ["1.00"], ["2.00"], "1.00", "USD"]],
                     first_seen="2026-11-04T00:00:00.000000Z"),
        mismatch_row("customers", "cus_1", [["field_mismatch", ["emailaddress1"], ["a***"], ["b***"], "", ""]],
                     first_seen="2026-11-05T00:00:00.000000Z", resolved_at="2026-11-06T00:00:00.000000Z"),
        mismatch_row("invoices", "in_4", [["amount_under", ["bcs_amountdue"], ["9.00"], ["8.00"], "-1.00", "EUR"],
                                          ["lines_missing", ["lines"], [], [], "", ""]],
                     first_seen="2026-11-07T00:00:00.000000Z"),
    ]  # fmt: skip
    got = {(r["category"], r["currency"]): r for r in report.rollup("2026-11", rows)}
    assert list(got) == [("amount_over", "EUR"), ("amount_over", "USD"), ("amount_under", "EUR"),
                         ("field_mismatch", ""), ("lines_missing", "")]  # fmt: skip
    eur = got[("amount_over", "EUR")]
    assert (eur["mismatches"], eur["resolved"], eur["open"], eur["amount_difference"]) == ("2", "2", "0", "12.50")
    assert eur["median_hours_to_resolution"] == "4.000"  # 2 h and 6 h
    usd = got[("amount_over", "USD")]
    assert (usd["open"], usd["median_hours_to_resolution"]) == ("1", "")
    assert got[("amount_under", "EUR")]["amount_difference"] == "-1.00"
    assert got[("field_mismatch", "")]["median_hours_to_resolution"] == "24.000"


def test_a_detail_cut_short_still_gives_its_categories_and_columns() -> None:
    row = mismatch_row("invoices", "in_9", [], first_seen="2026-11-02T00:00:00Z")
    row.update(detail='[["amount_over", ["totalamount"], ["1', categories="amount_over,field_mismatch",
               columns="totalamount,name", difference="3.00", currency="EUR")  # fmt: skip
    found = report.findings_of(row)
    assert [(f.category, f.difference, f.currency) for f in found] == [("amount_over", "3.00", "EUR"),
                                                                       ("field_mismatch", "", "")]  # fmt: skip
    assert found[0].columns == ("totalamount", "name")


async def seed_run(runtime: Runtime, run_id: str, *, started_at: str, batches: int, messages: int) -> None:
    runs = await runtime.tables.table(RUNS)
    await runs.upsert_entity({"PartitionKey": "run", "RowKey": run_id, "status": "listed", "messages": messages,
                              "started_at": started_at, "dry_run": False})  # fmt: skip
    for n in range(batches):
        await runs.upsert_entity({"PartitionKey": run_id, "RowKey": f"b{n}", "entity": "invoices", "compared": 50,
                                  "mismatched": 1 if n == 0 else 0, "n_amount_over": 1 if n == 0 else 0})  # fmt: skip


async def test_the_tick_writes_an_ended_runs_csv_totals_and_last_months_roll_up_once(conn: str) -> None:
    async with runtime_for(conn) as runtime:
        run_id = "7999999999999-reconcile-aaaaaa"
        await seed_run(runtime, run_id, started_at="2026-12-01T02:00:00.000000Z", batches=2, messages=2)
        table = await runtime.tables.table(MISMATCHES)
        rows = [
            mismatch_row("invoices", "in_1", [["amount_over", ["totalamount"], ["1.00"], ["=2+3"], "1.00", "EUR"]],
                         first_seen="2026-11-30T23:00:00.000000Z", last_run=run_id),
            mismatch_row("invoices", "in_0", [["lines_extra", ["lines"], [], ["li_x"], "", ""]],
                         first_seen="2026-10-30T23:00:00.000000Z", last_run="older-run"),
        ]  # fmt: skip
        for row in rows:
            await table.upsert_entity(row, mode=UpdateMode.REPLACE)

        written = await report.write_pending(runtime)
        name = f"reconcile/2026-12-01-{run_id}.csv"
        assert written == [name, "reconcile/monthly-2026-11.csv"]
        csv_rows = report.read_csv(await report.download(runtime, name) or b"")
        assert [(r["record_id"], r["category"], r["crm_value"], r["difference"]) for r in csv_rows] == [
            ("in_1", "amount_over", "=2+3", "1.00")
        ]  # only what this run found; the CRM's "=2+3" defused in the file, read back as it was
        month = report.read_csv(await report.download(runtime, "reconcile/monthly-2026-11.csv") or b"")
        assert [(r["category"], r["mismatches"], r["amount_difference"]) for r in month] == [
            ("amount_over", "1", "1.00")
        ]
        summary = await start.summary(runtime, run_id)
        assert summary is not None
        assert (summary["report"], summary["report_rows"], summary["complete"]) == (name, 1, True)
        assert summary["entities"]["invoices"]["compared"] == 100
        assert summary["top_columns"] == [["invoices.totalamount", 1]]
        assert await report.write_pending(runtime) == []  # once: the run is finished
        assert await report.listing(runtime) == ["reconcile/monthly-2026-11.csv"]


async def test_a_run_whose_batches_never_all_end_is_closed_incomplete_after_twelve_hours(conn: str) -> None:
    async with runtime_for(conn) as runtime:
        recent = clock.iso(clock.utcnow() - timedelta(hours=1))
        await seed_run(runtime, "7999999999998-reconcile-bbbbbb", started_at=recent, batches=1, messages=3)
        assert await report.write_pending(runtime) == []  # still waiting for its batches
        old = clock.iso(clock.utcnow() - timedelta(hours=13))
        await seed_run(runtime, "7999999999999-reconcile-cccccc", started_at=old, batches=1, messages=3)
        written = await report.write_pending(runtime)
        assert written[0] == f"reconcile/{old[:10]}-7999999999999-reconcile-cccccc.csv"
        summary = await start.summary(runtime, "7999999999999-reconcile-cccccc")
        assert summary is not None
        assert summary["complete"] is False
        assert summary["completed_at"]
        assert summary["batches_done"] == 1


def test_the_page_escapes_what_it_shows_and_says_when_there_is_no_run_yet() -> None:
    from collections import Counter  # noqa: PLC0415

    from shared.reconcile import page  # noqa: PLC0415

    empty = page.render(None, [], Counter(), [])
    assert "No reconcile run yet" in empty
    assert "The DLQ holds no open row" in empty
    hostile = "<script>alert(1)</script>"
    run = {"run_id": hostile, "started_at": "2026-12-02T02:00:00Z", "complete": True, "completed_at": "x",
           "entities": {"invoices": {"compared": 10, "mismatched": 1, "drift": 0.1, "new": 1, "resolved": 0,
                                     "healed": 1, "persistent": 0, "crm_requests": 2,
                                     "categories": {"amount_over": 1}}},
           "top_columns": [[hostile, 1]], "report": f"reconcile/{hostile}.csv", "report_rows": 1}  # fmt: skip
    html = page.render(run, [run], Counter({hostile: 2}), [], key="k'ey")
    assert "<script>" not in html
    assert html.count("&lt;script&gt;") >= 4  # run id, column, DLQ reason, report name
    assert "code=k%27ey" in html  # the function key carried on in the links, URL-encoded


def test_the_median_time_to_resolution_passes_over_rows_it_cannot_read() -> None:
    rows = [{"resolved_at": "2026-11-02T02:00:00Z"}, {"first_seen": "bad", "resolved_at": "2026-11-02T02:00:00Z"},
            {"first_seen": "2026-11-02T00:00:00Z", "resolved_at": "2026-11-02T03:00:00Z"}]  # fmt: skip
    assert report.median_hours(rows) == 3.0
