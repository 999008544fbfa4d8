"""The slice of OData the simulator understands: key segments and `$filter`, compiled to parameterised SQL."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sandbox.dataverse_sim.schema import AMOUNT_KINDS, Table, stored_amount

GUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_GUID_RE = re.compile(f"^{GUID}$")
_TOKEN = re.compile(
    rf"\s*(?:(?P<string>'(?:[^']|'')*')|(?P<guid>{GUID})|(?P<number>-?\d+(?:\.\d+)?)"
    r"|(?P<name>[A-Za-z_@][A-Za-z0-9_.@]*)|(?P<punct>[(),]))"
)
_COMPARE = {"eq": "=", "ne": "<>", "gt": ">", "ge": ">=", "lt": "<", "le": "<="}


class ODataError(ValueError):
    """A query or key the simulator cannot parse; answered as Dataverse's 400 0x80060888."""


def unquote(literal: str) -> str:
    return literal[1:-1].replace("''", "'")


def parse_key(segment: str, table: Table) -> dict[str, Any]:
    """`(guid)` or `(name='v',other=3)` to {column: value}; the primary id for a bare GUID."""
    text = segment.strip()
    if _GUID_RE.match(text):
        return {table.primary_id: text.lower()}
    pairs: dict[str, Any] = {}
    tokens = _tokens(text)
    i = 0
    while i < len(tokens):
        if i + 3 > len(tokens) or tokens[i][0] != "name" or tokens[i + 1] != ("name", "="):
            raise ODataError(f"malformed key segment ({text})")
        pairs[tokens[i][1]] = _literal(*tokens[i + 2])
        i += 3
        if i < len(tokens):
            if tokens[i] != ("punct", ",") or i + 1 == len(tokens):
                raise ODataError(f"malformed key segment ({text})")
            i += 1
    if not pairs:
        raise ODataError("empty key segment")
    return pairs


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        if text[pos] == "=":
            out.append(("name", "="))
            pos += 1
            continue
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise ODataError(f"unexpected text at {pos}: {text[pos : pos + 20]!r}")
        kind = match.lastgroup or ""
        out.append((kind, match.group(kind)))
        pos = match.end()
        while pos < len(text) and text[pos] == " ":
            pos += 1
    return out


def _literal(kind: str, value: str) -> Any:
    if kind == "string":
        return unquote(value)
    if kind == "guid":
        return value.lower()
    if kind == "number":
        return Decimal(value) if "." in value else int(value)
    if kind == "name" and value in ("true", "false"):
        return value == "true"
    if kind == "name" and value == "null":
        return None
    raise ODataError(f"expected a literal, found {value!r}")


@dataclass
class _Parser:
    tokens: list[tuple[str, str]]
    table: Table
    pos: int = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        if self.pos >= len(self.tokens):
            raise ODataError("the filter ends too early")
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def expect(self, punct: str) -> None:
        if self.take() != ("punct", punct):
            raise ODataError(f"expected {punct!r} in the filter")

    def column(self, name: str) -> str:
        match = re.fullmatch(r"_(\w+)_value", name)
        column = match.group(1) if match else name
        col = self.table.by_name.get(column)
        if col is None or (match and col.type != "lookup"):
            raise ODataError(
                f"Could not find a property named '{name}' on type 'Microsoft.Dynamics.CRM.{self.table.logical_name}'."
            )
        return f'"{column}"'

    def amount(self, name: str) -> bool:
        col = self.table.by_name.get(name.strip('"'))
        return col is not None and col.type in AMOUNT_KINDS

    def expr(self, params: list[Any]) -> str:
        """`a or b or c` as one flat SQL group: nested pairs overflow SQLite's parser past a few hundred terms, and a
        client reading rows by keys sends that many."""
        terms = [self.conj(params)]
        while self.peek() == ("name", "or"):
            self.take()
            terms.append(self.conj(params))
        return terms[0] if len(terms) == 1 else "(" + " OR ".join(terms) + ")"

    def conj(self, params: list[Any]) -> str:
        terms = [self.unary(params)]
        while self.peek() == ("name", "and"):
            self.take()
            terms.append(self.unary(params))
        return terms[0] if len(terms) == 1 else "(" + " AND ".join(terms) + ")"

    def unary(self, params: list[Any]) -> str:
        if self.peek() == ("name", "not"):
            self.take()
            return f"(NOT {self.unary(params)})"
        if self.peek() == ("punct", "("):
            self.take()
            inner = self.expr(params)
            self.expect(")")
            return inner
        kind, name = self.take()
        if kind != "name":
            raise ODataError(f"expected a column or a function, found {name!r}")
        if name in ("contains", "startswith", "endswith") and self.peek() == ("punct", "("):
            self.take()
            column = self.column(self.take()[1])
            self.expect(",")
            value = _literal(*self.take())
            self.expect(")")
            if not isinstance(value, str):
                raise ODataError(f"{name}() needs a string")
            escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            params.append({"contains": f"%{escaped}%", "startswith": f"{escaped}%", "endswith": f"%{escaped}"}[name])
            return f"({column} LIKE ? ESCAPE '\\')"
        column = self.column(name)
        op_kind, op = self.take()
        if op == "in":
            self.expect("(")
            values = [_literal(*self.take())]
            while self.peek() == ("punct", ","):
                self.take()
                values.append(_literal(*self.take()))
            self.expect(")")
            params.extend(self.param(column, v) for v in values)
            return f"({column} IN ({', '.join('?' * len(values))}))"
        if op_kind != "name" or op not in _COMPARE:
            raise ODataError(f"unknown operator {op!r}")
        value = _literal(*self.take())
        if value is None:
            if op not in ("eq", "ne"):
                raise ODataError("null compares only with eq or ne")
            return f"({column} IS {'NOT ' if op == 'ne' else ''}NULL)"
        params.append(self.param(column, value))
        return f"({column} {_COMPARE[op]} ?)"

    def param(self, column: str, value: Any) -> Any:
        """A literal as the store holds the column's values: amounts in ten-thousandths."""
        if isinstance(value, bool) or not isinstance(value, int | Decimal):
            return value
        if self.amount(column):
            return stored_amount(value)
        return float(value) if isinstance(value, Decimal) else value


def compile_filter(text: str, table: Table) -> tuple[str, list[Any]]:
    """`$filter` to a SQL condition and its parameters. Raises ODataError naming what it could not read."""
    parser = _Parser(_tokens(text), table)
    params: list[Any] = []
    sql = parser.expr(params)
    if parser.peek() is not None:
        raise ODataError(f"unexpected {parser.peek()[1]!r} in the filter")  # type: ignore[index]
    return sql, params


def format_key(values: dict[str, Any]) -> str:
    """{column: value} to an alternate-key segment, quotes doubled (what clients must send)."""
    parts = []
    for name, value in values.items():
        literal = "'" + str(value).replace("'", "''") + "'" if isinstance(value, str) else str(value)
        parts.append(f"{name}={literal}")
    return ",".join(parts)
