"""Values put into OData URLs and filters (Dataverse's Web API, and Table storage queries): every one goes through
here, escaped (quotes doubled; in URL paths, then percent-encoded)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote
from uuid import UUID


def literal(value: Any) -> str:
    """An OData literal for a `$filter` or a key: strings quoted with `'` doubled; GUIDs, numbers, booleans bare."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | Decimal):
        return str(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    return "'" + str(value).replace("'", "''") + "'"


def key_segment(key: Mapping[str, Any]) -> str:
    """`(name='value',...)`, percent-encoded for a URL path: `&`, `#`, `/`, `?`, spaces, non-ASCII all escaped."""
    if not key:
        raise ValueError("a key needs at least one column")
    inner = ",".join(f"{name}={literal(value)}" for name, value in key.items())
    return "(" + quote(inner, safe="=,'") + ")"


def record_path(entity_set: str, key: Mapping[str, Any]) -> str:
    return f"{entity_set}{key_segment(key)}"


def bind(entity_set: str, key: Mapping[str, Any]) -> str:
    """The value of a `nav@odata.bind` annotation that points at a record by its alternate key."""
    inner = ",".join(f"{name}={literal(value)}" for name, value in key.items())
    return f"/{entity_set}({inner})"
