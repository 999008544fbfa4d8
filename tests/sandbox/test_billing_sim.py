"""The billing simulator's API: what clients rely on, and the faults it injects."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sandbox.billing_sim.run import RunningBilling, billing_server
from sandbox.billing_sim.store import Store
from sandbox.faults import BillingFaults, FaultProfile, Outage, RateLimit
from sandbox.procutil import spawn, stop
from sandbox.servers import ThreadedServer
from tests.polling import wait_until

KEY = "sim-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def sim() -> Iterator[RunningBilling]:
    with billing_server(records=300, seed=9, api_key=KEY) as running:
        yield running


def get(running: RunningBilling, path: str, **kwargs: Any) -> httpx.Response:
    headers = kwargs.pop("headers", AUTH)
    return httpx.get(running.url + path, headers=headers, timeout=10, **kwargs)


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/v1/invoices", {}, 401),
        ("/v1/invoices", {"Authorization": "Bearer nope"}, 401),
        ("/v1/invoices", {"Authorization": f"Basic {KEY}"}, 401),
        ("/v1/payments", AUTH, 404),
        ("/v1/invoices?limit=0", AUTH, 400),
        ("/v1/invoices?limit=101", AUTH, 400),
        ("/v1/invoices?limit=1000&fields=id,updated_at", AUTH, 200),
        ("/v1/invoices?offset=10", AUTH, 400),
        ("/v1/invoices?cursor=garbage!", AUTH, 400),
        ("/v1/invoices?updated_since=yesterday", AUTH, 400),
        ("/v1/invoices?updated_since=2024-01-01T00:00:00", AUTH, 400),
        ("/v1/invoices/count", AUTH, 200),
        ("/v1/invoices/in_does_not_exist", AUTH, 404),
    ],
)
def test_requests_and_their_answers(sim: RunningBilling, path: str, headers: dict[str, str], status: int) -> None:
    response = get(sim, path, headers=headers)
    assert response.status_code == status
    if status >= 400:
        assert set(response.json()["error"]) == {"code", "message"}


def test_cursor_listing_returns_every_record_once_in_update_order(sim: RunningBilling) -> None:
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": "70", "fields": "id,updated_at"} | ({"cursor": cursor} if cursor else {})
        body = get(sim, "/v1/invoices", params=params).json()
        seen += body["data"]
        if not body["has_more"]:
            assert body["next_cursor"] is None
            break
        cursor = body["next_cursor"]
    assert len(seen) == len({r["id"] for r in seen}) == 300
    assert [r["updated_at"] for r in seen] == sorted(r["updated_at"] for r in seen)
    assert set(seen[0]) == {"id", "updated_at"}


def test_count_and_updated_since_agree(sim: RunningBilling) -> None:
    body = get(sim, "/v1/invoices", params={"limit": "100"}).json()
    middle = body["data"][50]["updated_at"]
    count = get(sim, "/v1/invoices/count", params={"updated_since": middle}).json()["count"]
    assert count == 300 - 50


def test_full_records_have_money_as_strings_and_lines(sim: RunningBilling) -> None:
    invoice = get(sim, "/v1/invoices", params={"limit": "1"}).json()["data"][0]
    assert isinstance(invoice["total"], str)
    assert invoice["lines"]
    assert all(isinstance(line["amount"], str) for line in invoice["lines"])
    customer = get(sim, "/v1/customers", params={"limit": "1"}).json()["data"][0]
    assert set(customer["address"]) == {"line1", "city", "postal_code", "country"}


def test_bulk_fetch_leaves_out_unknown_ids_and_refuses_more_than_100(sim: RunningBilling) -> None:
    ids = sim.store.all_ids("customers")[:5]
    answer = httpx.post(f"{sim.url}/v1/customers/bulk", headers=AUTH, json={"ids": [*ids, "nope"]}, timeout=10)
    assert sorted(r["id"] for r in answer.json()["data"]) == sorted(ids)
    too_many = httpx.post(f"{sim.url}/v1/customers/bulk", headers=AUTH, json={"ids": ["x"] * 101}, timeout=10)
    assert too_many.status_code == 400
    bad = httpx.post(f"{sim.url}/v1/customers/bulk", headers=AUTH, content=b"{not json", timeout=10)
    assert bad.status_code == 400


def test_openapi_document_describes_every_route(sim: RunningBilling) -> None:
    doc = httpx.get(f"{sim.url}/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {"/v1/{entity}", "/v1/{entity}/count", "/v1/{entity}/bulk", "/v1/{entity}/{id}"}
    assert {"Customer", "Invoice", "InvoiceLine", "Page", "Error"} <= set(doc["components"]["schemas"])


def test_admin_mutate_bumps_version_and_moves_the_record_to_the_end(sim: RunningBilling) -> None:
    first = get(sim, "/v1/invoices", params={"limit": "1"}).json()["data"][0]
    answer = httpx.post(f"{sim.url}/admin/mutate", headers=AUTH, json={"entity": "invoices", "ids": [first["id"]]})
    assert answer.json()["changed"] == [[first["id"], first["version"] + 1]]
    latest = get(sim, f"/v1/invoices/{first['id']}").json()
    assert latest["updated_at"] > first["updated_at"]
    stats = get(sim, "/admin/stats").json()
    assert stats["mutations"] >= 1
    assert stats["records"]["invoices"] == 300
    assert stats["requests"]["GET /v1/invoices/{id}"]["200"] >= 1


def test_data_is_the_same_for_the_same_seed() -> None:
    a, b, c = Store(), Store(), Store()
    a.seed(invoices=40, seed=11)
    b.seed(invoices=40, seed=11)
    c.seed(invoices=40, seed=12)
    rows = [[dict(r) for r in s.list_offset("invoices", "", 0, 100)] for s in (a, b, c)]
    assert rows[0] == rows[1]
    assert rows[0] != rows[2]


def test_db_file_has_one_table_per_entity_with_api_column_names(tmp_path: Path) -> None:
    db = tmp_path / "billing.sqlite"
    with billing_server(records=20, seed=1, api_key=KEY, db=db):
        pass
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        columns = {r[1] for r in conn.execute("PRAGMA table_info(invoices)")}
        assert conn.execute("SELECT COUNT(*) FROM invoices").fetchone()[0] == 20
    assert tables == {"customers", "invoices", "invoice_lines"}
    assert {"id", "number", "customer_id", "total", "amount_due", "updated_at", "version"} <= columns
    with billing_server(records=999, seed=2, api_key=KEY, db=db) as again:  # an existing store is kept
        assert again.store.table_counts()["invoices"] == 20


def test_429_mode_answers_retry_after() -> None:
    profile = FaultProfile(billing=BillingFaults(rate_limit=RateLimit(requests_per_second=1, burst=1, mode="429")))
    with billing_server(records=10, seed=1, profile=profile, api_key=KEY) as running:
        codes = [get(running, "/v1/invoices").status_code for _ in range(3)]
        throttled = get(running, "/v1/invoices")
    assert 429 in codes
    assert throttled.status_code == 429
    assert int(throttled.headers["retry-after"]) >= 1


def test_silent_mode_answers_an_empty_last_page_and_short_bulk_fetches() -> None:
    profile = FaultProfile(billing=BillingFaults(rate_limit=RateLimit(requests_per_second=0.5, burst=1)))
    with billing_server(records=30, seed=1, profile=profile, api_key=KEY) as running:
        assert get(running, "/v1/invoices").json()["data"]  # the burst
        page = get(running, "/v1/invoices")
        ids = running.store.all_ids("invoices")[:10]
        bulk = httpx.post(f"{running.url}/v1/invoices/bulk", headers=AUTH, json={"ids": ids}, timeout=10)
    assert page.status_code == 200
    assert page.json() == {"object": "list", "data": [], "has_more": False, "next_cursor": None}
    assert bulk.status_code == 200
    assert len(bulk.json()["data"]) < 10


def test_outage_refuses_service_with_a_transport_error() -> None:
    profile = FaultProfile(billing=BillingFaults(outages=(Outage(start_s=0, duration_s=60),)))
    with billing_server(records=10, seed=1, profile=profile, api_key=KEY) as running:
        with pytest.raises(httpx.TransportError):
            get(running, "/v1/invoices")
        assert running.simulator.stats.outage_drops == 1


def test_every_change_is_posted_as_a_signed_webhook() -> None:
    received: list[tuple[dict[str, str], bytes]] = []
    lock = threading.Lock()

    async def hook(request: Request) -> Response:
        with lock:
            received.append((dict(request.headers), await request.body()))
        return Response(status_code=204)

    with (
        ThreadedServer(Starlette(routes=[Route("/hook", hook, methods=["POST"])])) as receiver,
        billing_server(
            records=20, seed=1, api_key=KEY, webhook_url=f"{receiver.url}/hook", webhook_secret="whsec"
        ) as running,
    ):
        ids = running.store.all_ids("invoices")[:3]
        httpx.post(f"{running.url}/admin/mutate", headers=AUTH, json={"entity": "invoices", "ids": ids})
        wait_until(lambda: len(received) == 3, within=30, what="three webhooks")
    for headers, body in received:
        timestamp = headers["x-billing-timestamp"]
        expected = hmac.new(b"whsec", timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        assert headers["x-billing-signature"] == f"v1={expected}"
    events = [json.loads(body) for _, body in received]
    assert sorted(e["data"]["id"] for e in events) == sorted(ids)
    assert all(e["data"]["version"] >= 2 for e in events)
    assert {e["type"] for e in events} == {"invoice.updated"}
    assert len({e["id"] for e in events}) == 3
    assert all(e["id"].startswith("evt_") and e["created_at"].endswith("Z") for e in events)


def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "BILLING_API_KEY": KEY, "BILLING_WEBHOOK_SECRET": "w"}
    proc = spawn([sys.executable, "-m", "sandbox", "billing-sim", "--records", "20", "--db", str(tmp_path / "b.db")],
                 cwd=root, env=env)  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(line.rstrip() for line in proc.stdout or []), daemon=True).start()
    try:
        url_line = wait_until(
            lambda: next((line for line in lines if "listening on" in line), None), within=60, what="the URL"
        )
        url = url_line.rsplit(" ", 1)[1]
        assert httpx.get(f"{url}/v1/invoices/count", headers=AUTH, timeout=10).json()["count"] == 20
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        stop(proc)
