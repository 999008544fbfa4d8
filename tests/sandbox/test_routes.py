"""Route templates compile to the matching rules of ASP.NET routing that Functions uses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox.host.errors import HostStartupError
from sandbox.host.http import compile_route


@pytest.mark.parametrize(
    ("template", "path", "params"),
    [
        ("api/health", "/api/health", {}),
        ("api/health", "/API/Health/", {}),
        ("api/items/{id:int}", "/api/items/42", {"id": "42"}),
        ("api/items/{id:int}", "/api/items/x", None),
        ("api/dlq/{id?}", "/api/dlq", {"id": None}),
        ("api/dlq/{id?}", "/api/dlq/abc", {"id": "abc"}),
        ("api/files/{*path}", "/api/files/a/b/c.txt", {"path": "a/b/c.txt"}),
        ("api/runs/{run}/rows/{n:int}", "/api/runs/r1/rows/3", {"run": "r1", "n": "3"}),
        ("api/flag/{on:bool}", "/api/flag/True", {"on": "True"}),
        ("api/flag/{on:bool}", "/api/flag/yes", None),
        ("api/items/{id}", "/api/items/1/2", None),
        ("api/v{version:int}/x", "/api/v2/x", {"version": "2"}),
    ],
)
def test_route_templates(template: str, path: str, params: dict[str, str | None] | None) -> None:
    match = compile_route(template, where="t").match(path)
    if params is None:
        assert match is None
    else:
        assert match is not None
        assert match.groupdict() == params


@pytest.mark.parametrize("template", ["api/{id:regex}", "api/{id", "api/x}"])
def test_unsupported_or_malformed_templates_fail_start_up(template: str) -> None:
    with pytest.raises(HostStartupError, match="function 'f'"):
        compile_route(template, where="function 'f'")


@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_int_constraint_accepts_every_integer(n: int) -> None:
    match = compile_route("api/items/{id:int}", where="t").match(f"/api/items/{n}")
    assert match is not None
    assert match["id"] == str(n)
