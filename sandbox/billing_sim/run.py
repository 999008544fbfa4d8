"""Start the billing simulator: in a background thread (tests, demo) or in the foreground (CLI)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sandbox.billing_sim.app import BillingSimulator
from sandbox.billing_sim.store import Store
from sandbox.faults import FaultProfile
from sandbox.servers import ThreadedServer


@dataclass
class RunningBilling:
    url: str
    simulator: BillingSimulator
    store: Store
    server: ThreadedServer

    def call(self, func: object, *args: object) -> object:
        """Run a callable on the server's loop thread (the store is thread-safe; this is for async helpers)."""
        return asyncio.run_coroutine_threadsafe(func(*args), self.server.loop).result(timeout=30)  # type: ignore[operator]


def build(
    *,
    records: int,
    seed: int,
    profile: FaultProfile,
    api_key: str,
    db: Path | None = None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
) -> BillingSimulator:
    store = Store(db)
    if sum(store.table_counts().values()) == 0:
        store.seed(invoices=records, seed=seed, invalid_rate=profile.billing.invalid_record_rate)
    return BillingSimulator(
        store,
        api_key=api_key,
        faults=profile.billing,
        seed=profile.seed,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
    )


@contextmanager
def billing_server(
    *,
    records: int,
    seed: int = 1,
    profile: FaultProfile | None = None,
    api_key: str,
    db: Path | None = None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
    port: int = 0,
) -> Iterator[RunningBilling]:
    simulator = build(
        records=records,
        seed=seed,
        profile=profile or FaultProfile(),
        api_key=api_key,
        db=db,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
    )
    server = ThreadedServer(simulator, port=port).start()
    try:
        yield RunningBilling(server.url, simulator, simulator.store, server)
    finally:
        asyncio.run_coroutine_threadsafe(simulator.aclose(), server.loop).result(timeout=10)
        server.stop()
        simulator.store.close()
