"""The whole local platform in one process: Azurite, both simulators, and the local host running `function_app.py`.

Used by `python -m sandbox demo` and `up`, and by the end-to-end tests. Nothing is mocked: the app talks to the
billing simulator over HTTP, to the Dataverse simulator over HTTPS (with the local test CA), and to Azurite.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from azure.core.exceptions import ResourceExistsError
from azure.storage.queue.aio import QueueClient

from sandbox.azurite import ROOT, Azurite
from sandbox.billing_sim.run import RunningBilling, billing_server
from sandbox.dataverse_sim.run import RunningDataverse, dataverse_server
from sandbox.faults import FaultProfile, ServiceProtection
from sandbox.host.runtime import HostOptions, LocalHost
from shared.runtime import close_runtime

log = logging.getLogger("sandbox.platform")
NEVER = "0 0 0 1 1 *"  # once a year: the demo and the tests fire fan_out themselves


@dataclass
class PlatformOptions:
    records: int = 1000
    seed: int = 1
    profile: FaultProfile = field(default_factory=FaultProfile)
    billing_db: Path | None = None
    dataverse_db: Path | None = None
    schedule: str = NEVER
    http_port: int = 0
    work_dir: Path | None = None
    settings: dict[str, str] = field(default_factory=dict)  # extra or overriding app settings
    lease_s: float = 30  # how long a crashed worker's message stays invisible (the host's is 10 minutes)
    identities: int = 1
    webhooks: bool = True  # the billing simulator posts signed change events to the app
    azurite_conn: str | None = None  # reuse a running Azurite (tests) instead of starting one
    visibility_timeout_s: float | None = None  # tests: shorter than host.json's 30 s between redeliveries


@dataclass
class Platform:
    options: PlatformOptions
    azurite: Any  # sandbox.azurite.Azurite, or an existing one's connection string holder
    billing: RunningBilling
    dataverse: RunningDataverse
    host: LocalHost
    settings: dict[str, str]
    work_dir: Path

    @property
    def conn(self) -> str:
        return str(self.azurite.connection_string)

    @property
    def queue_name(self) -> str:
        return self.settings["SYNC_QUEUE"]

    def queue(self, name: str | None = None) -> QueueClient:
        from azure.storage.queue import TextBase64DecodePolicy, TextBase64EncodePolicy  # noqa: PLC0415

        return QueueClient.from_connection_string(
            self.conn,
            name or self.queue_name,
            message_encode_policy=TextBase64EncodePolicy(),
            message_decode_policy=TextBase64DecodePolicy(),
        )

    async def fan_out(self) -> bool:
        """Fire the timer function once, as the schedule would."""
        return await self.host.timer_listeners["fan_out"].fire(past_due=False)

    async def queue_depth(self, name: str | None = None) -> int:
        async with self.queue(name) as client:
            with contextlib.suppress(Exception):
                props = await client.get_queue_properties()
                return int(props.approximate_message_count or 0)
        return 0

    def in_flight(self) -> int:
        return sum(listener.in_flight for listener in self.host.queue_listeners)

    async def wait_idle(self, *, timeout_s: float = 600, settle_s: float = 1.5) -> None:
        """Until every queue (the sync's, reconcile's and their poison queues) is empty and nothing runs, for
        `settle_s` in a row (deferred messages count: they sit invisible in the queue)."""
        deadline = time.monotonic() + timeout_s
        quiet_since: float | None = None
        names = [self.queue_name + suffix for suffix in ("", "-poison", "-reconcile", "-reconcile-poison")]
        while time.monotonic() < deadline:
            busy = self.in_flight() or any([await self.queue_depth(name) for name in names])
            if busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= settle_s:
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"the sync did not finish within {timeout_s:.0f} s")

    async def runtime(self) -> Any:
        from shared.runtime import get_runtime  # noqa: PLC0415

        return await get_runtime(_settings_of(self.host))

    async def run_done(self, run_id: str) -> bool:
        """A fan-out run is done when its listing is complete and every one of its messages has a final batch row
        (succeeded, poisoned or dead-lettered): deferred and failed ones are still on their way."""
        from shared import state  # noqa: PLC0415

        runtime = await self.runtime()
        runs = {r["RowKey"]: r for r in await state.recent_runs(runtime.tables, limit=200)}
        run = runs.get(run_id)
        if run is None or run.get("status") not in ("completed", "short"):
            return False
        final = 0
        async for row in state.run_batches(runtime.tables, run_id):
            final += row.get("status") in ("succeeded", "poisoned", "dead-lettered")
        return final >= int(run.get("messages") or 0)

    async def sync_until_complete(self, *, timeout_s: float = 900, settle: bool = False) -> list[str]:
        """Fire fan-out until every entity's listing is complete, then wait until every message of those runs has
        ended. With `settle`, also wait for the queues to drain (webhooks, repairs). Returns the run ids."""
        from shared import state  # noqa: PLC0415

        deadline = time.monotonic() + timeout_s
        runtime = await self.runtime()
        run_ids: list[str] = []
        while True:
            await self.fan_out()
            pending = []
            for entity in runtime.settings.entity_list:
                cp = await state.read_checkpoint(runtime.tables, entity)
                if cp.run_id:
                    pending.append(cp.run_id)
            if not pending:
                break
            if time.monotonic() > deadline:
                raise TimeoutError("fan-out did not complete its listings in time")
            await asyncio.sleep(1.0)
        recent = await state.recent_runs(runtime.tables, limit=len(runtime.settings.entity_list) * 20)
        seen: set[str] = set()
        for run in recent:  # newest first: the last run of each entity
            if run.get("entity") not in seen:
                seen.add(str(run.get("entity")))
                run_ids.append(str(run["RowKey"]))
        while not all([await self.run_done(r) for r in run_ids]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the runs {run_ids} did not finish in time")
            await asyncio.sleep(0.5)
        if settle:
            await self.wait_idle(timeout_s=max(30.0, deadline - time.monotonic()))
        return run_ids

    async def reconcile(self, body: dict[str, Any], *, timeout_s: float = 600) -> dict[str, Any]:
        """Start a reconcile run over HTTP as an operator would (`POST /api/reconcile`), wait until its batches and
        the syncs it sent are done, fire one fan-out tick (as the schedule would: it writes the run's report and
        totals, and sets the drift gauge), and return `GET /api/reconcile/latest`, report included."""
        headers = {"x-functions-key": self.settings["SANDBOX_HOST_FUNCTION_KEY"]}
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=self.host.http_url or "", headers=headers, timeout=120) as http:
            started = await http.post("/api/reconcile", json=body)
            if started.status_code != 202:
                raise RuntimeError(f"reconcile refused: {started.status_code} {started.text[:300]}")
            run_id = started.json()["run_id"]
            while True:
                latest = (await http.get("/api/reconcile/latest")).json()
                if latest.get("run_id") == run_id and latest.get("complete"):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reconcile run {run_id} did not finish in {timeout_s:.0f} s")
                await asyncio.sleep(0.3)
            await self.wait_idle(timeout_s=max(30.0, deadline - time.monotonic()))
            await self.fan_out()
            await self.wait_idle(timeout_s=max(30.0, deadline - time.monotonic()))  # what the tick listed, synced
            latest = (await http.get("/api/reconcile/latest")).json()
            if latest.get("run_id") != run_id or not latest.get("report"):
                raise RuntimeError(f"reconcile run {run_id}: the fan-out tick wrote no report ({latest})")
        return dict(latest)


def _settings_of(host: LocalHost) -> Any:
    """The validated settings object of the app the host loaded (function_app.SETTINGS)."""
    spec = host.functions[0]
    return spec.callable.__globals__["SETTINGS"]


@dataclass(frozen=True)
class Simulators:
    """Where the app finds the simulators, in this process or in processes of their own."""

    billing_url: str
    dataverse_url: str
    tenant_id: str
    authority: str
    ca_pem: Path

    @classmethod
    def of(cls, billing: RunningBilling, dataverse: RunningDataverse) -> Simulators:
        return cls(billing.url, dataverse.url, dataverse.tenant_id, dataverse.authority, dataverse.tls.ca_pem)


def app_settings(conn: str, sims: Simulators, options: PlatformOptions, secrets_: dict[str, str]) -> dict[str, str]:
    profile = options.profile
    rate = profile.billing.rate_limit
    prefix = "t" + uuid.uuid4().hex[:8]
    values = {
        "FUNCTIONS_WORKER_RUNTIME": "python",
        "AzureWebJobsFeatureFlags": "EnableWorkerIndexing",
        "AzureWebJobsStorage": conn,
        "SYNC_SCHEDULE": options.schedule,
        "RECONCILE_SCHEDULE": NEVER,  # the demo and the tests start reconcile runs themselves
        "SYNC_QUEUE": f"billing-sync-{prefix[1:]}",
        "SYNC_TABLE_PREFIX": prefix,
        "BILLING_BASE_URL": sims.billing_url,
        "BILLING_API_KEY": secrets_["billing"],
        "BILLING_WEBHOOK_SECRET": secrets_["webhook"],
        "BILLING_PAGINATION": profile.billing.pagination,
        "BILLING_RATE_LIMIT_RPS": str(round(rate.requests_per_second * 0.9, 2)) if rate else "50",
        "DATAVERSE_URL": sims.dataverse_url,
        "DATAVERSE_TENANT_ID": sims.tenant_id,
        "DATAVERSE_CLIENT_ID": ",".join(f"bcs-sync-{i + 1}" for i in range(options.identities)),
        "DATAVERSE_CLIENT_SECRET": secrets_["dataverse"],
        "DATAVERSE_AUTHORITY": sims.authority,
        "DATAVERSE_CA_BUNDLE": str(sims.ca_pem),
        **_protection_settings(profile.dataverse.service_protection),
        "SANDBOX_HOST_FUNCTION_KEY": secrets_["function_key"],
        "SANDBOX_HOST_MASTER_KEY": secrets_["master_key"],
    }
    values.update(options.settings)
    return values


def _protection_settings(limits: ServiceProtection | None) -> dict[str, str]:
    """The simulated tenant's service-protection limits, as the settings that tell the app about a tenant's own."""
    if limits is None:
        return {}
    return {
        "DATAVERSE_LIMIT_WINDOW_SECONDS": str(max(1, round(limits.window_s))),
        "DATAVERSE_LIMIT_REQUESTS": str(limits.requests),
        "DATAVERSE_LIMIT_EXECUTION_SECONDS": str(max(1, round(limits.execution_ms / 1000))),
    }


@contextlib.asynccontextmanager
async def platform(options: PlatformOptions) -> AsyncIterator[Platform]:
    keys = {
        name: secrets.token_urlsafe(24) for name in ("billing", "webhook", "dataverse", "function_key", "master_key")
    }
    with contextlib.ExitStack() as stack:
        work = options.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bcs-platform-")))
        emulator: Any = _Existing(options.azurite_conn) if options.azurite_conn else stack.enter_context(Azurite())
        host_port = _free_port() if options.http_port == 0 else options.http_port
        billing = stack.enter_context(
            billing_server(
                records=options.records,
                seed=options.seed,
                profile=options.profile,
                api_key=keys["billing"],
                db=options.billing_db,
                webhook_url=f"http://127.0.0.1:{host_port}/api/webhooks/billing" if options.webhooks else None,
                webhook_secret=keys["webhook"],
            )
        )
        dataverse = stack.enter_context(
            dataverse_server(client_secret=keys["dataverse"], profile=options.profile, db=options.dataverse_db)
        )
        settings = app_settings(emulator.connection_string, Simulators.of(billing, dataverse), options, keys)
        async with app_host(emulator.connection_string, settings, options, work, host_port) as host:
            yield Platform(options, emulator, billing, dataverse, host, settings, work)


@contextlib.asynccontextmanager
async def app_host(
    conn: str, settings: dict[str, str], options: PlatformOptions, work: Path, host_port: int
) -> AsyncIterator[LocalHost]:
    """The local host running `function_app.py` with `settings` (written to `work/local.settings.json`, mode 0600),
    its queues created as the deployment creates them."""
    settings_file = work / "local.settings.json"
    settings_file.write_text(json.dumps({"IsEncrypted": False, "Values": settings}), encoding="utf-8")
    settings_file.chmod(0o600)
    host_options = HostOptions(
        app_dir=ROOT,
        settings_file=settings_file,
        faults=options.profile,
        http_port=host_port,
        lease=timedelta(seconds=options.lease_s),
        drain_timeout=timedelta(seconds=10),
        state_dir=work / "host",
        visibility_timeout=(
            timedelta(seconds=options.visibility_timeout_s) if options.visibility_timeout_s is not None else None
        ),
    )
    for name in (settings["SYNC_QUEUE"] + s for s in ("", "-poison", "-reconcile", "-reconcile-poison")):
        async with QueueClient.from_connection_string(conn, name) as client:
            with contextlib.suppress(ResourceExistsError):
                await client.create_queue()
    host = LocalHost(host_options)
    try:
        await host.start()
        yield host
    finally:
        await host.stop()
        await close_runtime()


def _free_port() -> int:
    from sandbox.servers import bind  # noqa: PLC0415

    sock = bind()
    port = int(sock.getsockname()[1])
    sock.close()
    return port


@dataclass
class _Existing:
    connection_string: str
