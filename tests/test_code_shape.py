"""The shape of the deployed package: short functions, and retries only through the call policy."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 40
LONG_REASON = "Long because"  # a function may run longer when its docstring says why, starting with these words


def _functions() -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for path in sorted((ROOT / "shared").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node


def test_no_function_of_the_package_runs_over_forty_lines_without_saying_why() -> None:
    long = [
        f"{where} ({node.end_lineno - node.lineno + 1} lines)"  # type: ignore[operator]
        for where, node in _functions()
        if node.end_lineno - node.lineno + 1 > MAX_LINES  # type: ignore[operator]
        and LONG_REASON not in (ast.get_docstring(node) or "")
    ]
    assert long == []


def _calls_sleep(node: ast.AST) -> bool:
    """A call of anything named *sleep: `asyncio.sleep(...)`, `self._sleep(...)`, `(self._sleep or sleep)(...)`."""
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        for part in ast.walk(call.func):
            name = part.attr if isinstance(part, ast.Attribute) else getattr(part, "id", "")
            if name.endswith("sleep"):
                return True
    return False


# Loops that sleep and are not retries: an application user's pacing turn and its wait for a 429's Retry-After.
WAITS = {("shared/dataverse/client.py", "turn"), ("shared/dataverse/client.py", "wait_unblocked")}


def _sleeping_loops(tree: ast.AST, where: str) -> Iterator[str]:
    for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
        if (where, function.name) in WAITS:
            continue
        for loop in ast.walk(function):
            if isinstance(loop, ast.For | ast.AsyncFor | ast.While) and _calls_sleep(loop):
                yield f"{where}:{loop.lineno} {function.name}"


def test_no_hand_written_retry_loop_is_left_in_the_package() -> None:
    """A loop that sleeps between tries is a retry loop: those belong to shared/callpolicy.py (tenacity)."""
    loops = []
    for path in sorted((ROOT / "shared").rglob("*.py")):
        where = path.relative_to(ROOT).as_posix()
        if where != "shared/callpolicy.py":
            loops += _sleeping_loops(ast.parse(path.read_text(encoding="utf-8")), where)
    assert sorted(set(loops)) == []


def _own_loggers(tree: ast.AST, where: str) -> Iterator[str]:
    """Loggers made with `logging.getLogger`, past the sanitiser of shared/logs.py."""
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        if isinstance(call.func, ast.Attribute) and call.func.attr == "getLogger":
            yield f"{where}:{call.lineno}"


def test_every_logger_of_the_package_goes_through_the_sanitiser() -> None:
    found = []
    for path in sorted([*(ROOT / "shared").rglob("*.py"), ROOT / "function_app.py"]):
        where = path.relative_to(ROOT).as_posix()
        if where != "shared/logs.py":
            found += _own_loggers(ast.parse(path.read_text(encoding="utf-8")), where)
    assert found == []


def test_the_shape_checks_see_what_they_look_for() -> None:
    """The checks above would fail on the code they forbid (a check that cannot fail proves nothing)."""
    rounds = ast.parse("async def fetch():\n    for n in range(6):\n        if await ask():\n            return\n"
                       "        await self._sleep(policy.wait(n))\n")  # fmt: skip
    assert list(_sleeping_loops(rounds, "shared/x.py")) == ["shared/x.py:2 fetch"]
    assert list(_own_loggers(ast.parse('log = logging.getLogger("shared.x")'), "shared/x.py")) == ["shared/x.py:1"]
    assert sum(1 for _ in _functions()) > 200
