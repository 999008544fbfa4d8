"""HTTP-trigger semantics of the local host: routes, methods, auth levels, conversions, admin API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from sandbox.host.runtime import LocalHost
from tests.conftest import AppFactory, read_records
from tests.polling import eventually
from tests.sandbox.hosting import running_host

pytestmark = pytest.mark.anyio
FUNCTION_KEY = "fk-test-0123456789"
MASTER_KEY = "mk-test-0123456789"


@pytest.fixture
async def web(make_app: AppFactory) -> AsyncIterator[tuple[LocalHost, httpx.AsyncClient]]:
    app_dir, settings, _ = make_app("web", SANDBOX_HOST_FUNCTION_KEY=FUNCTION_KEY, SANDBOX_HOST_MASTER_KEY=MASTER_KEY)
    async with running_host(app_dir, settings) as host, httpx.AsyncClient(base_url=host.http_url or "") as client:
        yield host, client


@pytest.mark.parametrize(
    ("method", "path", "key", "status"),
    [
        ("GET", "/api/items/7", None, 401),
        ("GET", "/api/items/7", "wrong-key", 401),
        ("GET", "/api/items/7", FUNCTION_KEY, 201),
        ("GET", "/api/items/7", MASTER_KEY, 201),
        ("POST", "/api/admin-only", FUNCTION_KEY, 401),
        ("POST", "/api/admin-only", MASTER_KEY, 200),
        ("GET", "/api/open/a/b/c", None, 200),
        ("GET", "/api/items/not-a-number", FUNCTION_KEY, 404),
        ("GET", "/api/nothing-here", FUNCTION_KEY, 404),
        ("DELETE", "/api/items/7", FUNCTION_KEY, 405),
        ("GET", "/admin/host/status", FUNCTION_KEY, 401),
        ("GET", "/admin/host/status", MASTER_KEY, 200),
    ],
)
async def test_status_by_route_method_and_key(
    web: tuple[LocalHost, httpx.AsyncClient], method: str, path: str, key: str | None, status: int
) -> None:
    _, client = web
    headers = {"x-functions-key": key} if key else {}
    response = await client.request(method, path, headers=headers)
    assert response.status_code == status


async def test_key_in_code_query_parameter_is_accepted(web: tuple[LocalHost, httpx.AsyncClient]) -> None:
    _, client = web
    assert (await client.get("/api/items/1", params={"code": FUNCTION_KEY})).status_code == 201


async def test_request_and_response_are_converted(web: tuple[LocalHost, httpx.AsyncClient]) -> None:
    _, client = web
    response = await client.put(
        "/API/Items/42",  # routes match case-insensitively, as in ASP.NET routing
        params={"q": "O'Brien & co"},
        content=b"payload",
        headers={"x-functions-key": FUNCTION_KEY, "x-custom": "yes"},
    )
    assert response.status_code == 201
    assert response.headers["x-out"] == "1"
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"id": "42", "method": "PUT", "q": "O'Brien & co", "body": "payload", "header": "yes"}


async def test_method_not_allowed_names_the_allowed_methods(web: tuple[LocalHost, httpx.AsyncClient]) -> None:
    _, client = web
    response = await client.delete("/api/items/1", headers={"x-functions-key": FUNCTION_KEY})
    assert response.headers["allow"] == "GET, PUT"


async def test_catch_all_route_and_plain_string_return(web: tuple[LocalHost, httpx.AsyncClient]) -> None:
    _, client = web
    response = await client.get("/api/open/x/y")
    assert response.text == "open:x/y"


async def test_function_that_raises_answers_500(web: tuple[LocalHost, httpx.AsyncClient]) -> None:
    _, client = web
    response = await client.get("/api/boom")
    assert response.status_code == 500
    assert response.content == b""  # no exception text leaks to the caller


async def test_admin_api_runs_a_timer_function(web: tuple[LocalHost, httpx.AsyncClient]) -> None:
    host, client = web
    response = await client.post("/admin/functions/nightly", headers={"x-functions-key": MASTER_KEY})
    assert response.status_code == 202
    records = host.options.app_dir / "records.jsonl"
    await eventually(lambda: read_records(records), what="the timer run")
    assert read_records(records)[-1] == {**read_records(records)[-1], "event": "nightly", "past_due": False}


async def test_generated_keys_are_written_to_a_private_file(make_app: AppFactory) -> None:
    app_dir, settings, _ = make_app("web")
    async with running_host(app_dir, settings) as host, httpx.AsyncClient(base_url=host.http_url or "") as client:
        key_file = app_dir / ".state" / "host-keys.json"
        keys = json.loads(key_file.read_text())
        assert key_file.stat().st_mode & 0o077 == 0
        ok = await client.get("/api/items/3", headers={"x-functions-key": keys["functionKey"]})
        assert ok.status_code == 201
        assert (await client.get("/api/items/3")).status_code == 401
