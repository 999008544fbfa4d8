"""Fan-out ticks against Azurite and a crafted billing platform on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox.servers import ThreadedServer
from shared import dlq, fanout, messages, state
from shared.runtime import Runtime
from tests.shared.runtimes import runtime_for

pytestmark = pytest.mark.anyio


def _endless_app() -> Starlette:
    """One invoice due; the listing always has one more page and never asks the same thing twice."""

    async def count(request: Request) -> Response:
        return JSONResponse({"count": 1})

    async def listing(request: Request) -> Response:
        n = int(request.query_params.get("cursor", "0")) + 1
        row = {"id": f"inv_{n}", "updated_at": "2026-01-01T00:00:00Z"}
        return JSONResponse({"data": [row], "has_more": True, "next_cursor": str(n)})

    return Starlette(routes=[Route("/v1/{entity}/count", count), Route("/v1/{entity}", listing)])


@pytest.fixture
def endless() -> Iterator[str]:
    with ThreadedServer(_endless_app()) as server:
        yield server.url


@pytest.fixture
async def runtime(conn: str, endless: str) -> AsyncIterator[Runtime]:
    values = {"SYNC_ENTITIES": "invoices", "BILLING_BASE_URL": endless, "BILLING_PAGE_SIZE": "10",
              "BILLING_RATE_LIMIT_RPS": "1000"}  # fmt: skip
    async with runtime_for(conn, **values) as built:
        yield built


async def test_a_listing_the_platform_never_ends_fails_the_run_and_the_next_tick_starts_afresh(
    runtime: Runtime,
) -> None:
    """Resuming such a listing would ask the same request again, tick after tick: the run ends failed instead, the
    watermark stays, and the next tick lists the range from the start under a new run."""
    runs = []
    for _ in range(2):
        with pytest.raises(fanout.FanoutFailed, match="never ends the listing"):
            await fanout.fan_out(runtime, budget_s=600)
        cp = await state.read_checkpoint(runtime.tables, "invoices")
        assert (cp.run_id, cp.watermark, cp.listing.params) == ("", "", None)
        runs = await state.recent_runs(runtime.tables)
    assert [r["status"] for r in runs] == ["failed", "failed"]
    assert len({r["RowKey"] for r in runs}) == 2


def _bad_ids_app() -> Starlette:
    """Four invoices listed, two of them with ids no message can carry."""
    rows = [{"id": i, "updated_at": "2026-01-01T00:00:00Z"} for i in ("inv_1", "inv\n2", "x" * 101, "inv_3")]

    async def count(request: Request) -> Response:
        return JSONResponse({"count": len(rows)})

    async def listing(request: Request) -> Response:
        return JSONResponse({"data": rows, "has_more": False, "next_cursor": None})

    return Starlette(routes=[Route("/v1/{entity}/count", count), Route("/v1/{entity}", listing)])


async def test_an_id_no_message_can_carry_is_dead_lettered_and_the_rest_of_the_listing_goes_on(conn: str) -> None:
    """Before, the id failed the message model inside fan-out: the run failed, tick after tick, at the same page."""
    with ThreadedServer(_bad_ids_app()) as server:
        values = {"SYNC_ENTITIES": "invoices", "BILLING_BASE_URL": server.url, "BILLING_RATE_LIMIT_RPS": "1000"}
        async with runtime_for(conn, **values) as runtime:
            (result,) = await fanout.fan_out(runtime, budget_s=600)
            sent = [messages.parse(m.content) async for m in runtime.queue.receive_messages(max_messages=32)]
            rows = await dlq.rows(runtime.tables, dlq.Selection(all=True))
    assert (result.outcome, result.listed) == ("completed", 4)
    assert [m.ids for m in sent] == [("inv_1", "inv_3")]
    assert sorted((r["record_id"], r["reason_kind"]) for r in rows) == [("inv\\n2", "invalid"), ("x" * 101, "invalid")]
