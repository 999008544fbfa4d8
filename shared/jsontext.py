"""JSON text whose decimal amounts stay exact: `Decimal` is written as a JSON number, digit for digit.

The standard library writes only floats as numbers, and a float keeps about 15 significant digits: billing's
amounts have up to 19 (15 before the point, 4 after), so `float()` would change some of them on the way to the CRM.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any


def dumps(value: Any) -> str:
    """`json.dumps(value)` for dicts, lists, strings, numbers, booleans and None, with `Decimal` as an exact number."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{value} is not a JSON number")
        return format(value, "f")
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


def loads(text: str | bytes) -> Any:
    """JSON text to Python, numbers with a fraction or an exponent as `Decimal` (never through a float)."""
    return json.loads(text, parse_float=Decimal)
