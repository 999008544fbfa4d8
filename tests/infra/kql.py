"""Run the alert rules' KQL over `customMetrics` rows, for tests: the subset of KQL the rules use.

A rule's query is a pipeline: `customMetrics`, then `where` (==, !=, <, <=, >, >=, `in (...)`, `and`),
`summarize` (`arg_max(timestamp, value)`, `name = min|max|sum(column)`, `count()`, `by alias = expression`) and
`extend`-free comparisons on the result. Expressions are column names, `tostring(customDimensions.X)`, numbers,
"strings" and `todouble("...")`. Rows are dicts shaped as `sandbox.metrics_file` writes them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

Row = dict[str, Any]


def _split(text: str, sep: str) -> list[str]:
    """Split on `sep` outside double quotes and parentheses."""
    parts, depth, quoted, start, i = [], 0, False, 0, 0
    while i < len(text):
        c = text[i]
        if c == '"':
            quoted = not quoted
        elif not quoted and c == "(":
            depth += 1
        elif not quoted and c == ")":
            depth -= 1
        elif not quoted and depth == 0 and text.startswith(sep, i):
            parts.append(text[start:i].strip())
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(text[start:].strip())
    return parts


def _value(expr: str) -> Callable[[Row], Any]:
    expr = expr.strip()
    if m := re.fullmatch(r'"([^"]*)"', expr):
        return lambda _row: m.group(1)
    if m := re.fullmatch(r'todouble\("([^"]*)"\)', expr):
        return lambda _row: float(m.group(1))
    if re.fullmatch(r"-?\d+(\.\d+)?", expr):
        return lambda _row: float(expr)
    if m := re.fullmatch(r"tostring\(customDimensions\.(\w+)\)", expr):
        return lambda row: str(row.get("customDimensions", {}).get(m.group(1), ""))
    if re.fullmatch(r"\w+", expr):
        return lambda row: row.get(expr)
    raise ValueError(f"kql: cannot read the expression {expr!r}")


def _condition(text: str) -> Callable[[Row], bool]:
    clauses = _split(text, " and ")
    if len(clauses) > 1:
        tests = [_condition(c) for c in clauses]
        return lambda row: all(t(row) for t in tests)
    if m := re.fullmatch(r"(.+?) in \((.+)\)", text.strip()):
        left, options = _value(m.group(1)), [_value(o)(None) for o in _split(m.group(2), ",")]  # type: ignore[arg-type]
        return lambda row: left(row) in options
    m = re.fullmatch(r"(.+?)\s*(==|!=|>=|<=|>|<)\s*(.+)", text.strip())
    if m is None:
        raise ValueError(f"kql: cannot read the condition {text!r}")
    left, op, right = _value(m.group(1)), m.group(2), _value(m.group(3))
    compare: dict[str, Callable[[Any, Any], bool]] = {
        "==": lambda a, b: a == b, "!=": lambda a, b: a != b, ">=": lambda a, b: a >= b,
        "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b,
    }  # fmt: skip
    return lambda row: left(row) is not None and compare[op](left(row), right(row))


def _summarize(text: str, rows: list[Row]) -> list[Row]:
    aggregations, _, by = text.partition(" by ")
    key_name, key = "", (lambda _row: None)
    if by:
        alias, _, expr = by.partition("=")
        key_name, key = alias.strip(), _value(expr)
    groups: dict[Any, list[Row]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    out = []
    for group_key, members in groups.items():
        result: Row = {key_name: group_key} if by else {}
        for agg in _split(aggregations, ","):
            if m := re.fullmatch(r"arg_max\(timestamp, (\w+)\)", agg):
                newest = max(members, key=lambda r: r["timestamp"])
                result |= {"timestamp": newest["timestamp"], m.group(1): newest[m.group(1)]}
            elif m := re.fullmatch(r"(\w+) = (min|max|sum)\((\w+)\)", agg):
                pick = {"min": min, "max": max, "sum": sum}[m.group(2)]
                result[m.group(1)] = pick(r[m.group(3)] for r in members)
            elif m := re.fullmatch(r"(\w+) = count\(\)", agg):
                result[m.group(1)] = len(members)
            else:
                raise ValueError(f"kql: cannot read the aggregation {agg!r}")
        out.append(result)
    return out


def run(query: str, rows: Iterable[Row]) -> list[Row]:
    """The query's result rows."""
    stages = _split(query, "|")
    if stages[0] != "customMetrics":
        raise ValueError(f"kql: only customMetrics is read, not {stages[0]!r}")
    current = list(rows)
    for stage in stages[1:]:
        verb, _, rest = stage.partition(" ")
        if verb == "where":
            test = _condition(rest)
            current = [r for r in current if test(r)]
        elif verb == "summarize":
            current = _summarize(rest, current)
        else:
            raise ValueError(f"kql: cannot run {verb!r}")
    return current
