"""The whole pipeline's speed: a full sync of N invoices (and N/4 customers) with no faults, then the latency of
webhook events (billing change to CRM row) one at a time, against Azurite, both simulators and the local host.

`python -m bench.sync_pipeline --records 20000 --events 20`. Writes bench/results/sync-pipeline-<date>.json.
Everything runs in one Python process on this machine (the simulators too), so the figures are a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import httpx

from bench import record
from sandbox.dataverse_sim.schema import TABLES
from sandbox.platform import PlatformOptions, platform


async def run(records: int, events: int) -> dict[str, Any]:
    async with platform(PlatformOptions(records=records)) as p:
        started = time.perf_counter()
        await p.sync_until_complete(timeout_s=3600, settle=True)
        seconds = time.perf_counter() - started
        listed = sum(p.billing.store.table_counts()[e] for e in ("customers", "invoices"))
        latencies = []
        ids = p.billing.store.all_ids("invoices")[:events]
        headers = {"Authorization": f"Bearer {p.settings['BILLING_API_KEY']}"}
        async with httpx.AsyncClient(base_url=p.billing.url, headers=headers) as http:
            for invoice_id in ids:
                changed = time.perf_counter()
                answer = await http.post("/admin/mutate", json={"entity": "invoices", "ids": [invoice_id]})
                version = answer.json()["changed"][0][1]
                number = p.billing.store.get_many("invoices", [invoice_id])[0]["number"]
                deadline = changed + 30
                while time.perf_counter() < deadline:
                    row = p.dataverse.store.find(TABLES["invoice"], {"invoicenumber": number})
                    if row is not None and row["bcs_sourceversion"] == version:
                        latencies.append(time.perf_counter() - changed)
                        break
                    await asyncio.sleep(0.02)
        return {
            "records": listed,
            "full_sync_seconds": round(seconds, 2),
            "records_per_s": round(listed / seconds, 1),
            "dataverse_requests": sum(sum(c.values()) for c in p.dataverse.simulator.stats.requests.values()),
            "billing_requests": sum(sum(c.values()) for c in p.billing.simulator.stats.requests.values()),
            "webhook_events": len(ids),
            "webhook_reached_crm": len(latencies),
            "webhook_latency_s": {
                "median": round(statistics.median(latencies), 3) if latencies else None,
                "max": round(max(latencies), 3) if latencies else None,
            },
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--events", type=int, default=20)
    args = parser.parse_args()
    outcome = asyncio.run(run(args.records, args.events))
    record("sync-pipeline", outcome)


if __name__ == "__main__":
    main()
