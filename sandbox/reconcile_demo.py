"""The demo's last phase: a person edits the CRM by hand, and production reconcile (through the app, not
`crm_check`) finds each edit by name, heals it, and the run after it finds them gone.

The edits are the ones finance meets: an invoice amount raised, an account's email changed, a line deleted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.table import Table

from sandbox.dataverse_sim.schema import TABLES
from sandbox.dataverse_sim.store import decoded
from sandbox.platform import Platform
from shared import dlq
from shared.odata import literal
from shared.reconcile.compare import CATEGORIES
from shared.reconcile.findings import MISMATCHES

INVOICE, ACCOUNT, LINE = TABLES["invoice"], TABLES["account"], TABLES["invoicedetail"]


@dataclass
class ReconcileDemo:
    edits: dict[tuple[str, str], str] = field(default_factory=dict)  # (entity, billing id) -> what the person did
    first: dict[str, Any] = field(default_factory=dict)
    second: dict[str, Any] = field(default_factory=dict)
    found: dict[tuple[str, str], str] = field(default_factory=dict)  # edited key -> categories the first run found
    left: dict[tuple[str, str], str] = field(default_factory=dict)  # edited key -> categories still open after

    @property
    def ok(self) -> bool:
        return bool(self.edits) and set(self.found) == set(self.edits) and not self.left

    def as_json(self) -> dict[str, Any]:
        return {"edits": {f"{e}/{k}": what for (e, k), what in self.edits.items()},
                "found": {f"{e}/{k}": c for (e, k), c in self.found.items()},
                "still_open_after_healing": {f"{e}/{k}": c for (e, k), c in self.left.items()},
                "first_run": self.first, "second_run": self.second, "ok": self.ok}  # fmt: skip


async def edit_by_hand(p: Platform) -> dict[tuple[str, str], str]:
    """Three edits a person makes directly in the CRM; the billing ids of the records they touched. The records
    chosen are in step before the edit: none the DLQ holds (the realistic profile has Dataverse reject a few writes),
    so each edit is the only difference reconcile can find in its record."""
    crm, billing = p.dataverse.store, p.billing.store
    runtime = await p.runtime()
    held = {(str(r["entity"]), str(r["record_id"])) for r in await dlq.rows(runtime.tables, dlq.Selection(all=True))}
    ids_by_number = {str(r["number"]): str(r["id"]) for r in billing.get_many("invoices", billing.all_ids("invoices"))}
    candidates = [decoded(INVOICE, r) for r in crm.query(INVOICE, limit=400)]
    billing_id = {str(i["invoiceid"]): ids_by_number.get(str(i["invoicenumber"]), "") for i in candidates}
    in_step = [
        i
        for i in candidates
        if billing_id[str(i["invoiceid"])] and ("invoices", billing_id[str(i["invoiceid"])]) not in held
    ]
    billing_lines = billing.lines_of([billing_id[str(i["invoiceid"])] for i in in_step])
    with_lines = [
        i for i in in_step
        if len(_lines(p, str(i["invoiceid"]))) == len(billing_lines.get(billing_id[str(i["invoiceid"])], [])) >= 2
    ]  # fmt: skip
    raised, trimmed = with_lines[0], with_lines[1]
    crm.write(INVOICE, {"invoicenumber": raised["invoicenumber"]},
              {"totalamount": raised["totalamount"] + Decimal("250.00")})  # fmt: skip
    crm.delete(LINE, {"bcs_billinglineid": _lines(p, str(trimmed["invoiceid"]))[0]["bcs_billinglineid"]})
    accounts = [decoded(ACCOUNT, r) for r in crm.query(ACCOUNT, where='"emailaddress1" IS NOT NULL', limit=50)]
    account = next(a for a in accounts if ("customers", str(a["accountnumber"])) not in held)
    crm.write(ACCOUNT, {"accountnumber": account["accountnumber"]}, {"emailaddress1": "typo@example.invalid"})
    return {
        ("invoices", ids_by_number[str(raised["invoicenumber"])]): "total raised by 250.00",
        ("invoices", ids_by_number[str(trimmed["invoicenumber"])]): "a line deleted",
        ("customers", str(account["accountnumber"])): "email changed",
    }


def _lines(p: Platform, invoice_guid: str) -> list[dict[str, Any]]:
    rows = p.dataverse.store.query(LINE, where='"invoiceid" = ?', params=[invoice_guid])
    return [decoded(LINE, r) for r in rows]


async def _rows(p: Platform, query: str) -> dict[tuple[str, str], str]:
    runtime = await p.runtime()
    table = await runtime.tables.table(MISMATCHES)
    return {(str(r["PartitionKey"]), str(r["record_id"])): str(r["categories"])
            async for r in table.query_entities(query)}  # fmt: skip


async def reconcile_phase(p: Platform, console: Console) -> ReconcileDemo:
    demo = ReconcileDemo(edits=await edit_by_hand(p))
    console.print("a person edited the CRM by hand: " + "; ".join(f"{k[1]} ({v})" for k, v in demo.edits.items()))
    demo.first = await p.reconcile({})
    # What the first run found, resolved or not: under the realistic profile the host may deliver a reconcile batch
    # twice, and a second delivery after the heal finds the record in step and resolves its row at once.
    found = await _rows(p, f"last_run eq {literal(demo.first['run_id'])}")
    demo.found = {key: found[key] for key in demo.edits if key in found}
    demo.second = await p.reconcile({})
    still = await _rows(p, "resolved_at eq ''")
    demo.left = {key: still[key] for key in demo.edits if key in still}
    _print(demo, console)
    return demo


def _print(demo: ReconcileDemo, console: Console) -> None:
    table = Table(title="reconcile: the CRM read and compared with billing, through the app")
    table.add_column("category")
    for run in ("first run", "after healing"):
        table.add_column(run, justify="right")
    for category in CATEGORIES:
        counts = [sum(e["categories"].get(category, 0) for e in run["entities"].values()) for run in
                  (demo.first, demo.second)]  # fmt: skip
        if any(counts):
            table.add_row(category, *(f"{n:,}" for n in counts))
    runs = (demo.first, demo.second)
    for label, name in (("compared", "compared"), ("healed (forced re-sync)", "healed"), ("resolved", "resolved")):
        table.add_row(label, *(f"{sum(e[name] for e in run['entities'].values()):,}" for run in runs))
    for entity in sorted(demo.first["entities"]):
        table.add_row(f"drift {entity}", *(f"{run['entities'].get(entity, {}).get('drift', 0):.2%}" for run in
                                           (demo.first, demo.second)))  # fmt: skip
    console.print(table)
    for edited, what in demo.edits.items():
        found = demo.found.get(edited, "[red]not found[/]")
        after = "[red]still open[/]" if edited in demo.left else "[green]healed[/]"
        console.print(f"  {edited[0]} {edited[1]}: {what} → {found} → {after}")
    console.print(
        "[green]every hand edit found by name and healed[/]" if demo.ok else "[red]reconcile missed an edit[/]"
    )
    console.print(f"  CSV reports: {demo.first.get('report')}, {demo.second.get('report')} (blob container "
                  "'reports'; the page: GET /api/report)")  # fmt: skip
