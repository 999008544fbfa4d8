"""The billing platform's change events (HTTP `POST /api/webhooks/billing`): verified, then enqueued at once.

The platform signs `"<timestamp>.<body>"` with HMAC-SHA256 and sends `X-Billing-Timestamp` (unix seconds) and
`X-Billing-Signature: v1=<hex>` (several comma-separated during a key rotation). We accept the event when any `v1`
signature matches any configured secret (`BILLING_WEBHOOK_SECRET`, comma-separated while rotating) and the timestamp
is within the tolerance (default 300 s) of our clock, which bounds replays. Polling stays the safety net: an event
we refuse is picked up by the next fan-out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import azure.functions as func

from shared import messages
from shared.clock import utcnow
from shared.messages import Entity
from shared.responses import error_response, json_response
from shared.runtime import Runtime

log = logging.getLogger("shared.webhook")
ENTITY_OF_TYPE: dict[str, Entity] = {"customer": "customers", "invoice": "invoices"}


class WebhookRejected(Exception):
    def __init__(self, status: int, reason: str, outcome: str) -> None:
        super().__init__(reason)
        self.status = status
        self.outcome = outcome


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


@dataclass(frozen=True)
class Event:
    event_id: str
    entity: Entity
    record_id: str


def parse_event(body: bytes) -> Event | None:
    """The event's entity and record id; None for an event type the sync does not follow."""
    try:
        data: Any = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WebhookRejected(400, "the body is not JSON", "malformed") from None
    except RecursionError:
        raise WebhookRejected(400, "the body is nested too deep to be an event", "malformed") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise WebhookRejected(400, "the event has no 'type'", "malformed")
    kind = data["type"].split(".", 1)[0]
    entity = ENTITY_OF_TYPE.get(kind)
    if entity is None:
        return None
    inner = data.get("data")
    record_id = inner.get("id") if isinstance(inner, dict) else None
    if not isinstance(record_id, str) or not record_id or len(record_id) > 100:
        raise WebhookRejected(400, "the event has no 'data.id' (1-100 characters)", "malformed")
    return Event(str(data.get("id") or "")[:100], entity, record_id)


def message_for(event: Event) -> messages.SyncMessage:
    run_id = f"webhook-{utcnow():%Y%m%d}"
    return messages.build(event.entity, [event.record_id], run_id=run_id, source="webhook")


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
        return error_response(exc.status, str(exc))
    if event is None:
        runtime.metrics.webhooks.add(1, {"outcome": "ignored"})
        return json_response({"accepted": False, "reason": "event type not synced"}, 202)
    msg = message_for(event)
    await runtime.queue.send_message(msg.body())
    runtime.metrics.webhooks.add(1, {"outcome": "accepted"})
    return json_response({"accepted": True, "batch_id": msg.batch_id}, 202)
