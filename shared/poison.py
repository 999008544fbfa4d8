"""The poison queue's handler (`poison_to_dlq`): a message the host gave up on becomes one DLQ row, with the last
error the worker recorded for its batch and how often it was tried."""

from __future__ import annotations

import logging

from shared import dlq, messages, state
from shared.messages import MalformedMessage
from shared.runtime import Runtime

log = logging.getLogger("shared.poison")


async def handle_poison(runtime: Runtime, content: bytes, *, dequeue_count: int = 1) -> str:
    """A message the host gave up on (`content` as the queue holds it): one DLQ row with the body, the last error
    recorded for it and its attempts."""
    body = messages.readable(content)
    text = body.decode("utf-8", "replace")
    runtime.metrics.poison.add(1, {"queue": runtime.settings.queue_name})
    try:
        msg = messages.parse(messages.from_queue(content))
    except MalformedMessage as exc:
        run_id, batch_id, entity = messages.peek_ids(body)
        key = await dlq.put_message(runtime.tables, body=text, reason_kind="malformed", reason=str(exc),
                                    run_id=run_id, batch_id=batch_id, entity=entity)  # fmt: skip
        runtime.metrics.dlq_writes.add(1, {"kind": "message", "reason": "malformed"})
        return key
    batch = await state.read_batch(runtime.tables, msg.run_id, msg.batch_id) or {}
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
    await state.record_batch(runtime.tables, msg.run_id, msg.batch_id, status="poisoned", poisoned=len(msg.ids))
    runtime.metrics.dlq_writes.add(1, {"kind": "message", "reason": "poison"})
    log.error("batch %s of run %s poisoned after %d attempts: %s", msg.batch_id, msg.run_id, attempts, last_error)
    return key
