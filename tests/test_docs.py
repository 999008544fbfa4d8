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


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_docs_resolve_to_a_file_and_a_heading() -> None:
    broken = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        for target, anchor in re.findall(r"\]\(([\w./-]+\.md)(?:#([\w-]+))?\)", text):
            path = (doc.parent / target).resolve()
            if not path.is_file():
                broken.append(f"{doc.name}: {target}")
                continue
            headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
            if anchor and anchor not in {_anchor(h) for h in headings}:
                broken.append(f"{doc.name}: {target}#{anchor}")
    assert broken == []


def test_the_repository_explains_itself_without_files_outside_it() -> None:
    outside = re.compile(r"DESIGN(?:\.md| §)|CONTRACTS\.md|\.\./shared/")
    found = []
    for folder in ("shared", "sandbox", "tests", "docs", "infra", "bench"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".md", ".bicep", ".json") or path == Path(__file__):
                continue
            if outside.search(path.read_text(encoding="utf-8", errors="replace")):
                found.append(str(path.relative_to(ROOT)))
    for path in (ROOT / "README.md", ROOT / "function_app.py"):
        if outside.search(path.read_text(encoding="utf-8")):
            found.append(path.name)
    assert found == []


def test_the_architecture_map_names_every_module_of_the_package() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    unnamed = []
    for path in sorted((ROOT / "shared").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        relative = path.relative_to(ROOT).as_posix()
        folder = path.parent.relative_to(ROOT).as_posix() + "/"
        if f"`{relative}`" not in text and not (f"`{folder}`" in text and f"`{path.name}`" in text):
            unnamed.append(relative)
    assert unnamed == []


def test_the_runbook_says_what_to_do_with_every_dlq_reason() -> None:
    from shared.telemetry import DLQ_REASONS  # noqa: PLC0415 - one test's registry

    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)` \| (record|message) \|", text, flags=re.MULTILINE))
    assert sorted(rows) == sorted(DLQ_REASONS)
