"""Timer triggers: 6-field NCRONTAB or TimeSpan schedules, runOnStartup, and the schedule monitor.

The schedule monitor keeps `{"Last", "Next", "LastUpdated"}` in the blob
`azure-webjobs-hosts/timers/<hostId>/<function>/status`, as the Functions host does; an occurrence missed while
the host was down fires once at start-up with `past_due=True`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.functions.timer import TimerRequest
from azure.storage.blob.aio import BlobServiceClient
from croniter import croniter

from sandbox.host.config import parse_timespan
from sandbox.host.errors import HostStartupError
from sandbox.host.invoke import Invoker
from sandbox.host.loader import FunctionSpec

log = logging.getLogger("sandbox.host")
_TIMESPAN = re.compile(r"^(?:\d+\.)?\d{1,2}:\d{2}:\d{2}$")
MONITOR_CONTAINER = "azure-webjobs-hosts"
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Schedule(Protocol):
    def next_after(self, moment: datetime) -> datetime: ...


@dataclass(frozen=True)
class CronSchedule:
    """`{second} {minute} {hour} {day} {month} {day-of-week}` evaluated in the app's time zone."""

    expression: str
    tz: tzinfo = UTC

    def next_after(self, moment: datetime) -> datetime:
        local = moment.astimezone(self.tz)
        nxt: datetime = croniter(self.expression, local, second_at_beginning=True).get_next(datetime)
        return nxt.astimezone(UTC)


@dataclass(frozen=True)
class IntervalSchedule:
    """A TimeSpan schedule: every `interval`, counted from the last occurrence."""

    interval: timedelta

    def next_after(self, moment: datetime) -> datetime:
        return moment + self.interval


def parse_schedule(text: str, *, where: str, time_zone: str | None = None) -> Schedule:
    tz: tzinfo = UTC
    if time_zone:
        try:
            tz = ZoneInfo(time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise HostStartupError(f"WEBSITE_TIME_ZONE: {time_zone!r} is not an IANA time zone name") from None
    text = text.strip()
    if _TIMESPAN.match(text):
        interval = parse_timespan(text, where=where)
        if interval <= timedelta(0):
            raise HostStartupError(f"{where}: a TimeSpan schedule must be longer than zero")
        return IntervalSchedule(interval)
    fields = text.split()
    if len(fields) != 6:
        raise HostStartupError(
            f"{where}: {text!r} has {len(fields)} fields; NCRONTAB needs 6: "
            "{second} {minute} {hour} {day} {month} {day-of-week}"
        )
    if not croniter.is_valid(text, second_at_beginning=True):
        raise HostStartupError(f"{where}: {text!r} is not a valid NCRONTAB expression")
    return CronSchedule(text, tz)


def default_use_monitor(schedule: Schedule, now: datetime) -> bool:
    """The host monitors schedules whose interval is at least a minute."""
    first = schedule.next_after(now)
    return schedule.next_after(first) - first >= timedelta(minutes=1)


class ScheduleMonitor:
    def __init__(self, conn: str, host_id: str) -> None:
        self._service = BlobServiceClient.from_connection_string(conn)
        self._host_id = host_id

    def _blob(self, function: str) -> str:
        return f"timers/{self._host_id}/{function}/status"

    async def read(self, function: str) -> dict[str, datetime] | None:
        blob = self._service.get_blob_client(MONITOR_CONTAINER, self._blob(function))
        try:
            raw = await (await blob.download_blob()).readall()
        except ResourceNotFoundError:
            return None
        try:
            data = json.loads(raw)
            return {k: datetime.fromisoformat(data[k]) for k in ("Last", "Next", "LastUpdated") if data.get(k)}
        except (ValueError, TypeError, KeyError):
            log.warning("Schedule status of '%s' is unreadable; starting afresh", function)
            return None

    async def write(self, function: str, last: datetime | None, nxt: datetime, now: datetime) -> None:
        container = self._service.get_container_client(MONITOR_CONTAINER)
        with contextlib.suppress(ResourceExistsError):
            await container.create_container()
        body = {
            "Last": last.isoformat() if last else None,
            "Next": nxt.isoformat(),
            "LastUpdated": now.isoformat(),
        }
        await container.upload_blob(self._blob(function), json.dumps(body), overwrite=True)

    async def close(self) -> None:
        await self._service.close()


@dataclass
class TimerListener:
    spec: FunctionSpec
    schedule: Schedule
    invoker: Invoker
    monitor: ScheduleMonitor | None
    run_on_startup: bool = False
    fire_at_start: bool = False
    clock: Clock = utcnow
    fired: list[bool] = field(default_factory=list)  # past_due of each invocation, for the host's stats
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    async def fire(self, *, past_due: bool, status: dict[str, Any] | None = None) -> bool:
        """One invocation; the timer is a singleton, so invocations never overlap."""
        async with self._lock:
            request = TimerRequest(
                past_due=past_due,
                schedule_status={k: v.isoformat() for k, v in (status or {}).items()},
                schedule={"AdjustForDST": True},
            )
            inv = await self.invoker.invoke(self.spec, request, reason=f"Timer fired at {self.clock().isoformat()}")
            self.fired.append(past_due)
            return inv.succeeded

    async def run(self, stop: asyncio.Event) -> None:
        now = self.clock()
        status = await self._read_status()
        last: datetime | None = status.get("Last") if status else None
        if status and "Next" in status and status["Next"] < now:
            log.info("Timer '%s' missed its occurrence at %s: firing now, past due", self.spec.name, status["Next"])
            await self.fire(past_due=True, status=status)
            last = status["Next"]
        elif self.run_on_startup or self.fire_at_start:
            await self.fire(past_due=False, status=status)
        while not stop.is_set():
            now = self.clock()
            # TimeSpan schedules count from the last occurrence; cron schedules from now.
            base = last if isinstance(self.schedule, IntervalSchedule) and last else now
            nxt = self.schedule.next_after(base)
            if nxt < now:
                nxt = self.schedule.next_after(now)
            await self._write_status(last, nxt)
            log.info("Timer '%s': next occurrence at %s", self.spec.name, nxt.isoformat())
            while not stop.is_set():
                remaining = (nxt - self.clock()).total_seconds()
                if remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=min(remaining, 60.0))
            if stop.is_set():
                return
            await self.fire(past_due=False, status={"Last": last, "Next": nxt} if last else {"Next": nxt})
            last = nxt

    async def _read_status(self) -> dict[str, datetime] | None:
        if self.monitor is None:
            return None
        try:
            return await self.monitor.read(self.spec.name)
        except AzureError as exc:
            log.warning("Reading the schedule status of '%s' failed: %s", self.spec.name, type(exc).__name__)
            return None

    async def _write_status(self, last: datetime | None, nxt: datetime) -> None:
        if self.monitor is None:
            return
        try:
            await self.monitor.write(self.spec.name, last, nxt, self.clock())
        except AzureError as exc:
            log.warning("Writing the schedule status of '%s' failed: %s", self.spec.name, type(exc).__name__)
