"""The billing client and the listing engine fan-out ships, against the billing simulator: real HTTP on loopback,
the profile's faults for real."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from azure.data.tables.aio import TableClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from sandbox.billing_sim.run import RunningBilling, billing_server
from sandbox.faults import BillingFaults, FaultProfile, LatencyMs, Outage, RateLimit
from sandbox.servers import ThreadedServer
from shared.billing.client import BillingClient, BillingClientConfig
from shared.billing.listing import MAX_ROUNDS, ChangeListing, ListingPosition
from shared.billing.models import Entity
from shared.billing.pagination import KeysetOverOffset, Paginator
from shared.breaker import BreakerConfig, CircuitBreaker
from shared.callpolicy import TRANSPORT_ERROR, Answered, RetryPolicy
from shared.errors import AuthError, CircuitOpenError, ContractError, TransientError
from shared.state import Checkpoint
from tests.shared.billing.naive import NaiveOffsetPaginator

pytestmark = pytest.mark.anyio
KEY = "test-billing-key"


def client_for(url: str, **overrides: Any) -> BillingClient:
    config: dict[str, Any] = {"base_url": url, "api_key": KEY, "rate_limit_rps": 1000.0, **overrides}
    return BillingClient(BillingClientConfig(**config))


async def list_all(
    client: BillingClient, entity: Entity, *, paginator_for: Callable[[str], Paginator] | None = None
) -> set[str]:
    """Every id the engine gives, driven page by page as fan-out drives it; fails if the listing ends short.
    With another paginator: one round, short or not (the naive paginator's losses are the point)."""
    position = ListingPosition(expected=await client.count(entity, ""))
    rounds = 1 if paginator_for else MAX_ROUNDS
    listing = ChangeListing(client, entity, position, max_rounds=rounds, paginator_for=paginator_for)
    ids: set[str] = set()
    while not listing.finished:
        ids.update((await listing.next_page()).ids)
    assert paginator_for or not listing.short, f"{position.listed} listed, {position.expected} due"
    return ids


def total_requests(running: RunningBilling) -> int:
    return sum(sum(codes.values()) for codes in running.simulator.stats.requests.values())


@pytest.mark.slow
async def test_hostile_profile_lists_and_fetches_every_invoice_exactly_once_at_its_latest_version() -> None:
    """Silent throttling at 5 req/s, 5 % 5xx, 5-50 ms latency, a 10 s outage, offset pagination with 20 changes/s,
    2 % short bulk fetches: the listing and the fetch still give every id once, none older than at the start."""
    faults = BillingFaults(
        rate_limit=RateLimit(requests_per_second=5, burst=5, mode="silent"),
        error_rate=0.05,
        latency_ms=LatencyMs(min=5, max=50),
        outages=(Outage(start_s=10, duration_s=10),),
        pagination="offset",
        mutations_per_second=20,
        drop_ids_rate=0.02,
        invalid_record_rate=0.01,
    )
    with billing_server(records=10_000, seed=3, profile=FaultProfile(seed=3, billing=faults), api_key=KEY) as running:
        before = running.store.versions("invoices")
        retry = RetryPolicy(attempts=12, total_s=120, base_s=0.5, cap_s=8)
        async with client_for(running.url, pagination="offset", rate_limit_rps=5, retry=retry) as client:
            listed = await list_all(client, "invoices")
            result = await client.fetch("invoices", list(listed))
        stats = running.simulator.stats
        served = total_requests(running)
    assert listed == set(before)
    fetched, invalid = set(result.records), {r.record_id for r in result.invalid}
    assert result.not_found == []
    assert fetched.isdisjoint(invalid)
    assert fetched | invalid == set(before)
    assert len(result.invalid) == len(invalid)
    assert all(r.reason for r in result.invalid)
    assert all(result.records[i].version >= before[i] for i in fetched)
    # The faults really happened (errors, the outage, dropped ids, background changes) and the client's pacing
    # kept it under the rate limit.
    assert stats.throttled / served < 0.05
    assert stats.errors_injected > 0
    assert stats.dropped_ids > 0
    assert stats.outage_drops > 0
    assert stats.mutations > 100
    assert 0 < len(invalid) < 300


async def test_without_faults_the_client_makes_only_the_requests_pages_and_bulk_fetches_need() -> None:
    with billing_server(records=2_500, seed=1, api_key=KEY) as running:
        async with client_for(running.url, page_size=1000) as client:
            listed = await list_all(client, "invoices")
            result = await client.fetch("invoices", list(listed))
        served = total_requests(running)
    assert len(result.records) == 2_500
    assert served == 1 + 3 + 25  # count, 3 pages of 1000, 25 bulk fetches of 100
    assert sum(client.stats.requests.values()) == served
    assert client.stats.retries == 0


async def test_client_pacing_keeps_throttled_responses_under_five_percent() -> None:
    faults = BillingFaults(rate_limit=RateLimit(requests_per_second=10, burst=10, mode="429"))
    with billing_server(records=3_000, seed=2, profile=FaultProfile(billing=faults), api_key=KEY) as running:
        async with client_for(running.url, page_size=100, rate_limit_rps=10) as client:
            listed = await list_all(client, "invoices")
            result = await client.fetch("invoices", list(listed))
        served = total_requests(running)
        throttled = running.simulator.stats.throttled
    assert len(result.records) == 3_000
    assert served >= 61
    assert throttled / served < 0.05


async def test_naive_offset_loop_skips_records_that_keyset_over_offset_does_not() -> None:
    """The same simulator settings; after every page, two records already listed change and move to the end."""
    profile = FaultProfile(billing=BillingFaults(pagination="offset"))
    outcomes = {}
    for name, make in (("naive", NaiveOffsetPaginator), ("keyset", KeysetOverOffset)):
        with billing_server(records=2_000, seed=4, profile=profile, api_key=KEY) as running:
            all_ids = set(running.store.all_ids("invoices"))
            async with client_for(running.url, page_size=100) as client:
                client._http.event_hooks["response"].append(_mutate_listed(running))
                listed = await list_all(client, "invoices", paginator_for=make)
            outcomes[name] = all_ids - listed
    assert len(outcomes["naive"]) >= 10  # the naive loop lost records ...
    assert outcomes["keyset"] == set()  # ... ours lost none, under the same changes


def _mutate_listed(running: RunningBilling) -> Any:
    async def hook(response: httpx.Response) -> None:
        if response.request.method == "GET" and response.request.url.path == "/v1/invoices":
            await response.aread()
            ids = [r["id"] for r in response.json()["data"]]
            running.simulator.mutate("invoices", ids[:2])

    return hook


async def test_silent_throttling_of_list_and_bulk_is_detected_and_retried() -> None:
    faults = BillingFaults(rate_limit=RateLimit(requests_per_second=4, burst=2, mode="silent"))
    with billing_server(records=600, seed=5, profile=FaultProfile(billing=faults), api_key=KEY) as running:
        # The client paces itself far above the limit, so the platform throttles it silently, often.
        retry = RetryPolicy(attempts=30, total_s=120, base_s=0.2, cap_s=1)
        async with client_for(running.url, page_size=50, rate_limit_rps=50, retry=retry) as client:
            listed = await list_all(client, "invoices")
            result = await client.fetch("invoices", list(listed))
        ids = set(running.store.all_ids("invoices"))
    assert listed == ids
    assert set(result.records) | {r.record_id for r in result.invalid} == ids
    assert client.silent_throttles > 0


async def test_ids_that_do_not_exist_are_reported_not_found_after_confirmation() -> None:
    with billing_server(records=50, seed=6, api_key=KEY) as running:
        real = running.store.all_ids("customers")[:3]
        async with client_for(running.url, retry=RetryPolicy(base_s=0, cap_s=0)) as client:
            result = await client.fetch("customers", [*real, "cus_missing_1", "O'Brien & co/#1", "ünïcode"])
    assert set(result.records) == set(real)
    assert sorted(result.not_found) == sorted(["cus_missing_1", "O'Brien & co/#1", "ünïcode"])


@pytest.mark.parametrize(("known", "unknown"), [(0, 1), (97, 3), (0, 100)])
async def test_an_unknown_id_costs_one_bulk_answer_and_one_single_fetch(known: int, unknown: int) -> None:
    """Before, ids left out of a bulk answer were asked for again in bulk, with back-off, until the attempts ran
    out (seven or more calls and 10-24 s for a batch holding one unknown id), and the breaker counted a failure."""
    with billing_server(records=200, seed=6, api_key=KEY) as running:
        real = running.store.all_ids("invoices")[:known]
        missing = [f"in_gone_{n}" for n in range(unknown)]
        async with client_for(running.url) as client:
            result = await client.fetch("invoices", [*real, *missing])
            retries = client.stats.retries
        served = total_requests(running)
    assert sorted(result.not_found) == sorted(missing)
    assert len(result.records) + len(result.invalid) == known
    assert served == 1 + unknown  # one bulk answer, then one single fetch per unknown id
    assert retries == 0
    assert client.silent_throttles == 0


async def test_invalid_records_name_the_field_and_do_not_sink_the_batch() -> None:
    profile = FaultProfile(billing=BillingFaults(invalid_record_rate=0.3))
    with billing_server(records=200, seed=7, profile=profile, api_key=KEY) as running:
        async with client_for(running.url) as client:
            listed = await list_all(client, "invoices")
            result = await client.fetch("invoices", list(listed))
    assert len(result.records) + len(result.invalid) == 200
    assert len(result.invalid) > 20
    reasons = " ".join(r.reason for r in result.invalid)
    for field in ("currency", "customer_id", "quantity"):
        assert field in reasons


async def test_wrong_api_key_is_fatal_at_once() -> None:
    with billing_server(records=10, seed=1, api_key=KEY) as running:
        config = BillingClientConfig(base_url=running.url, api_key="wrong", rate_limit_rps=100)
        async with BillingClient(config) as client:
            with pytest.raises(AuthError, match="HTTP 401"):
                await client.count("invoices", "")
        assert total_requests(running) == 1


async def test_an_outage_opens_the_breaker_and_later_calls_are_refused_without_a_request(conn: str) -> None:
    profile = FaultProfile(billing=BillingFaults(outages=(Outage(start_s=0, duration_s=600),)))
    async with TableClient.from_connection_string(conn, "breakersclient") as table:
        await table.create_table()
        breaker = CircuitBreaker(table, "billing", BreakerConfig(failure_threshold=2, open_for_s=600, cache_s=0))
        with billing_server(records=10, seed=1, profile=profile, api_key=KEY) as running:
            config = BillingClientConfig(
                base_url=running.url, api_key=KEY, rate_limit_rps=100, retry=RetryPolicy(attempts=2, base_s=0, cap_s=0)
            )
            async with BillingClient(config, breaker=breaker) as client:
                for _ in range(2):
                    with pytest.raises(TransientError):
                        await client.count("invoices", "")
                served = running.simulator.stats.outage_drops
                with pytest.raises(CircuitOpenError, match="breaker 'billing' is open"):
                    await client.count("invoices", "")
                assert running.simulator.stats.outage_drops == served == 4  # the refused call sent nothing


async def test_a_hanging_platform_times_out_and_is_retried_not_waited_for() -> None:
    profile = FaultProfile(billing=BillingFaults(timeout_rate=1.0))
    with billing_server(records=10, seed=1, profile=profile, api_key=KEY) as running:
        retry = RetryPolicy(attempts=2, base_s=0, cap_s=0)
        async with client_for(running.url, timeout_s=0.3, retry=retry) as client:
            with pytest.raises(TransientError, match="ReadTimeout"):
                await client.count("invoices", "")
        assert client.stats.requests[Answered("GET", "/v1/invoices/count", TRANSPORT_ERROR)] == 2


# ---- a platform that answers garbage: a crafted server on loopback ----


def _garbage_app() -> Starlette:
    async def listing(request: Request) -> Response:
        kind = request.path_params["entity"]
        if kind == "nohasmore":
            return JSONResponse({"data": [{"id": "a", "updated_at": "2026-01-01T00:00:00Z"}]})
        if kind == "notjson":
            return PlainTextResponse("<html>proxy error</html>")
        if kind == "short":  # the count says 5; every listing ends after 2
            rows = [{"id": f"s{i}", "updated_at": f"2026-01-01T00:00:0{i}Z"} for i in range(2)]
            return JSONResponse({"data": rows, "has_more": False})
        if kind == "endless":  # always one more page, never the same request twice
            n = int(request.query_params.get("cursor", "0")) + 1
            row = {"id": f"e{n}", "updated_at": "2026-01-01T00:00:00Z"}
            return JSONResponse({"data": [row], "has_more": True, "next_cursor": str(n)})
        return JSONResponse({"data": [{"updated_at": "2026-01-01T00:00:00Z"}], "has_more": False})

    async def count(request: Request) -> Response:
        return JSONResponse({"count": 5 if request.path_params["entity"] == "short" else 1})

    async def bulk(request: Request) -> Response:
        ids = json.loads(await request.body())["ids"]
        return JSONResponse({"data": [{"name": "no id here"} for _ in ids]})

    async def one(request: Request) -> Response:
        return JSONResponse({"name": "still no id", "currency": "usd"})

    return Starlette(
        routes=[
            Route("/v1/{entity}/count", count),
            Route("/v1/{entity}/bulk", bulk, methods=["POST"]),
            Route("/v1/{entity}/{id}", one),
            Route("/v1/{entity}", listing),
        ]
    )


@pytest.fixture
def garbage() -> Iterator[str]:
    with ThreadedServer(_garbage_app()) as server:
        yield server.url


@pytest.mark.parametrize(
    ("entity", "error", "message"),
    [
        ("nohasmore", ContractError, "has_more"),
        ("noid", ContractError, "record 0 of the page has no id"),
        ("notjson", TransientError, "not JSON"),
    ],
)
async def test_malformed_answers_give_a_clear_error_not_a_loop(
    garbage: str, entity: str, error: type[Exception], message: str
) -> None:
    async with client_for(garbage, retry=RetryPolicy(attempts=3, base_s=0, cap_s=0)) as client:
        with pytest.raises(error, match=message):
            await list_all(client, entity)  # type: ignore[arg-type]


async def test_a_listing_short_of_the_count_is_listed_again_then_ends_short(garbage: str) -> None:
    async with client_for(garbage) as client:
        position = ListingPosition(expected=await client.count("short", ""))  # type: ignore[arg-type]
        listing = ChangeListing(client, "short", position)  # type: ignore[arg-type]
        pages = [await listing.next_page() for _ in range(3)]
    assert [p.restarted for p in pages] == [True, True, False]
    assert listing.finished
    assert listing.short
    assert (position.round, position.listed, position.expected) == (3, 2, 5)


async def test_a_platform_that_never_ends_the_listing_is_a_contract_error(garbage: str) -> None:
    async with client_for(garbage, page_size=1) as client:
        listing = ChangeListing(client, "endless", ListingPosition(expected=1))  # type: ignore[arg-type]
        for _ in range((1 // 1 + 1) * 4 + 10):  # what one due record allows at one record a page
            await listing.next_page()
        with pytest.raises(ContractError, match="never ends the listing"):
            await listing.next_page()
    assert not listing.finished


async def test_a_listing_resumed_from_its_stored_position_gives_the_rest_and_asks_nothing_twice() -> None:
    with billing_server(records=2_500, seed=1, api_key=KEY) as running:
        async with client_for(running.url, page_size=1000) as client:
            position = ListingPosition(expected=await client.count("invoices", ""))
            first = await ChangeListing(client, "invoices", position).next_page()
            cp = Checkpoint("invoices", run_id="r", listing=position)
            stored = Checkpoint.from_entity(cp.to_entity(), etag=None).listing  # through the table row's shape
            resumed = ChangeListing(client, "invoices", stored)
            rest: list[str] = []
            while not resumed.finished:
                rest += (await resumed.next_page()).ids
        served = total_requests(running)
        all_ids = set(running.store.all_ids("invoices"))
    assert len(first.ids) == 1000
    assert set(first.ids) | set(rest) == all_ids
    assert not set(first.ids) & set(rest)
    assert served == 1 + 3  # the count and three pages: the resumed listing asked for no page again


async def test_a_bulk_answer_without_ids_ends_as_invalid_records_under_the_asked_id(garbage: str) -> None:
    async with client_for(garbage, retry=RetryPolicy(attempts=2, base_s=0, cap_s=0)) as client:
        result = await client.fetch("customers", ["cus_1", "cus_2"])
    assert result.records == {}
    assert result.not_found == []
    assert {r.record_id for r in result.invalid} == {"cus_1", "cus_2"}
    assert all("id" in r.reason for r in result.invalid)
