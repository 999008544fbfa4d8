"""Benchmark: write N rows to the Dataverse simulator at its service-protection ceiling.

The profile is scaled so the limits bite within seconds: a 5 s window with 2,500 ms of execution time, 0.25 ms per
record, so the sustained ceiling is 2,500 / 5 / 0.25 = 2,000 records/s per application user. The first window's
budget is free (an empty window), so the sustained throughput is measured after it.

    python -m bench.dataverse_ceiling [--rows 100000] [--chunk-size 100] [--users 1]

Prints a summary and writes it to bench/results/dataverse-ceiling-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import ssl
import time
from dataclasses import asdict, dataclass

from azure.core.credentials import AccessToken

from bench import record
from sandbox.dataverse_sim.run import RunningDataverse, dataverse_server
from sandbox.faults import DataverseFaults, FaultProfile, ServiceProtection
from shared.dataverse.client import (
    DataverseClient,
    DataverseClientConfig,
    ProtectionLimits,
    TableRef,
    UpsertRow,
)

WINDOW_S = 5.0
EXECUTION_MS = 2_500.0
MS_PER_RECORD = 0.25
REQUESTS = 1_000
CONCURRENT = 16


@dataclass
class Outcome:
    rows: int
    users: int
    chunk_size: int
    written: int
    distinct_in_store: int
    requests: int
    throttled_429: int
    seconds: float
    rows_per_s: float
    sustained_rows_per_s: float
    ceiling_rows_per_s: float
    share_of_ceiling: float
    share_429: float


class SimCredential:
    def __init__(self, running: RunningDataverse, name: str) -> None:
        self.running, self.name = running, name

    def get_token(self, *scopes: str) -> AccessToken:
        return AccessToken(self.running.simulator.mint(self.name, 3600), int(time.time()) + 3600)


def profile() -> FaultProfile:
    limits = ServiceProtection(window_s=WINDOW_S, requests=REQUESTS, execution_ms=EXECUTION_MS, concurrent=CONCURRENT)
    return FaultProfile(dataverse=DataverseFaults(service_protection=limits, ms_per_record=MS_PER_RECORD))


async def run(rows: int = 100_000, chunk_size: int = 100, users: int = 1) -> Outcome:
    secret = secrets.token_urlsafe(16)  # tokens here are minted by the simulator itself; the secret is unused
    with dataverse_server(client_secret=secret, profile=profile(), dop_hint=8) as running:
        config = DataverseClientConfig(
            org_url=running.url,
            chunk_size=chunk_size,
            max_concurrency=CONCURRENT,
            limits=ProtectionLimits(window_s=WINDOW_S, requests=REQUESTS, execution_ms=EXECUTION_MS),
        )
        creds = {f"bench-{i}": SimCredential(running, f"bench-{i}") for i in range(users)}
        verify = ssl.create_default_context(cafile=str(running.tls.ca_pem))
        table = TableRef("account", "accounts")
        data = [UpsertRow({"accountnumber": f"BN-{i:07d}"}, {"name": f"Bench {i}"}, 1) for i in range(rows)]
        written_at: list[tuple[float, int]] = []
        async with DataverseClient(config, creds, verify=verify) as client:
            started = time.monotonic()
            batch = chunk_size * CONCURRENT * 4  # feed the client in slices to timestamp progress
            written = 0
            for i in range(0, rows, batch):
                outcomes = await client.upsert_many(table, data[i : i + batch])
                written += sum(o.status == "written" for o in outcomes)
                written_at.append((time.monotonic() - started, written))
            seconds = time.monotonic() - started
        distinct = running.store.count(running.store_table("account"), '"accountnumber" LIKE ?', ["BN-%"])
        throttled = sum(running.simulator.stats.throttled.values())
        served = sum(sum(c.values()) for c in running.simulator.stats.requests.values())
    after = [(t, w) for t, w in written_at if t >= WINDOW_S]
    base = next(((t, w) for t, w in reversed(written_at) if t < WINDOW_S), (0.0, 0))
    sustained = (after[-1][1] - base[1]) / (after[-1][0] - base[0]) if after and after[-1][0] > base[0] else 0.0
    ceiling = EXECUTION_MS / WINDOW_S / MS_PER_RECORD * users
    return Outcome(
        rows=rows,
        users=users,
        chunk_size=chunk_size,
        written=written,
        distinct_in_store=distinct,
        requests=served,
        throttled_429=throttled,
        seconds=round(seconds, 2),
        rows_per_s=round(written / seconds, 1),
        sustained_rows_per_s=round(sustained, 1),
        ceiling_rows_per_s=ceiling,
        share_of_ceiling=round(sustained / ceiling, 3),
        share_429=round(throttled / max(1, served), 4),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--chunk-size", type=int, default=100)
    parser.add_argument("--users", type=int, default=1)
    args = parser.parse_args()
    outcome = asyncio.run(run(args.rows, args.chunk_size, args.users))
    record("dataverse-ceiling", asdict(outcome))


if __name__ == "__main__":
    main()
