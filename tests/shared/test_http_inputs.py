"""Every HTTP endpoint against what a careless or hostile caller sends: a 400 with a JSON body naming the field, never
a 500 with an empty body; and a signed webhook replayed inside its tolerance window enqueues nothing."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import azure.functions as func
import pytest

from shared import coalesce, dlq, dlq_api, state, webhook
from shared.reconcile import api as reconcile_api
from shared.runtime import Runtime
from tests.shared.runtimes import runtime_for

pytestmark = pytest.mark.anyio
SECRET = "whsec-test"


@pytest.fixture
async def runtime(conn: str) -> AsyncIterator[Runtime]:
    async with runtime_for(conn, BILLING_WEBHOOK_SECRET=SECRET) as built:
        await dlq.put_records(built.tables, [dlq.RecordFailure("customers", "c1", "invalid", "x")], run_id="run-1",
                              batch_id="b-1")  # fmt: skip
        yield built


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> func.HttpRequest:
    return func.HttpRequest("POST", url, body=body, headers={"content-type": "application/json", **(headers or {})})


def signed(body: bytes, timestamp: str | None = None) -> func.HttpRequest:
    ts = timestamp or str(int(time.time()))
    headers = {"X-Billing-Timestamp": ts, "X-Billing-Signature": webhook.sign(SECRET, ts, body)}
    return post("/api/webhooks/billing", body, headers)


def answer(response: func.HttpResponse) -> tuple[int, Any]:
    return response.status_code, json.loads(response.get_body())


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"run_id": 123}', "run_id"),
        (b'{"reason": 123}', "reason"),
        (b'{"status": [{}], "all": true}', "status.0"),
        (b'{"all": "please"}', "all"),
        (b'{"ids": "c1", "entity": "contacts"}', "entity"),
        (b'{"ids": ["c1\\nforged"]}', "ids.0"),
        (b'{"ids": [["c1"]]}', "ids.0"),
        (b'{"all": true, "delete": true}', "delete"),
        (b'{"run_id": "a/b#c?"}', "run_id"),
    ],
)
async def test_reprocess_answers_400_naming_the_field(runtime: Runtime, body: bytes, field: str) -> None:
    """Before, `run_id: 123`, `reason: 123` and `status: [{}]` answered 500 with an empty body."""
    status, data = answer(await dlq_api.reprocess(runtime, post("/api/dlq/reprocess", body)))
    assert status == 400
    assert field in [f["field"] for f in data["fields"]]
    assert field in data["error"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"[" * 10_000 + b"]" * 10_000, "nested too deep"),
        (b'{"ids": ["' + b"x" * 70_000 + b'"]}', "over the"),
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b"{}", "choose rows"),
    ],
)
async def test_reprocess_refuses_bodies_that_are_not_a_selection(runtime: Runtime, body: bytes, says: str) -> None:
    status, data = answer(await dlq_api.reprocess(runtime, post("/api/dlq/reprocess", body)))
    assert (status, says in data["error"]) == (400, True)


@pytest.mark.parametrize(
    ("params", "field"),
    [({"top": "many"}, "top"), ({"top": "0"}, "top"), ({"status": "gone"}, "status.0"), ({"color": "red"}, "color")],
)
async def test_the_dlq_list_answers_400_naming_the_query_parameter(
    runtime: Runtime, params: dict[str, str], field: str
) -> None:
    status, data = answer(await dlq_api.list_dlq(runtime, func.HttpRequest("GET", "/api/dlq", body=b"", params=params)))
    assert status == 400
    assert field in [f["field"] for f in data["fields"]]


async def test_the_dlq_list_ignores_a_function_key_sent_in_the_url(runtime: Runtime) -> None:
    params = {"code": "the-function-key", "status": "open,requeued", "ids": "c1"}
    status, data = answer(await dlq_api.list_dlq(runtime, func.HttpRequest("GET", "/api/dlq", body=b"", params=params)))
    assert (status, [r["record_id"] for r in data["rows"]]) == (200, ["c1"])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"id": "evt_1", "type": "invoice.updated", "data": {"id": "in_1\\nINFO forged"}}', "data.id"),
        (b'{"id": "evt_1", "type": "invoice.updated", "data": {"id": 42}}', "data.id"),
        (b'{"id": "evt_1", "type": "invoice.updated", "data": "in_1"}', "data"),
        (b'{"id": "evt_1", "type": "invoice.updated"}', "data"),
        (b'{"id": "evt_1", "type": 7, "data": {"id": "in_1"}}', "type"),
        (b'{"id": ["evt_1"], "type": "invoice.updated", "data": {"id": "in_1"}}', "id"),
    ],
)
async def test_a_signed_webhook_with_a_bad_field_is_refused_before_anything_is_enqueued(
    runtime: Runtime, body: bytes, field: str
) -> None:
    status, data = answer(await webhook.receive(runtime, signed(body)))
    assert status == 400
    assert field in [f["field"] for f in data["fields"]]
    assert (await runtime.queue.get_queue_properties()).approximate_message_count == 0  # invisible ones included


async def test_a_replayed_webhook_is_answered_200_and_enqueues_nothing(runtime: Runtime) -> None:
    """Before, each replay of a captured event within the 300 s tolerance enqueued a new batch."""
    body = json.dumps({"id": "evt_7", "type": "invoice.paid", "data": {"id": "in_7"}}).encode()
    request = signed(body)
    first = answer(await webhook.receive(runtime, request))
    again = [answer(await webhook.receive(runtime, request)) for _ in range(3)]
    queued = (await runtime.queue.get_queue_properties()).approximate_message_count  # the drain may be invisible
    assert first[0] == 202
    assert again == [(200, {"accepted": False, "reason": "event already received"})] * 3
    assert queued == 1  # the window's one drain message
    assert await coalesce.pending(runtime, first[1]["window"]) == ["in_7"]


async def test_an_event_without_an_id_is_remembered_by_its_signed_bytes(runtime: Runtime) -> None:
    body = b'{"type": "customer.updated", "data": {"id": "cus_1"}}'
    request = signed(body)
    results = [(await webhook.receive(runtime, request)).status_code for _ in range(2)]
    later = (await webhook.receive(runtime, signed(body, str(int(time.time()) + 1)))).status_code  # signed anew
    assert (results, later) == ([202, 200], 202)


async def test_events_older_than_the_window_are_forgotten(runtime: Runtime) -> None:
    assert await state.remember_event(runtime.tables, "id-evt_1", window_s=600)
    assert not await state.remember_event(runtime.tables, "id-evt_1", window_s=600)
    assert await state.forget_events(runtime.tables, older_than_s=600) == 0
    assert await state.forget_events(runtime.tables, older_than_s=-1) == 1  # every row is older than the future
    assert await state.remember_event(runtime.tables, "id-evt_1", window_s=600)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"ids": ["in_1"]}', "exactly one entity"),
        (b'{"ids": ["in_1"], "entity": ["customers", "invoices"]}', "exactly one entity"),
        (b'{"entity": "contacts"}', "entity.0"),
        (b'{"since": "yesterday"}', "since"),
        (b'{"dry_run": "yes"}', "dry_run"),
        (b'{"everything": true}', "everything"),
    ],
)
async def test_a_reconcile_request_that_cannot_be_run_answers_400_saying_why(
    runtime: Runtime, body: bytes, says: str
) -> None:
    status, data = answer(await reconcile_api.begin(runtime, post("/api/reconcile", body)))
    assert status == 400
    assert says in data["error"]
    assert (await runtime.reconcile_queue.get_queue_properties()).approximate_message_count == 0  # reconcile's queue
