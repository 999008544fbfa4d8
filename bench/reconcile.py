"""Reconcile at scale: production runs through the app over N invoices (and N/4 customers) whose CRM copy is in step
but for hand edits, the simulators each in a process of its own.

`python -m bench.reconcile --records 50000 --edits 100`. The billing simulator's data is generated into a SQLite file,
and the CRM's copy is written from it through the data dictionary (the state a full sync leaves), with `--edits`
invoice totals raised, a fifth as many lines deleted and a quarter as many account emails changed, as people do.
Then the billing simulator, the Dataverse simulator (HTTPS) and Azurite run as processes of their own, and the local
host runs `function_app.py` in this one. Two runs are started over HTTP as an operator would: the first finds and
heals the edits, the second finds them gone. Figures (ratios, which hold from one machine to another): Dataverse and
billing requests per compared record (reconcile's goal: at most 1/50 on the CRM), and the seconds and records per
second of each run on this machine. Writes bench/results/reconcile-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import httpx

from bench import record
from sandbox.azurite import ROOT, Azurite
from sandbox.billing_sim.run import RunningBilling
from sandbox.billing_sim.store import Store, to_api
from sandbox.dataverse_sim.run import TENANT, RunningDataverse
from sandbox.dataverse_sim.schema import TABLES
from sandbox.dataverse_sim.store import DataverseStore
from sandbox.platform import Platform, PlatformOptions, Simulators, _free_port, app_host, app_settings
from shared import clock, state
from shared.billing.models import Customer, Invoice, parse_record
from shared.mapping import customer_row, invoice_rows

ACCOUNT, INVOICE, LINE = TABLES["account"], TABLES["invoice"], TABLES["invoicedetail"]
CHUNK = 500


def _bound(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if not k.endswith("@odata.bind")}


def seed(work: Path, records: int, edits: int) -> Counter[str]:
    """The billing data, the CRM's copy of it, and the hand edits; what was edited, by kind."""
    billing = Store(work / "billing.db")
    billing.seed(invoices=records, seed=7)
    crm = DataverseStore(work / "dataverse.db")
    with crm.transaction():
        for chunk in _chunks(billing.all_ids("customers")):
            for row in billing.get_many("customers", chunk):
                customer = parse_record("customers", to_api("customers", row))
                if isinstance(customer, Customer):
                    head = customer_row(customer)
                    crm.write(ACCOUNT, dict(head.key), _bound(head.values))
        for chunk in _chunks(billing.all_ids("invoices")):
            rows = billing.get_many("invoices", chunk)
            lines = billing.lines_of([r["id"] for r in rows])
            for row in rows:
                invoice = parse_record("invoices", to_api("invoices", row, lines.get(row["id"])))
                if isinstance(invoice, Invoice):
                    _write_invoice(crm, invoice)
    edited = _edit(crm, random.Random(7), edits)  # noqa: S311 - which records to edit, repeatably
    crm.close()
    billing.close()
    return edited


def _chunks(ids: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(ids), CHUNK):
        yield ids[start : start + CHUNK]


def _write_invoice(crm: DataverseStore, invoice: Invoice) -> None:
    head, lines = invoice_rows(invoice)
    parent = {"customerid_account@odata.bind": f"/accounts(accountnumber='{invoice.customer_id}')"}
    crm.write(INVOICE, dict(head.key), {**_bound(head.values), **parent})
    for line in lines:
        bind = {"invoiceid@odata.bind": f"/invoices(invoicenumber='{invoice.number}')"}
        crm.write(LINE, dict(line.key), {**_bound(line.values), **bind})


def _edit(crm: DataverseStore, rng: random.Random, edits: int) -> Counter[str]:
    """Totals raised, lines deleted, emails changed: directly in the CRM's store, as a person would."""
    done: Counter[str] = Counter()
    invoices = rng.sample(crm.query(INVOICE, limit=10 * edits + 100), edits + edits // 5)
    with crm.transaction():
        for row in invoices[:edits]:
            crm.write(INVOICE, {"invoicenumber": row["invoicenumber"]}, {"totalamount": float(row["totalamount"]) + 10})
            done["amount_over"] += 1
        for row in invoices[edits:]:
            lines = crm.query(LINE, where='"invoiceid" = ?', params=[row["invoiceid"]], limit=1)
            if lines:
                crm.delete(LINE, {"bcs_billinglineid": lines[0]["bcs_billinglineid"]})
                done["lines_missing"] += 1
        for row in crm.query(ACCOUNT, where='"emailaddress1" IS NOT NULL', limit=max(1, edits // 4)):
            crm.write(
                ACCOUNT, {"accountnumber": row["accountnumber"]}, {"emailaddress1": "changed.by.hand@example.org"}
            )
            done["field_mismatch"] += 1
    return done


@contextlib.contextmanager
def simulator(args: list[str], env: dict[str, str], pattern: str) -> Iterator[re.Match[str]]:
    """`python -m sandbox <args>` in a process of its own, until it prints `pattern`; stopped with SIGTERM."""
    process = subprocess.Popen(  # noqa: S603 - our own CLI, fixed arguments
        [sys.executable, "-m", "sandbox", *args], cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None  # noqa: S101 - piped above
        seen = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
            seen.append(line)
            if match := re.search(pattern, "".join(seen)):
                break
        else:
            match = None
        if match is None:
            raise RuntimeError(f"sandbox {args[0]} did not start: {''.join(seen)[-2000:]}")
        yield match
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


async def stats(url: str, headers: dict[str, str], verify: Any = True) -> Counter[str]:
    """A simulator's requests so far, by route (`GET /api/...`), from its `/admin/stats`."""
    async with httpx.AsyncClient(verify=verify, timeout=60) as http:
        answer = (await http.get(f"{url}/admin/stats", headers=headers)).json()
    return Counter({route: sum(codes.values()) for route, codes in answer["requests"].items()})


@contextlib.asynccontextmanager
async def running(work: Path, keys: dict[str, str]) -> AsyncIterator[tuple[Platform, Simulators]]:
    billing_env = {"BILLING_API_KEY": keys["billing"], "BILLING_WEBHOOK_SECRET": keys["webhook"]}
    with (
        simulator(["billing-sim", "--db", str(work / "billing.db")], billing_env, r"listening on (\S+)") as b,
        simulator(["dataverse-sim", "--db", str(work / "dataverse.db"), "--ca-dir", str(work / "ca")],
                  {"DATAVERSE_CLIENT_SECRET": keys["dataverse"]},
                  r"listening on (\S+) .*\n\s+trust this CA: (\S+)") as d,
        Azurite() as azurite,
    ):  # fmt: skip
        sims = Simulators(b.group(1), d.group(1), TENANT, d.group(1), Path(d.group(2)))
        options = PlatformOptions(webhooks=False)
        settings = app_settings(azurite.connection_string, sims, options, keys)
        async with app_host(azurite.connection_string, settings, options, work, _free_port()) as host:
            # Only the methods that drive the app are used: the simulators are not in this process.
            remote = cast(RunningBilling, None), cast(RunningDataverse, None)
            yield Platform(options, azurite, *remote, host, settings, work), sims


async def synced(p: Platform) -> None:
    """The sync's checkpoints as a full sync leaves them (the CRM's copy is in step): the fan-out tick that writes a
    run's report lists only what changed since, which is nothing."""
    runtime = await p.runtime()
    for entity in ("customers", "invoices"):
        await state.write_checkpoint(runtime.tables, state.Checkpoint(entity, watermark=clock.iso(clock.utcnow())))


async def one_run(p: Platform, sims: Simulators) -> dict[str, Any]:
    """A run over everything started over HTTP; figures from the start to its last heal, before the fan-out tick that
    writes its report (so the tick's own requests are not counted)."""
    billing_headers = {"Authorization": f"Bearer {p.settings['BILLING_API_KEY']}"}
    before = (await stats(sims.dataverse_url, {}, str(sims.ca_pem)), await stats(sims.billing_url, billing_headers))
    headers = {"x-functions-key": p.settings["SANDBOX_HOST_FUNCTION_KEY"]}
    async with httpx.AsyncClient(base_url=p.host.http_url or "", headers=headers, timeout=120) as http:
        started = time.perf_counter()
        answer = await http.post("/api/reconcile", json={})
        if answer.status_code != 202:
            raise RuntimeError(f"reconcile refused: {answer.status_code} {answer.text[:500]}")
        run_id = answer.json()["run_id"]
        for _ in range(7200):  # an hour at most
            latest = (await http.get("/api/reconcile/latest")).json()
            if latest["run_id"] == run_id and latest["complete"]:
                break
            await asyncio.sleep(0.5)
        compared_at = time.perf_counter()
        await p.wait_idle(timeout_s=3600)  # the heals it sent
        healed_at = time.perf_counter()
        after = (await stats(sims.dataverse_url, {}, str(sims.ca_pem)), await stats(sims.billing_url, billing_headers))
        await p.fan_out()
        summary = (await http.get("/api/reconcile/latest")).json()
    if summary["run_id"] != run_id or not summary["report"]:
        raise RuntimeError(f"run {run_id} did not finish with a report: {summary}")
    dataverse, billing = after[0] - before[0], after[1] - before[1]
    compared = sum(int(e["compared"]) for e in summary["entities"].values())
    comparing = sum(int(e["crm_requests"]) for e in summary["entities"].values())  # the batches' own reads
    reads = sum(n for route, n in dataverse.items() if route.startswith("GET ") and "token" not in route)
    writes = sum(n for route, n in dataverse.items() if not route.startswith("GET ") and "token" not in route)
    return {
        "seconds_to_compare": round(compared_at - started, 1),
        "seconds_to_heal": round(healed_at - started, 1),
        "compared_records": compared,
        "compared_per_s": round(compared / (compared_at - started), 1),
        "dataverse_requests_comparing": comparing,
        "dataverse_requests_per_compared_record": round(comparing / max(1, compared), 4),
        "dataverse_reads_with_healing": reads,
        "dataverse_requests_healing": writes,
        "billing_requests": sum(billing.values()),
        "billing_requests_per_compared_record": round(sum(billing.values()) / max(1, compared), 4),
        "entities": {
            e: {
                k: v[k] for k in ("compared", "mismatched", "drift", "healed", "resolved", "categories", "crm_requests")
            }
            for e, v in summary["entities"].items()
        },
        "report_rows": summary["report_rows"],
    }


async def run(records: int, edits: int) -> dict[str, Any]:
    keys = {n: secrets.token_urlsafe(24) for n in ("billing", "webhook", "dataverse", "function_key", "master_key")}
    with tempfile.TemporaryDirectory(prefix="bench-reconcile-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        edited = seed(work, records, edits)
        seeded = time.perf_counter() - started
        async with running(work, keys) as (p, sims):
            await synced(p)
            first = await one_run(p, sims)
            second = await one_run(p, sims)
    return {
        "invoices": records,
        "customers": records // 4,
        "hand_edits": dict(edited),
        "seed_seconds": round(seeded, 1),
        "goal_dataverse_requests_per_compared_record": 0.02,
        "first_run": first,
        "second_run": second,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--edits", type=int, default=100)
    args = parser.parse_args()
    record("reconcile", asyncio.run(run(args.records, args.edits)))


if __name__ == "__main__":
    main()
