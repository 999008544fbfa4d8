"""Docs move with code: every test that docs/local-platform.md cites exists."""

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
