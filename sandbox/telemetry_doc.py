"""What the alert rules and the workbook query, read from the Bicep, and `docs/telemetry.md` generated from it.

The queries are KQL strings inside `infra/app/alerts.bicep` (`rules`) and `infra/app/workbook.bicep` (`tiles`).
Each names one metric (`name == "sync_…"`), reads dimensions as `customDimensions.<name>` and compares them with
string literals. `infra_queries()` extracts those three things, so that tests can hold them against the registry in
`shared/telemetry.py` (and against what a demo run really emitted), and the doc can say which alert or tile uses each
metric.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from shared.telemetry import FAILURE_OUTCOMES, GAUGE_MAX_AGE_S, SPECS, MetricSpec

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOC = ROOT / "docs" / "telemetry.md"

_BLOCK = re.compile(
    r"(?:name|title): '(?P<title>[^']+)'"  # a rule's name or a tile's title,
    r"(?:(?!(?:name|title): ').)*?"  # then, before the next one,
    r"query: (?:format\()?'(?P<query>(?:[^'\\]|\\.)*)'",  # its query string
    re.S,
)
_METRIC = re.compile(r'name == "([a-z_]+)"')
_DIMENSION = re.compile(r"customDimensions\.([A-Za-z_]+)")
_LITERAL = re.compile(r'"([^"]*)"')


@dataclass(frozen=True)
class Query:
    source: str  # "alert" or "workbook"
    title: str  # the alert rule's name or the tile's title
    kql: str
    metric: str | None  # None: a query on another table (exceptions)
    dimensions: frozenset[str]
    literals: frozenset[str]  # compared with dimension values (metric names excluded)


def infra_queries(infra: Path = INFRA) -> list[Query]:
    out = []
    for source, file in (("alert", "alerts.bicep"), ("workbook", "workbook.bicep")):
        text = (infra / "app" / file).read_text(encoding="utf-8")
        for match in _BLOCK.finditer(text):
            kql = match["query"]
            metrics = _METRIC.findall(kql)
            without_names = _METRIC.sub("", kql)
            literals = {lit for lit in _LITERAL.findall(without_names) if "{" not in lit}  # not format() holes
            out.append(
                Query(
                    source=source,
                    title=match["title"],
                    kql=kql,
                    metric=metrics[0] if metrics else None,
                    dimensions=frozenset(_DIMENSION.findall(kql)),
                    literals=frozenset(literals),
                )
            )
    return out


def _dimensions(spec: MetricSpec) -> str:
    if not spec.dimensions:
        return "—"
    parts = []
    for name, values in spec.dimensions.items():
        parts.append(f"`{name}` ({', '.join(values)})" if values else f"`{name}`")
    return "; ".join(parts)


_INTRO = """\
# Telemetry

Generated from the registry in `shared/telemetry.py` and the queries in `infra/app/alerts.bicep` and
`infra/app/workbook.bicep` by `python -m sandbox telemetry-doc --write`; a test fails when this file is stale.

## How it flows

- The app emits metrics through the OpenTelemetry API only (meter `billing_crm_sync`). When
  `APPLICATIONINSIGHTS_CONNECTION_STRING` is set, `shared/observability.py` calls `configure_azure_monitor()` from
  `azure-monitor-opentelemetry`; without it nothing is exported and the calls cost next to nothing.
- Application Insights has local authentication off. The Functions host signs in with the managed identity named by
  `APPLICATIONINSIGHTS_AUTHENTICATION_STRING` (`ClientId=…;Authorization=AAD`), and the worker passes the same
  identity to `configure_azure_monitor(credential=…)`; the identity holds Monitoring Metrics Publisher on the
  Application Insights resource (`infra/app/rbac.bicep`).
- The host already sends requests, the worker's logs and exceptions; the worker sends the metrics below and, by
  default, no logs or traces of its own (`OTEL_LOGS_EXPORTER` and `OTEL_TRACES_EXPORTER` default to `none`; set
  either to another value to turn it on). Live metrics and performance counters stay with the host.
- Every export (60 s, `OTEL_METRIC_EXPORT_INTERVAL`) becomes one row of `customMetrics` per metric and attribute
  set: `name`, `customDimensions` (the attributes), `valueSum`, `valueCount`, `valueMin`, `valueMax`. Counters and
  histograms are exported as deltas: `sum(valueSum)` over a window is what happened in it. The exporter adds rows
  of its own (`Item_Success_Count`, `Item_Dropped_Count`: what it delivered or lost).
- Gauges report a reading only while it is younger than {max_age:.0f} s (`FreshGauge`). Azure Monitor's exporter
  reads synchronous gauges cumulatively, so an instance that measured the DLQ depth once would repeat that reading
  every minute for as long as it lives, and an alert could take a stale value for the current one. Every fan-out
  tick and every health call measures them afresh.

Locally: `python -m sandbox demo --metrics-file metrics.jsonl` writes the same rows (one JSON object a line, the
columns above) every 5 s and at the end; `tests/e2e/test_cli.py` checks that a demo run emits every metric and
dimension the alerts and the workbook query, and `tests/shared/test_telemetry.py` that `configure_telemetry()` sends
them to an ingestion endpoint as Application Insights receives them.

"""


def render(queries: list[Query] | None = None) -> str:
    queries = infra_queries() if queries is None else queries
    lines = [*_INTRO.format(max_age=GAUGE_MAX_AGE_S).splitlines()]
    lines += [
        "## Metrics",
        "",
        "| metric | kind | unit | dimensions (known values) | meaning | alerts | workbook tiles |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in SPECS:
        alerts = [q.title for q in queries if q.source == "alert" and q.metric == spec.name]
        tiles = [q.title for q in queries if q.source == "workbook" and q.metric == spec.name]
        lines.append(
            f"| `{spec.name}` | {spec.kind} | {spec.unit} | {_dimensions(spec)} | {spec.description} | "
            f"{', '.join(alerts) or '—'} | {', '.join(tiles) or '—'} |"
        )
    lines += [
        "",
        "## Alert rules",
        "",
        "Scheduled-query rules on the Application Insights resource, evaluated every 5 minutes; each notifies the",
        "action group (email, and Teams through the `teams` Logic App when a Workflows webhook URL is given). What to",
        "do when one fires: [`docs/operations.md`](operations.md#alerts-and-what-to-do). Thresholds are parameters",
        "of `infra/main.bicep`.",
        "",
        "| rule | query |",
        "|---|---|",
    ]
    lines += _query_rows(queries, "alert", "`{}`")
    lines += [
        "",
        f"The failure rate counts outcomes {', '.join(f'`{o}`' for o in FAILURE_OUTCOMES)} of `sync_records`: a",
        "record whose delivery failed counts once as `failed` per failed delivery, so a flapping Dataverse shows in",
        "the rate even when redeliveries finally write every record.",
        "",
        "## Workbook tiles",
        "",
        'The workbook "Billing sync health" (`infra/app/workbook.bicep`), over the last 24 hours:',
        "",
        "| tile | query |",
        "|---|---|",
    ]
    lines += _query_rows(queries, "workbook", "{}")
    return "\n".join(lines) + "\n"


def _query_rows(queries: list[Query], source: str, title_format: str) -> list[str]:
    """Table rows `| title | query |` of one source, the KQL in a code span with its pipes escaped."""
    rows = []
    for q in queries:
        if q.source == source:
            kql = q.kql.replace("|", "\\|").replace("${", "{")
            rows.append(f"| {title_format.format(q.title)} | `{kql}` |")
    return rows
