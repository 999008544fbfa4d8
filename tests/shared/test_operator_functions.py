"""The operator's functions against Azurite: the poison handler, the DLQ API (list, reprocess) and health."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import azure.functions as func
import pytest

from shared import dlq, dlq_api, health, ledger, messages, poison, state, worker
from shared.runtime import Runtime
from tests.shared.runtimes import runtime_for

pytestmark = pytest.mark.anyio


@pytest.fixture
async def runtime(conn: str) -> AsyncIterator[Runtime]:
    async with runtime_for(conn) as built:
        yield built


def on_queue(body: bytes) -> bytes:
    """As the queue holds a message: base64 text (host.json passes it through undecoded)."""
    return base64.b64encode(body)


def request(method: str, url: str, body: object = None, **params: str) -> func.HttpRequest:
    data = json.dumps(body).encode() if body is not None else b""
    return func.HttpRequest(method, url, body=data, params=params, headers={"content-type": "application/json"})


async def test_a_poisoned_message_becomes_one_dlq_row_with_its_last_error_and_attempts(runtime: Runtime) -> None:
    run_id = state.run_id_for("invoices")  # 13 digits, then the entity: it looks like a phone number to masking
    msg = messages.build("invoices", ["in_1", "in_2"], run_id=run_id, source="fanout")
    await ledger.record_failure(runtime, msg, RuntimeError("Dataverse answered 503"), 5)
    key = await poison.handle_poison(runtime, on_queue(msg.body().encode()), dequeue_count=1)
    rows = await dlq.rows(runtime.tables, dlq.Selection(all=True))
    assert [(r["RowKey"], r["reason_kind"], r["attempts"]) for r in rows] == [(key, "poison", 5)]
    assert "RuntimeError: Dataverse answered 503" in rows[0]["reason"]
    assert messages.parse(rows[0]["body"]) == msg  # what reprocess will send again, exactly


async def test_a_malformed_poisoned_message_is_kept_as_malformed(runtime: Runtime) -> None:
    await poison.handle_poison(runtime, on_queue(b'{"v": 1, "run_id": "r"}'))
    rows = await dlq.rows(runtime.tables, dlq.Selection(all=True))
    assert [r["reason_kind"] for r in rows] == ["malformed"]


async def test_reprocess_requeues_the_chosen_rows_marks_them_and_refuses_a_bad_selection(runtime: Runtime) -> None:
    failures = [dlq.RecordFailure("customers", i, "invalid", "currency: unknown") for i in ("c1", "c2")]
    await dlq.put_records(runtime.tables, failures, run_id="run-r", batch_id="b-r")
    refused = await dlq_api.reprocess(runtime, request("POST", "/api/dlq/reprocess", {"status": ["nope"], "all": True}))
    dry = await dlq_api.reprocess(runtime, request("POST", "/api/dlq/reprocess", {"ids": ["c1"], "dry_run": True}))
    done = await dlq_api.reprocess(runtime, request("POST", "/api/dlq/reprocess", {"ids": ["c1"]}))
    sent = [messages.parse(m.content) async for m in runtime.queue.receive_messages(max_messages=32)]
    listed = await dlq_api.list_dlq(runtime, request("GET", "/api/dlq", status="requeued"))
    assert refused.status_code == 400
    assert "status" in json.loads(refused.get_body())["error"]
    assert json.loads(dry.get_body())["would_requeue"] == 1
    assert json.loads(done.get_body())["requeued_records"] == 1
    assert [(m.ids, m.source) for m in sent] == [(("c1",), "reprocess")]
    assert [r["record_id"] for r in json.loads(listed.get_body())["rows"]] == ["c1"]


async def test_health_reports_breakers_dlq_depth_and_listings(runtime: Runtime) -> None:
    await dlq.put_records(runtime.tables, [dlq.RecordFailure("customers", "c9", "invalid", "x")], run_id="r",
                          batch_id="b")  # fmt: skip
    for _ in range(runtime.settings.breaker_failure_threshold):
        await runtime.dataverse_breaker.record_failure()
    answer = await health.health(runtime)
    body = json.loads(answer.get_body())
    assert answer.status_code == 200
    assert body["status"] == "degraded"
    assert body["breakers"] == {"billing": "closed", "dataverse": "open"}
    assert body["dlq_depth"] == 1
    assert body["entities"]["invoices"] == {"watermark": None, "lag_seconds": None, "last_completed": None,
                                            "listing": None}  # fmt: skip


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 10_000 + b"]" * 10_000,
        b'{"v": 1, "run_id": "r/1#x?", "batch_id": "b", "entity": "invoices", "ids": ["in_1"]}',
        b'{"v": 1, "run_id": "ann@example.com", "batch_id": "+1 555 123 4567", "entity": "invoices", "ids": []}',
    ],
)
async def test_a_hostile_message_is_dead_lettered_at_its_first_delivery(runtime: Runtime, body: bytes) -> None:
    result = await worker.handle(runtime, on_queue(body), dequeue_count=1)
    rows = await dlq.rows(runtime.tables, dlq.Selection(all=True))
    assert result.outcome == "malformed"
    assert [r["reason_kind"] for r in rows] == ["malformed"]
    assert "ann@example.com" not in json.dumps(rows)
    assert "555 123 4567" not in json.dumps(rows)


@pytest.mark.parametrize("content", [b"not base64 at all!", b"\xff\xfe\x00", b""])
async def test_content_that_is_not_base64_is_dead_lettered_by_the_worker_and_by_the_poison_handler(
    runtime: Runtime, content: bytes
) -> None:
    """Before, the host failed to decode such content, past every handler, and it ended in -poison-poison."""
    result = await worker.handle(runtime, content, dequeue_count=1)
    await poison.handle_poison(runtime, content)
    rows = await dlq.rows(runtime.tables, dlq.Selection(all=True))
    assert result.outcome == "malformed"
    assert [r["reason_kind"] for r in rows] == ["malformed"]  # one row: the same body, refreshed
    assert rows[0]["occurrences"] == 2
    assert "base64" in rows[0]["reason"] or "JSON" in rows[0]["reason"]


async def test_a_malformed_row_keeps_the_raw_content_base64_encoded_and_capped_with_the_decode_error(
    runtime: Runtime,
) -> None:
    content = b"\xff\xfe not base64 " + bytes(range(256)) * 100  # 25.6 KB: over what a row keeps of it
    await poison.handle_poison(runtime, content, dequeue_count=5)
    (row,) = await dlq.rows(runtime.tables, dlq.Selection(all=True))
    assert (row["reason_kind"], row["raw_bytes"], row["attempts"]) == ("malformed", len(content), 5)
    assert "not base64" in row["reason"]
    assert base64.b64decode(row["raw_base64"]) == content[: dlq.MAX_RAW]


async def test_the_poison_handler_keeps_the_message_when_the_batch_ledger_cannot_be_read_or_written(
    runtime: Runtime,
) -> None:
    """Before, a failing ledger write raised out of the poison handler: the message went to -poison-poison."""
    msg = messages.build("invoices", ["in_1"], run_id="run-1", source="fanout")
    ledger_table = await runtime.tables.table("syncruns")
    await ledger_table.delete_table()  # every read and write of the batch's ledger row now fails
    key = await poison.handle_poison(runtime, on_queue(msg.body().encode()))
    (row,) = await dlq.rows(runtime.tables, dlq.Selection(all=True))
    assert (row["RowKey"], row["reason_kind"]) == (key, "poison")
    assert messages.parse(row["body"]) == msg


async def test_a_poisoned_message_larger_than_a_table_property_is_kept_whole_and_reprocessed_whole(
    runtime: Runtime,
) -> None:
    """Before, a verbatim body was cut at 30,000 characters: reprocess could not parse what was left and skipped it."""
    ids = [f"in_{n:04d}_" + "x" * 80 for n in range(400)]  # 38 KB: within a message, over a Table property
    msg = messages.build("invoices", ids, run_id="run-big", source="fanout")
    assert len(msg.body().encode("utf-16-le")) // 2 > dlq.MAX_BODY
    await poison.handle_poison(runtime, on_queue(msg.body().encode()))
    (row,) = await dlq.rows(runtime.tables, dlq.Selection(all=True))
    result = await dlq_api.requeue(runtime, [row])
    (sent,) = [messages.parse(m.content) async for m in runtime.queue.receive_messages(max_messages=32)]
    assert "body_1" in row
    assert result.skipped == []
    assert sent.ids == msg.ids


async def test_dlq_rows_hold_no_raw_control_characters(runtime: Runtime) -> None:
    reason = "name: too long\nINFO forged line\x00 for ann@example.com"
    await dlq.put_records(runtime.tables, [dlq.RecordFailure("customers", "c1", "invalid", reason)], run_id="r",
                          batch_id="b")  # fmt: skip
    await worker.handle(runtime, b"\x00\x1b[2J not base64\n", dequeue_count=1)
    rows = await dlq.rows(runtime.tables, dlq.Selection(all=True))
    texts = [str(v) for row in rows for k, v in row.items() if k not in ("Timestamp",)]
    assert len(rows) == 2
    assert not [t for t in texts if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in t)]
    assert "a***@example.com" in " ".join(texts)


async def test_a_reconcile_batch_yields_while_fan_out_is_listing(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    """The sync shares the CRM's budget and goes first: a reconcile batch waits (deferred on its own queue, no
    dequeue budget spent) while a listing is under way, and nothing of it is compared or written meanwhile."""
    cp = await state.read_checkpoint(runtime.tables, "invoices")
    cp.run_id = "run-listing"
    cp = await state.write_checkpoint(runtime.tables, cp)
    await assert_deferred(runtime, caplog, "fan-out is listing invoices")


async def test_a_reconcile_batch_yields_while_the_sync_has_a_backlog(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    for n in range(worker.SYNC_BACKLOG + 1):
        await runtime.queue.send_message(
            messages.build("invoices", [f"in_{n}"], run_id="run-s", source="fanout").body()
        )
    await assert_deferred(runtime, caplog, f"the sync's queue holds {worker.SYNC_BACKLOG + 1} messages")


async def assert_deferred(runtime: Runtime, caplog: pytest.LogCaptureFixture, why: str) -> None:
    sync_before = (await runtime.queue.get_queue_properties()).approximate_message_count
    msg = messages.build("invoices", ["in_1"], run_id="run-r", source="reconcile", kind="reconcile")
    result = await worker.handle(runtime, on_queue(msg.body().encode()))
    batches = await runtime.tables.table("reconcileruns")
    assert (result.outcome, result.counts["deferred"]) == ("deferred", 1)
    props = await runtime.reconcile_queue.get_queue_properties()
    assert props.approximate_message_count == 1  # sent again on its own queue, invisible for a while
    assert (await runtime.queue.get_queue_properties()).approximate_message_count == sync_before
    assert [row async for row in batches.list_entities()] == []
    run = [r async for r in state.run_batches(runtime.tables, "run-r")]
    assert [r["deferrals"] for r in run] == [1]
    assert f"reconcile yields: {why}" in caplog.text
