"""The Dataverse Web API v9.2 simulator: CRUD, alternate keys, bulk messages, metadata, tokens, service protection.

See docs/dataverse-simulator.md for what it serves and what it does not.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import random
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse as _StarletteJSON
from starlette.responses import Response

from sandbox.dataverse_sim import batch
from sandbox.dataverse_sim.odata import ODataError, compile_filter, parse_key
from sandbox.dataverse_sim.protection import Protection
from sandbox.dataverse_sim.schema import BY_SET, TABLES, Table
from sandbox.dataverse_sim.store import DataverseError, DataverseStore, not_found, to_json
from sandbox.faults import DataverseFaults
from sandbox.outages import Drop, OutageClock
from shared import jsontext

API = "/api/data/v9.2"
MAX_PAGE = 5000
BULK_ACTIONS = ("UpsertMultiple", "CreateMultiple", "UpdateMultiple")
_ENTITY = re.compile(r"^(?P<set>\w+)(?:\((?P<key>.*)\))?(?:/Microsoft\.Dynamics\.CRM\.(?P<action>\w+))?$")
_DEFINITION = re.compile(r"^EntityDefinitions\(LogicalName='(?P<name>\w+)'\)(?P<rest>/.*)?$")


class JSONResponse(_StarletteJSON):
    """Amounts go out as JSON numbers, digit for digit, as Dataverse answers them."""

    def render(self, content: Any) -> bytes:
        return jsontext.dumps(content).encode()


def odata_error(err: DataverseError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


@dataclass
class Stats:
    requests: defaultdict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    throttled: Counter[str] = field(default_factory=Counter)  # by error code
    by_identity: Counter[str] = field(default_factory=Counter)  # requests admitted, per application user
    records_written: int = 0
    records_rejected: int = 0
    errors_injected: int = 0
    outage_drops: int = 0
    tokens_issued: int = 0


class DataverseSimulator:
    def __init__(
        self,
        store: DataverseStore,
        *,
        client_secret: str,
        faults: DataverseFaults | None = None,
        seed: int = 0,
        dop_hint: int = 4,
    ) -> None:
        self.store = store
        self.faults = faults or DataverseFaults()
        if self.faults.reverting_plugin is not None:
            plugin = self.faults.reverting_plugin
            store.reverted.setdefault(plugin.table, set()).add(plugin.column)
        self.client_secret = client_secret
        self._signing_key = hashlib.sha256(f"dataverse-sim:{client_secret}:{seed}".encode()).digest()
        self.rng = random.Random(f"{seed}:dataverse-faults")
        self.seed = seed
        self.dop_hint = dop_hint
        self.protection = Protection(self.faults.service_protection) if self.faults.service_protection else None
        self.stats = Stats()
        self.clock = OutageClock(self.faults.outages)

    # ---- tokens ----

    def mint(self, identity: str, ttl_s: float | None = None) -> str:
        """A bearer token for `identity` (an application user), valid for `ttl_s` (default: the profile's TTL)."""
        payload = {"sub": identity, "exp": time.time() + (ttl_s if ttl_s is not None else self.faults.token_ttl_s)}
        body = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
        signature = hmac.new(self._signing_key, body.encode(), hashlib.sha256).hexdigest()
        return f"sim.{body}.{signature}"

    def identity(self, request: Request) -> str | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        parts = token.split(".")
        if scheme.lower() != "bearer" or len(parts) != 3 or parts[0] != "sim":
            return None
        expected = hmac.new(self._signing_key, parts[1].encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, parts[2]):
            return None
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        if payload["exp"] < time.time():
            return None
        return str(payload["sub"])

    async def token_endpoint(self, request: Request) -> Response:
        """OAuth 2.0 client credentials, as Microsoft Entra ID's v2.0 token endpoint answers them."""
        form = parse_qs((await request.body()).decode())
        client_id = (form.get("client_id") or [""])[0]
        secret = (form.get("client_secret") or [""])[0]
        if (form.get("grant_type") or [""])[0] != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        if not client_id or not hmac.compare_digest(secret.encode(), self.client_secret.encode()):
            return JSONResponse(
                {"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."},
                status_code=401,
            )
        self.stats.tokens_issued += 1
        ttl = int(self.faults.token_ttl_s)
        return JSONResponse(
            {"token_type": "Bearer", "expires_in": ttl, "ext_expires_in": ttl, "access_token": self.mint(client_id)}
        )

    async def openid_configuration(self, request: Request, tenant: str) -> Response:
        base = f"{request.url.scheme}://{request.url.netloc}"
        return JSONResponse(
            {
                "token_endpoint": f"{base}/{tenant}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/{tenant}/oauth2/v2.0/authorize",
                "issuer": f"{base}/{tenant}/v2.0",
                "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
                "response_types_supported": ["code", "id_token", "token"],
                "jwks_uri": f"{base}/{tenant}/discovery/v2.0/keys",
            }
        )

    # ---- ASGI entry: outages, auth, protection, faults ----

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]

        async def tracking_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.stats.requests[f"{scope['method']} {_route(path)}"][message["status"]] += 1
            await send(message)

        request = Request(scope, receive)
        if path.startswith(API):
            self.clock.start()
            if self.clock.down():
                self.stats.outage_drops += 1
                await tracking_send({"type": "http.response.start", "status": 503, "headers": []})
                raise Drop
            response = await self._api(request, path[len(API) :].lstrip("/"))
        elif path.endswith("/oauth2/v2.0/token") and scope["method"] == "POST":
            response = await self.token_endpoint(request)
        elif path.endswith("/v2.0/.well-known/openid-configuration"):
            response = await self.openid_configuration(request, path.strip("/").split("/")[0])
        elif path == "/admin/stats":
            response = self.admin_stats(request)
        else:
            response = JSONResponse({"error": {"code": "0x80060888", "message": f"No route for {path}"}}, 404)
        await response(scope, receive, tracking_send)

    async def _api(self, request: Request, rest: str) -> Response:
        identity = self.identity(request)
        if identity is None:
            return JSONResponse(
                {"error": {"code": "0x80072560", "message": "The user is not a member of the organization."}},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        refusal = self.protection.admit(identity) if self.protection else None
        if refusal is not None:
            self.stats.throttled[refusal.code] += 1
            return JSONResponse(
                {"error": {"code": refusal.code, "message": refusal.message}},
                status_code=429,
                headers={"Retry-After": str(max(1, round(refusal.retry_after_s)))},
            )
        self.stats.by_identity[identity] += 1
        charged = 0.0
        response: Response
        try:
            if self.faults.latency_ms is not None and self.faults.latency_ms.max > 0:
                await asyncio.sleep(self.rng.uniform(self.faults.latency_ms.min, self.faults.latency_ms.max) / 1000)
            if self.faults.error_rate and self.rng.random() < self.faults.error_rate:
                self.stats.errors_injected += 1
                status = self.rng.choice([500, 503])
                raise DataverseError(status, "0x80040216", "An unexpected error occurred.")  # noqa: TRY301 - same path as a real one
            response, written = await self._dispatch(request, rest)
            charged = written * self.faults.ms_per_record
            if charged:
                await asyncio.sleep(charged / 1000)
        except DataverseError as err:
            response = odata_error(err)
        finally:
            if self.protection is not None:
                self.protection.finish(identity, charged)
        if self.protection is not None:
            requests_left, time_left = self.protection.remaining(identity)
            response.headers["x-ms-ratelimit-burst-remaining-xrm-requests"] = str(requests_left)
            response.headers["x-ms-ratelimit-time-remaining-xrm-requests"] = str(time_left)
        return response

    # ---- routing ----

    async def _dispatch(self, request: Request, rest: str) -> tuple[Response, int]:
        method = request.method
        if rest == "$batch" and method == "POST":
            return await self._batch(request)
        if rest == "WhoAmI" and method == "GET":
            ids = uuid.uuid5(uuid.NAMESPACE_URL, self.identity(request) or "")
            body = {
                "BusinessUnitId": str(uuid.uuid5(ids, "bu")),
                "UserId": str(ids),
                "OrganizationId": str(uuid.uuid5(ids, "org")),
            }
            return JSONResponse(body, headers={"x-ms-dop-hint": str(self.dop_hint)}), 0
        if rest == "EntityDefinitions" and method == "GET":
            return self._definitions(request), 0
        definition = _DEFINITION.match(rest)
        if definition and method == "GET":
            return self._definition(definition.group("name"), definition.group("rest") or ""), 0
        match = _ENTITY.match(rest)
        table = BY_SET.get(match.group("set")) if match else None
        if match is None or table is None:
            raise DataverseError(
                404, "0x80060888", f"Resource not found for the segment '{rest.split('(', maxsplit=1)[0]}'."
            )
        key_text, action = match.group("key"), match.group("action")
        if action:
            if method != "POST" or key_text is not None or action not in BULK_ACTIONS:
                raise DataverseError(400, "0x80060888", f"Unsupported operation {method} {action}")
            if not table.bulk_messages:
                raise DataverseError(400, "0x80040203", f"{action} is not enabled for {table.logical_name}")
            return await self._bulk(request, table, action)
        if key_text is None:
            if method == "GET":
                return self._list(request, table), 0
            if method == "POST":
                payload = await _json(request)
                self._maybe_reject(table, payload)
                stored = self.store.write(table, None, payload, update=False)
                self.stats.records_written += 1
                return _entity_id(request, table, stored.id, 204), 1
            raise DataverseError(405, "0x80060888", f"{method} is not supported on a collection")
        try:
            key = parse_key(key_text, table)
        except ODataError as exc:
            raise DataverseError(400, "0x80060888", str(exc)) from None
        if method == "GET":
            row = self.store.find(table, key)
            if row is None:
                raise not_found(table, key)
            return JSONResponse(to_json(table, row, _select(request))), 0
        if method == "PATCH":
            payload = await _json(request)
            self._maybe_reject(table, payload, key)
            if_match, if_none = request.headers.get("if-match"), request.headers.get("if-none-match")
            stored = self.store.write(table, key, payload, create=if_match != "*", update=if_none != "*")
            self.stats.records_written += 1
            return _entity_id(request, table, stored.id, 204), 1
        if method == "DELETE":
            self.store.delete(table, key)
            return Response(status_code=204), 1
        raise DataverseError(405, "0x80060888", f"{method} is not supported on a record")

    async def _batch(self, request: Request) -> tuple[Response, int]:
        parts = batch.parse(await request.body(), request.headers.get("content-type", ""), API)
        written = 0

        async def run(inner: batch.InnerRequest) -> batch.InnerResponse:
            nonlocal written
            scope = {
                "type": "http",
                "method": inner.method,
                "path": f"{API}/{inner.path}",
                "raw_path": f"{API}/{inner.path}".encode(),
                "query_string": inner.query.encode(),
                "headers": [(k.encode(), v.encode()) for k, v in inner.headers.items()],
                "scheme": request.url.scheme,
                "server": (request.url.hostname, request.url.port),
                "root_path": "",
                "http_version": "1.1",
            }

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": inner.body, "more_body": False}

            try:
                response, count = await self._dispatch(Request(scope, receive), inner.path)
            except DataverseError as err:
                return batch.InnerResponse(
                    err.status, {"Content-Type": "application/json"}, json.dumps(err.body()).encode()
                )
            written += count
            headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
            return batch.InnerResponse(response.status_code, headers, bytes(response.body))

        continue_on_error = "odata.continue-on-error" in request.headers.get("prefer", "")
        body, content_type = await batch.execute(
            parts, run, transaction=self.store.transaction, continue_on_error=continue_on_error
        )
        return Response(body, status_code=200, media_type=content_type), written

    def _maybe_reject(self, table: Table, payload: dict[str, Any], key: dict[str, Any] | None = None) -> None:
        """The profile's reject_rate: decided per record (not per attempt), so retries and bisection agree."""
        rate = self.faults.reject_rate
        if not rate:
            return
        identity = json.dumps(key or {k: payload.get(k) for k in table.alternate_key}, sort_keys=True, default=str)
        digest = hashlib.sha256(f"{self.seed}:{table.logical_name}:{identity}".encode()).digest()
        if int.from_bytes(digest[:8], "big") / 2**64 < rate:
            self.stats.records_rejected += 1
            raise DataverseError(
                400, "0x80040265", f"The {table.logical_name} record was rejected by a business rule (simulated)."
            )

    async def _bulk(self, request: Request, table: Table, action: str) -> tuple[Response, int]:
        payload = await _json(request)
        targets = payload.get("Targets")
        if not isinstance(targets, list) or not targets:
            raise DataverseError(400, "0x80040203", "Targets must be a non-empty array of entities")
        seen: dict[str, int] = {}
        resolved: list[tuple[dict[str, Any] | None, dict[str, Any]]] = []
        for index, target in enumerate(targets):
            if not isinstance(target, dict):
                raise DataverseError(400, "0x80040203", f"Targets[{index}] is not an entity", index=index)
            odata_type = target.get("@odata.type")
            if odata_type not in (None, f"Microsoft.Dynamics.CRM.{table.logical_name}"):
                raise DataverseError(
                    400,
                    "0x80060888",
                    f"Targets[{index}]: @odata.type must be Microsoft.Dynamics.CRM.{table.logical_name}",
                )
            key = _key_of(target, table, index)
            marker = json.dumps(key, sort_keys=True, default=str) if key else None
            if marker is not None:
                if marker in seen:
                    raise DataverseError(
                        400, "0x80040237",
                        f"Targets[{index}] has the same key as Targets[{seen[marker]}]: "
                        "duplicate key values in one request.",
                        index=index,
                    )  # fmt: skip
                seen[marker] = index
            resolved.append((key, target))
        ids: list[str] = []
        with self.store.transaction():  # all or nothing, as on a standard table
            for index, (key, target) in enumerate(resolved):
                try:
                    self._maybe_reject(table, target, key)
                    stored = self.store.write(
                        table, key, target, create=action != "UpdateMultiple", update=action != "CreateMultiple"
                    )
                except DataverseError as err:
                    raise DataverseError(
                        err.status if err.status != 404 else 400,
                        err.code,
                        f"Targets[{index}]: {err.message}",
                        index=index,
                    ) from None
                ids.append(stored.id)
        self.stats.records_written += len(ids)
        if action == "UpdateMultiple":
            return Response(status_code=204), len(ids)
        context = f"{request.base_url}{API.lstrip('/')}/$metadata#Microsoft.Dynamics.CRM.{action}Response"
        return JSONResponse({"@odata.context": context, "Ids": ids}), len(ids)

    def _list(self, request: Request, table: Table) -> Response:
        q = request.query_params
        try:
            where, params = compile_filter(q["$filter"], table) if q.get("$filter") else ("", [])
            orderby = _orderby(q.get("$orderby"), table)
            top = int(q["$top"]) if q.get("$top") else None
            skip = int(q.get("$skiptoken") or 0)
        except (ODataError, ValueError) as exc:
            raise DataverseError(400, "0x80060888", str(exc)) from None
        page_size = _max_page_size(request.headers.get("prefer", ""))
        remaining = None if top is None else max(0, top - skip)
        size = min(page_size, remaining) if remaining is not None else page_size
        rows = self.store.query(table, where=where, params=params, orderby=orderby, limit=size + 1, offset=skip)
        more = len(rows) > size and (remaining is None or remaining > size)
        body: dict[str, Any] = {"@odata.context": f"{request.base_url}{API.lstrip('/')}/$metadata#{table.entity_set}"}
        if q.get("$count") == "true":
            body["@odata.count"] = self.store.count(table, where, params)
        body["value"] = [to_json(table, r, _select(request)) for r in rows[:size]]
        headers = {}
        if "odata.maxpagesize" in request.headers.get("prefer", ""):
            headers["Preference-Applied"] = f"odata.maxpagesize={page_size}"
        if more:
            query = {k: v for k, v in q.items() if k != "$skiptoken"} | {"$skiptoken": str(skip + size)}
            body["@odata.nextLink"] = f"{str(request.url).split('?')[0]}?{urlencode(query)}"
        return JSONResponse(body, headers=headers)

    def _definitions(self, request: Request) -> Response:
        text = request.query_params.get("$filter", "")
        match = re.fullmatch(r"\s*LogicalName eq '(\w+)'\s*", text)
        tables = (
            [TABLES[match.group(1)]] if match and match.group(1) in TABLES else ([] if match else list(TABLES.values()))
        )
        return JSONResponse({"value": [_definition_json(t) for t in tables]})

    def _definition(self, name: str, rest: str) -> Response:
        table = TABLES.get(name)
        if table is None:
            raise DataverseError(404, "0x80040217", f"Could not find entity with LogicalName = {name}")
        if rest == "":
            return JSONResponse(_definition_json(table))
        if rest.startswith("/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata"):
            return JSONResponse({"value": []})  # no choice columns in these tables
        if rest == "/Keys":
            return JSONResponse(
                {
                    "value": [
                        {
                            "LogicalName": f"{table.logical_name}_key",
                            "KeyAttributes": list(table.alternate_key),
                            "EntityKeyIndexStatus": "Active",
                        }
                    ]
                }
            )
        raise DataverseError(404, "0x80060888", f"Resource not found for the segment '{rest}'.")

    def admin_stats(self, request: Request) -> Response:
        s = self.stats
        return JSONResponse(
            {
                "requests": {k: {str(code): n for code, n in v.items()} for k, v in s.requests.items()},
                "throttled": dict(s.throttled),
                "by_identity": dict(s.by_identity),
                "records_written": s.records_written,
                "records_rejected": s.records_rejected,
                "errors_injected": s.errors_injected,
                "outage_drops": s.outage_drops,
                "tokens_issued": s.tokens_issued,
                "records": self.store.table_counts(),
            }
        )


def _definition_json(table: Table) -> dict[str, Any]:
    return {
        "LogicalName": table.logical_name,
        "SchemaName": table.logical_name.capitalize(),
        "EntitySetName": table.entity_set,
        "PrimaryIdAttribute": table.primary_id,
        "PrimaryNameAttribute": table.primary_name,
        "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"table:{table.logical_name}")),
    }


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = jsontext.loads(await request.body())  # amounts as Decimal: never through a float
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataverseError(400, "0x80060888", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise DataverseError(400, "0x80060888", "The request body must be a JSON object.")
    return body


def _key_of(target: dict[str, Any], table: Table, index: int) -> dict[str, Any] | None:
    odata_id = target.get("@odata.id")
    if odata_id:
        match = _ENTITY.match(str(odata_id).split(API)[-1].lstrip("/"))
        if not match or BY_SET.get(match.group("set")) is not table or match.group("key") is None:
            raise DataverseError(
                400, "0x80060888", f"Targets[{index}]: @odata.id must be {table.entity_set}(key)", index=index
            )
        try:
            return parse_key(match.group("key"), table)
        except ODataError as exc:
            raise DataverseError(400, "0x80060888", f"Targets[{index}]: {exc}", index=index) from None
    if all(target.get(k) not in (None, "") for k in table.alternate_key):
        return {k: target[k] for k in table.alternate_key}
    if target.get(table.primary_id):
        return {table.primary_id: str(target[table.primary_id]).lower()}
    return None


def _entity_id(request: Request, table: Table, record_id: str, status: int) -> Response:
    url = f"{request.base_url}{API.lstrip('/')}/{table.entity_set}({record_id})"
    return Response(status_code=status, headers={"OData-EntityId": url})


def _select(request: Request) -> list[str] | None:
    value = request.query_params.get("$select")
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


def _orderby(value: str | None, table: Table) -> list[tuple[str, bool]]:
    out = []
    for part in (value or "").split(","):
        words = part.split()
        if not words:
            continue
        name = words[0]
        column = name[1:-6] if name.startswith("_") and name.endswith("_value") else name
        if column not in table.by_name or len(words) > 2 or (len(words) == 2 and words[1] not in ("asc", "desc")):
            raise ODataError(f"cannot order by {part.strip()!r}")
        out.append((column, len(words) == 2 and words[1] == "desc"))
    return out


def _max_page_size(prefer: str) -> int:
    match = re.search(r"odata\.maxpagesize=(\d+)", prefer)
    return min(int(match.group(1)), MAX_PAGE) if match else MAX_PAGE


def _route(path: str) -> str:
    rest = path[len(API) :].lstrip("/") if path.startswith(API) else path
    match = _ENTITY.match(rest)
    if path.startswith(API) and match:
        return (
            f"{match.group('set')}"
            + ("(key)" if match.group("key") is not None else "")
            + (f"/{match.group('action')}" if match.group("action") else "")
        )
    return rest.split("(")[0] if path.startswith(API) else path
