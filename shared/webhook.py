"""The billing platform's change events (HTTP `POST /api/webhooks/billing`): verified, then coalesced into a window
of the entity's changes (`shared.coalesce`: one sync a window, `WEBHOOK_COALESCE_SECONDS`), or with 0 enqueued at once.

The platform signs `"<timestamp>.<body>"` with HMAC-SHA256 and sends `X-Billing-Timestamp` (unix seconds) and
`X-Billing-Signature: v1=<hex>` (several comma-separated during a key rotation). We accept the event when any `v1`
signature matches any configured secret (`BILLING_WEBHOOK_SECRET`, comma-separated while rotating) and the timestamp
is within the tolerance (default 300 s) of our clock. Inside that window a replay of a captured event would verify
again, so each accepted event is remembered (`webhookevents`, by event id, or by the signed bytes when billing sent
none) for twice the tolerance: a replay answers 200 and enqueues nothing. Polling stays the safety net: an event we
refuse is picked up by the next fan-out.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any

import azure.functions as func
from pydantic import BaseModel, ConfigDict, Field

from shared import coalesce, inputs, logs, messages, state
from shared.clock import utcnow
from shared.messages import Entity
from shared.responses import error_response, json_response
from shared.runtime import Runtime

log = logs.get_logger("shared.webhook")
ENTITY_OF_TYPE: dict[str, Entity] = {"customer": "customers", "invoice": "invoices"}


class WebhookRejected(Exception):
    def __init__(self, status: int, reason: str, outcome: str, fields: list[dict[str, str]] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.outcome = outcome
        self.fields = fields or []


def sign(secret: str, timestamp: str, body: bytes) -> str:
    return "v1=" + hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(
    body: bytes, headers: dict[str, str], secrets: list[str], *, tolerance_s: int, now: float | None = None
) -> None:
    """Raise WebhookRejected (401) unless the signature and timestamp hold."""
    timestamp = headers.get("x-billing-timestamp", "")
    signature = headers.get("x-billing-signature", "")
    if not timestamp or not signature:
        raise WebhookRejected(401, "missing X-Billing-Timestamp or X-Billing-Signature", "bad_signature")
    if not re.fullmatch(r"[0-9]{1,12}", timestamp):  # ASCII digits only: int() refuses '²' and 5,000 digits
        raise WebhookRejected(401, "X-Billing-Timestamp is not unix seconds", "bad_signature")
    offered = [part.strip() for part in signature.split(",") if part.strip().startswith("v1=")]
    if not any(hmac.compare_digest(sign(s, timestamp, body), o) for s in secrets for o in offered):
        raise WebhookRejected(401, "signature does not match", "bad_signature")
    skew = abs((now if now is not None else time.time()) - int(timestamp))
    if skew > tolerance_s:
        raise WebhookRejected(401, f"timestamp is {skew:.0f} s from now (tolerance {tolerance_s} s)", "stale")


class EventData(BaseModel):
    id: Annotated[str, Field(pattern=messages.RECORD_ID_PATTERN)]


class BillingEvent(BaseModel):
    """What the sync reads of an event; billing adds fields of its own (`created`, the record's other fields)."""

    model_config = ConfigDict(extra="ignore")

    id: Annotated[str, Field(pattern=messages.RECORD_ID_PATTERN)] | None = None
    type: Annotated[str, Field(min_length=1, max_length=100)]
    data: dict[str, Any] | None = None


@dataclass(frozen=True)
class Event:
    event_id: str
    entity: Entity
    record_id: str


def parse_event(body: bytes) -> Event | None:
    """The event's entity and record id; None for an event type the sync does not follow. The record id is checked
    against the queue contract here, before anything is enqueued."""
    try:
        event = inputs.validate(BillingEvent, _load(body))
    except inputs.BadRequest as exc:
        raise WebhookRejected(400, str(exc), "malformed", exc.fields) from None
    entity = ENTITY_OF_TYPE.get(event.type.split(".", 1)[0])
    if entity is None:
        return None
    try:
        data = inputs.validate(EventData, event.data)
    except inputs.BadRequest as exc:
        fields = [{**f, "field": "data" if f["field"] == "(body)" else f"data.{f['field']}"} for f in exc.fields]
        raise WebhookRejected(400, "the event has no valid 'data.id' (1-100 printable characters)", "malformed",
                              fields) from None  # fmt: skip
    return Event(event.id or "", entity, data.id)


def _load(body: bytes) -> Any:
    try:
        data = inputs.load_json(body, what="the event")
    except inputs.BadRequest as exc:
        raise WebhookRejected(400, str(exc), "malformed") from None
    if not isinstance(data, dict):
        raise WebhookRejected(400, "the event must be a JSON object", "malformed")
    return data


def message_for(event: Event) -> messages.SyncMessage:
    run_id = f"webhook-{utcnow():%Y%m%d}"
    return messages.build(event.entity, [event.record_id], run_id=run_id, source="webhook")


def seen_key(event: Event, timestamp: str, body: bytes) -> str:
    """What a replay repeats: the event id, or without one the signed bytes themselves."""
    if event.event_id:
        return state.row_key("id-" + event.event_id)
    return "sig-" + hashlib.sha256(timestamp.encode() + b"." + body).hexdigest()


@inputs.guarded
async def receive(runtime: Runtime, req: func.HttpRequest) -> func.HttpResponse:
    secret = runtime.settings.webhook_secret
    if secret is None:
        return error_response(503, "webhooks are not configured (BILLING_WEBHOOK_SECRET is not set)")
    body = req.get_body()
    headers = {k.lower(): v for k, v in req.headers.items()}
    secrets = [s.strip() for s in secret.get_secret_value().split(",") if s.strip()]
    try:
        verify(body, headers, secrets, tolerance_s=runtime.settings.webhook_tolerance_s)
        event = parse_event(body)
    except WebhookRejected as exc:
        runtime.metrics.webhooks.add(1, {"outcome": exc.outcome})
        log.warning("webhook refused (%s): %s", exc.outcome, exc)
        return json_response({"error": str(exc), **({"fields": exc.fields} if exc.fields else {})}, exc.status)
    if event is None:
        runtime.metrics.webhooks.add(1, {"outcome": "ignored"})
        return json_response({"accepted": False, "reason": "event type not synced"}, 202)
    key = seen_key(event, headers["x-billing-timestamp"], body)
    if not await state.remember_event(runtime.tables, key, window_s=2 * runtime.settings.webhook_tolerance_s):
        runtime.metrics.webhooks.add(1, {"outcome": "replayed"})
        log.warning("webhook event %s received again within its tolerance window: not enqueued", event.event_id)
        return json_response({"accepted": False, "reason": "event already received"}, 200)
    runtime.metrics.webhooks.add(1, {"outcome": "accepted"})
    if runtime.settings.webhook_coalesce_s > 0:
        window = await coalesce.add(runtime, event.entity, event.record_id)
        return json_response({"accepted": True, "window": window}, 202)
    msg = message_for(event)
    await runtime.queue.send_message(msg.body())
    return json_response({"accepted": True, "batch_id": msg.batch_id}, 202)
