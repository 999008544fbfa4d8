"""One typed serializer between the state's dataclasses and Azure Table rows.

A row holds scalars only, so: strings, numbers and booleans go as they are; dicts, lists and tuples as JSON text;
None as an empty string; a nested dataclass is flattened into the row under its own field names (the checkpoint's
listing position sits in the same row as the watermark, in the columns it always had). Reading back, pydantic
validates and converts each value to the field's type, and a column the row does not have takes the field's default,
so rows written by an older version still read.
"""

from __future__ import annotations

import json
import types
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from pydantic import TypeAdapter

T = TypeVar("T")
_CONTAINERS = (dict, list, tuple)


def to_row(value: Any, *, partition: str, row_key: str, exclude: tuple[str, ...] = ("etag",)) -> dict[str, Any]:
    """The Table row of dataclass `value` (fields in `exclude` are not stored)."""
    return {"PartitionKey": partition, "RowKey": row_key, **_columns(value, exclude)}


def _columns(value: Any, exclude: tuple[str, ...]) -> dict[str, Any]:
    columns: dict[str, Any] = {}
    for field in fields(value):
        if field.name in exclude:
            continue
        item = getattr(value, field.name)
        if is_dataclass(item) and not isinstance(item, type):
            columns.update(_columns(item, exclude))
        elif isinstance(item, _CONTAINERS):
            columns[field.name] = json.dumps(item)
        else:
            columns[field.name] = "" if item is None else item
    return columns


def from_row(cls: type[T], row: Mapping[str, Any], **given: Any) -> T:
    """An instance of dataclass `cls` from a Table row; `given` values (an ETag, the key) win over the row's."""
    values = {**_values(cls, row), **given}
    adapter = _ADAPTERS.get(cls)
    if adapter is None:  # built once per class: building one costs far more than using it
        adapter = _ADAPTERS[cls] = TypeAdapter(cls)
    result: T = adapter.validate_python(values)
    return result


_ADAPTERS: dict[type[Any], TypeAdapter[Any]] = {}
_HINTS: dict[type[Any], dict[str, Any]] = {}


def _values(cls: type[Any], row: Mapping[str, Any]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:  # resolved once per class, like the adapters
        hints = _HINTS[cls] = get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in fields(cls):
        hint = hints[field.name]
        if isinstance(hint, type) and is_dataclass(hint):
            values[field.name] = _values(hint, row)
            continue
        raw = row.get(field.name)
        if raw is None or raw == "":
            continue  # the field's default
        values[field.name] = json.loads(raw) if _is_container(hint) and isinstance(raw, str) else raw
    return values


def _is_container(hint: Any) -> bool:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_is_container(arg) for arg in get_args(hint) if arg is not type(None))
    return (origin or hint) in _CONTAINERS
