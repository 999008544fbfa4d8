"""What the worker writes down after its writes (`shared.ledger`), against Azurite: DLQ rows, hashes, repairs of
records two workers wrote at once, and what a reprocessed batch resolves."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from shared import dlq, ledger, messages, state
from shared.dataverse.client import UpsertRow
from shared.plan import Planned
from shared.runtime import Runtime
from tests.shared.runtimes import runtime_for

pytestmark = pytest.mark.anyio


@pytest.fixture
async def runtime(conn: str) -> AsyncIterator[Runtime]:
    async with runtime_for(conn) as built:
        yield built


def written(record_id: str, digest: str, version: int = 1) -> Planned:
    return Planned(record_id, version, digest, (UpsertRow({"accountnumber": record_id}, {}, version),))


async def queued(runtime: Runtime) -> list[messages.SyncMessage]:
    return [messages.parse(m.content) async for m in runtime.queue.receive_messages(max_messages=32)]


async def test_a_record_another_worker_wrote_meanwhile_is_sent_again_forced_under_a_repair_run(
    runtime: Runtime,
) -> None:
    msg = messages.build("customers", ["c1", "c2"], run_id="run-1", source="fanout")
    await state.write_hashes(runtime.tables, "customers", [written("c1", "h0").synced], {})
    before = await state.read_hashes(runtime.tables, "customers", ["c1", "c2"])
    await state.write_hashes(runtime.tables, "customers", [written("c1", "other", 2).synced], before)  # elsewhere
    done = ledger.Settlement(written=[written("c1", "h1", 2), written("c2", "h1")], before=before)
    repaired = await ledger.settle(runtime, msg, done)
    stored = await state.read_hashes(runtime.tables, "customers", ["c1", "c2"])
    sent = await queued(runtime)
    assert repaired == ["c1"]
    assert {i: h.hash for i, h in stored.items()} == {"c1": "other", "c2": "h1"}
    assert [(m.ids, m.force, m.source, m.run_id.startswith("repair-")) for m in sent] == [
        (("c1",), True, "repair", True)
    ]


async def test_failures_get_dlq_rows_and_a_reprocessed_batch_resolves_what_it_settled(runtime: Runtime) -> None:
    failures = [dlq.RecordFailure("invoices", i, "invalid", "currency: unknown") for i in ("i1", "i2", "i3")]
    await dlq.put_records(runtime.tables, failures, run_id="run-0", batch_id="b-0")
    token = "0123456789abcdef" * 2
    await dlq.mark_requeued(runtime.tables, [("record-invoices", i) for i in ("i1", "i2", "i3")], token)
    again = messages.build("invoices", ["i1", "i2", "i3"], run_id="reprocess-1", source="reprocess")
    still_bad = [dlq.RecordFailure("invoices", "i2", "rejected", "Dataverse refused the invoice"),
                 dlq.RecordFailure("invoices", "i3", "not_found", "billing has no invoice with this id")]  # fmt: skip
    done = ledger.Settlement(failures=still_bad)
    await ledger.settle(runtime, again.model_copy(update={"dlq_token": token}), done)
    rows = await dlq.rows(runtime.tables, dlq.Selection(all=True, statuses=()))
    by_id = {r["record_id"]: (r["status"], r["reason_kind"]) for r in rows}
    assert by_id == {"i1": ("resolved", "invalid"), "i2": ("open", "rejected"), "i3": ("open", "not_found")}


@pytest.mark.parametrize("token", [None, "f" * 32])
async def test_a_reprocess_message_without_the_rows_token_resolves_nothing(runtime: Runtime, token: str | None) -> None:
    """Before, any message saying `"source": "reprocess"` marked the rows of its ids (or its batch id) resolved."""
    await dlq.put_records(runtime.tables, [dlq.RecordFailure("invoices", "i1", "invalid", "x")], run_id="r",
                          batch_id="b-0")  # fmt: skip
    poisoned = messages.build("invoices", ["i9"], run_id="run-0", source="fanout")
    await dlq.put_message(runtime.tables, body=poisoned.body(), reason_kind="poison", reason="x", run_id="run-0",
                          batch_id=poisoned.batch_id, entity="invoices", verbatim=True)  # fmt: skip
    await dlq.mark_requeued(runtime.tables, [("record-invoices", "i1"), ("message", poisoned.batch_id)], "0" * 32)
    for message in (messages.build("invoices", ["i1"], run_id="r", source="reprocess"),
                    poisoned.model_copy(update={"source": "reprocess"})):  # fmt: skip
        forged = message.model_copy(update={"dlq_token": token})
        await ledger.settle(runtime, forged, ledger.Settlement())
        await ledger.record_batch(runtime, forged, {}, complete=True)
    rows = await dlq.rows(runtime.tables, dlq.Selection(all=True, statuses=()))
    assert sorted(r["status"] for r in rows) == ["requeued", "requeued"]


async def test_a_failed_delivery_keeps_its_last_error_masked_and_its_first_failure_time(runtime: Runtime) -> None:
    msg = messages.build("customers", ["c1"], run_id="run-2", source="fanout")
    await ledger.record_failure(runtime, msg, RuntimeError("write to ann@example.com failed"), 1)
    first = await state.read_batch(runtime.tables, "run-2", msg.batch_id)
    await ledger.record_failure(runtime, msg, RuntimeError("again"), 2)
    second = await state.read_batch(runtime.tables, "run-2", msg.batch_id)
    assert first is not None
    assert second is not None
    assert first["last_error"] == "RuntimeError: write to a***@example.com failed"
    assert (second["attempts"], second["last_error"], second["status"]) == (2, "RuntimeError: again", "failed")
    assert second["first_failed"] == first["first_failed"]
