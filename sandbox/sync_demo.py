"""`python -m sandbox demo`: the product end to end on this machine, to a summary and a verdict.

1. starts Azurite, the billing simulator (seeded with N invoices, N/4 customers), the Dataverse simulator and the
   local host running `function_app.py`, all with the chosen fault profile;
2. pre-seeds the CRM with a drifted copy of about 12 % of the accounts, as the manual audits found them: stale
   contacts, old prices, missing lines, a line billing has since removed, and notes that sales wrote;
3. runs a full sync (fan-out ticks until the listing is complete, then the queue drains);
4. changes 1 % of the records in billing, stops the background changes, and runs an incremental sync;
5. edits the CRM by hand (an amount raised, an email changed, a line deleted) and runs production reconcile
   through the app twice (`sandbox.reconcile_demo`): the first run finds each edit by name and heals it, the
   second finds them gone;
6. checks the CRM against billing record by record (`sandbox.crm_check`, the independent check) and exits 0 only
   if they agree and reconcile found and healed every edit.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from opentelemetry import metrics as otel_metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricReader, PeriodicExportingMetricReader
from rich.console import Console
from rich.live import Live
from rich.table import Table

from sandbox.billing_sim.store import to_api
from sandbox.crm_check import CheckReport, CrmCheck
from sandbox.dataverse_sim.schema import TABLES
from sandbox.metrics_file import CustomMetricsFileExporter
from sandbox.platform import Platform, PlatformOptions, platform
from sandbox.reconcile_demo import ReconcileDemo, reconcile_phase
from shared import dlq, state
from shared.billing.models import Customer, Invoice, parse_record
from shared.mapping import customer_row, invoice_rows
from shared.runtime import Runtime, get_runtime
from shared.telemetry import RECORDS

_READER: InMemoryMetricReader | None = None
_PROVIDER: MeterProvider | None = None
FILE_EXPORT_INTERVAL_MS = 5_000


def metric_reader(metrics_file: Path | None = None) -> InMemoryMetricReader:
    """One in-memory reader for the process (a global meter provider can be set once), and with `metrics_file`
    a file exporter that writes the rows Application Insights would get (`sandbox.metrics_file`)."""
    global _READER, _PROVIDER  # noqa: PLW0603
    if _READER is None:
        _READER = InMemoryMetricReader()
        readers: list[MetricReader] = [_READER]
        if metrics_file is not None:
            exporter = CustomMetricsFileExporter(metrics_file)
            readers.append(PeriodicExportingMetricReader(exporter, export_interval_millis=FILE_EXPORT_INTERVAL_MS))
        _PROVIDER = MeterProvider(metric_readers=readers)
        otel_metrics.set_meter_provider(_PROVIDER)
    elif metrics_file is not None:
        raise RuntimeError("the metrics file must be chosen before the first metric reader is made")
    return _READER


def flush_metrics() -> None:
    """Export what the readers have not exported yet (the file's last rows)."""
    if _PROVIDER is not None:
        _PROVIDER.force_flush()


def metric_points(reader: InMemoryMetricReader) -> dict[str, Counter[tuple[tuple[str, Any], ...]]]:
    """Every metric's current values by attribute set (sums for counters, last value for gauges, count for
    histograms)."""
    out: dict[str, Counter[tuple[tuple[str, Any], ...]]] = {}
    data = reader.get_metrics_data()
    if data is None:
        return out
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                values = out.setdefault(metric.name, Counter())
                for point in metric.data.data_points:
                    attrs = tuple(sorted((point.attributes or {}).items()))
                    value = getattr(point, "value", None)
                    values[attrs] = value if value is not None else getattr(point, "count", 0)
    return out


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    ledger: Counter[str] = field(default_factory=Counter)
    listed: int = 0
    created: int = 0
    billing_requests: int = 0
    dataverse_requests: int = 0


@dataclass
class DemoSummary:
    records: int
    profile: str
    phases: list[Phase]
    invalid_by_reason: dict[str, int]
    deferred_messages: int
    retried: dict[str, int]
    check: CheckReport
    seconds: float
    metrics: dict[str, int]
    reconcile: ReconcileDemo | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "profile": self.profile,
            "seconds": round(self.seconds, 1),
            "phases": [
                {
                    "name": p.name,
                    "seconds": round(p.seconds, 1),
                    "listed": p.listed,
                    "created": p.created,
                    "updated": max(0, p.ledger["written"] - p.created),
                    **dict(p.ledger),
                    "requests": {"billing": p.billing_requests, "dataverse": p.dataverse_requests},
                }
                for p in self.phases
            ],
            "invalid_by_reason": self.invalid_by_reason,
            "deferred_messages": self.deferred_messages,
            "retried": self.retried,
            "check": {
                "ok": self.check.ok,
                "checked": dict(self.check.checked),
                "matched": dict(self.check.matched),
                "excused_by_dlq": dict(self.check.excused),
                "invalid_in_dlq": self.check.invalid_in_dlq,
                "duplicates": self.check.duplicates,
                "sales_columns_kept": self.check.sales_columns_kept,
                "differences": self.check.differences[:50],
            },
            "metrics": self.metrics,
            "reconcile": self.reconcile.as_json() if self.reconcile else None,
        }


# ---- the drifted CRM ----


def preseed_drift(p: Platform, *, share: float = 0.12, seed: int = 1) -> dict[str, str]:
    """Write a drifted copy of `share` of the accounts (and their invoices) straight into the CRM's store, as an
    earlier hand-kept process left them. Returns the sales notes written, by account number."""
    rng = random.Random(f"drift:{seed}")
    store, crm = p.billing.store, p.dataverse.store
    customers = store.all_ids("customers")
    chosen = sorted(rng.sample(customers, max(1, int(len(customers) * share)))) if customers else []
    notes: dict[str, str] = {}
    account, invoice, line_table = TABLES["account"], TABLES["invoice"], TABLES["invoicedetail"]
    for row in store.get_many("customers", chosen):
        record = parse_record("customers", to_api("customers", row))
        if not isinstance(record, Customer):
            continue
        values = dict(customer_row(record).values)
        values.update(emailaddress1="old-contact@example.com", telephone1="+1-555-000-0000")  # stale contacts
        note = f"Key account; renewal call with {record.name[:40]} in Q{rng.randint(1, 4)}"
        values["description"] = note
        crm.write(account, {"accountnumber": record.id}, values)
        notes[record.id] = note
    for raw in _invoices_of(store, set(notes)):
        record = parse_record("invoices", raw)
        if not isinstance(record, Invoice):
            continue
        head, lines = invoice_rows(record)
        values = {k: v for k, v in head.values.items() if not k.endswith("@odata.bind")}
        values["totalamount"] = round(float(values.get("totalamount") or 0) * 0.9, 2)  # old prices
        values["customerid_account@odata.bind"] = f"/accounts(accountnumber='{record.customer_id}')"
        crm.write(invoice, {"invoicenumber": record.number}, {**values, "description": "agreed discount, see email"})
        keep = lines[:-1] if len(lines) > 1 and rng.random() < 0.5 else lines  # missing lines
        for line in keep:
            line_values = {k: v for k, v in line.values.items() if not k.endswith("@odata.bind")}
            line_values["priceperunit"] = round(float(line_values.get("priceperunit") or 0) * 0.8, 2)
            line_values["invoiceid@odata.bind"] = f"/invoices(invoicenumber='{record.number}')"
            crm.write(line_table, {"bcs_billinglineid": str(line.key["bcs_billinglineid"])}, line_values)
        if rng.random() < 0.2:  # a line billing has since removed
            crm.write(
                line_table,
                {"bcs_billinglineid": f"il_removed_{record.id}"},
                {"productdescription": "Legacy seat (removed)", "quantity": 1.0, "priceperunit": 10.0,
                 "extendedamount": 10.0, "invoiceid@odata.bind": f"/invoices(invoicenumber='{record.number}')"},
            )  # fmt: skip
    return notes


def _invoices_of(store: Any, customer_ids: set[str]) -> list[dict[str, Any]]:
    ids = store.all_ids("invoices")
    out = []
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        rows = [r for r in store.get_many("invoices", chunk) if r["customer_id"] in customer_ids]
        lines = store.lines_of([r["id"] for r in rows]) if rows else {}
        out += [to_api("invoices", r, lines.get(r["id"])) for r in rows]
    return out


# ---- running and watching ----


async def ledger_totals(runtime: Runtime, run_ids: list[str]) -> Counter[str]:
    totals: Counter[str] = Counter()
    for run_id in run_ids:
        async for row in state.run_batches(runtime.tables, run_id):
            for key in (*state.BATCH_COUNTS, "poisoned", "ids"):
                totals[key] += int(row.get(key) or 0)
    return totals


def _requests(stats: Any) -> int:
    return sum(sum(codes.values()) for codes in stats.requests.values())


async def _phase(
    p: Platform, name: str, console: Console, reader: InMemoryMetricReader, *, settle: bool = False
) -> Phase:
    phase = Phase(name)
    runtime = await get_runtime(p.host.functions[0].callable.__globals__["SETTINGS"])
    before_runs = {r["RowKey"] for r in await state.recent_runs(runtime.tables, limit=50)}
    before_counts = p.dataverse.store.table_counts()
    before_billing, before_dv = _requests(p.billing.simulator.stats), _requests(p.dataverse.simulator.stats)
    started = time.perf_counter()
    task = asyncio.create_task(p.sync_until_complete(timeout_s=3600, settle=settle))
    with Live(console=console, refresh_per_second=4, transient=True) as live:
        while not task.done():
            live.update(_progress(name, p, reader, time.perf_counter() - started))
            await asyncio.wait({task}, timeout=0.5)
    await task
    phase.seconds = time.perf_counter() - started
    runs = [r for r in await state.recent_runs(runtime.tables, limit=50) if r["RowKey"] not in before_runs]
    phase.listed = sum(int(r.get("listed") or 0) for r in runs)
    phase.ledger = await ledger_totals(runtime, [r["RowKey"] for r in runs])
    after = p.dataverse.store.table_counts()
    phase.created = sum(after[t] - before_counts[t] for t in ("account", "invoice"))
    phase.billing_requests = _requests(p.billing.simulator.stats) - before_billing
    phase.dataverse_requests = _requests(p.dataverse.simulator.stats) - before_dv
    console.print(
        f"[bold]{name}[/]: {phase.listed:,} ids listed, {phase.ledger['written']:,} written, "
        f"{phase.ledger['unchanged']:,} unchanged in {phase.seconds:.1f} s"
    )
    return phase


def _progress(name: str, p: Platform, reader: InMemoryMetricReader, seconds: float) -> Table:
    points = metric_points(reader).get(RECORDS, Counter())
    by_outcome: Counter[str] = Counter()
    for attrs, value in points.items():
        by_outcome[dict(attrs).get("outcome", "?")] += int(value)
    table = Table(title=f"{name}: {seconds:.0f} s", show_header=False)
    table.add_row("records written / unchanged", f"{by_outcome['written']:,} / {by_outcome['unchanged']:,}")
    table.add_row("invalid / rejected", f"{by_outcome['invalid']:,} / {by_outcome['rejected']:,}")
    table.add_row("messages in flight", str(p.in_flight()))
    table.add_row("CRM rows", ", ".join(f"{k} {v:,}" for k, v in p.dataverse.store.table_counts().items()))
    return table


async def run_sync_demo(
    *,
    records: int,
    seed: int,
    profile_name: str,
    options: PlatformOptions,
    json_out: Path | None = None,
    keep: bool = False,
    console: Console | None = None,
    metrics_file: Path | None = None,
) -> tuple[bool, DemoSummary]:
    console = console or Console()
    reader = metric_reader(metrics_file)
    started = time.perf_counter()
    async with platform(options) as p:
        queue = next(part for part in p.conn.split(";") if part.startswith("QueueEndpoint="))
        console.print(f"billing simulator {p.billing.url}, Dataverse simulator {p.dataverse.url}")
        console.print(f"Functions host {p.host.http_url}, Azurite {queue}")
        notes = preseed_drift(p, seed=seed)
        console.print(f"CRM pre-seeded with a drifted copy of {len(notes):,} accounts and their invoices")
        full = await _phase(p, "full sync", console, reader)
        changed = max(1, records // 100)
        async with httpx.AsyncClient(
            base_url=p.billing.url, headers={"Authorization": f"Bearer {p.settings['BILLING_API_KEY']}"}
        ) as http:
            for entity, n in (("invoices", changed), ("customers", max(1, changed // 4))):
                await http.post("/admin/mutate", json={"entity": entity, "count": n})
        p.billing.simulator.mutations_paused = True
        console.print(f"changed {changed + max(1, changed // 4):,} records in billing; background changes paused")
        incremental = await _phase(p, "incremental sync", console, reader, settle=True)
        reconciled = await reconcile_phase(p, console)
        runtime = await get_runtime(p.host.functions[0].callable.__globals__["SETTINGS"])
        open_rows = await dlq.rows(runtime.tables, dlq.Selection(all=True), limit=1_000_000)
        dlq_open = {(str(r.get("entity")), str(r.get("record_id"))): str(r.get("reason_kind")) for r in open_rows}
        check = CrmCheck(p.billing.store, p.dataverse.store, dlq_open, notes).run()
        points = metric_points(reader)
        deferred = sum(int(v) for a, v in points.get("sync_batches", Counter()).items() if ("outcome", "deferred") in a)
        stats = [listener.stats for listener in p.host.queue_listeners if listener.spec.name == "sync_batch"]
        summary = DemoSummary(
            records=records,
            profile=profile_name,
            phases=[full, incremental],
            invalid_by_reason=dict(Counter(str(r.get("reason_kind")) for r in open_rows)),
            deferred_messages=deferred,
            retried={
                "billing requests retried": int(runtime.billing.stats.retries),
                "dataverse 429s": runtime.dataverse.policy.stats.by_status()["429"],
                "deliveries that failed and were redelivered": sum(s.failed for s in stats),
                "duplicate deliveries injected": sum(s.duplicated for s in stats),
                "crashes before delete injected": sum(s.crashed for s in stats),
            },
            check=check,
            seconds=time.perf_counter() - started,
            metrics={
                name: int(sum(values.values())) for name, values in points.items() if name != "sync_batch_duration_ms"
            },
            reconcile=reconciled,
        )
        _print(summary, console)
        if metrics_file is not None:
            await asyncio.to_thread(flush_metrics)
            console.print(f"metrics, as Application Insights' customMetrics rows: {metrics_file}")
        if json_out is not None:
            await asyncio.to_thread(json_out.write_text, json.dumps(summary.as_json(), indent=2), encoding="utf-8")
        if keep:
            _print_keep(p, console)
            await asyncio.Event().wait()
    return check.ok and reconciled.ok, summary


def _print(s: DemoSummary, console: Console) -> None:
    table = Table(title=f"billing → CRM sync: {s.records:,} invoices, profile '{s.profile}'")
    table.add_column("")
    for phase in s.phases:
        table.add_column(phase.name, justify="right")
    rows: list[tuple[str, list[str]]] = [
        ("listed", [f"{p.listed:,}" for p in s.phases]),
        ("created", [f"{p.created:,}" for p in s.phases]),
        ("updated", [f"{max(0, p.ledger['written'] - p.created):,}" for p in s.phases]),
        ("unchanged", [f"{p.ledger['unchanged'] + p.ledger['stale']:,}" for p in s.phases]),
        ("invalid (billing contract)", [f"{p.ledger['invalid']:,}" for p in s.phases]),
        ("rejected by Dataverse", [f"{p.ledger['rejected']:,}" for p in s.phases]),
        ("not found", [f"{p.ledger['not_found']:,}" for p in s.phases]),
        ("requests billing / Dataverse", [f"{p.billing_requests:,} / {p.dataverse_requests:,}" for p in s.phases]),
        ("seconds", [f"{p.seconds:.1f}" for p in s.phases]),
        ("records/s", [f"{(p.listed / p.seconds if p.seconds else 0):,.0f}" for p in s.phases]),
    ]
    for label, values in rows:
        table.add_row(label, *values)
    console.print(table)
    extra = Table(show_header=False, title="failures and retries")
    for reason, n in sorted(s.invalid_by_reason.items()):
        extra.add_row(f"DLQ rows: {reason}", f"{n:,}")
    extra.add_row("messages deferred (breaker open)", f"{s.deferred_messages:,}")
    for label, n in s.retried.items():
        extra.add_row(label, f"{n:,}")
    console.print(extra)
    c = s.check
    verdict = Table(show_header=False, title="CRM checked against billing, record by record")
    verdict.add_row("records checked", f"{sum(c.checked.values()):,}")
    verdict.add_row("identical", f"{sum(c.matched.values()):,}")
    verdict.add_row("invalid in billing, in the DLQ", f"{c.invalid_in_dlq:,}")
    verdict.add_row("different, in the DLQ with a reason", f"{sum(c.excused.values()):,}")
    verdict.add_row("sales notes kept", f"{c.sales_columns_kept:,}")
    verdict.add_row("duplicates", f"{c.duplicates:,}")
    verdict.add_row("unexplained differences", f"{len(c.differences):,}")
    console.print(verdict)
    for line in c.differences[:20]:
        console.print(f"  [red]{line}[/]")
    console.print("[green]CRM and billing agree[/]" if c.ok else "[red]CRM and billing DIFFER[/]")


def _print_keep(p: Platform, console: Console) -> None:
    console.print("--keep: everything stays up until Ctrl-C")
    console.print(f"  local host      {p.host.http_url}  (x-functions-key: {p.settings['SANDBOX_HOST_FUNCTION_KEY']})")
    console.print(f"  billing         {p.billing.url}  (settings in {p.work_dir / 'local.settings.json'})")
    console.print(f"  Dataverse       {p.dataverse.url}  (CA {p.dataverse.tls.ca_pem})")
    console.print(f"  AzureWebJobsStorage={p.conn}")
    key = p.settings["SANDBOX_HOST_FUNCTION_KEY"]
    console.print(f"  reconcile report page: {p.host.http_url}/api/report?code={key}  (open it in a browser)")
