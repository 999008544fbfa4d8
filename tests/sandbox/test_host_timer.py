"""Timer-trigger semantics of the local host."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from azure.storage.blob import BlobServiceClient

from sandbox.host.runtime import _host_id
from sandbox.host.timers import MONITOR_CONTAINER
from tests.conftest import AppFactory, read_records
from tests.polling import eventually
from tests.sandbox.hosting import running_host

pytestmark = pytest.mark.anyio


async def test_schedule_from_a_setting_resolves_and_fires(make_app: AppFactory) -> None:
    app_dir, settings, records = make_app("timers", TICK_SCHEDULE="* * * * * *")
    async with running_host(app_dir, settings):
        await eventually(lambda: len(read_records(records)) >= 2, within=10, what="two ticks")
    ticks = [r for r in read_records(records) if r["event"] == "tick"]
    assert {r["past_due"] for r in ticks} == {False}
    assert ticks[1]["t"] - ticks[0]["t"] >= 0.5  # once a second, not in a burst


async def test_once_fires_a_timer_immediately(make_app: AppFactory) -> None:
    app_dir, settings, records = make_app("timers", TICK_SCHEDULE="0 0 0 1 1 *")
    async with running_host(app_dir, settings, once=("yearly",)):
        await eventually(lambda: read_records(records), within=10, what="the yearly timer")
    assert read_records(records)[0]["event"] == "yearly"
    assert read_records(records)[0]["past_due"] is False


async def test_missed_occurrence_fires_at_start_up_as_past_due(make_app: AppFactory, conn: str) -> None:
    app_dir, settings, records = make_app("timers", TICK_SCHEDULE="0 0 0 1 1 *")
    now = datetime.now(UTC)
    status = {
        "Last": (now - timedelta(days=400)).isoformat(),
        "Next": (now - timedelta(days=35)).isoformat(),  # the host was down when this came
        "LastUpdated": (now - timedelta(days=400)).isoformat(),
    }
    blobs = BlobServiceClient.from_connection_string(conn)
    container = blobs.get_container_client(MONITOR_CONTAINER)
    if not container.exists():
        container.create_container()
    container.upload_blob(f"timers/{_host_id(app_dir)}/yearly/status", json.dumps(status), overwrite=True)
    async with running_host(app_dir, settings):
        await eventually(lambda: read_records(records), within=10, what="the past-due occurrence")
    assert read_records(records)[0] == {**read_records(records)[0], "event": "yearly", "past_due": True}
    written = json.loads(container.download_blob(f"timers/{_host_id(app_dir)}/yearly/status").readall())
    assert datetime.fromisoformat(written["Next"]) > now  # the monitor moved on to the next occurrence
    blobs.close()


async def test_monitored_timer_without_a_missed_occurrence_does_not_fire(make_app: AppFactory) -> None:
    app_dir, settings, records = make_app("timers", TICK_SCHEDULE="0 0 0 1 1 *")
    async with running_host(app_dir, settings) as host:
        await eventually(lambda: "yearly" in host.timer_listeners, what="the timer")
    assert read_records(records) == []


async def test_run_on_startup_fires_at_start(make_app: AppFactory) -> None:
    app_dir, settings, records = make_app("timers", TICK_SCHEDULE="0 0 0 1 1 *")
    source = (app_dir / "function_app.py").read_text()
    (app_dir / "function_app.py").write_text(
        source.replace(
            'schedule="%TICK_SCHEDULE%", use_monitor=False', 'schedule="%TICK_SCHEDULE%", run_on_startup=True'
        )
    )
    async with running_host(app_dir, settings):
        await eventually(lambda: read_records(records), within=10, what="the start-up run")
    assert read_records(records)[0]["event"] == "tick"
