"""Reconcile end to end: Azurite, both simulators and the local host running `function_app.py`. The CRM is edited by
hand (directly in the Dataverse simulator, as a person or a plugin would), a reconcile run is started over HTTP as
an operator would, and what it finds, heals and reports is read back."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest

from sandbox.azurite import Azurite
from sandbox.dataverse_sim.schema import TABLES
from sandbox.dataverse_sim.store import decoded
from sandbox.faults import BillingFaults, DataverseFaults, FaultProfile, RevertingPlugin
from sandbox.platform import Platform, PlatformOptions, platform
from shared import dlq, state
from shared.reconcile import report
from shared.reconcile.findings import MISMATCHES
from tests import browser

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]
INVOICE, ACCOUNT, LINE = TABLES["invoice"], TABLES["account"], TABLES["invoicedetail"]


@pytest.fixture
async def synced(azurite: Azurite) -> AsyncIterator[Platform]:
    profile = FaultProfile(billing=BillingFaults(invalid_record_rate=0.04))
    options = PlatformOptions(azurite_conn=azurite.connection_string, records=150, seed=7, profile=profile,
                              visibility_timeout_s=0.5, webhooks=False)  # fmt: skip
    async with platform(options) as p:
        await p.sync_until_complete(timeout_s=300, settle=True)
        yield p


async def run(p: Platform, body: dict[str, Any]) -> dict[str, Any]:
    """A run started over HTTP, waited for (its batches and the syncs it sent); its summary."""
    return await p.reconcile(body, timeout_s=300)


async def open_findings(p: Platform) -> dict[tuple[str, str], set[str]]:
    runtime = await p.runtime()
    table = await runtime.tables.table(MISMATCHES)
    return {
        (str(row["PartitionKey"]), str(row["record_id"])): set(str(row["categories"]).split(","))
        async for row in table.query_entities("resolved_at eq ''")
    }


def crm_invoices(p: Platform) -> dict[str, dict[str, Any]]:
    return {str(r["invoicenumber"]): decoded(INVOICE, r) for r in p.dataverse.store.query(INVOICE)}


def crm_writes(p: Platform) -> int:
    """Requests that could change the CRM: every one but reads and token requests."""
    stats = p.dataverse.simulator.stats.requests
    return sum(
        sum(codes.values()) for route, codes in stats.items() if not route.startswith("GET") and "token" not in route
    )


async def get(p: Platform, path: str, **params: str) -> httpx.Response:
    key = p.settings["SANDBOX_HOST_FUNCTION_KEY"]
    async with httpx.AsyncClient(base_url=p.host.http_url or "", timeout=120) as http:
        return await http.get(path, params=params, headers={"x-functions-key": key})


async def check_report_page(p: Platform, summary: dict[str, Any]) -> None:
    """The report page, loaded in headless Chromium, shows the numbers `GET /api/reconcile/latest` gives."""
    url = f"{p.host.http_url}/api/report?code={p.settings['SANDBOX_HOST_FUNCTION_KEY']}"
    page = browser.parse(await browser.rendered_dom(url))
    assert page.text("run-id") == summary["run_id"]
    assert page.text("run-state") == "complete"
    for entity, counts in summary["entities"].items():
        for name in ("compared", "mismatched", "new", "resolved", "healed", "persistent", "crm_requests"):
            assert page.values(entity=entity, field=name) == [str(counts[name])], (entity, name)
        assert page.values(entity=entity, field="drift") == [str(counts["drift"])]
        for category, n in counts["categories"].items():
            assert page.values(entity=entity, category=category) == [str(n)], (entity, category)
        assert str(counts["drift"]) in page.attributes("data-drift")  # the chart's latest point
    assert page.values(column=summary["top_columns"][0][0]) == [str(summary["top_columns"][0][1])]
    assert summary["report"] in page.attributes("data-report")
    runtime = await p.runtime()
    for reason, n in (await dlq.open_by_reason(runtime.tables)).items():
        assert page.values(reason=reason) == [str(n)]


def lines_of(p: Platform, invoice_guid: str) -> list[dict[str, Any]]:
    return [decoded(LINE, r) for r in p.dataverse.store.query(LINE, where='"invoiceid" = ?', params=[invoice_guid])]


async def test_hand_edits_are_found_by_key_healed_and_gone_in_the_next_run(synced: Platform) -> None:
    p = synced
    crm, billing = p.dataverse.store, p.billing.store
    number_to_id = {str(r["number"]): str(r["id"]) for r in billing.get_many("invoices", billing.all_ids("invoices"))}
    invoices = crm_invoices(p)
    with_lines = [n for n, row in invoices.items() if len(lines_of(p, str(row["invoiceid"]))) >= 2]
    over, under, line_gone, line_added, deleted = with_lines[:5]
    crm.write(INVOICE, {"invoicenumber": over}, {"totalamount": invoices[over]["totalamount"] + Decimal("10.00")})
    crm.write(INVOICE, {"invoicenumber": under}, {"bcs_amountdue": invoices[under]["bcs_amountdue"] - Decimal("5")})
    crm.delete(LINE, {"bcs_billinglineid": lines_of(p, str(invoices[line_gone]["invoiceid"]))[0]["bcs_billinglineid"]})
    crm.write(LINE, {"bcs_billinglineid": "li_added_by_hand"}, {"quantity": 1, "priceperunit": 5, "extendedamount": 5,
              "invoiceid@odata.bind": f"/invoices(invoicenumber='{line_added}')"})  # fmt: skip
    for line in lines_of(p, str(invoices[deleted]["invoiceid"])):
        crm.delete(LINE, {"bcs_billinglineid": line["bcs_billinglineid"]})
    crm.delete(INVOICE, {"invoicenumber": deleted})
    account = decoded(ACCOUNT, crm.query(ACCOUNT, where='"emailaddress1" IS NOT NULL', limit=1)[0])
    crm.write(ACCOUNT, {"accountnumber": account["accountnumber"]}, {"emailaddress1": "someone.else@example.org"})
    crm.write(ACCOUNT, {"accountnumber": "cus_gone_from_billing"}, {"name": "Deleted in billing"})
    runtime = await p.runtime()
    in_dlq = await dlq.rows(runtime.tables, dlq.Selection(all=True), limit=1000)
    invalid = {(str(r["entity"]), str(r["record_id"])) for r in in_dlq if r["reason_kind"] == "invalid"}
    blocked = {(str(r["entity"]), str(r["record_id"])) for r in in_dlq if r["reason_kind"] == "dependency"}
    assert invalid  # the profile makes some (and invoices of invalid customers wait in the DLQ: blocked)

    first = await run(p, {})
    found = await open_findings(p)
    expected = {
        ("invoices", number_to_id[over]): {"amount_over"},
        ("invoices", number_to_id[under]): {"amount_under"},
        ("invoices", number_to_id[line_gone]): {"lines_missing"},
        ("invoices", number_to_id[line_added]): {"lines_extra"},
        ("invoices", number_to_id[deleted]): {"missing_in_crm"},
        ("customers", str(account["accountnumber"])): {"field_mismatch"},
        ("customers", "cus_gone_from_billing"): {"orphan_in_crm"},
    }
    for key, categories in expected.items():
        assert found.get(key) == categories, key
    assert {key for key, c in found.items() if c == {"invalid_in_billing"}} == invalid
    assert {key for key, c in found.items() if c == {"missing_in_crm"}} - set(expected) == blocked  # in the DLQ
    assert set(found) == set(expected) | invalid | blocked  # nothing else differs
    name = first["report"]
    assert name == f"reconcile/{first['started_at'][:10]}-{first['run_id']}.csv"  # the day the run started (UTC)
    answer = await get(p, "/api/report/csv", name=name)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/csv")
    rows = report.read_csv(answer.content)
    assert {(r["entity"], r["record_id"], r["category"]) for r in rows} == {
        (entity, record_id, category) for (entity, record_id), categories in found.items() for category in categories
    }  # the CSV holds every finding of the run, and nothing else
    raised = next(r for r in rows if r["record_id"] == number_to_id[over])
    assert (raised["columns"], raised["difference"]) == ("totalamount", "10.00")
    assert raised["currency"]
    month = report.previous_month(datetime.fromisoformat(first["started_at"]))  # the month before the run's
    assert (await get(p, "/api/report/csv", name=f"reconcile/monthly-{month}.csv")).status_code == 200
    assert (await get(p, "/api/report/csv", name="../secrets.csv")).status_code == 400
    assert (await get(p, "/api/report/csv", name="reconcile/2000-01-01-none.csv")).status_code == 404
    await check_report_page(p, first)
    assert first["entities"]["invoices"]["healed"] == 5
    assert first["entities"]["customers"]["categories"]["orphan_in_crm"] == 1
    healed = crm_invoices(p)
    assert healed[over]["totalamount"] == invoices[over]["totalamount"]
    assert deleted in healed
    assert "li_added_by_hand" not in {
        str(r["bcs_billinglineid"]) for r in lines_of(p, str(healed[line_added]["invoiceid"]))
    }

    second = await run(p, {})
    after = await open_findings(p)
    assert set(after) == {("customers", "cus_gone_from_billing")} | invalid | blocked  # healed, resolved; known stay
    assert second["entities"]["invoices"]["resolved"] == 5
    assert second["entities"]["invoices"]["mismatched"] == len(blocked)  # still missing, waiting in the DLQ
    assert second["entities"]["invoices"]["healed"] == 0


async def test_a_dry_run_reports_and_writes_nothing_to_the_crm_or_the_queue(synced: Platform) -> None:
    p = synced
    invoices = crm_invoices(p)
    number = next(iter(invoices))
    raised = invoices[number]["totalamount"] + Decimal("1.00")
    p.dataverse.store.write(INVOICE, {"invoicenumber": number}, {"totalamount": raised})
    writes_before = crm_writes(p)
    summary = await run(p, {"entity": "invoices", "dry_run": True})
    assert summary["dry_run"] is True
    assert summary["entities"]["invoices"]["categories"]["amount_over"] == 1
    assert summary["entities"]["invoices"]["healed"] == 0
    assert crm_invoices(p)[number]["totalamount"] == raised
    runtime = await p.runtime()
    assert not [b async for b in state.run_batches(runtime.tables, f"heal-{summary['run_id']}")]
    assert crm_writes(p) == writes_before


class PhoneChange(random.Random):
    """The billing simulator's users, changing a customer's phone number and nothing else."""

    def choice(self, seq: Any) -> Any:
        return "phone" if "phone" in seq else super().choice(seq)


async def test_a_column_a_crm_plugin_keeps_reverting_ends_in_one_persistent_mismatch_not_a_loop(
    azurite: Azurite,
) -> None:
    plugin = DataverseFaults(reverting_plugin=RevertingPlugin(table="account", column="telephone1"))
    options = PlatformOptions(azurite_conn=azurite.connection_string, records=16, seed=3, webhooks=False,
                              profile=FaultProfile(dataverse=plugin), visibility_timeout_s=0.5,
                              settings={"RECONCILE_MAX_ATTEMPTS": "2"})  # fmt: skip
    async with platform(options) as p:
        await p.sync_until_complete(timeout_s=300, settle=True)
        customer = p.billing.store.all_ids("customers")[0]
        p.billing.store.mutate("customers", [customer], PhoneChange(1))
        await p.sync_until_complete(timeout_s=300, settle=True)  # written, then put back by the plugin
        runs = [await run(p, {"entity": "customers"}) for _ in range(3)]
        runtime = await p.runtime()
        rows = [r for r in await dlq.rows(runtime.tables, dlq.Selection(all=True), limit=1000)
                if r["record_id"] == customer]  # fmt: skip
    assert [r["entities"]["customers"]["healed"] for r in runs] == [1, 0, 0]
    assert [r["entities"]["customers"]["persistent"] for r in runs] == [0, 1, 1]
    assert [(r["reason_kind"], r["occurrences"]) for r in rows] == [("persistent_mismatch", 2)]
    assert "telephone1" in rows[0]["reason"]
