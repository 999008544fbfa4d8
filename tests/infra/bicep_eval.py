"""Evaluate the single-line `param` defaults and `var` expressions of a Bicep file, for tests.

No Bicep CLI installs here and pycep's expression trees lose operator precedence, so the templates' arithmetic
(alert windows, the schedule interval, input checks with `fail()`) is evaluated by this small interpreter of
Bicep's expression language: literals, interpolated strings, arrays, `[for x in xs: e]`, member and index access,
the operators with Bicep's precedence, `?:` evaluated lazily as ARM does, and the functions the templates use.
`fail(message)` raises `BicepFail`. Multi-line declarations (objects, resource bodies) are not read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class BicepFail(Exception):
    """The deployment would stop here with this message (Bicep's `fail()`)."""


_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(\?\?|&&|\|\||==|!=|<=|>=|[-+*/%<>!?:.,()\[\]{}])|(')|(\S))")


def _string(text: str, i: int) -> tuple[list[Any], int]:
    """A '...' literal starting after its quote: parts are text or parsed interpolations."""
    parts: list[Any] = []
    buf = ""
    while True:
        c = text[i]
        if c == "\\":
            buf += {"n": "\n", "t": "\t"}.get(text[i + 1], text[i + 1])
            i += 2
        elif c == "'":
            if buf:
                parts.append(buf)
            return parts, i + 1
        elif text.startswith("${", i):
            if buf:
                parts.append(buf)
                buf = ""
            parser = _Parser(text, i + 2)
            parts.append(parser.expr())
            parser.expect("}")
            i = parser.pos
        else:
            buf += c
            i += 1


class _Parser:
    def __init__(self, text: str, pos: int = 0) -> None:
        self.text, self.pos = text, pos

    def peek(self) -> tuple[str, Any]:
        saved = self.pos
        try:
            return self.next()
        finally:
            self.pos = saved

    def next(self) -> tuple[str, Any]:
        match = _TOKEN.match(self.text, self.pos)
        if match is None:
            return ("end", None)
        number, name, op, quote, other = match.groups()
        self.pos = match.end()
        if number is not None:
            return ("num", int(number))
        if name is not None:
            return ("name", name)
        if op is not None:
            return ("op", op)
        if quote is not None:
            parts, self.pos = _string(self.text, self.pos)
            return ("str", parts)
        raise SyntaxError(f"unexpected {other!r} at {self.pos} in {self.text!r}")

    def expect(self, op: str) -> None:
        kind, value = self.next()
        if (kind, value) != ("op", op) and not (op == "}" and kind == "op" and value == "}"):
            raise SyntaxError(f"expected {op!r}, found {value!r} at {self.pos} in {self.text!r}")

    def accept(self, op: str) -> bool:
        if self.peek() == ("op", op):
            self.next()
            return True
        return False

    def expr(self) -> Any:
        condition = self.binary(0)
        if self.accept("?"):
            yes = self.expr()
            self.expect(":")
            return ("?", condition, yes, self.expr())
        return condition

    LEVELS = (("??",), ("||",), ("&&",), ("==", "!="), ("<", "<=", ">", ">="), ("+", "-"), ("*", "/", "%"))

    def binary(self, level: int) -> Any:
        if level == len(self.LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while (tok := self.peek())[0] == "op" and tok[1] in self.LEVELS[level]:
            self.next()
            left = ("bin", tok[1], left, self.binary(level + 1))
        return left

    def unary(self) -> Any:
        if self.accept("!"):
            return ("not", self.unary())
        if self.accept("-"):
            return ("neg", self.unary())
        return self.postfix(self.primary())

    def postfix(self, node: Any) -> Any:
        while True:
            if self.accept("."):
                node = ("member", node, self.next()[1])
            elif self.accept("["):
                node = ("index", node, self.expr())
                self.expect("]")
            else:
                return node

    def primary(self) -> Any:
        kind, value = self.next()
        if kind in ("num", "str"):
            return (kind, value)
        if kind == "name":
            if value in ("true", "false", "null"):
                return ("const", {"true": True, "false": False, "null": None}[value])
            if self.accept("("):
                args = []
                while not self.accept(")"):
                    args.append(self.expr())
                    self.accept(",")
                return ("call", value, args)
            return ("ref", value)
        if value == "(":
            inner = self.expr()
            self.expect(")")
            return inner
        if value == "[":
            if self.peek() == ("name", "for"):
                self.next()
                var = self.next()[1]
                if self.next() != ("name", "in"):
                    raise SyntaxError("for: expected 'in'")
                source = self.expr()
                self.expect(":")
                body = self.expr()
                self.expect("]")
                return ("for", var, source, body)
            items = []
            while not self.accept("]"):
                items.append(self.expr())
                self.accept(",")
            return ("array", items)
        raise SyntaxError(f"unexpected {value!r} in {self.text!r}")


def parse(text: str) -> Any:
    parser = _Parser(text)
    node = parser.expr()
    if parser.peek()[0] != "end":
        raise SyntaxError(f"trailing text at {parser.pos} in {text!r}")
    return node


def _substring(s: str, start: int, length: int | None = None) -> str:
    return s[start:] if length is None else s[start : start + length]


def _int(value: Any) -> int:
    if isinstance(value, str) and not re.fullmatch(r"-?\d+", value.strip()):
        raise BicepFail(f"int(): {value!r} is not a whole number (the deployment stops with a conversion error)")
    return int(value)


def _min_max(pick: Callable[..., Any]) -> Callable[..., Any]:
    return lambda *args: pick(args[0]) if len(args) == 1 and isinstance(args[0], list) else pick(args)


def _fail(message: str) -> Any:
    raise BicepFail(message)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "split": lambda s, sep: s.split(sep),
    "trim": lambda s: s.strip(),
    "length": len,
    "startsWith": lambda s, p: s.lower().startswith(p.lower()),
    "endsWith": lambda s, p: s.lower().endswith(p.lower()),
    "substring": _substring,
    "int": _int,
    "string": lambda v: ("true" if v else "false") if isinstance(v, bool) else str(v),
    "bool": lambda v: v if isinstance(v, bool) else str(v).lower() == "true",
    "contains": lambda c, v: v in c,
    "empty": lambda v: v is None or len(v) == 0,
    "replace": lambda s, old, new: s.replace(old, new),
    "first": lambda v: v[0],
    "join": lambda items, sep: sep.join(items),
    "min": _min_max(min),
    "max": _min_max(max),
    "toLower": lambda s: s.lower(),
    "format": lambda fmt, *args: re.sub(r"\{(\d+)\}", lambda m: str(args[int(m.group(1))]), fmt),
    "fail": _fail,
}

_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a // b,
    "%": lambda a, b: a % b,
}


@dataclass
class Template:
    """The single-line params and vars of one Bicep file; evaluate a var with `template.var(name, **params)`."""

    path: Path
    params: dict[str, str] = field(default_factory=dict)  # name -> default expression ("" when none)
    vars: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Template:
        template = cls(path)
        for line in path.read_text().splitlines():
            if m := re.match(r"^param (\w+) \w+(?: = (.+))?$", line):
                template.params[m.group(1)] = m.group(2) or ""
            elif (m := re.match(r"^var (\w+) = (.+)$", line)) and not re.match(r"^[\[{]\s*$", m.group(2)):
                template.vars[m.group(1)] = m.group(2)
        return template

    def var(self, name: str, **params: Any) -> Any:
        return self.evaluate(("ref", name), params)

    def expression(self, text: str, **params: Any) -> Any:
        return self.evaluate(parse(text), params)

    def evaluate(self, node: Any, params: Mapping[str, Any], local: Mapping[str, Any] | None = None) -> Any:
        scope = _Scope(self, params, dict(local or {}))
        return scope.eval(node)


@dataclass
class _Scope:
    template: Template
    params: Mapping[str, Any]
    local: dict[str, Any]
    cache: dict[str, Any] = field(default_factory=dict)

    def lookup(self, name: str) -> Any:
        if name in self.local:
            return self.local[name]
        if name in self.params:
            return self.params[name]
        if name in self.cache:
            return self.cache[name]
        if name in self.template.vars:
            self.cache[name] = self.eval(parse(self.template.vars[name]))
            return self.cache[name]
        default = self.template.params.get(name)
        if default:
            return self.eval(parse(default))
        raise KeyError(f"{self.template.path.name}: no value for {name!r} (a parameter without a default?)")

    def eval(self, node: Any) -> Any:
        kind = node[0]
        if kind in ("num", "const"):
            return node[1]
        if kind == "str":
            return "".join(p if isinstance(p, str) else FUNCTIONS["string"](self.eval(p)) for p in node[1])
        if kind == "ref":
            return self.lookup(node[1])
        if kind == "array":
            return [self.eval(item) for item in node[1]]
        if kind == "for":
            _, var, source, body = node
            return [_Scope(self.template, self.params, {**self.local, var: v}, self.cache).eval(body)
                    for v in self.eval(source)]  # fmt: skip
        if kind == "?":
            return self.eval(node[2]) if self.eval(node[1]) else self.eval(node[3])
        if kind == "not":
            return not self.eval(node[1])
        if kind == "neg":
            return -self.eval(node[1])
        if kind == "bin":
            _, op, left, right = node
            a, b = self.eval(left), self.eval(right)  # ARM evaluates both sides of && and ||: so do we
            if op == "&&":
                return bool(a) and bool(b)
            if op == "||":
                return bool(a) or bool(b)
            if op == "??":
                return a if a is not None else b
            return _OPS[op](a, b)
        if kind == "index":
            return self.eval(node[1])[self.eval(node[2])]
        if kind == "member":
            return self.eval(node[1])[node[2]]
        if kind == "call":
            return FUNCTIONS[node[1]](*(self.eval(a) for a in node[2]))
        raise ValueError(f"unknown node {kind}")
