"""Fan-out (timer trigger `fan_out`): list what changed in billing and put its IDs on the queue, page by page.

Per entity (docs/sync.md, "Fan-out"):

- a run starts from the watermark less the overlap, asks the count endpoint how many records are due, and claims
  the entity's checkpoint row (optimistic concurrency: a second fan-out running at the same time stops);
- the listing engine (`shared.billing.listing`) gives the run's ids page by page, de-duplicated at page boundaries
  and listed again when a round comes up short of the count; each page becomes messages of `SYNC_BATCH_SIZE` ids,
  and only *after* they are sent does the checkpoint move to the next page's request, so a crash or the time
  budget resumes exactly there (a page sent twice is harmless: the worker skips unchanged records);
- a listing still short after its last round ends without moving the watermark, so the next run lists the same
  range again; a listing the platform broke (off contract, a loop) ends failed and starts afresh next tick.
  Otherwise the watermark moves to the time this listing *started*: a record changed while the listing ran is
  picked up by the next run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from shared import clock, coalesce, dlq, health, logs, messages, state
from shared.billing.listing import ChangeListing, ListingPosition
from shared.billing.models import Entity
from shared.errors import CircuitOpenError, ContractError
from shared.reconcile import report
from shared.runtime import Runtime
from shared.state import Checkpoint, CheckpointConflict

log = logs.get_logger("shared.fanout")
SEND_CONCURRENCY = 16

Outcome = Literal["completed", "paused", "short", "conflict", "deferred", "failed"]


@dataclass
class FanoutResult:
    entity: str
    run_id: str
    outcome: Outcome
    listed: int
    messages: int
    expected: int


class FanoutFailed(Exception):
    """Some entities' listings failed this tick (the others ran, and the health readings were taken)."""


async def fan_out(runtime: Runtime, *, budget_s: float | None = None) -> list[FanoutResult]:
    """One tick: every configured entity, customers first, within one time budget.

    Entities are isolated: one entity's failure neither skips the others nor the health readings, which are taken
    whatever happened (an outage is exactly when the breaker and DLQ alerts need them). A failure still fails the
    invocation afterwards, so the host records it.
    """
    deadline = time.monotonic() + (budget_s if budget_s is not None else runtime.settings.fanout_budget_s)
    results: list[FanoutResult] = []
    failures: list[str] = []
    try:
        for entity in runtime.settings.entity_list:
            try:
                results.append(await _entity(runtime, entity, deadline))
            except CheckpointConflict as exc:
                log.warning("fan-out %s: %s; another fan-out is running it", entity, exc)
                results.append(FanoutResult(entity, "", "conflict", 0, 0, 0))
            except CircuitOpenError as exc:
                log.warning("fan-out %s: %s; the next tick resumes", entity, exc)
                results.append(FanoutResult(entity, "", "deferred", 0, 0, 0))
                runtime.metrics.runs.add(1, {"entity": entity, "outcome": "deferred"})
            except Exception as exc:  # noqa: BLE001 - isolated per entity, reported below and re-raised as a whole
                log.error("fan-out %s failed: %s: %s; the next tick retries", entity, type(exc).__name__, exc)
                results.append(FanoutResult(entity, "", "failed", 0, 0, 0))
                runtime.metrics.runs.add(1, {"entity": entity, "outcome": "failed"})
                failures.append(f"{entity}: {type(exc).__name__}: {exc}")
    finally:
        await health.observe(runtime)  # the gauges the alerts read: DLQ depth, breaker states, lag
        await _housekeeping(runtime)
    if failures:
        raise FanoutFailed("fan-out failed for " + "; ".join(failures))
    return results


BAD_ID_REASON = "billing listed an id the sync cannot carry: 1 to 100 characters, no control characters"


async def _housekeeping(runtime: Runtime) -> None:
    """After the gauges, each tick's housekeeping, step by step: one failing does not stop the others, and the next
    tick tries it again. The replay cache forgets events older than twice the tolerance (they cannot verify any
    more, `shared.webhook`); webhook windows left undrained for an hour are forgotten (their drain is in the DLQ,
    `shared.coalesce`); reconcile runs whose batches have all ended get their totals and report
    (`shared.reconcile.report`)."""
    steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("old webhook events not forgotten",
         lambda: state.forget_events(runtime.tables, older_than_s=2 * runtime.settings.webhook_tolerance_s + 60)),
        ("old webhook windows not forgotten", lambda: coalesce.purge(runtime)),
        ("reconcile reports not written", lambda: report.write_pending(runtime)),
    ]  # fmt: skip
    for failed, step in steps:
        try:
            await step()
        except Exception as exc:  # noqa: BLE001 - housekeeping: the next tick tries again
            log.warning("fan-out: %s (%s: %s); the next tick tries again", failed, type(exc).__name__, exc)


async def _start(runtime: Runtime, cp: Checkpoint) -> Checkpoint:
    started = clock.utcnow()
    since = ""
    if cp.watermark:
        since = clock.iso(clock.parse_iso(cp.watermark) - timedelta(seconds=runtime.settings.overlap_s))
    entity: Entity = cp.entity  # type: ignore[assignment]
    expected = await runtime.billing.count(entity, since)
    cp.run_id = state.run_id_for(entity, started)
    cp.listing_started, cp.messages = clock.iso(started), 0
    cp.listing = ListingPosition(since=since, expected=expected)
    cp = await state.write_checkpoint(runtime.tables, cp)  # claims the run
    await state.start_run(runtime.tables, cp.run_id, entity, since, "fanout")
    await state.update_run(runtime.tables, cp.run_id, expected=expected)
    log.info("fan-out %s: run %s lists changes since %s (%d due)", entity, cp.run_id, since or "the start", expected)
    return cp


async def _entity(runtime: Runtime, entity: Entity, deadline: float) -> FanoutResult:
    cp = await state.read_checkpoint(runtime.tables, entity)
    if not cp.run_id:
        cp = await _start(runtime, cp)
    else:
        log.info("fan-out %s: resuming run %s at page %d", entity, cp.run_id, cp.listing.pages + 1)
    listing = ChangeListing(runtime.billing, entity, cp.listing)
    progressed = False
    try:
        while not listing.finished:
            if time.monotonic() > deadline and progressed:  # at least one page per entity and tick: none starves
                return await _pause(runtime, cp)
            progressed = True
            page = await listing.next_page()
            cp.messages += await _send(runtime, entity, page.ids, cp.run_id)  # sent before the checkpoint moves
            runtime.metrics.listed.add(len(page.ids), {"entity": entity})
            if page.restarted:
                runtime.metrics.throttled.add(1, {"system": "billing"})
            cp = await state.write_checkpoint(runtime.tables, cp)
    except ContractError:
        await _abandon(runtime, cp)
        raise
    return await _finish(runtime, cp)


async def _pause(runtime: Runtime, cp: Checkpoint) -> FanoutResult:
    listed = cp.listing.listed
    await state.update_run(runtime.tables, cp.run_id, status="paused", listed=listed, messages=cp.messages)
    runtime.metrics.runs.add(1, {"entity": cp.entity, "outcome": "paused"})
    log.info("fan-out %s: time budget spent after %d ids; the next tick resumes", cp.entity, listed)
    return FanoutResult(cp.entity, cp.run_id, "paused", listed, cp.messages, cp.listing.expected)


async def _abandon(runtime: Runtime, cp: Checkpoint) -> None:
    """A listing the platform broke (a loop, an answer off contract) is not resumed: resuming would ask the same
    request again. The run ends failed, the watermark stays, and the next tick lists the range from the start."""
    await state.update_run(runtime.tables, cp.run_id, status="failed", listed=cp.listing.listed, messages=cp.messages)
    cp.run_id, cp.listing = "", ListingPosition()
    await state.write_checkpoint(runtime.tables, cp)


async def _finish(runtime: Runtime, cp: Checkpoint) -> FanoutResult:
    pos = cp.listing
    short = pos.listed < pos.expected
    result = FanoutResult(
        cp.entity, cp.run_id, "short" if short else "completed", pos.listed, cp.messages, pos.expected
    )
    now = clock.iso(clock.utcnow())
    if short:
        log.error(
            "fan-out %s: run %s listed %d ids, the count said %d; the watermark stays at %s so the next run lists "
            "this range again", cp.entity, cp.run_id, pos.listed, pos.expected, cp.watermark or "the start",
        )  # fmt: skip
    else:
        cp.watermark = cp.listing_started
        cp.last_completed = now
    await state.update_run(
        runtime.tables,
        cp.run_id,
        status=result.outcome,
        listed=pos.listed,
        messages=cp.messages,
        rounds=pos.round,
        listing_completed_at=now,
    )
    cp.run_id, cp.listing = "", ListingPosition()
    await state.write_checkpoint(runtime.tables, cp)
    runtime.metrics.runs.add(1, {"entity": cp.entity, "outcome": result.outcome})
    if cp.watermark:
        lag = (clock.utcnow() - clock.parse_iso(cp.watermark)).total_seconds()
        runtime.metrics.lag.set(lag, {"entity": cp.entity})
    log.info("fan-out %s: run %s %s: %d ids in %d messages", cp.entity, result.run_id, result.outcome,
             pos.listed, cp.messages)  # fmt: skip
    return result


async def _send(runtime: Runtime, entity: Entity, ids: list[str], run_id: str) -> int:
    """Messages of the listed ids; an id that breaks the queue contract (a control character, over 100 characters)
    is dead-lettered as `invalid` here, so that one bad record neither stalls the listing nor poisons a batch."""
    bad = [i for i in ids if not messages.is_record_id(i)]
    if bad:
        failures = [dlq.RecordFailure(entity, i, "invalid", BAD_ID_REASON) for i in bad]
        await dlq.put_records(runtime.tables, failures, run_id=run_id, batch_id="listing")
        runtime.metrics.dlq_writes.add(len(bad), {"kind": "record", "reason": "invalid"})
        ids = [i for i in ids if messages.is_record_id(i)]
    batch = messages.split(entity, ids, size=runtime.settings.batch_size, run_id=run_id, source="fanout")
    gate = asyncio.Semaphore(SEND_CONCURRENCY)

    async def one(msg: messages.SyncMessage) -> None:
        async with gate:
            await runtime.queue.send_message(msg.body())

    await asyncio.gather(*(one(m) for m in batch))
    return len(batch)
