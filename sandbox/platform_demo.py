"""`python -m sandbox demo` before the pipeline exists: the local platform proving its own semantics.

Starts Azurite and the local host on the demo app, sends work items of which some fail once or twice and some
always fail, and checks that every item ends either completed or in the poison queue: none lost.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import httpx
from azure.storage.queue import BinaryBase64DecodePolicy, BinaryBase64EncodePolicy
from azure.storage.queue.aio import QueueClient
from rich.console import Console
from rich.table import Table

from sandbox.azurite import Azurite
from sandbox.faults import FaultProfile
from sandbox.host.runtime import HostOptions, LocalHost

DEMO_APP = Path(__file__).parent / "demoapp"
QUEUE = "demo-work"


@dataclass
class Outcome:
    plan: dict[int, str]
    completed: dict[int, int] = field(default_factory=dict)  # item -> delivery that succeeded
    poisoned: list[int] = field(default_factory=list)
    http_codes: tuple[int, int] = (0, 0)
    invocations: int = 0
    duplicated: int = 0
    crashed: int = 0
    heartbeats: int = 0
    seconds: float = 0.0

    @property
    def lost(self) -> set[int]:
        return set(self.plan) - set(self.completed) - set(self.poisoned)

    @property
    def wrongly_poisoned(self) -> set[int]:
        return set(self.poisoned) ^ {n for n, f in self.plan.items() if f == "always"}

    @property
    def ok(self) -> bool:
        return not self.lost and not self.wrongly_poisoned and self.http_codes == (401, 200)


def _client(conn: str, queue: str) -> QueueClient:
    # The Functions host expects base64 bodies by default; the SDK's default is no encoding.
    return QueueClient.from_connection_string(
        conn, queue, message_encode_policy=BinaryBase64EncodePolicy(), message_decode_policy=BinaryBase64DecodePolicy()
    )


async def _drain(client: QueueClient) -> list[bytes]:
    out: list[bytes] = []
    async for message in client.receive_messages(messages_per_page=32, visibility_timeout=300):
        out.append(message.content)
        await client.delete_message(message)
    return out


def _settings(path: Path, conn: str) -> Path:
    values = {"AzureWebJobsStorage": conn, "DEMO_QUEUE": QUEUE, "DEMO_SCHEDULE": "*/2 * * * * *"}
    path.write_text(json.dumps({"Values": values}), encoding="utf-8")
    return path


async def _exercise(host: LocalHost, conn: str, outcome: Outcome, console: Console, timeout_s: float) -> None:
    async with (
        _client(conn, QUEUE) as work,
        _client(conn, f"{QUEUE}-done") as done,
        _client(conn, f"{QUEUE}-poison") as poison,
    ):
        sem = asyncio.Semaphore(16)

        async def send(n: int) -> None:
            async with sem:
                await work.send_message(json.dumps({"n": n, "fail": outcome.plan[n]}).encode())

        await asyncio.gather(*(send(n) for n in outcome.plan))
        deadline = time.monotonic() + timeout_s
        with console.status("processing") as status:
            while time.monotonic() < deadline:
                for raw in await _drain(done):
                    item = json.loads(raw)
                    outcome.completed[item["n"]] = item["deliveries"]
                outcome.poisoned += [json.loads(raw)["n"] for raw in await _drain(poison)]
                status.update(f"completed {len(outcome.completed)}, poisoned {len(outcome.poisoned)}")
                if not outcome.lost and host.queue_listeners[0].in_flight == 0:
                    break
                await asyncio.sleep(0.25)
    keys = host.keys
    async with httpx.AsyncClient(base_url=host.http_url or "") as http:
        unauth = (await http.get("/api/demo/status")).status_code
        authed = (
            await http.get("/api/demo/status", headers={"x-functions-key": keys.function if keys else ""})
        ).status_code
    outcome.http_codes = (unauth, authed)


def _report(outcome: Outcome, console: Console) -> None:
    deliveries = Counter(outcome.completed.values())
    table = Table(title="local platform demonstration")
    table.add_column("what")
    table.add_column("count", justify="right")
    rows = [
        ("work items sent", len(outcome.plan)),
        ("completed on 1st delivery", deliveries.get(1, 0)),
        ("completed after retries", sum(count for delivery, count in deliveries.items() if delivery > 1)),
        ("moved to poison queue", len(set(outcome.poisoned))),
        ("invocations", outcome.invocations),
        ("duplicate deliveries injected", outcome.duplicated),
        ("crashes before delete injected", outcome.crashed),
        ("timer heartbeats", outcome.heartbeats),
        ("HTTP without key / with key", "{} / {}".format(*outcome.http_codes)),
        ("lost", len(outcome.lost)),
        ("seconds", f"{outcome.seconds:.1f}"),
    ]
    for what, count in rows:
        table.add_row(what, str(count))
    console.print(table)
    if outcome.ok:
        console.print("[green]every item completed or poisoned as planned[/]")
        return
    console.print("[red]MISMATCH[/]")
    if outcome.lost:
        console.print(f"lost: {sorted(outcome.lost)[:20]}")
    if outcome.wrongly_poisoned:
        console.print(f"poison set differs from plan: {sorted(outcome.wrongly_poisoned)[:20]}")


async def run_platform_demo(*, messages: int, profile: FaultProfile, timeout_s: float = 300.0) -> bool:
    console = Console()
    rng = random.Random(profile.seed)
    plan = {n: rng.choices(["0", "1", "2", "always"], weights=[88, 6, 4, 2])[0] for n in range(messages)}
    outcome = Outcome(plan)
    started = time.perf_counter()
    with Azurite() as emulator, tempfile.TemporaryDirectory() as tmp:
        conn = emulator.connection_string
        for name in (QUEUE, f"{QUEUE}-done", f"{QUEUE}-poison"):
            async with _client(conn, name) as client:
                await client.create_queue()
        options = HostOptions(
            app_dir=DEMO_APP,
            settings_file=_settings(Path(tmp) / "local.settings.json", conn),
            faults=profile,
            http_port=0,
            lease=timedelta(seconds=5),
            state_dir=Path(tmp),
        )
        async with LocalHost(options) as host:
            console.print(f"Azurite queue endpoint http://127.0.0.1:{emulator.endpoints.queue_port}")
            console.print(f"Local host {host.http_url}; sending {messages} work items to '{QUEUE}'")
            await _exercise(host, conn, outcome, console, timeout_s)
            stats = host.queue_listeners[0].stats
            outcome.invocations, outcome.duplicated, outcome.crashed = (
                stats.invocations,
                stats.duplicated,
                stats.crashed,
            )
            outcome.heartbeats = len(host.timer_listeners["heartbeat"].fired)
    outcome.seconds = time.perf_counter() - started
    _report(outcome, console)
    return outcome.ok
