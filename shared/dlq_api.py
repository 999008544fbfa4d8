"""The DLQ's HTTP API: `GET /api/dlq` lists rows, `POST /api/dlq/reprocess` sends chosen rows through the sync again.

Rows are never deleted: reprocess marks them `requeued`, and the worker marks them `resolved` once they sync.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import azure.functions as func
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from shared import clock, dlq, inputs, logs, messages
from shared.messages import MalformedMessage
from shared.responses import json_response
from shared.runtime import Runtime

log = logs.get_logger("shared.dlq_api")
MAX_LIST = 1000
MAX_SELECTED_IDS = 10_000


def _comma_list(value: Any) -> Any:
    """`a,b` in a query string (or a JSON string) is the list `[a, b]`."""
    return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


class SelectionInput(BaseModel):
    """Which DLQ rows: filters that combine. Shared by the list's query string and reprocess's body."""

    model_config = ConfigDict(extra="forbid")

    run_id: Annotated[str, Field(pattern=messages.KEY_PATTERN)] | None = None
    reason: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    ids: Annotated[
        list[Annotated[str, Field(pattern=messages.RECORD_ID_PATTERN)]],
        BeforeValidator(_comma_list), Field(max_length=MAX_SELECTED_IDS),
    ] = []  # fmt: skip
    entity: messages.Entity | None = None
    status: Annotated[list[Literal["open", "requeued", "resolved", "any"]], BeforeValidator(_comma_list)] = ["open"]

    def selection(self, *, all_rows: bool) -> dlq.Selection:
        return dlq.Selection(
            all=all_rows,
            run_id=self.run_id,
            reason=self.reason,
            ids=tuple(self.ids),
            entity=self.entity,
            statuses=() if "any" in self.status else tuple(dict.fromkeys(self.status)),
        )


class ListQuery(SelectionInput):
    """`GET /api/dlq?status=&run_id=&reason=&ids=&entity=&top=&body=`"""

    top: Annotated[int, Field(ge=1, le=MAX_LIST)] = 100
    body: bool = False


class ReprocessRequest(SelectionInput):
    """`POST /api/dlq/reprocess` `{"all" | "run_id" | "reason" | "ids" | "entity", "status", "dry_run"}`"""

    all: StrictBool = False
    dry_run: StrictBool = False


@inputs.guarded
async def list_dlq(runtime: Runtime, req: func.HttpRequest) -> func.HttpResponse:
    params = inputs.query(req, ListQuery)
    rows = await dlq.rows(runtime.tables, params.selection(all_rows=True), limit=params.top)
    return json_response({"count": len(rows), "rows": [dlq.public(r, with_body=params.body) for r in rows]})


@dataclass
class ReprocessResult:
    records: int = 0
    messages: int = 0
    skipped: list[str] = field(default_factory=list)


@inputs.guarded
async def reprocess(runtime: Runtime, req: func.HttpRequest) -> func.HttpResponse:
    """Re-enqueue chosen DLQ rows: `{"all": true}`, `{"run_id": ...}`, `{"reason": ...}`, `{"ids": [...]}`
    (optionally `entity`, `status`, `dry_run`). Rows are marked `requeued`; nothing is deleted."""
    body = inputs.body(req, ReprocessRequest, empty={})
    selection = body.selection(all_rows=body.all)
    if not (selection.all or selection.run_id or selection.reason or selection.ids or selection.entity):
        raise inputs.BadRequest("choose rows: all, run_id, reason, ids or entity")
    rows = await dlq.rows(runtime.tables, selection, limit=100_000)
    if body.dry_run:
        return json_response({"dry_run": True, "would_requeue": len(rows), "rows": [dlq.public(r) for r in rows[:100]]})
    result = await requeue(runtime, rows)
    log.info("reprocess: %d records and %d messages requeued", result.records, result.messages)
    return json_response({"requeued_records": result.records, "requeued_messages": result.messages,
                  "skipped": result.skipped})  # fmt: skip


async def requeue(runtime: Runtime, rows: list[dict[str, Any]]) -> ReprocessResult:
    """Send the rows through the sync again under one new token: the rows are marked `requeued` with it first, then
    the messages carrying it are sent, so only these messages can mark these rows `resolved`."""
    token = secrets.token_hex(16)
    result = ReprocessResult()
    again, marked = _replayed_messages(rows, token, result)
    run_id = f"reprocess-{clock.utcnow():%Y%m%dT%H%M%S}"
    by_entity: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("kind") == "record":  # a persistent mismatch is written forced: its hash says it is in step
            by_entity.setdefault((str(row["entity"]), row.get("reason_kind") == "persistent_mismatch"), []).append(row)
    for (entity, force), entity_rows in by_entity.items():
        ids = [str(r["record_id"]) for r in entity_rows]
        split = messages.split(entity, ids, size=runtime.settings.batch_size, run_id=run_id, source="reprocess",  # type: ignore[arg-type]
                               force=force, dlq_token=token)  # fmt: skip
        again += split
        marked += [(str(r["PartitionKey"]), str(r["RowKey"])) for r in entity_rows]
        result.records += len(ids)
    await dlq.mark_requeued(runtime.tables, marked, token)
    for msg in again:
        await runtime.queue_for(msg).send_message(msg.body())
    return result


def _replayed_messages(
    rows: list[dict[str, Any]], token: str, result: ReprocessResult
) -> tuple[list[messages.SyncMessage], list[tuple[str, str]]]:
    """The message rows' messages as they failed, now from reprocess with `token`; malformed ones are skipped."""
    again: list[messages.SyncMessage] = []
    marked: list[tuple[str, str]] = []
    for row in (r for r in rows if r.get("kind") != "record"):
        try:
            original = messages.parse(dlq.body_of(row))
        except MalformedMessage as exc:
            result.skipped.append(f"{row['RowKey']}: cannot be reprocessed ({exc})")
            continue
        again.append(original.model_copy(update={"source": "reprocess", "deferrals": 0, "dlq_token": token}))
        marked.append((str(row["PartitionKey"]), str(row["RowKey"])))
    result.messages = len(again)
    return again, marked
