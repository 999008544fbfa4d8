"""The sync end to end: Azurite, both simulators and the local host running `function_app.py`. Nothing is mocked;
faults are injected by the simulators' profiles and the host, as a user's environment would have them."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue.aio import QueueClient

from sandbox.azurite import Azurite
from sandbox.crm_check import CrmCheck
from sandbox.dataverse_sim.schema import TABLES
from sandbox.faults import FaultProfile, load_profile
from sandbox.platform import Platform, PlatformOptions, platform
from sandbox.sync_demo import metric_points, metric_reader
from shared import dlq, fanout, state, telemetry
from tests.polling import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


def options(azurite: Azurite, **kwargs: Any) -> PlatformOptions:
    return PlatformOptions(azurite_conn=azurite.connection_string, **kwargs)


async def dlq_rows(p: Platform, **selection: Any) -> list[dict[str, Any]]:
    runtime = await p.runtime()
    return await dlq.rows(runtime.tables, dlq.Selection(all=True, **selection), limit=100_000)


async def check(p: Platform) -> Any:
    rows = await dlq_rows(p)
    open_rows = {(str(r["entity"]), str(r["record_id"])): str(r["reason_kind"]) for r in rows}
    return CrmCheck(p.billing.store, p.dataverse.store, open_rows, {}).run()


async def ledger(p: Platform, run_id: str) -> tuple[dict[str, Any], Counter[str]]:
    runtime = await p.runtime()
    run = next(r for r in await state.recent_runs(runtime.tables, limit=200) if r["RowKey"] == run_id)
    totals: Counter[str] = Counter()
    async for row in state.run_batches(runtime.tables, run_id):
        for key in (*state.BATCH_COUNTS, "ids", "poisoned"):
            totals[key] += int(row.get(key) or 0)
    return run, totals


def crm_row(p: Platform, logical: str, key: dict[str, str]) -> dict[str, Any] | None:
    row = p.dataverse.store.find(TABLES[logical], key)
    return dict(row) if row is not None else None


@pytest.fixture
async def quiet(azurite: Azurite) -> AsyncIterator[Platform]:
    async with platform(options(azurite, records=120, visibility_timeout_s=0.5)) as p:
        yield p


# ---- chaos ----


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_hostile_chaos_converges_with_nothing_lost_duplicated_or_poisoned(azurite: Azurite) -> None:
    hostile = load_profile("hostile")  # every billing and Dataverse fault; the host's, made frequent enough to
    profile = hostile.model_copy(  # hit a run of a few dozen messages
        update={
            "host": hostile.host.model_copy(update={"duplicate_delivery_rate": 0.15, "crash_after_success_rate": 0.15})
        }
    )
    # Webhooks off: at 20 changes/s against a 5 requests/s billing limit, one message per event would take minutes.
    run = options(
        azurite, records=800, profile=profile, visibility_timeout_s=2, lease_s=5, webhooks=False,
        settings={"SYNC_BATCH_SIZE": "50"},
    )  # fmt: skip
    async with platform(run) as p:
        first = await p.sync_until_complete(timeout_s=400)
        p.billing.simulator.mutations_paused = True
        second = await p.sync_until_complete(timeout_s=400, settle=True)
        report = await check(p)
        assert report.ok, report.differences[:10]
        assert report.duplicates == 0
        assert sum(report.matched.values()) > 900
        invalid = p.billing.simulator.stats  # the profile makes 1 % of generated records invalid
        assert report.invalid_in_dlq > 0, invalid
        rows = await dlq_rows(p, statuses=())
        assert not [r for r in rows if r["reason_kind"] in ("poison", "deferred_too_long")], "an outage poisoned"
        assert all(r["reason"] for r in rows)
        for run_id in first + second:
            run, totals = await ledger(p, run_id)
            ended = sum(totals[k] for k in ("written", "unchanged", "stale", "invalid", "rejected", "not_found"))
            assert totals["ids"] == int(run["listed"]), run_id
            assert ended == int(run["listed"]), (run_id, dict(totals))
        host = {listener.spec.name: listener.stats for listener in p.host.queue_listeners}
        assert host["sync_batch"].duplicated + host["sync_batch"].crashed > 0  # the host's faults did happen
        assert host["sync_batch"].poisoned == 0
        assert p.billing.simulator.stats.outage_drops + p.dataverse.simulator.stats.outage_drops > 0


# ---- idempotency and ordering ----


async def test_the_same_full_sync_twice_writes_nothing_the_second_time(quiet: Platform) -> None:
    p = quiet
    await p.sync_until_complete(timeout_s=120)
    written = p.dataverse.simulator.stats.records_written
    reads_after_first = line_reads(p)
    runtime = await p.runtime()
    table = await runtime.tables.table("syncstate")
    async for row in table.list_entities():
        await table.delete_entity(row["PartitionKey"], row["RowKey"])  # forget the watermark: list everything again
    runs = await p.sync_until_complete(timeout_s=120)
    for run_id in runs:
        run, totals = await ledger(p, run_id)
        assert totals["written"] == 0
        assert totals["unchanged"] + totals["invalid"] == int(run["listed"]) > 0
    assert p.dataverse.simulator.stats.records_written == written
    assert line_reads(p) == reads_after_first  # nothing written, nothing read


def line_reads(p: Platform) -> int:
    """Reads of the CRM's invoice lines so far (the Dataverse simulator's request log)."""
    return sum(
        sum(codes.values())
        for route, codes in p.dataverse.simulator.stats.requests.items()
        if route.startswith("GET") and "invoicedetails" in route
    )


def per_record_requests(p: Platform) -> dict[str, int]:
    """Requests that name one record in their URL (`accounts(key)`, `/v1/invoices/{id}`), by route: the hot path
    sends none (bulk fetches, UpsertMultiple, $batch, reads by filter)."""
    dataverse = p.dataverse.simulator.stats.requests
    billing = p.billing.simulator.stats.requests
    found = {route: sum(c.values()) for route, c in dataverse.items() if "(key)" in route}
    found |= {route: sum(c.values()) for route, c in billing.items() if "{id}" in route}
    return found


class LineRemoval(random.Random):
    """The billing simulator's users, removing one line of an invoice and changing nothing else."""

    def choice(self, seq: Any) -> Any:
        return "remove_line" if "remove_line" in seq else super().choice(seq)


async def test_an_invoice_written_before_loses_a_removed_line_without_a_read_of_its_crm_lines(quiet: Platform) -> None:
    """The line keys an invoice was written with are kept beside its hash: a line billing removed is deleted by key,
    and the CRM's lines are not read (before, every written invoice's lines were read: one request per 25)."""
    p = quiet
    await p.sync_until_complete(timeout_s=120)
    billing = p.billing.store
    ids = billing.all_ids("invoices")
    lines = billing.lines_of(ids)
    unpaid = [r["id"] for r in billing.get_many("invoices", ids) if r["status"] != "paid" and len(lines[r["id"]]) >= 2]
    chosen = [
        i for i in unpaid if crm_row(p, "invoice", {"invoicenumber": billing.get_many("invoices", [i])[0]["number"]})
    ][:3]
    assert len(chosen) == 3
    before = {i: {str(line["id"]) for line in lines[i]} for i in chosen}
    billing.mutate("invoices", chosen, LineRemoval(5))
    after = {i: {str(line["id"]) for line in billing.lines_of([i])[i]} for i in chosen}
    removed = {line for i in chosen for line in before[i] - after[i]}
    assert len(removed) == 3
    reads = line_reads(p)
    await p.sync_until_complete(timeout_s=120, settle=True)
    assert line_reads(p) == reads
    assert per_record_requests(p) == {}  # the removed lines went as one $batch, as did everything else
    in_crm = {str(r["bcs_billinglineid"]) for r in p.dataverse.store.query(TABLES["invoicedetail"])}
    assert not removed & in_crm
    assert set().union(*after.values()) <= in_crm


async def test_an_older_version_delivered_after_a_newer_one_does_not_overwrite_it(quiet: Platform) -> None:
    p = quiet
    await p.sync_until_complete(timeout_s=120)
    customer_id = next(i for i in p.billing.store.all_ids("customers") if crm_row(p, "account", {"accountnumber": i}))
    old = dict(p.billing.store.get_many("customers", [customer_id])[0])
    async with httpx.AsyncClient(
        base_url=p.billing.url, headers={"Authorization": f"Bearer {p.settings['BILLING_API_KEY']}"}
    ) as http:
        await http.post("/admin/mutate", json={"entity": "customers", "ids": [customer_id, customer_id]})
    newest = dict(p.billing.store.get_many("customers", [customer_id])[0])
    await p.sync_until_complete(timeout_s=120, settle=True)
    assert crm_row(p, "account", {"accountnumber": customer_id})["bcs_sourceversion"] in (  # type: ignore[index]
        newest["version"],
        old["version"],  # a bump that changes nothing mapped is not written
    )
    synced = crm_row(p, "account", {"accountnumber": customer_id})
    p.billing.store.restore("customers", old)  # billing now answers an older version (a stale replica)
    async with p.queue() as queue:
        await queue.send_message(json.dumps(
            {"v": 1, "run_id": "test-stale", "batch_id": "b-stale", "entity": "customers", "ids": [customer_id]}
        ))  # fmt: skip
    await p.wait_idle(timeout_s=60)
    _, totals = await ledger_batch(p, "test-stale", "b-stale")
    assert totals["stale"] + totals["unchanged"] == 1
    assert crm_row(p, "account", {"accountnumber": customer_id}) == synced


async def ledger_batch(p: Platform, run_id: str, batch_id: str) -> tuple[dict[str, Any], Counter[str]]:
    runtime = await p.runtime()
    row = await state.read_batch(runtime.tables, run_id, batch_id) or {}
    return row, Counter({k: int(row.get(k) or 0) for k in state.BATCH_COUNTS})


async def test_a_record_changed_while_a_listing_runs_is_synced_by_the_next_run(azurite: Azurite) -> None:
    slow = FaultProfile.model_validate({"billing": {"latency_ms": {"min": 300, "max": 300}}})
    async with platform(options(azurite, records=60, profile=slow, visibility_timeout_s=0.5)) as p:
        fan_out = asyncio.create_task(p.fan_out())
        requests = p.billing.simulator.stats.requests
        # the invoices' listing has started (billing answered its count): change a record under it
        await eventually(lambda: requests.get("GET /v1/invoices/count"), within=60, what="the invoices' count")
        invoice_id = p.billing.store.all_ids("invoices")[0]
        async with httpx.AsyncClient(
            base_url=p.billing.url, headers={"Authorization": f"Bearer {p.settings['BILLING_API_KEY']}"}
        ) as http:
            await http.post("/admin/mutate", json={"entity": "invoices", "ids": [invoice_id]})
        await fan_out
        p.billing.simulator.mutations_paused = True
        await p.sync_until_complete(timeout_s=120, settle=True)
        report = await check(p)
        assert report.ok, report.differences[:5]
        version = p.billing.store.versions("invoices")[invoice_id]
        number = p.billing.store.get_many("invoices", [invoice_id])[0]["number"]
        synced = crm_row(p, "invoice", {"invoicenumber": number})
        assert synced is not None
        assert synced["bcs_sourceversion"] in (version, version - 1)


# ---- failures ----


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("this is not json", "not JSON"),
        ('{"v": 9, "run_id": "r", "batch_id": "b", "entity": "customers", "ids": ["x"]}', "unknown schema version"),
        ('{"v": 1, "run_id": "r", "batch_id": "b", "entity": "contacts", "ids": ["x"]}', "unknown entity"),
        ('{"v": 1, "run_id": "r", "batch_id": "b", "entity": "customers"}', "ids"),
    ],
)
async def test_a_malformed_message_goes_to_the_dlq_at_once_with_its_reason(
    quiet: Platform, body: str, reason: str
) -> None:
    p = quiet
    async with p.queue() as queue:
        await queue.send_message(body)
    rows = await eventually(lambda: dlq_rows(p, reason="malformed"), within=30, what="the DLQ row")
    assert reason in rows[0]["reason"]
    stats = next(listener.stats for listener in p.host.queue_listeners if listener.spec.name == "sync_batch")
    assert stats.invocations == 1
    assert stats.failed == 0  # no redelivery: it cannot get better


async def test_content_that_is_not_base64_is_dead_lettered_at_its_first_delivery_not_moved_past_every_handler(
    quiet: Platform,
) -> None:
    p = quiet
    async with QueueClient.from_connection_string(p.conn, p.queue_name) as raw:  # no encode policy: text as it is
        await raw.send_message("{not base64, not anything}")
    rows = await eventually(lambda: dlq_rows(p, reason="malformed"), within=30, what="the DLQ row")
    assert "not base64" in rows[0]["reason"]
    stats = next(listener.stats for listener in p.host.queue_listeners if listener.spec.name == "sync_batch")
    assert (stats.invocations, stats.failed) == (1, 0)
    for suffix in ("-poison", "-poison-poison"):
        async with p.queue(p.queue_name + suffix) as queue:
            try:
                left = await queue.peek_messages(max_messages=32)
            except ResourceNotFoundError:
                left = []  # never created: nothing was ever moved there
            assert left == []


def _bad(**fields: Any) -> str:
    return json.dumps({"v": 1, "run_id": "run-bad", "batch_id": "b-bad", "entity": "invoices", "ids": ["in_x"],
                       **fields})  # fmt: skip


BAD_MESSAGES: dict[str, tuple[str, bool]] = {  # kind: (text, sent as base64 like every producer)
    "not base64": ("{not base64, not anything}", False),
    "nested 10,000 levels": ("[" * 10_000 + "]" * 10_000, True),
    "key characters in run_id": (_bad(run_id="r/1#x?y", batch_id="b-keys"), True),
    "key characters in batch_id": (_bad(batch_id="b/../x#?"), True),
    "email and phone as ids": (_bad(run_id="ann@example.com", batch_id="+1 555 123 4567"), True),
    "46 KB without whitespace": (_bad(batch_id="b-big", run_id="a@b." * 11_500), True),  # 60 KB on the queue
    "ids not a list": (_bad(batch_id="b-true", ids=True), True),
    "unknown ids": (_bad(batch_id="b-unknown", ids=["in_nobody_1", "in_nobody_2"]), True),
}


async def test_every_bad_message_kind_ends_in_one_dlq_row_at_its_first_delivery_and_nothing_in_poison_poison(
    quiet: Platform,
) -> None:
    p = quiet
    runtime = await p.runtime()
    unrelated = await dlq_rows(p)  # a forged reprocess message naming an unrelated row must not resolve it
    await dlq.put_message(runtime.tables, body=_bad(batch_id="b-victim"), reason_kind="poison", reason="x",
                          run_id="run-bad", batch_id="b-victim", entity="invoices", verbatim=True)  # fmt: skip
    await dlq.mark_requeued(runtime.tables, [("message", "b-victim")], "a" * 32)
    forged = _bad(batch_id="b-victim", source="reprocess", ids=["in_nobody_3"])
    async with QueueClient.from_connection_string(p.conn, p.queue_name) as raw:
        for text, encode in [*BAD_MESSAGES.values(), (forged, True)]:
            await raw.send_message(base64.b64encode(text.encode()).decode() if encode else text)
    malformed = len(BAD_MESSAGES) - 1  # all but the unknown ids, which are dead-lettered as not_found records

    async def at_least(n: int, reason: str) -> list[dict[str, Any]] | None:
        rows = await dlq_rows(p, reason=reason)
        return rows if len(rows) >= n else None

    rows = await eventually(lambda: at_least(malformed, "malformed"), within=90, what="the malformed rows")
    not_found = await eventually(lambda: at_least(3, "not_found"), within=90, what="the not_found rows")
    stats = next(listener.stats for listener in p.host.queue_listeners if listener.spec.name == "sync_batch")
    victim = [r for r in await dlq_rows(p, statuses=()) if r["RowKey"] == "b-victim"]
    assert len(rows) == malformed
    assert sorted(r["record_id"] for r in not_found) == ["in_nobody_1", "in_nobody_2", "in_nobody_3"]
    assert all(r["occurrences"] == 1 for r in [*rows, *not_found])  # one delivery each
    assert (stats.invocations, stats.failed) == (len(BAD_MESSAGES) + 1, 0)
    assert [r["status"] for r in victim] == ["requeued"]
    assert unrelated == []
    assert "ann@example.com" not in json.dumps(rows)
    for suffix in ("-poison", "-poison-poison"):
        async with p.queue(p.queue_name + suffix) as queue:
            try:
                left = await queue.peek_messages(max_messages=32)
            except ResourceNotFoundError:
                left = []
            assert left == []
    async with httpx.AsyncClient(base_url=p.host.http_url or "") as http:  # the host is up and answering
        key = {"x-functions-key": p.settings["SANDBOX_HOST_FUNCTION_KEY"]}
        assert (await http.get("/api/health", headers=key, timeout=30)).status_code == 200


async def test_a_message_that_always_fails_reaches_the_dlq_through_the_poison_queue_and_reprocess_syncs_it(
    quiet: Platform,
) -> None:
    p = quiet
    reader = metric_reader()
    failed_before = _failed_records(reader)
    sim = p.dataverse.simulator
    customer_ids = p.billing.store.all_ids("customers")[:3]
    secret, key = sim.client_secret, sim._signing_key
    sim.client_secret, sim._signing_key = "revoked", b"revoked"  # the app's Dataverse credentials stop working
    async with p.queue() as queue:
        await queue.send_message(json.dumps(
            {"v": 1, "run_id": "test-poison", "batch_id": "b-poison", "entity": "customers", "ids": customer_ids}
        ))  # fmt: skip
    rows = await eventually(lambda: dlq_rows(p, reason="poison"), within=90, what="the poison DLQ row")
    row = rows[0]
    assert row["batch_id"] == "b-poison"
    assert row["attempts"] == 5
    assert "401" in row["error"] or "Authentication" in row["error"] or "invalid_client" in row["error"]
    assert secret not in json.dumps(rows, default=str)
    assert crm_row(p, "account", {"accountnumber": customer_ids[0]}) is None
    assert _failed_records(reader) - failed_before == 3 * 5  # every id of every failed delivery: the failure rate

    sim.client_secret, sim._signing_key = secret, key  # the cause is removed
    async with httpx.AsyncClient(base_url=p.host.http_url or "") as http:
        headers = {"x-functions-key": p.settings["SANDBOX_HOST_FUNCTION_KEY"]}
        assert (await http.post("/api/dlq/reprocess", json={"run_id": "test-poison"})).status_code == 401
        answer = await http.post("/api/dlq/reprocess", json={"run_id": "test-poison"}, headers=headers)
        assert answer.status_code == 200, answer.text
        assert answer.json()["requeued_messages"] == 1
        await eventually(
            lambda: all(crm_row(p, "account", {"accountnumber": c}) for c in customer_ids),
            within=60, what="the reprocessed customers in the CRM",
        )  # fmt: skip
        resolved = await eventually(
            lambda: dlq_rows(p, run_id="test-poison", statuses=("resolved",)), within=30, what="the row resolved"
        )
        assert resolved[0]["requeue_count"] == 1
        listed = (await http.get("/api/dlq", params={"status": "any"}, headers=headers)).json()
        assert any(r["batch_id"] == "b-poison" and r["status"] == "resolved" for r in listed["rows"])


def _failed_records(reader: Any) -> int:
    points = metric_points(reader).get(telemetry.RECORDS, Counter())
    return int(
        sum(v for attrs, v in points.items() if ("outcome", "failed") in attrs and ("entity", "customers") in attrs)
    )


async def test_reprocess_selects_rows_by_reason_and_by_id_and_deletes_nothing(quiet: Platform) -> None:
    p = quiet
    runtime = await p.runtime()
    failures = [
        dlq.RecordFailure("customers", "cus_missing_1", "rejected", "Dataverse refused: call +1 (555) 123-4567"),
        dlq.RecordFailure("customers", "cus_missing_2", "invalid", "currency: 'XYZ' is not ISO 4217, jane@x.org"),
    ]
    await dlq.put_records(runtime.tables, failures, run_id="test-select", batch_id="b1")
    headers = {"x-functions-key": p.settings["SANDBOX_HOST_FUNCTION_KEY"]}
    async with httpx.AsyncClient(base_url=p.host.http_url or "", headers=headers) as http:
        listed = (await http.get("/api/dlq", params={"run_id": "test-select"})).json()["rows"]
        text = json.dumps(listed)
        assert "(555) 123" not in text
        assert "jane@" not in text
        assert "***4567" in text
        assert "j***@x.org" in text
        dry = (await http.post("/api/dlq/reprocess", json={"reason": "rejected", "dry_run": True})).json()
        assert dry["would_requeue"] == 1
        by_id = (await http.post("/api/dlq/reprocess", json={"ids": ["cus_missing_2"]})).json()
        assert by_id["requeued_records"] == 1
        bad = await http.post("/api/dlq/reprocess", json={"everything": True})
        assert bad.status_code == 400
        assert bad.json()["fields"] == [{"field": "everything", "problem": "unknown key"}]
    rows = await dlq_rows(p, run_id="test-select", statuses=())
    assert {r["record_id"]: r["status"] for r in rows if r["run_id"] == "test-select"} | {} != {}
    assert len([r for r in rows if r["record_id"] in ("cus_missing_1", "cus_missing_2")]) == 2  # nothing deleted


# ---- HTTP ----


def signed(secret: str, body: bytes, timestamp: int) -> dict[str, str]:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return {"X-Billing-Timestamp": str(timestamp), "X-Billing-Signature": f"v1={digest}"}


async def test_webhooks_are_verified_and_a_valid_event_reaches_the_crm_at_once(quiet: Platform) -> None:
    p = quiet
    await p.sync_until_complete(timeout_s=120, settle=True)
    invoice_id = p.billing.store.all_ids("invoices")[5]
    body = json.dumps({"id": "evt_1", "type": "invoice.updated", "data": {"id": invoice_id, "version": 99}}).encode()
    secret = p.settings["BILLING_WEBHOOK_SECRET"]
    async with httpx.AsyncClient(base_url=p.host.http_url or "") as http:
        url = "/api/webhooks/billing"
        assert (await http.post(url, content=body, headers=signed("wrong", body, int(time.time())))).status_code == 401
        stale = await http.post(url, content=body, headers=signed(secret, body, int(time.time()) - 3600))
        assert stale.status_code == 401
        assert "timestamp" in stale.text
        assert (await http.post(url, content=b"{", headers=signed(secret, b"{", int(time.time())))).status_code == 400
        before = p.billing.store.versions("invoices")[invoice_id]
        mutate = {"Authorization": f"Bearer {p.settings['BILLING_API_KEY']}"}
        changed = time.monotonic()
        await http.post(
            f"{p.billing.url}/admin/mutate", json={"entity": "invoices", "ids": [invoice_id]}, headers=mutate
        )
        number = p.billing.store.get_many("invoices", [invoice_id])[0]["number"]

        async def synced() -> bool:
            row = crm_row(p, "invoice", {"invoicenumber": number})
            return row is not None and row["bcs_sourceversion"] == before + 1

        await eventually(synced, within=15, what="the webhook's change in the CRM")
        latency = time.monotonic() - changed
    assert p.billing.simulator.stats.webhooks_sent >= 1
    print(f"webhook change in the CRM after {latency:.2f} s")  # measured, not asserted (see bench/)


def billing_calls(p: Platform) -> int:
    """Requests the app made to billing so far (the simulator's log; its admin routes left out)."""
    stats = p.billing.simulator.stats.requests
    return sum(sum(codes.values()) for route, codes in stats.items() if "/admin" not in route)


async def test_a_burst_of_webhook_events_costs_a_billing_fetch_per_window_not_per_event(quiet: Platform) -> None:
    """Forty invoices changed at once, each announced by a signed event: coalesced into windows of 2 s, they cost a
    handful of bulk fetches (before: forty messages, forty fetches), and every change reaches the CRM."""
    p = quiet
    await p.sync_until_complete(timeout_s=120, settle=True)
    ids = p.billing.store.all_ids("invoices")[:40]
    before = billing_calls(p)
    sent = p.billing.simulator.stats.webhooks_sent
    async with httpx.AsyncClient(base_url=p.billing.url) as http:
        mutate = {"Authorization": f"Bearer {p.settings['BILLING_API_KEY']}"}
        await http.post("/admin/mutate", json={"entity": "invoices", "ids": ids}, headers=mutate)
    versions = p.billing.store.versions("invoices")
    numbers = {str(r["number"]): versions[str(r["id"])] for r in p.billing.store.get_many("invoices", ids)}

    async def converged() -> bool:
        rows = [crm_row(p, "invoice", {"invoicenumber": n}) for n in numbers]
        return all(r is not None and r["bcs_sourceversion"] == numbers[r["invoicenumber"]] for r in rows)

    await eventually(converged, within=60, what="the forty changes in the CRM")
    await p.wait_idle(timeout_s=60)
    assert p.billing.simulator.stats.webhooks_sent - sent == 40
    calls = billing_calls(p) - before
    print(f"40 webhook events cost {calls} billing requests")
    assert calls <= 8  # a bulk fetch per window (and a retry or two), not one per event


async def test_health_needs_a_key_and_reports_runs_lag_dlq_and_breakers(quiet: Platform) -> None:
    p = quiet
    await p.sync_until_complete(timeout_s=120)
    async with httpx.AsyncClient(base_url=p.host.http_url or "") as http:
        assert (await http.get("/api/health")).status_code == 401
        answer = await http.get("/api/health", headers={"x-functions-key": p.settings["SANDBOX_HOST_FUNCTION_KEY"]})
    body = answer.json()
    assert body["status"] == "ok"
    assert body["breakers"] == {"billing": "closed", "dataverse": "closed"}
    assert body["entities"]["customers"]["lag_seconds"] >= 0
    assert isinstance(body["dlq_depth"], int)
    assert {r["entity"] for r in body["recent_runs"]} == {"customers", "invoices"}


async def test_a_sync_emits_the_metrics_the_alerts_use_to_an_in_memory_reader(quiet: Platform) -> None:
    reader = metric_reader()
    p = quiet
    await p.sync_until_complete(timeout_s=120)
    async with httpx.AsyncClient(base_url=p.host.http_url or "") as http:
        await http.get("/api/health", headers={"x-functions-key": p.settings["SANDBOX_HOST_FUNCTION_KEY"]})
    points = metric_points(reader)
    by_outcome = Counter(dict(a).get("outcome") for a, v in points[telemetry.RECORDS].items() for _ in range(int(v)))
    assert by_outcome["written"] > 0
    assert any(("outcome", "succeeded") in a for a in points[telemetry.BATCHES])
    assert {dict(a)["system"] for a in points[telemetry.API_REQUESTS]} == {"billing", "dataverse"}
    assert any(("outcome", "completed") in a for a in points[telemetry.RUNS])
    for gauge in (telemetry.DLQ_DEPTH, telemetry.BREAKER_STATE, telemetry.LAG):
        assert gauge in points, gauge
    assert set(points) <= set(telemetry.ALL_METRICS)


async def test_fan_out_stops_at_its_time_budget_and_the_next_tick_resumes_where_it_stopped(azurite: Azurite) -> None:
    slow = FaultProfile.model_validate({"billing": {"latency_ms": {"min": 150, "max": 150}}})
    settings = {"BILLING_PAGE_SIZE": "10", "SYNC_BATCH_SIZE": "10"}
    async with platform(options(azurite, records=80, profile=slow, settings=settings, webhooks=False)) as p:
        p.billing.simulator.mutations_paused = True
        runtime = await p.runtime()
        outcomes: list[str] = []
        for _ in range(60):
            results = await fanout.fan_out(runtime, budget_s=0.4)  # a page or two per tick
            outcomes += [r.outcome for r in results]
            if all(r.outcome == "completed" for r in results):
                break
        assert outcomes.count("paused") >= 3
        await p.wait_idle(timeout_s=120)
        runs = [r for r in await state.recent_runs(runtime.tables, limit=200) if int(r.get("listed") or 0)]
        assert {r["entity"]: int(r["listed"]) for r in runs} == {"customers": 20, "invoices": 80}
        for run in runs:
            _, totals = await ledger(p, run["RowKey"])
            assert totals["ids"] == int(run["listed"])  # every id enqueued once across the pauses
        report = await check(p)
        assert report.ok, report.differences[:5]
