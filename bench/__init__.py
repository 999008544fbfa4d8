import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def record(name: str, outcome: dict[str, Any]) -> Path:
    """Write a benchmark's figures to bench/results/<name>-<time>.json and print them."""
    summary = {"benchmark": name, "at": datetime.now(UTC).isoformat(), **outcome}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(summary, indent=2))  # noqa: T201 - a command-line tool's output
    print(f"written to {path}")  # noqa: T201
    return path
