"""The app's metrics, locally, as the rows Application Insights would hold in `customMetrics` (dev only).

`CustomMetricsFileExporter` is an OpenTelemetry metric exporter that appends one JSON object a line per metric and
attribute set and export: `timestamp`, `name`, `value`, `valueSum`, `valueCount`, `valueMin`, `valueMax`,
`customDimensions`. It asks for the temporalities Azure Monitor's exporter asks for (counters and histograms as
deltas, the rest cumulative), so `sum(valueSum)` over the rows of a window means what it means in Azure.
`python -m sandbox demo --metrics-file F` uses it; `read_rows()` reads the file back.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics import Counter, Histogram, ObservableCounter
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
)

DELTA_INSTRUMENTS = (Counter, Histogram, ObservableCounter)  # as Azure Monitor's exporter asks for them


class CustomMetricsFileExporter(MetricExporter):
    def __init__(self, path: Path) -> None:
        super().__init__(preferred_temporality=dict.fromkeys(DELTA_INSTRUMENTS, AggregationTemporality.DELTA))
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        rows = [json.dumps(row, sort_keys=True) for row in _rows(metrics_data)]
        if rows:
            with self._lock, self.path.open("a", encoding="utf-8") as out:
                out.write("\n".join(rows) + "\n")
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        return None


def _rows(data: MetricsData) -> Iterator[dict[str, Any]]:
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    if isinstance(point, HistogramDataPoint):
                        total, count, low, high = point.sum, point.count, point.min, point.max
                    elif isinstance(point, NumberDataPoint):
                        total, count, low, high = point.value, 1, point.value, point.value
                    else:  # exponential histograms: not used by the app
                        continue
                    yield {
                        "timestamp": datetime.fromtimestamp(point.time_unix_nano / 1e9, UTC).isoformat(),
                        "name": metric.name,
                        "value": total,
                        "valueSum": total,
                        "valueCount": count,
                        "valueMin": low,
                        "valueMax": high,
                        "customDimensions": {k: str(v) for k, v in (point.attributes or {}).items()},
                    }


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
