"""The billing platform's HTTP API, with the faults of a fault profile (the `billing` section). See docs/billing-api.md.

Throttling, when the profile's `rate_limit.mode` is `silent`, is what the real platform does: list calls answer
`200` with an empty page and `has_more: false`, bulk fetches answer `200` with some or none of the records. Calls
that have no "empty" answer (count, fetch one) answer `429` with `Retry-After` in either mode.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sandbox.billing_sim.openapi import openapi_document
from sandbox.billing_sim.store import ENTITIES, Entity, Store, iso, to_api
from sandbox.faults import BillingFaults
from sandbox.outages import Drop, OutageClock

log = logging.getLogger("sandbox.billing")
MAX_BULK = 100
MAX_PAGE_FULL = 100
MAX_PAGE_LIGHT = 1000
LIGHT_FIELDS = frozenset({"id", "updated_at", "version"})
HANG_S = 120.0


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class Stats:
    requests: defaultdict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    throttled: int = 0
    dropped_ids: int = 0
    errors_injected: int = 0
    outage_drops: int = 0
    mutations: int = 0
    webhooks_sent: int = 0
    webhooks_failed: int = 0


class BillingSimulator:
    def __init__(
        self,
        store: Store,
        *,
        api_key: str,
        faults: BillingFaults | None = None,
        seed: int = 0,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
    ) -> None:
        self.store = store
        self.api_key = api_key
        self.faults = faults or BillingFaults()
        self.rng = random.Random(f"{seed}:billing-faults")
        self.mutation_rng = random.Random(f"{seed}:billing-mutations")
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.stats = Stats()
        self.clock = OutageClock(self.faults.outages)
        rl = self.faults.rate_limit
        self.bucket = TokenBucket(rl.requests_per_second, rl.burst) if rl else None
        self._events: asyncio.Queue[dict[str, Any]] | None = None
        self._background: list[asyncio.Task[None]] = []
        self.mutations_paused = False  # the demo and tests pause background changes before a final check
        self.app = Starlette(
            routes=[
                Route("/openapi.json", self.openapi, methods=["GET"]),
                Route("/admin/stats", self.admin_stats, methods=["GET"]),
                Route("/admin/mutate", self.admin_mutate, methods=["POST"]),
                Route("/v1/{entity}", self.list_records, methods=["GET"]),
                Route("/v1/{entity}/count", self.count, methods=["GET"]),
                Route("/v1/{entity}/bulk", self.bulk, methods=["POST"]),
                Route("/v1/{entity}/{id:path}", self.get_one, methods=["GET"]),
            ]
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return

        async def tracking_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                key = f"{scope['method']} {_route_name(scope['path'])}"
                self.stats.requests[key][message["status"]] += 1
            await send(message)

        if scope["path"].startswith("/v1/"):
            self._on_first_request()
            if self.clock.down():
                # Outside Starlette, so no error middleware turns it into a 500: the status line goes out, then
                # the connection is cut, and the client sees a transport error as in a real outage.
                self.stats.outage_drops += 1
                await tracking_send({"type": "http.response.start", "status": 503, "headers": []})
                raise Drop
        await self.app(scope, receive, tracking_send)

    # ---- faults ----

    def _on_first_request(self) -> None:
        if not self.clock.start():
            return
        loop = asyncio.get_running_loop()
        if self.faults.mutations_per_second > 0:
            self._background.append(loop.create_task(self._mutate_forever()))
        if self.webhook_url:
            self._events = asyncio.Queue()
            self._background.append(loop.create_task(self._deliver_webhooks()))

    async def _faults(self, request: Request, *, silent_ok: bool) -> Response | None:
        """Apply the profile to one API request. Returns a response to send instead, or None to go on."""
        if self.bucket is not None:
            wait = self.bucket.take()
            if wait > 0:
                self.stats.throttled += 1
                assert self.faults.rate_limit is not None  # noqa: S101
                if self.faults.rate_limit.mode == "silent" and silent_ok:
                    request.state.silently_throttled = True
                else:
                    return error(
                        429, "rate_limited", "Too many requests", headers={"Retry-After": str(max(1, round(wait)))}
                    )
        if self.faults.error_rate and self.rng.random() < self.faults.error_rate:
            self.stats.errors_injected += 1
            status = self.rng.choice([500, 502, 503])
            return error(status, "server_error", "The platform had a problem; try again")
        if self.faults.timeout_rate and self.rng.random() < self.faults.timeout_rate:
            await asyncio.sleep(HANG_S)
            return error(504, "timeout", "upstream timed out")
        if self.faults.latency_ms is not None and self.faults.latency_ms.max > 0:
            lat = self.faults.latency_ms
            await asyncio.sleep(self.rng.uniform(lat.min, lat.max) / 1000)
        return None

    def _authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), self.api_key.encode())

    async def _guard(self, request: Request, *, silent_ok: bool) -> tuple[Entity | None, Response | None]:
        if not self._authorized(request):
            return None, error(401, "unauthorized", "A valid API key is required (Authorization: Bearer ...)")
        entity = request.path_params.get("entity")
        if entity not in ENTITIES:
            return None, error(404, "not_found", f"Unknown resource {entity!r}")
        return cast(Entity, entity), await self._faults(request, silent_ok=silent_ok)

    # ---- API ----

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def list_records(self, request: Request) -> Response:
        entity, refusal = await self._guard(request, silent_ok=True)
        if refusal is not None or entity is None:
            return cast(Response, refusal)
        q = request.query_params
        try:
            since = _since(q.get("updated_since"))
            fields = _fields(q.get("fields"))
            light = fields is not None and fields <= LIGHT_FIELDS
            limit = _int(q.get("limit"), "limit", default=100, lo=1, hi=MAX_PAGE_LIGHT if light else MAX_PAGE_FULL)
        except ValueError as exc:
            return error(400, "invalid_request", str(exc))
        offset_mode = self.faults.pagination == "offset"
        if offset_mode and "cursor" in q:
            return error(400, "invalid_request", "this account paginates with 'offset', not 'cursor'")
        if not offset_mode and "offset" in q:
            return error(400, "invalid_request", "this account paginates with 'cursor', not 'offset'")
        if getattr(request.state, "silently_throttled", False):
            empty: dict[str, Any] = {"object": "list", "data": [], "has_more": False}
            if not offset_mode:
                empty["next_cursor"] = None
            return JSONResponse(empty)
        if offset_mode:
            try:
                offset = _int(q.get("offset"), "offset", default=0, lo=0, hi=10**9)
            except ValueError as exc:
                return error(400, "invalid_request", str(exc))
            rows = self.store.list_offset(entity, since, offset, limit + 1)
        else:
            try:
                after = _decode_cursor(q["cursor"]) if q.get("cursor") else None
            except ValueError:
                return error(400, "invalid_request", "'cursor' is not a cursor this API issued")
            rows = self.store.list_after(entity, since, after, limit + 1)
        has_more = len(rows) > limit
        rows = rows[:limit]
        data = self._render(entity, rows, fields)
        body: dict[str, Any] = {"object": "list", "data": data, "has_more": has_more}
        if offset_mode:
            body.update(offset=offset, limit=limit)
        else:
            body["next_cursor"] = _encode_cursor(rows[-1]["updated_at"], rows[-1]["id"]) if has_more else None
        return JSONResponse(body)

    async def count(self, request: Request) -> Response:
        entity, refusal = await self._guard(request, silent_ok=False)
        if refusal is not None or entity is None:
            return cast(Response, refusal)
        try:
            since = _since(request.query_params.get("updated_since"))
        except ValueError as exc:
            return error(400, "invalid_request", str(exc))
        return JSONResponse({"object": "count", "count": self.store.count(entity, since)})

    async def bulk(self, request: Request) -> Response:
        entity, refusal = await self._guard(request, silent_ok=True)
        if refusal is not None or entity is None:
            return cast(Response, refusal)
        try:
            payload = json.loads(await request.body())
        except json.JSONDecodeError:
            return error(400, "invalid_request", 'the body must be JSON: {"ids": [...]}')
        ids = payload.get("ids") if isinstance(payload, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            return error(400, "invalid_request", "'ids' must be a list of non-empty strings")
        if len(ids) > MAX_BULK:
            return error(400, "invalid_request", f"at most {MAX_BULK} ids per call, got {len(ids)}")
        rows = self.store.get_many(entity, list(dict.fromkeys(ids)))
        if getattr(request.state, "silently_throttled", False):
            rows = self.rng.sample(rows, self.rng.randint(0, len(rows) // 2)) if rows else []
        elif rows and self.faults.drop_ids_rate and self.rng.random() < self.faults.drop_ids_rate:
            keep = len(rows) - self.rng.randint(1, max(1, len(rows) // 10))
            self.stats.dropped_ids += len(rows) - keep
            rows = self.rng.sample(rows, keep)
        return JSONResponse({"object": "list", "data": self._render(entity, rows, None)})

    async def get_one(self, request: Request) -> Response:
        entity, refusal = await self._guard(request, silent_ok=False)
        if refusal is not None or entity is None:
            return cast(Response, refusal)
        rows = self.store.get_many(entity, [request.path_params["id"]])
        if not rows:
            return error(404, "not_found", f"No {entity[:-1]} with that id")
        return JSONResponse(self._render(entity, rows, None)[0])

    def _render(self, entity: Entity, rows: list[Any], fields: frozenset[str] | None) -> list[dict[str, Any]]:
        if fields is not None:
            return [{f: row[f] for f in fields if f in row.keys()} for row in rows]  # noqa: SIM118 - sqlite3.Row
        lines = self.store.lines_of([r["id"] for r in rows]) if entity == "invoices" and rows else {}
        return [to_api(entity, row, lines.get(row["id"])) for row in rows]

    # ---- admin ----

    async def admin_stats(self, request: Request) -> Response:
        if not self._authorized(request):
            return error(401, "unauthorized", "A valid API key is required")
        s = self.stats
        return JSONResponse(
            {
                "requests": {k: {str(code): n for code, n in v.items()} for k, v in s.requests.items()},
                "throttled": s.throttled,
                "errors_injected": s.errors_injected,
                "outage_drops": s.outage_drops,
                "dropped_ids": s.dropped_ids,
                "mutations": s.mutations,
                "webhooks": {"sent": s.webhooks_sent, "failed": s.webhooks_failed},
                "records": self.store.table_counts(),
            }
        )

    async def admin_mutate(self, request: Request) -> Response:
        if not self._authorized(request):
            return error(401, "unauthorized", "A valid API key is required")
        self._on_first_request()
        usage = 'body: {"entity": "customers"|"invoices", "ids": [...] | "count": n}'
        try:
            payload = json.loads(await request.body())
        except json.JSONDecodeError:
            return error(400, "invalid_request", usage)
        entity = payload.get("entity") if isinstance(payload, dict) else None
        if entity not in ENTITIES:
            return error(400, "invalid_request", usage)
        if "ids" in payload:
            ids = [str(i) for i in payload["ids"]]
        else:
            all_ids = self.store.all_ids(entity)
            ids = self.mutation_rng.sample(all_ids, min(int(payload.get("count", 1)), len(all_ids)))
        changed = self.mutate(entity, ids)
        return JSONResponse({"changed": [[i, v] for i, v in changed]})

    def mutate(self, entity: Entity, ids: list[str]) -> list[tuple[str, int]]:
        changed = self.store.mutate(entity, ids, self.mutation_rng)
        self.stats.mutations += len(changed)
        if self._events is not None:
            for record_id, version in changed:
                self._events.put_nowait(
                    {
                        "type": f"{entity[:-1]}.updated",
                        "data": {"id": record_id, "version": version},
                        "created_at": iso(datetime.now(UTC)),
                    }
                )
        return changed

    # ---- background ----

    async def _mutate_forever(self) -> None:
        rate = self.faults.mutations_per_second
        tick = 0.1
        carry = 0.0
        while True:
            await asyncio.sleep(tick)
            carry += rate * tick
            n, carry = int(carry), carry - int(carry)
            if self.mutations_paused:
                continue
            for _ in range(n):
                entity: Entity = "invoices" if self.mutation_rng.random() < 0.7 else "customers"
                ids = self.store.all_ids(entity)
                if ids:
                    self.mutate(entity, [self.mutation_rng.choice(ids)])

    async def _deliver_webhooks(self) -> None:
        assert self._events is not None  # noqa: S101
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                event = await self._events.get()
                body = json.dumps({"id": f"evt_{self.mutation_rng.randrange(16**12):012x}", **event}).encode()
                for attempt in range(5):
                    timestamp = str(int(time.time()))
                    headers = {"Content-Type": "application/json", **self.sign(timestamp, body)}
                    try:
                        response = await client.post(cast(str, self.webhook_url), content=body, headers=headers)
                        if response.status_code < 300:
                            self.stats.webhooks_sent += 1
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(min(8.0, 0.25 * 2**attempt))
                else:
                    self.stats.webhooks_failed += 1

    def sign(self, timestamp: str, body: bytes) -> dict[str, str]:
        """`X-Billing-Timestamp` and `X-Billing-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`."""
        secret = (self.webhook_secret or "").encode()
        digest = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        return {"X-Billing-Timestamp": timestamp, "X-Billing-Signature": f"v1={digest}"}

    async def aclose(self) -> None:
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _route_name(path: str) -> str:
    parts = path.strip("/").split("/")
    if len(parts) == 3 and parts[0] == "v1" and parts[2] not in ("count", "bulk"):
        return f"/v1/{parts[1]}/{{id}}"
    return path


def _since(value: str | None) -> str:
    if not value:
        return ""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"'updated_since' must be an ISO 8601 time, got {value!r}") from None
    if moment.tzinfo is None:
        raise ValueError("'updated_since' needs a time zone (for example a trailing Z)")
    return iso(moment)


def _int(value: str | None, name: str, *, default: int, lo: int, hi: int) -> int:
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"'{name}' must be a whole number, got {value!r}") from None
    if not lo <= number <= hi:
        raise ValueError(f"'{name}' must be from {lo} to {hi}, got {number}")
    return number


def _fields(value: str | None) -> frozenset[str] | None:
    if not value:
        return None
    return frozenset(f.strip() for f in value.split(",") if f.strip()) | {"id"}


def _encode_cursor(updated_at: str, record_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([updated_at, record_id]).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("bad cursor") from None
    if not (isinstance(raw, list) and len(raw) == 2 and all(isinstance(x, str) for x in raw)):
        raise ValueError("bad cursor")
    return raw[0], raw[1]
