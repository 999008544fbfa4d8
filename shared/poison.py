"""The poison queue's handler (`poison_to_dlq`): a message the host gave up on becomes one DLQ row, with the last
error the worker recorded for its batch and how often it was tried.

It never fails for what the message holds: whatever the bytes, one row (`malformed` with the decode error named and
the raw content kept base64-encoded, or `poison`), and the poison metric counted. A message that reached the poison
queue has nowhere further to go but `<queue>-poison-poison`, which nothing reads. Only a failure to write the row
itself (storage down) is raised, so that the host tries again while storage comes back.
"""

from __future__ import annotations

import hashlib
from typing import Any

from shared import dlq, logs, messages, state
from shared.messages import MalformedMessage, SyncMessage
from shared.runtime import Runtime

log = logs.get_logger("shared.poison")


async def handle_poison(runtime: Runtime, content: bytes, *, dequeue_count: int = 1, queue: str = "sync") -> str:
    """A message the host gave up on (`content` as the queue holds it): one DLQ row; returns its RowKey. `queue`:
    whose poison queue it came from, the sync's or reconcile's (`<queue>-reconcile-poison`)."""
    name = runtime.settings.queue_name if queue == "sync" else runtime.settings.reconcile_queue
    runtime.metrics.poison.add(1, {"queue": name})
    try:
        msg = messages.parse(messages.from_queue(content))
    except MalformedMessage as exc:
        key = await dlq.put_malformed(runtime.tables, content, str(exc), attempts=dequeue_count)
        runtime.metrics.dlq_writes.add(1, {"kind": "message", "reason": "malformed"})
        return key
    try:
        return await _poisoned(runtime, msg, messages.readable(content).decode("utf-8", "replace"))
    except Exception as exc:  # the row below is the last place this message can be kept: never lose it
        log.exception("poison handler: the row of batch %s could not be written in full", msg.batch_id)
        return await _kept_anyway(runtime, content, exc)


async def _poisoned(runtime: Runtime, msg: SyncMessage, text: str) -> str:
    batch = await _batch_row(runtime, msg)
    attempts = int(batch.get("attempts") or 0)
    last_error = str(batch.get("last_error") or "no error was recorded (the worker may have timed out or crashed)")
    key = await dlq.put_message(
        runtime.tables,
        body=text,
        reason_kind="poison",
        reason=f"failed {attempts or 'maxDequeueCount'} deliveries; last error: {last_error}",
        run_id=msg.run_id,
        batch_id=msg.batch_id,
        entity=msg.entity,
        attempts=attempts,
        last_error=last_error,
        first_failed=str(batch.get("first_failed") or ""),
        verbatim=True,
    )
    runtime.metrics.dlq_writes.add(1, {"kind": "message", "reason": "poison"})
    log.error("batch %s of run %s poisoned after %d attempts: %s", msg.batch_id, msg.run_id, attempts, last_error)
    try:
        await state.record_batch(runtime.tables, msg.run_id, msg.batch_id, status="poisoned", poisoned=len(msg.ids))
    except Exception:  # the DLQ row holds the message: the ledger row only loses its `poisoned` mark
        log.exception("poison handler: batch %s is in the DLQ; its ledger row could not be marked", msg.batch_id)
    return key


async def _batch_row(runtime: Runtime, msg: SyncMessage) -> dict[str, Any]:
    try:
        return await state.read_batch(runtime.tables, msg.run_id, msg.batch_id) or {}
    except Exception as exc:  # noqa: BLE001 - the row is kept without the ledger's last error
        return {"last_error": f"the batch's ledger row could not be read ({type(exc).__name__})"}


async def _kept_anyway(runtime: Runtime, content: bytes, exc: Exception) -> str:
    """The message as it came, under a key of its own, with what went wrong."""
    key = await dlq.put_message(
        runtime.tables,
        body=messages.readable(content).decode("utf-8", "replace"),
        reason_kind="poison",
        reason=f"reached the poison queue; its row could not be written in full ({type(exc).__name__}: {exc})",
        run_id=None,
        batch_id=None,
        entity=None,
        raw=content,
        key="poison-" + hashlib.sha256(content).hexdigest()[:32],
    )
    runtime.metrics.dlq_writes.add(1, {"kind": "message", "reason": "poison"})
    return key
