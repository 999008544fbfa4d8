"""Docs move with code: every test the docs cite exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _defined(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_test_cited_by_the_local_platform_doc_exists() -> None:
    text = (ROOT / "docs" / "local-platform.md").read_text(encoding="utf-8")
    cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(cited) > 30
    missing = [f"{file}::{name}" for file, name in cited if name not in _defined(ROOT / file)]
    assert missing == []


def test_tests_and_files_cited_anywhere_in_the_docs_exist() -> None:
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for file, name in re.findall(r"(tests/[\w/]+\.py)::(\w+)", text):
            if not (ROOT / file).is_file() or name not in _defined(ROOT / file):
                missing.append(f"{doc.name}: {file}::{name}")
        for file in re.findall(r"`((?:shared|sandbox|tests)/[\w/]+\.py)`", text):
            if not (ROOT / file).is_file():
                missing.append(f"{doc.name}: {file}")
    assert missing == []


def test_the_telemetry_doc_is_generated_from_the_registry_and_the_queries() -> None:
    from sandbox.telemetry_doc import DOC, render  # noqa: PLC0415 - one test's tool

    assert DOC.read_text(encoding="utf-8") == render(), "run: python -m sandbox telemetry-doc --write"
    for spec_name in ("sync_records", "sync_dlq_depth", "sync_breaker_state", "sync_runs", "sync_lag_seconds"):
        assert f"| `{spec_name}` |" in DOC.read_text(encoding="utf-8")
