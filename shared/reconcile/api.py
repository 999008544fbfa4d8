"""Reconcile's triggers: the daily timer, `POST /api/reconcile` and `GET /api/reconcile/latest` (function key)."""

from __future__ import annotations

import azure.functions as func

from shared import inputs, logs
from shared.reconcile import start
from shared.responses import json_response
from shared.runtime import Runtime

log = logs.get_logger("shared.reconcile")


async def on_timer(runtime: Runtime) -> start.Started:
    """Everything, compared and healed (`RECONCILE_SCHEDULE`, daily at 02:00 UTC by default)."""
    return await start.start(runtime, start.ReconcileRequest(), trigger="timer")


@inputs.guarded
async def begin(runtime: Runtime, req: func.HttpRequest) -> func.HttpResponse:
    """`POST /api/reconcile`: a run over the scope asked for; 202 with its id once its ids are on the queue."""
    request = inputs.body(req, start.ReconcileRequest, empty={})
    run = await start.start(runtime, request, trigger="http")
    body = {"run_id": run.run_id, "dry_run": run.dry_run, "status": run.status, "messages": run.messages,
            "listed": dict(run.listed)}  # fmt: skip
    return json_response(body, 202)


@inputs.guarded
async def latest(runtime: Runtime, req: func.HttpRequest) -> func.HttpResponse:
    """`GET /api/reconcile/latest`: the newest run, its batches summed (404 before the first run)."""
    found = await start.summary(runtime)
    if found is None:
        return json_response({"error": "no reconcile run yet"}, 404)
    return json_response(found)
