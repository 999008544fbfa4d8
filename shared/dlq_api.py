"""The DLQ's HTTP API: `GET /api/dlq` lists rows, `POST /api/dlq/reprocess` sends chosen rows through the sync again.

Rows are never deleted: reprocess marks them `requeued`, and the worker marks them `resolved` once they sync.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any

import azure.functions as func

from shared import clock, dlq, messages
from shared.messages import MalformedMessage
from shared.responses import error_response, json_response
from shared.runtime import Runtime

log = logging.getLogger("shared.dlq_api")
MAX_LIST = 1000


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
        return error_response(400, str(exc))
    rows = await dlq.rows(runtime.tables, selection, limit=max(1, min(top, MAX_LIST)))
    with_body = params.get("body") in ("1", "true")
    return json_response({"count": len(rows), "rows": [dlq.public(r, with_body=with_body) for r in rows]})


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
        return error_response(400, 'the body must be JSON, for example {"all": true}')
    if not isinstance(body, dict):
        return error_response(400, "the body must be a JSON object")
    unknown = sorted(set(body) - {"all", "run_id", "reason", "ids", "entity", "status", "dry_run"})
    if unknown:
        return error_response(400, f"unknown keys: {', '.join(unknown)}")
    try:
        selection = _selection(body)
    except ValueError as exc:
        return error_response(400, str(exc))
    if not (selection.all or selection.run_id or selection.reason or selection.ids or selection.entity):
        return error_response(400, "choose rows: all, run_id, reason, ids or entity")
    rows = await dlq.rows(runtime.tables, selection, limit=100_000)
    if body.get("dry_run"):
        return json_response({"dry_run": True, "would_requeue": len(rows), "rows": [dlq.public(r) for r in rows[:100]]})
    result = await requeue(runtime, rows)
    log.info("reprocess: %d records and %d messages requeued", result.records, result.messages)
    return json_response({"requeued_records": result.records, "requeued_messages": result.messages,
                  "skipped": result.skipped or []})  # fmt: skip


async def requeue(runtime: Runtime, rows: list[dict[str, Any]]) -> ReprocessResult:
    """Send the rows through the sync again under one new token: the rows are marked `requeued` with it first, then
    the messages carrying it are sent, so only these messages can mark these rows `resolved`."""
    result = ReprocessResult(skipped=[])
    assert result.skipped is not None  # noqa: S101
    token = secrets.token_hex(16)
    run_id = f"reprocess-{clock.utcnow():%Y%m%dT%H%M%S}"
    by_entity: dict[str, list[dict[str, Any]]] = {}
    again: list[messages.SyncMessage] = []
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
        again.append(original.model_copy(update={"source": "reprocess", "deferrals": 0, "dlq_token": token}))
        marked.append((str(row["PartitionKey"]), str(row["RowKey"])))
    result.messages = len(again)
    for entity, entity_rows in by_entity.items():
        ids = [str(r["record_id"]) for r in entity_rows]
        split = messages.split(entity, ids, size=runtime.settings.batch_size, run_id=run_id, source="reprocess")  # type: ignore[arg-type]
        again += [m.model_copy(update={"dlq_token": token}) for m in split]
        marked += [(str(r["PartitionKey"]), str(r["RowKey"])) for r in entity_rows]
        result.records += len(ids)
    await dlq.mark_requeued(runtime.tables, marked, token)
    for msg in again:
        await runtime.queue.send_message(msg.body())
    return result
