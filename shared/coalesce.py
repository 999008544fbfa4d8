"""Webhook coalescing: the change events of one entity within a window (`WEBHOOK_COALESCE_SECONDS`, default 2)
become one sync of up to `SYNC_BATCH_SIZE` ids, so a burst of events costs a billing fetch per window, not per event.

- An accepted event writes one row to `webhookpending` (PartitionKey `<entity>-<window number>`, RowKey the record
  id): an id changed twice inside a window is one row.
- The first event of a window claims it (a row in partition `window`, created once whichever instance tries) and
  sends one `webhooks` message (`kind: webhooks`, its one id the window's key), invisible until the last whole
  second before the window closes; the drain waits until half a second after the close, then reads. Each instance
  remembers the windows it saw claimed, so a burst costs one claim per instance and window, not one per event.
- The worker's drain of that message reads the window's rows, syncs the first `SYNC_BATCH_SIZE` ids itself, sends
  the rest as ordinary sync messages and deletes the rows it read.
- An event less than half a second before its window closes goes into the next window, so every row is written
  before its window can be drained (the drain reads half a second after the window closes at the earliest: clocks
  may differ by up to a second between instances). A row written after its window closed anyway (a slower write)
  is also sent on its own: nothing may wait for a window already drained.
- The fan-out tick forgets claims and rows older than an hour: left only by a drain that failed for good, whose
  message is in the DLQ (and fan-out's listing finds those changes anyway).

Storage per event: one Table upsert, beside the replay cache's create (`shared.webhook`); per window and entity: a
claim, a queue message, a query and the deletes. `WEBHOOK_COALESCE_SECONDS=0` sends each event on its own, as before.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Final

from azure.core.exceptions import ResourceExistsError
from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableClient

from shared import clock, logs, messages, state
from shared.messages import Entity, SyncMessage
from shared.odata import literal
from shared.runtime import Runtime

log = logs.get_logger("shared.coalesce")
TABLE: Final = "webhookpending"
CLAIMS: Final = "window"
GRACE_S: Final = 0.5  # the drain reads this long after its window closes, at the earliest
MARGIN_S: Final = 0.5  # an event this close to its window's end goes into the next window
KEEP_S: Final = 3600.0
_CLAIMED: dict[str, float] = {}  # (table prefix, window) -> when it closes: windows this instance saw claimed


def window_of(entity: str, now: float, width_s: float) -> tuple[str, float]:
    """The window `now` falls in: its key and when it closes (unix seconds)."""
    number = math.floor(now / width_s)
    return f"{entity}-{number}", (number + 1) * width_s


async def add(runtime: Runtime, entity: Entity, record_id: str, *, clock_s: Callable[[], float] = time.time) -> str:
    """Put a changed record into its entity's window; the window's key. An event less than MARGIN_S before a window
    closes goes into the next one, so its row is written before the window it is in can be drained; a row written
    after its window closed anyway (a very slow write) is also sent on its own."""
    width = runtime.settings.webhook_coalesce_s
    moment = clock_s()
    window, closes = window_of(entity, moment + MARGIN_S, width)
    table = await runtime.tables.table(TABLE)
    row = {"PartitionKey": window, "RowKey": state.row_key(record_id), "record_id": record_id,
           "at": clock.iso(clock.utcnow())}  # fmt: skip
    await table.upsert_entity(row, mode=UpdateMode.REPLACE, **state.RETRY_WRITES)
    await _claim(runtime, table, entity, window, closes=closes, now=moment)
    if clock_s() > closes:
        late = messages.build(entity, [record_id], run_id=run_id_of(window), source="webhook")
        await runtime.queue.send_message(late.body())
        log.warning("webhook change of %s %s written after its window closed: sent on its own", entity, record_id)
    return window


def run_id_of(window: str) -> str:
    return f"webhooks-{window}"


async def _claim(
    runtime: Runtime, table: TableClient, entity: Entity, window: str, *, closes: float, now: float
) -> None:
    """Send the window's drain message once, whichever instance and event come first."""
    key = f"{runtime.settings.table_prefix}:{window}"
    if key in _CLAIMED:
        return
    claim = {"PartitionKey": CLAIMS, "RowKey": window, "at": clock.iso(clock.utcnow())}
    try:
        await table.create_entity(claim)
    except ResourceExistsError:
        _remember(key, closes, now)
        return
    drain = messages.build(entity, [window], run_id=run_id_of(window), source="webhook", kind="webhooks")
    delay = max(0, math.floor(closes - now))  # whole seconds (the queue's unit), never past the close: `settle`
    # waits out the rest, so the drain runs the grace after the close, not up to a second later
    await runtime.queue.send_message(drain.body(), visibility_timeout=delay)
    _remember(key, closes, now)


def _remember(key: str, closes: float, now: float) -> None:
    _CLAIMED[key] = closes
    if len(_CLAIMED) > 1000:
        for old in [k for k, c in _CLAIMED.items() if c < now - KEEP_S]:
            del _CLAIMED[old]


async def settle(window: str, width_s: float) -> None:
    """Wait, if need be, until GRACE_S after the window closed (the drain message's delay is in whole seconds)."""
    closes = (int(window.rsplit("-", 1)[1]) + 1) * width_s
    wait = closes + GRACE_S - time.time()
    if wait > 0:
        await asyncio.sleep(min(wait, GRACE_S + 1))


async def pending(runtime: Runtime, window: str) -> list[str]:
    """The record ids waiting in a window, in the order they were written."""
    table = await runtime.tables.table(TABLE)
    rows = [r async for r in table.query_entities(f"PartitionKey eq {literal(window)}", select=["record_id", "at"])]
    return [str(r["record_id"]) for r in sorted(rows, key=lambda r: str(r.get("at") or ""))]


async def forget(runtime: Runtime, window: str, record_ids: Sequence[str]) -> None:
    """Delete a drained window's rows (100 a transaction)."""
    table = await runtime.tables.table(TABLE)
    await state.delete_rows(table, window, [state.row_key(i) for i in record_ids])


def drain_plan(msg: SyncMessage, ids: Sequence[str], batch_size: int) -> list[SyncMessage]:
    """The sync messages a drained window becomes: the first is synced by the drain itself."""
    return messages.split(msg.entity, list(ids), size=batch_size, run_id=msg.run_id, source="webhook")


async def purge(runtime: Runtime, *, older_than_s: float = KEEP_S) -> int:
    """Forget claims and rows older than `older_than_s`; how many rows."""
    table = await runtime.tables.table(TABLE)
    cutoff = clock.iso(clock.utcnow() - timedelta(seconds=older_than_s))
    by_partition: dict[str, list[str]] = {}
    async for row in table.query_entities(f"at lt {literal(cutoff)}", select=["PartitionKey", "RowKey"]):
        by_partition.setdefault(str(row["PartitionKey"]), []).append(str(row["RowKey"]))
    for partition, keys in by_partition.items():
        await state.delete_rows(table, partition, keys)
    return sum(len(k) for k in by_partition.values())
