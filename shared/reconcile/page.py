"""`GET /api/report` (function key): one HTML page on whether billing and the CRM agree, for operations and finance.

Server-rendered, no script, no build step, no outside request: the drift chart is inline SVG. It shows the run
`GET /api/reconcile/latest` shows (the newest run's `start.summary_of`, read once with the other 29), the drift score
over the last 30 runs, counts by category, the columns that differ most, the DLQ's open rows by reason, the median
time to resolution and links to the CSV reports (`GET /api/report/csv?name=`). Every value put into the page is
escaped; the page forbids scripts and outside resources (Content-Security-Policy) and sends no referrer. Numbers
carry `data-*` attributes naming what they are, so a test (and a scraper) can read them back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Annotated, Any, Final
from urllib.parse import urlencode

import azure.functions as func
from pydantic import BaseModel, ConfigDict, Field

from shared import dlq, inputs
from shared.reconcile import report, start
from shared.reconcile.compare import CATEGORIES
from shared.reconcile.findings import RUNS
from shared.responses import error_response
from shared.runtime import Runtime

HISTORY: Final = 30
MEANINGS: Final = {
    "missing_in_crm": "billing has it, the CRM does not",
    "duplicate_in_crm": "the CRM holds it more than once",
    "stale": "the CRM holds an older version",
    "amount_over": "the CRM shows a higher amount than billing",
    "amount_under": "the CRM shows a lower amount than billing",
    "field_mismatch": "the CRM shows another value",
    "lines_missing": "invoice lines billing has are missing in the CRM",
    "lines_extra": "the CRM holds invoice lines billing does not",
    "orphan_in_crm": "the CRM holds a customer billing no longer has",
    "invalid_in_billing": "billing's record is invalid (waiting in the DLQ)",
}
HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
COLOURS: Final = ("#1f6feb", "#bf5700", "#1a7f37", "#8250df")
STYLE: Final = """
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:64rem;padding:0 1rem;
color:#1f2328}h1{font-size:1.5rem;margin-bottom:.2rem}
h2{font-size:1.1rem;margin-top:2rem;border-bottom:1px solid #d0d7de}
table{border-collapse:collapse;margin:.5rem 0}th,td{padding:.25rem .75rem;text-align:left;border-bottom:1px solid #eee}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#59636e}.ok{color:#1a7f37}.bad{color:#cf222e}
.headline{font-size:1.15rem}svg text{font-size:11px;fill:#59636e}
"""


class CsvQuery(BaseModel):
    """`GET /api/report/csv?name=reconcile/<file>.csv`."""

    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(pattern=report.BLOB_NAME.pattern, max_length=200)]


@inputs.guarded
async def page(runtime: Runtime, req: func.HttpRequest) -> func.HttpResponse:
    history = await _history(runtime)
    latest = history[0] if history else None  # the newest run: what `GET /api/reconcile/latest` shows
    waiting = await dlq.open_by_reason(runtime.tables)
    monthly = await report.listing(runtime)
    key = req.params.get("code")
    html = render(latest, history, waiting, monthly, key=key)
    return func.HttpResponse(html, status_code=200, mimetype="text/html", charset="utf-8", headers=HEADERS)


@inputs.guarded
async def csv_file(runtime: Runtime, req: func.HttpRequest) -> func.HttpResponse:
    wanted = inputs.query(req, CsvQuery)
    data = await report.download(runtime, wanted.name)
    if data is None:
        return error_response(404, f"no report named {wanted.name}")
    filename = wanted.name.rsplit("/", 1)[-1]
    headers = {"Content-Disposition": f'attachment; filename="{filename}"', "X-Content-Type-Options": "nosniff"}
    return func.HttpResponse(data, status_code=200, mimetype="text/csv", charset="utf-8", headers=headers)


async def _history(runtime: Runtime) -> list[dict[str, Any]]:
    """The last runs, newest first, summarised (stored totals, or the batches summed for a run still going)."""
    table = await runtime.tables.table(RUNS)
    runs: list[dict[str, Any]] = []
    async for row in table.query_entities("PartitionKey eq 'run'", results_per_page=HISTORY):
        runs.append(await start.summary_of(table, dict(row)))
        if len(runs) >= HISTORY:
            break
    return runs


# ---- rendering (pure) ----


def _link(name: str, key: str | None) -> str:
    query = {"name": name, **({"code": key} if key else {})}
    return "report/csv?" + urlencode(query)  # relative to /api/report: /api/report/csv


def _pct(ratio: float) -> str:
    return f"{ratio * 100:.2f} %"


def render(
    latest: dict[str, Any] | None,
    history: Sequence[dict[str, Any]],
    waiting: Counter[str],
    monthly: Sequence[str],
    *,
    key: str | None = None,
) -> str:
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<title>Billing and CRM: reconcile report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Do billing and the CRM agree?</h1>",
    ]
    if latest is None:
        parts.append(
            "<p id='no-run' class='headline'>No reconcile run yet. Runs start daily (RECONCILE_SCHEDULE) or "
            "with <code>POST /api/reconcile</code>.</p>"
        )
    else:
        parts += _latest(latest)
        parts += _chart([h for h in reversed(history) if h["entities"]])
        parts += _categories(latest)
        parts += _columns(latest)
    parts += _waiting(waiting)
    parts += _resolution(latest, history)
    parts += _downloads(history, monthly, key)
    parts.append("</body></html>")
    return "".join(parts)


def _when(value: Any) -> str:
    """An ISO time as people read it: `2026-12-02 02:00 UTC`."""
    text = str(value or "")
    return f"{text[:10]} {text[11:16]} UTC" if len(text) >= 16 else text


def _state(run: dict[str, Any]) -> str:
    if run.get("completed_at") and not run.get("complete"):
        return "closed incomplete (some batches never ended: see the DLQ)"
    if run.get("complete"):
        return "complete"
    return f"in progress ({int(run.get('batches_done') or 0)} of {int(run.get('messages') or 0)} batches done)"


def _latest(run: dict[str, Any]) -> list[str]:
    entities: dict[str, Any] = run["entities"]
    lines = []
    for entity, counts in entities.items():
        compared, mismatched = int(counts["compared"]), int(counts["mismatched"])
        agree = 1 - counts["drift"] if compared else 1.0
        word = "agree" if mismatched == 0 else "differ"
        cls = "ok" if mismatched == 0 else "bad"
        lines.append(
            f"<li><span class='{cls}'>{escape(entity)}: {mismatched:,} of {compared:,} {word}</span> "
            f"(billing and the CRM agree on {_pct(agree)})</li>"
        )
    parts = [
        f"<p class='muted'>Latest run <code id='run-id'>{escape(str(run['run_id']))}</code>, started "
        f"{escape(_when(run.get('started_at')))}: <span id='run-state'>{escape(_state(run))}</span>"
        f"{' &middot; <strong>dry run</strong> (nothing healed)' if run.get('dry_run') else ''}.</p>",
        f"<ul class='headline'>{''.join(lines) or '<li>Nothing compared yet.</li>'}</ul>",
        "<h2>Latest run</h2><table id='latest'><thead><tr><th>entity</th>",
        *(
            f"<th class='n'>{escape(h)}</th>"
            for h in ("compared", "differing", "drift", "new", "resolved", "healed", "persistent", "CRM requests")
        ),
        "</tr></thead><tbody>",
    ]
    for entity, counts in entities.items():
        cells = [
            ("compared", f"{counts['compared']:,}", counts["compared"]),
            ("mismatched", f"{counts['mismatched']:,}", counts["mismatched"]),
            ("drift", _pct(counts["drift"]), counts["drift"]),
            *((k, f"{counts[k]:,}", counts[k]) for k in ("new", "resolved", "healed", "persistent", "crm_requests")),
        ]
        parts.append(f"<tr data-entity='{escape(entity)}'><th>{escape(entity)}</th>")
        for k, shown, raw in cells:
            data = f"data-entity='{escape(entity)}' data-field='{k}' data-value='{escape(str(raw))}'"
            parts.append(f"<td class='n' {data}>{shown}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return parts


@dataclass(frozen=True)
class _Plot:
    """The chart's geometry: run index and drift ratio to SVG coordinates."""

    runs: int
    ceiling: float
    width: int = 720
    height: int = 220
    left: int = 48
    bottom: int = 24
    top: int = 10

    def x(self, i: int) -> float:
        return self.left + i * (self.width - self.left - 10) / max(1, self.runs - 1)

    def y(self, value: float) -> float:
        return self.top + (self.height - self.top - self.bottom) * (1 - value / self.ceiling)


def _chart(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Drift (%) per entity over the runs given (oldest first), as an inline SVG line chart."""
    parts = [f"<h2>Drift over the last {len(runs)} run{'s' * (len(runs) != 1)}</h2>"]
    entities = sorted({e for r in runs for e in r["entities"]})
    if not runs or not entities:
        return [*parts, "<p>No run has compared anything yet.</p>"]
    peak = max([float(r["entities"][e]["drift"]) for r in runs for e in r["entities"]] + [0.0])
    plot = _Plot(len(runs), max(peak * 1.15, 0.01))
    svg = [
        f"<svg id='drift-chart' role='img' viewBox='0 0 {plot.width} {plot.height}' width='100%' "
        f"aria-label='drift score per run, per entity'>"
    ]
    for value in (0.0, plot.ceiling / 2, plot.ceiling):
        svg.append(
            f"<line x1='{plot.left}' x2='{plot.width - 10}' y1='{plot.y(value):.1f}' y2='{plot.y(value):.1f}' "
            f"stroke='#eee'/><text x='{plot.left - 6}' y='{plot.y(value) + 4:.1f}' text-anchor='end'>"
            f"{value * 100:.2f}%</text>"
        )
    legend = []
    for n, entity in enumerate(entities):
        colour = COLOURS[n % len(COLOURS)]
        svg += _series(plot, runs, entity, colour)
        legend.append(f"<span style='color:{colour}'>&#9632; {escape(entity)}</span>")
    svg.append(
        f"<text x='{plot.left}' y='{plot.height - 4}'>oldest</text>"
        f"<text x='{plot.width - 10}' y='{plot.height - 4}' text-anchor='end'>latest</text></svg>"
    )
    return [*parts, *svg, f"<p>{' &nbsp; '.join(legend)} &middot; drift = records that differ / records compared</p>"]


def _series(plot: _Plot, runs: Sequence[dict[str, Any]], entity: str, colour: str) -> list[str]:
    """One entity's line, a point per run with its drift in a tooltip."""
    points = [(i, float(r["entities"][entity]["drift"]), r) for i, r in enumerate(runs) if entity in r["entities"]]
    path = " ".join(f"{plot.x(i):.1f},{plot.y(v):.1f}" for i, v, _ in points)
    out = [f"<polyline fill='none' stroke='{colour}' stroke-width='2' points='{path}'/>"]
    for i, v, r in points:
        label = f"{entity} {escape(_when(r.get('started_at')) or str(r['run_id']))}: {v * 100:.2f}%"
        out.append(
            f"<circle cx='{plot.x(i):.1f}' cy='{plot.y(v):.1f}' r='3' fill='{colour}' data-entity='{escape(entity)}' "
            f"data-run='{escape(str(r['run_id']))}' data-drift='{v}'><title>{label}</title></circle>"
        )
    return out


def _categories(run: dict[str, Any]) -> list[str]:
    entities = list(run["entities"])
    counts = {e: run["entities"][e]["categories"] for e in entities}
    present = [c for c in CATEGORIES if any(counts[e].get(c) for e in entities)]
    parts = ["<h2>What differs, by category</h2>"]
    if not present:
        return [*parts, "<p id='categories-none' class='ok'>Nothing differs.</p>"]
    parts.append("<table id='categories'><thead><tr><th>category</th><th>meaning</th>")
    parts += [f"<th class='n'>{escape(e)}</th>" for e in entities]
    parts.append("</tr></thead><tbody>")
    for category in present:
        parts.append(f"<tr><th><code>{category}</code></th><td>{escape(MEANINGS.get(category, ''))}</td>")
        parts += [
            f"<td class='n' data-entity='{escape(e)}' data-category='{category}' "
            f"data-value='{int(counts[e].get(category, 0))}'>{int(counts[e].get(category, 0)):,}</td>"
            for e in entities
        ]
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return parts


def _columns(run: dict[str, Any]) -> list[str]:
    top: list[list[Any]] = run.get("top_columns") or []
    parts = ["<h2>Columns that differ most</h2>"]
    if not run.get("completed_at"):
        return [*parts, "<p class='muted'>Counted when the run's report is written, once its batches have ended.</p>"]
    if not top:
        return [*parts, "<p class='ok'>No column differs.</p>"]
    return [*parts, *_counts("columns", ("column", "findings"), [(str(name), int(n)) for name, n in top])]


def _counts(kind: str, header: tuple[str, str], items: Sequence[tuple[str, int]]) -> list[str]:
    """A two-column table of names and counts; each count carries `data-<first header>` and `data-value`."""
    attribute = header[0]
    rows = [
        f"<tr><td><code>{escape(name)}</code></td><td class='n' data-{attribute}='{escape(name)}' "
        f"data-value='{n}'>{n:,}</td></tr>"
        for name, n in items
    ]
    head = f"<table id='{kind}'><thead><tr><th>{header[0]}</th><th class='n'>{header[1]}</th></tr></thead><tbody>"
    return [head, *rows, "</tbody></table>"]


def _waiting(waiting: Counter[str]) -> list[str]:
    parts = ["<h2>Waiting for an operator: open DLQ rows by reason</h2>"]
    if not waiting:
        return [*parts, "<p id='dlq-none' class='ok'>The DLQ holds no open row.</p>"]
    parts += _counts("dlq", ("reason", "open rows"), sorted(waiting.items(), key=lambda kv: -kv[1]))
    parts.append(
        "<p class='muted'>Listed by <code>GET /api/dlq</code>; retried by "
        "<code>POST /api/dlq/reprocess</code> (see the operations runbook).</p>"
    )
    return parts


def _resolution(latest: dict[str, Any] | None, history: Sequence[dict[str, Any]]) -> list[str]:
    measured = next((r for r in ([latest] if latest else []) + list(history) if r.get("completed_at")), None)
    median = measured.get("median_hours_to_resolution") if measured else None
    parts = ["<h2>Time to resolution</h2>"]
    if median is None:
        return [*parts, "<p class='muted'>No mismatch was resolved in the 30 days before the last report.</p>"]
    return [
        *parts,
        f"<p>Median time from a mismatch first seen to resolved, over the 30 days before the last report: "
        f"<strong id='median-resolution' data-value='{median}'>{median:.1f} hours</strong>.</p>",
    ]


def _downloads(history: Sequence[dict[str, Any]], monthly: Sequence[str], key: str | None) -> list[str]:
    parts = ["<h2>Reports (CSV, opens in Excel)</h2><ul id='reports'>"]
    runs = [r for r in history if r.get("report")]
    for r in runs:
        name = str(r["report"])
        parts.append(
            f"<li><a href='{escape(_link(name, key))}' data-report='{escape(name)}'>{escape(name)}</a> "
            f"<span class='muted'>({int(r.get('report_rows') or 0):,} rows)</span></li>"
        )
    parts += [
        f"<li><a href='{escape(_link(name, key))}' data-report='{escape(name)}'>{escape(name)}</a> "
        "<span class='muted'>(monthly roll-up)</span></li>"
        for name in monthly
    ]
    if not runs and not monthly:
        parts.append("<li class='muted'>No report yet: a run's CSV is written once its batches have all ended.</li>")
    parts.append("</ul>")
    return parts
