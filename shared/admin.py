"""The HTTP functions' work: the DLQ API, reprocess, health, the webhook receiver, and the poison handler.

Each handler takes what the host gives (a request, a message body) and returns what the host sends back; the
decorators in `function_app.py` do nothing else.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import azure.functions as func

from shared import __version__, dlq, messages, state, webhook
from shared.messages import MalformedMessage
from shared.runtime import Runtime
from shared.telemetry import BREAKER_VALUES

log = logging.getLogger("shared.admin")
MAX_LIST = 1000


def _json(value: Any, status: int = 200) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(value, default=str, indent=1), status_code=status, mimetype="application/json")


def _error(status: int, message: str) -> func.HttpResponse:
    return _json({"error": message}, status)


# ---- DLQ ----


def _selection(params: dict[str, Any]) -> dlq.Selection:
    statuses = params.get("status") or "open"
    if isinstance(statuses, str):
        statuses = [s.strip() for s in statuses.split(",") if s.strip()]
    allowed = {"open", "requeued", "resolved", "any"}
    if not isinstance(statuses, list) or not set(statuses) <= allowed:
        raise ValueError(f"status: one or more of {', '.join(sorted(allowed))}")
    ids = params.get("ids") or ()
    if isinstance(ids, str):
        ids = [i.strip() for i in ids.split(",") if i.strip()]
    if not isinstance(ids, list | tuple) or not all(isinstance(i, str) for i in ids):
        raise ValueError("ids: a list of record or batch ids")
    entity = params.get("entity")
    if entity not in (None, "", "customers", "invoices"):
        raise ValueError("entity: customers or invoices")
    return dlq.Selection(
        all=params.get("all") in (True, "true", "1"),
        run_id=params.get("run_id") or None,
        reason=params.get("reason") or None,
        ids=tuple(ids),
        entity=entity or None,
        statuses=() if "any" in statuses else tuple(statuses),
    )


async def list_dlq(runtime: Runtime, req: func.HttpRequest) -> func.HttpResponse:
    params = dict(req.params)
    try:
        selection = _selection({**params, "all": "true"})
        top = int(params.get("top", "100"))
    except ValueError as exc:
        return _error(400, str(exc))
    rows = await dlq.rows(runtime.tables, selection, limit=max(1, min(top, MAX_LIST)))
    with_body = params.get("body") in ("1", "true")
    return _json({"count": len(rows), "rows": [dlq.public(r, with_body=with_body) for r in rows]})


@dataclass
class ReprocessResult:
    records: int = 0
    messages: int = 0
    skipped: list[str] | None = None


async def reprocess(runtime: Runtime, req: func.HttpRequest) -> func.HttpResponse:
    """Re-enqueue chosen DLQ rows: `{"all": true}`, `{"run_id": ...}`, `{"reason": ...}`, `{"ids": [...]}`
    (optionally `entity`, `status`, `dry_run`). Rows are marked `requeued`; nothing is deleted."""
    try:
        body = req.get_json() if req.get_body() else {}
    except ValueError:
        return _error(400, 'the body must be JSON, for example {"all": true}')
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object")
    unknown = sorted(set(body) - {"all", "run_id", "reason", "ids", "entity", "status", "dry_run"})
    if unknown:
        return _error(400, f"unknown keys: {', '.join(unknown)}")
    try:
        selection = _selection(body)
    except ValueError as exc:
        return _error(400, str(exc))
    if not (selection.all or selection.run_id or selection.reason or selection.ids or selection.entity):
        return _error(400, "choose rows: all, run_id, reason, ids or entity")
    rows = await dlq.rows(runtime.tables, selection, limit=100_000)
    if body.get("dry_run"):
        return _json({"dry_run": True, "would_requeue": len(rows), "rows": [dlq.public(r) for r in rows[:100]]})
    result = await requeue(runtime, rows)
    log.info("reprocess: %d records and %d messages requeued", result.records, result.messages)
    return _json({"requeued_records": result.records, "requeued_messages": result.messages,
                  "skipped": result.skipped or []})  # fmt: skip


async def requeue(runtime: Runtime, rows: list[dict[str, Any]]) -> ReprocessResult:
    result = ReprocessResult(skipped=[])
    assert result.skipped is not None  # noqa: S101
    run_id = f"reprocess-{state.utcnow():%Y%m%dT%H%M%S}"
    by_entity: dict[str, list[dict[str, Any]]] = {}
    marked: list[tuple[str, str]] = []
    for row in rows:
        if row.get("kind") == "record":
            by_entity.setdefault(str(row["entity"]), []).append(row)
            continue
        try:
            original = messages.parse(str(row.get("body") or ""))
        except MalformedMessage as exc:
            result.skipped.append(f"{row['RowKey']}: cannot be reprocessed ({exc})")
            continue
        again = original.model_copy(update={"source": "reprocess", "deferrals": 0})
        await runtime.queue.send_message(again.body())
        marked.append((str(row["PartitionKey"]), str(row["RowKey"])))
        result.messages += 1
    for entity, entity_rows in by_entity.items():
        ids = [str(r["record_id"]) for r in entity_rows]
        for msg in messages.split(entity, ids, size=runtime.settings.batch_size, run_id=run_id, source="reprocess"):  # type: ignore[arg-type]
            await runtime.queue.send_message(msg.body())
        marked += [(str(r["PartitionKey"]), str(r["RowKey"])) for r in entity_rows]
        result.records += len(ids)
    await dlq.mark(runtime.tables, marked, "requeued")
    return result


# ---- health ----


@dataclass
class Observed:
    entities: dict[str, dict[str, Any]]
    breakers: dict[str, str]
    dlq_depth: int


async def observe(runtime: Runtime) -> Observed:
    """Measure breaker states, DLQ depth and lag, and record them as gauges (health and every fan-out tick call
    this, so the alerts on them have fresh values even when nobody looks at health). Breakers first: in an outage
    they are the readings that matter, and they need nothing but the breakers' own table."""
    breakers: dict[str, str] = {}
    for breaker in (runtime.billing_breaker, runtime.dataverse_breaker):
        current = await breaker.read()
        breakers[breaker.system] = current.state
        runtime.metrics.breaker_state.set(BREAKER_VALUES[current.state], {"system": breaker.system})
        runtime.metrics.breaker_open.set(round(current.open_seconds(breaker.clock())), {"system": breaker.system})
    depth = await dlq.depth(runtime.tables)
    runtime.metrics.dlq_depth.set(depth)
    entities: dict[str, dict[str, Any]] = {}
    for entity in runtime.settings.entity_list:
        cp = await state.read_checkpoint(runtime.tables, entity)
        lag = None
        if cp.watermark:
            lag = round((state.utcnow() - state.parse_iso(cp.watermark)).total_seconds())
            runtime.metrics.lag.set(lag, {"entity": entity})
        entities[entity] = {
            "watermark": cp.watermark or None,
            "lag_seconds": lag,
            "last_completed": cp.last_completed or None,
            "listing": _listing(cp),
        }
    return Observed(entities, breakers, depth)


def _listing(cp: state.Checkpoint) -> dict[str, Any] | None:
    return {"run_id": cp.run_id, "listed": cp.listing.listed, "expected": cp.listing.expected} if cp.run_id else None


async def health(runtime: Runtime) -> func.HttpResponse:
    seen = await observe(runtime)
    runs = [
        {
            k: r.get(k)
            for k in ("RowKey", "entity", "status", "started_at", "listing_completed_at", "listed", "messages")
        }
        for r in await state.recent_runs(runtime.tables, limit=10)
    ]
    status = "degraded" if any(s != "closed" for s in seen.breakers.values()) else "ok"
    return _json(
        {
            "status": status,
            "version": __version__,
            "entities": seen.entities,
            "dlq_depth": seen.dlq_depth if seen.dlq_depth < dlq.DEPTH_CAP else f"{dlq.DEPTH_CAP}+",
            "breakers": seen.breakers,
            "recent_runs": [{"run_id": r.pop("RowKey"), **r} for r in runs],
        }
    )


# ---- webhook ----


async def receive_webhook(runtime: Runtime, req: func.HttpRequest) -> func.HttpResponse:
    secret = runtime.settings.webhook_secret
    if secret is None:
        return _error(503, "webhooks are not configured (BILLING_WEBHOOK_SECRET is not set)")
    body = req.get_body()
    headers = {k.lower(): v for k, v in req.headers.items()}
    secrets = [s.strip() for s in secret.get_secret_value().split(",") if s.strip()]
    try:
        webhook.verify(body, headers, secrets, tolerance_s=runtime.settings.webhook_tolerance_s)
        event = webhook.parse_event(body)
    except webhook.WebhookRejected as exc:
        runtime.metrics.webhooks.add(1, {"outcome": exc.outcome})
        log.warning("webhook refused (%s): %s", exc.outcome, exc)
        return _error(exc.status, str(exc))
    if event is None:
        runtime.metrics.webhooks.add(1, {"outcome": "ignored"})
        return _json({"accepted": False, "reason": "event type not synced"}, 202)
    msg = webhook.message_for(event)
    await runtime.queue.send_message(msg.body())
    runtime.metrics.webhooks.add(1, {"outcome": "accepted"})
    return _json({"accepted": True, "batch_id": msg.batch_id}, 202)


# ---- poison ----


async def handle_poison(runtime: Runtime, body: bytes, *, dequeue_count: int = 1) -> str:
    """A message the host gave up on: one DLQ row with the body, the last error recorded for it and its attempts."""
    text = body.decode("utf-8", "replace")
    runtime.metrics.poison.add(1, {"queue": runtime.settings.queue_name})
    try:
        msg = messages.parse(body)
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
    )
    await state.record_batch(runtime.tables, msg.run_id, msg.batch_id, status="poisoned", poisoned=len(msg.ids))
    runtime.metrics.dlq_writes.add(1, {"kind": "message", "reason": "poison"})
    log.error("batch %s of run %s poisoned after %d attempts: %s", msg.batch_id, msg.run_id, attempts, last_error)
    return key
