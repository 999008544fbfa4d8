"""Benchmark: a fleet of instances sharing one Dataverse application user, at the service-protection ceiling.

Flex Consumption may run 40 instances of the app (its lowest maximum instance count in some of Microsoft's pages),
and every instance signs in as the same application user, so they all spend one budget. Each instance here is a
`DataverseClient` of its own (its own pacing state, as in separate processes) fed by a shared queue of messages,
a few messages at a time, as the Functions host feeds `sync_batch`. The simulator runs in a process of its own.

The profile is scaled so the limits bite within seconds while keeping production's proportions: a 20 s window with
10,000 ms of execution time, 2,000 requests and 52 concurrent, 0.25 ms per record, so the sustained ceiling is
2,000 records/s per application user, and forty requests in flight are about 10 % of the execution budget (as forty
two-second requests are of Dataverse's 20 minutes). The first window's budget is free (an empty window), so
throughput is measured after it. 300,000 rows last about eight windows: a production backfill lasts many (a
million rows is hours of five-minute windows), so the run's first and last windows, where a fleet learns and then
gives back its shares, weigh about as much as they would there; `rows_per_s_by_window` shows each window.

    python -m bench.dataverse_fleet [--rows 300000] [--instances 40]

Reports the fleet's sustained throughput against the ceiling and against one instance alone on the same profile,
the share of requests answered 429 (by Dataverse error code), and that every row was written exactly once. Writes
bench/results/dataverse-fleet-<time>.json. docs/scaling.md says what it measured and why it matters.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import secrets
import ssl
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

from azure.core.credentials import AccessToken

from bench import record
from sandbox.faults import DataverseFaults, FaultProfile, ServiceProtection
from shared.dataverse.client import DataverseClient, DataverseClientConfig, ProtectionLimits, TableRef, UpsertRow

WINDOW_S = 20.0
EXECUTION_MS = 10_000.0
MS_PER_RECORD = 0.25
REQUESTS = 2_000
CONCURRENT = 52
MESSAGE_ROWS = 200  # SYNC_BATCH_SIZE: one queue message
MESSAGES_PER_INSTANCE = 4  # messages one instance works on at once
INSTANCE_CONCURRENCY = 8  # DATAVERSE_MAX_CONCURRENCY as the Bicep template sets it
IDENTITY = "fleet-user"
TABLE = TableRef("account", "accounts")


@dataclass
class Outcome:
    instances: int
    rows: int
    written: int
    failed: int
    distinct_in_store: int
    requests: int
    throttled_429: int
    throttled_by_code: dict[str, int]
    share_429: float
    seconds: float
    sustained_rows_per_s: float
    ceiling_rows_per_s: float
    share_of_ceiling: float
    rows_per_s_by_window: list[float]  # each window's throughput, first (free) window included


def _serve(conn: Connection) -> None:  # pragma: no cover - runs in the simulator's own process
    from sandbox.dataverse_sim.run import dataverse_server  # noqa: PLC0415

    limits = ServiceProtection(window_s=WINDOW_S, requests=REQUESTS, execution_ms=EXECUTION_MS, concurrent=CONCURRENT)
    profile = FaultProfile(dataverse=DataverseFaults(service_protection=limits, ms_per_record=MS_PER_RECORD))
    with dataverse_server(client_secret=secrets.token_urlsafe(16), profile=profile, dop_hint=8) as running:
        token = running.simulator.mint(IDENTITY, 3600)
        conn.send((running.url, str(running.tls.ca_pem), token))
        while (prefix := conn.recv()) != "stop":  # the rows' key prefix: count them
            sim = running.simulator
            table = running.store_table("account")
            distinct = running.store.count(table, '"accountnumber" LIKE ?', [f"{prefix}%"])
            served = sum(sum(c.values()) for c in sim.stats.requests.values())
            conn.send((distinct, served, dict(sim.stats.throttled)))


class _Token:
    def __init__(self, token: str) -> None:
        self.token = token

    def get_token(self, *scopes: str) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 3600)


async def _fleet(
    url: str, ca: str, token: str, *, instances: int, rows: int, prefix: str
) -> tuple[float, int, int, list[float]]:
    """Write `rows` rows through `instances` clients; returns (sustained rows/s, written, failed, rows/s by window)."""
    verify = ssl.create_default_context(cafile=ca)
    config = DataverseClientConfig(
        org_url=url,
        max_concurrency=INSTANCE_CONCURRENCY,
        limits=ProtectionLimits(window_s=WINDOW_S, requests=REQUESTS, execution_ms=EXECUTION_MS),
    )
    work: asyncio.Queue[list[UpsertRow]] = asyncio.Queue()
    for start in range(0, rows, MESSAGE_ROWS):
        work.put_nowait(
            [UpsertRow({"accountnumber": f"{prefix}{i:07d}"}, {"name": f"Fleet {i}"}, 1)
             for i in range(start, min(rows, start + MESSAGE_ROWS))]
        )  # fmt: skip
    progress: list[tuple[float, int]] = []
    totals = {"written": 0, "failed": 0}
    started = time.monotonic()

    async def instance() -> None:
        async with DataverseClient(config, {IDENTITY: _Token(token)}, verify=verify) as client:

            async def handler() -> None:
                while not work.empty():
                    message = work.get_nowait()
                    outcomes = await client.upsert_many(TABLE, message)
                    totals["written"] += sum(o.status == "written" for o in outcomes)
                    totals["failed"] += sum(o.status != "written" for o in outcomes)
                    progress.append((time.monotonic() - started, totals["written"]))

            await asyncio.gather(*(handler() for _ in range(MESSAGES_PER_INSTANCE)))

    await asyncio.gather(*(instance() for _ in range(instances)))
    after = [(t, w) for t, w in progress if t >= WINDOW_S]
    base = next(((t, w) for t, w in reversed(progress) if t < WINDOW_S), (0.0, 0))
    sustained = (after[-1][1] - base[1]) / (after[-1][0] - base[0]) if after and after[-1][0] > base[0] else 0.0
    return sustained, totals["written"], totals["failed"], _by_window(progress)


def _by_window(progress: list[tuple[float, int]]) -> list[float]:
    """Rows per second in each window-long slice of the run (the last slice may be shorter)."""
    rates, before, start = [], 0, 0.0
    while progress and start < progress[-1][0]:
        end = start + WINDOW_S
        upto = max((w for t, w in progress if t < end), default=before)
        rates.append(round((upto - before) / (min(end, progress[-1][0]) - start), 1))
        before, start = upto, end
    return rates


def run(rows: int = 300_000, instances: int = 40, prefix: str = "FL-") -> Outcome:
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(child,), daemon=True)
    server.start()
    try:
        url, ca, token = parent.recv()
        started = time.monotonic()
        sustained, written, failed, by_window = asyncio.run(
            _fleet(url, ca, token, instances=instances, rows=rows, prefix=prefix)
        )
        seconds = time.monotonic() - started
        parent.send(prefix)
        distinct, served, by_code = parent.recv()
        throttled = sum(by_code.values())
        parent.send("stop")
    finally:
        server.join(timeout=30)
        if server.is_alive():
            server.kill()
    ceiling = EXECUTION_MS / WINDOW_S / MS_PER_RECORD
    return Outcome(
        instances=instances,
        rows=rows,
        written=written,
        failed=failed,
        distinct_in_store=distinct,
        requests=served,
        throttled_429=throttled,
        throttled_by_code=by_code,
        share_429=round(throttled / max(1, served), 4),
        seconds=round(seconds, 1),
        sustained_rows_per_s=round(sustained, 1),
        ceiling_rows_per_s=ceiling,
        share_of_ceiling=round(sustained / ceiling, 3),
        rows_per_s_by_window=by_window,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--instances", type=int, default=40)
    args = parser.parse_args()
    single = run(args.rows, 1)
    fleet = run(args.rows, args.instances)
    summary: dict[str, Any] = {
        "profile": {"window_s": WINDOW_S, "execution_ms": EXECUTION_MS, "ms_per_record": MS_PER_RECORD,
                    "requests": REQUESTS, "concurrent": CONCURRENT, "instance_concurrency": INSTANCE_CONCURRENCY},
        "single": asdict(single),
        "fleet": asdict(fleet),
        "fleet_to_single": round(fleet.sustained_rows_per_s / max(1.0, single.sustained_rows_per_s), 3),
    }  # fmt: skip
    record("dataverse-fleet", summary)


if __name__ == "__main__":
    main()
