"""A circuit breaker per outside system whose state lives in an Azure Table entity, updated with ETags.

Every function instance reads and writes the same entity (PartitionKey `breaker`, RowKey the system's name), so
when one instance opens the breaker all of them see it open. Writes use optimistic concurrency: a write based on
a stale read fails with 412 and is redone on a fresh read, so concurrent failures are all counted and exactly one
instance wins the right to send the half-open probe.

closed --(failure_threshold failures in a row)--> open --(open_for_s elapsed; one caller probes)--> half_open
half_open --(probe succeeds)--> closed;  half_open --(probe fails)--> open

`unhealthy_since` is when the breaker last left `closed`; it stays through every open / half-open round of an
outage, so `open_seconds()` says how long calls have been paused however often probes flip the state. The
breaker-open alert reads that figure (`sync_breaker_open_seconds`), not the state, which probes keep changing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables.aio import TableClient
from pydantic import ValidationError
from tenacity import AsyncRetrying, RetryError, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from shared import logs
from shared.errors import CircuitOpenError
from shared.state import RowMoved, write_if_unchanged
from shared.tablerow import from_row, to_row

log = logs.get_logger("shared.breaker")
PARTITION = "breaker"
State = Literal["closed", "open", "half_open"]
Clock = Callable[[], float]


class LostRace(Exception):
    """Another writer changed the breaker's row since it was read."""


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 5
    open_for_s: float = 30.0
    cache_s: float = 1.0  # how stale a read may be when deciding to let a call through
    write_attempts: int = 20
    backoff_s: float = 0.02  # after a lost race: a random pause up to backoff_s * 2**n (capped at 1 s)


@dataclass(frozen=True)
class BreakerState:
    state: State = "closed"
    failures: int = 0
    opened_at: float = 0.0
    probe_at: float = 0.0
    unhealthy_since: float = 0.0  # when it last left closed; 0 while closed
    etag: str | None = None

    def open_seconds(self, now: float) -> float:
        """How long calls have been paused: 0 while closed, else the time since the breaker left closed."""
        if self.state == "closed":
            return 0.0
        return max(0.0, now - (self.unhealthy_since or self.opened_at or now))

    def to_entity(self, system: str) -> dict[str, Any]:
        return to_row(self, partition=PARTITION, row_key=system)

    @classmethod
    def from_entity(cls, entity: Any) -> BreakerState:
        etag = entity.metadata.get("etag") if hasattr(entity, "metadata") else None
        try:
            state = from_row(cls, entity, etag=etag)
        except ValidationError:
            log.error("breaker row %s is unreadable; taken as closed", entity.get("RowKey"))
            return cls(etag=etag)
        if state.state != "closed" and not state.unhealthy_since:  # rows from before unhealthy_since was kept
            state = replace(state, unhealthy_since=state.opened_at)
        return state


class CircuitBreaker:
    def __init__(
        self, table: TableClient, system: str, config: BreakerConfig | None = None, *, clock: Clock = time.time
    ) -> None:
        self.table = table
        self.system = system
        self.config = config or BreakerConfig()
        self.clock = clock
        self._cached: BreakerState | None = None
        self._cached_at = float("-inf")

    async def read(self, *, fresh: bool = True) -> BreakerState:
        now = time.monotonic()
        if not fresh and self._cached is not None and now - self._cached_at < self.config.cache_s:
            return self._cached
        try:
            entity = await self.table.get_entity(PARTITION, self.system)
            state = BreakerState.from_entity(entity)
        except ResourceNotFoundError:
            state = BreakerState()
        self._cached, self._cached_at = state, now
        return state

    async def _write(self, old: BreakerState, new: BreakerState) -> bool:
        """Write `new` if nobody wrote since `old` was read. False means: someone did; read again."""
        try:
            await write_if_unchanged(self.table, new.to_entity(self.system), old.etag)
        except RowMoved:
            return False
        self._cached = None
        if new.state != old.state:
            log.warning("Breaker '%s': %s -> %s (failures %d)", self.system, old.state, new.state, new.failures)
        return True

    async def _transition(self, change: Callable[[BreakerState], BreakerState | None]) -> BreakerState:
        """Apply `change` to the current state with optimistic concurrency. `change` returning None: no write.

        A write that loses the race to another writer reads again and retries after a random pause (full jitter:
        retrying at once keeps the losers in lock-step, and with more concurrent writers than attempts some ran
        out)."""

        async def once() -> BreakerState:
            old = await self.read()
            new = change(old)
            if new is None:
                return old
            if not await self._write(old, new):
                raise LostRace
            return new

        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.config.write_attempts),
            wait=wait_random_exponential(multiplier=self.config.backoff_s, max=1.0),
            retry=retry_if_exception_type(LostRace),
        )
        try:
            return await retrying(once)
        except RetryError:
            raise CircuitOpenError(
                f"breaker '{self.system}': could not record its state (too much contention)", system=self.system
            ) from None

    async def before_call(self) -> None:
        """Let the call through, or raise CircuitOpenError. While open, exactly one caller gets to probe."""
        state = await self.read(fresh=False)
        if state.state == "closed":
            return
        now = self.clock()
        if state.state == "open" and now - state.opened_at < self.config.open_for_s:
            raise self._open_error(state, now)
        if state.state == "half_open" and now - state.probe_at < self.config.open_for_s:
            raise self._open_error(state, now)  # someone else's probe is under way

        won = False

        def start_probe(current: BreakerState) -> BreakerState | None:
            nonlocal won
            t = self.clock()
            due = (current.state == "open" and t - current.opened_at >= self.config.open_for_s) or (
                current.state == "half_open" and t - current.probe_at >= self.config.open_for_s
            )
            won = due
            return replace(current, state="half_open", probe_at=t) if due else None

        result = await self._transition(start_probe)
        if result.state == "closed" or won:
            return
        raise self._open_error(result, self.clock())

    def _open_error(self, state: BreakerState, now: float) -> CircuitOpenError:
        since = state.opened_at if state.state == "open" else state.probe_at
        wait = max(0.0, self.config.open_for_s - (now - since))
        return CircuitOpenError(
            f"breaker '{self.system}' is {state.state.replace('_', '-')}: calls paused for {wait:.0f} s more",
            system=self.system,
            retry_after=wait,
        )

    async def record_success(self) -> None:
        cached = self._cached
        if cached is not None and cached.state == "closed" and cached.failures == 0:
            return  # the common case costs no table write

        def close(current: BreakerState) -> BreakerState | None:
            if current.state == "closed" and current.failures == 0:
                return None
            return replace(current, state="closed", failures=0, opened_at=0.0, probe_at=0.0, unhealthy_since=0.0)

        await self._transition(close)

    async def record_failure(self) -> None:
        def fail(current: BreakerState) -> BreakerState:
            failures = current.failures + 1
            if current.state == "half_open" or (
                current.state == "closed" and failures >= self.config.failure_threshold
            ):
                now = self.clock()
                since = current.unhealthy_since if current.state == "half_open" and current.unhealthy_since else now
                return replace(current, state="open", failures=failures, opened_at=now, unhealthy_since=since)
            return replace(current, failures=failures)

        await self._transition(fail)
