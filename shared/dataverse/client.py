"""A bulk Dataverse client that writes close to the service-protection limits without tripping them for long.

- rows are upserted by alternate key with `UpsertMultiple`, in chunks, duplicates removed inside a request (the
  newest source version wins);
- a chunk Dataverse rejects (bulk messages are all-or-nothing on standard tables) is bisected until each bad row
  stands alone, so k bad rows in n cost about 2·k·log2(n) extra requests and every good row is written;
- each application user (identity) has its own token, refreshed once on 401, its own `Retry-After` block (a 429
  pauses every request of that identity, not just the one that got it), and its own concurrency limit that starts
  at the server's `x-ms-dop-hint`, halves on 429 and climbs back one step per round of successes;
- every value put into a URL goes through `shared.dataverse.odata`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx

from shared.dataverse.odata import record_path
from shared.errors import AuthError, FatalError, NotFoundError, SyncError, ThrottledError, TransientError
from shared.http import RetryPolicy, Sleep, call_with_retries, classify, transport_error

log = logging.getLogger("shared.dataverse")
SYSTEM = "dataverse"
API_PATH = "/api/data/v9.2"
TOKEN_MARGIN_S = 300.0


class AccessTokenLike(Protocol):
    token: str
    expires_on: int


class Credential(Protocol):
    """azure-identity's TokenCredential or AsyncTokenCredential: `get_token(scope)`."""

    def get_token(self, *scopes: str) -> Any: ...


@dataclass(frozen=True)
class TableRef:
    logical_name: str
    entity_set: str
    bulk: bool = True  # UpsertMultiple enabled; otherwise rows go as PATCH upserts in a $batch


@dataclass(frozen=True)
class UpsertRow:
    key: Mapping[str, Any]
    values: Mapping[str, Any]
    source_version: int = 0

    def target(self, table: TableRef) -> dict[str, Any]:
        return {"@odata.type": f"Microsoft.Dynamics.CRM.{table.logical_name}", **self.values, **self.key}

    @property
    def key_tuple(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((k, str(v)) for k, v in self.key.items()))


Status = Literal["written", "rejected", "failed", "superseded"]


@dataclass(frozen=True)
class RowOutcome:
    row: UpsertRow
    status: Status
    record_id: str | None = None
    error: dict[str, Any] | None = None


@dataclass
class ClientStats:
    requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)  # answers by status code ("transport-error" too)
    throttled: int = 0
    unauthorized_refreshes: int = 0
    bisections: int = 0
    rows_written: int = 0
    rows_rejected: int = 0


class AdaptiveLimit:
    """Concurrency for one identity: additive increase, multiplicative decrease."""

    def __init__(self, start: int, maximum: int) -> None:
        self.limit = float(max(1, min(start, maximum)))
        self.maximum = maximum
        self.in_flight = 0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < int(self.limit))
            self.in_flight += 1
        try:
            yield
        finally:
            async with self._changed:
                self.in_flight -= 1
                self._changed.notify_all()

    def on_success(self) -> None:
        self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)

    def on_throttle(self) -> None:
        self.limit = max(1.0, self.limit / 2)


@dataclass(frozen=True)
class ProtectionLimits:
    """Service-protection limits per application user; Microsoft's published defaults, or your tenant's."""

    window_s: float = 300.0
    requests: int = 6000
    execution_ms: float = 1_200_000.0
    floor: float = 0.02  # keep this share of each budget in hand: in-flight requests spend from it

    def pause_for(self, requests_left: int | None, time_left_ms: float | None) -> float | None:
        """Seconds to wait so that the window refills back to the floor; None when there is room to spare."""
        waits = []
        if time_left_ms is not None and time_left_ms < self.floor * self.execution_ms:
            waits.append((self.floor * self.execution_ms - time_left_ms) / (self.execution_ms / self.window_s) / 1000)
        if requests_left is not None and requests_left < self.floor * self.requests:
            waits.append((self.floor * self.requests - requests_left) / (self.requests / self.window_s))
        return max(waits) if waits else None

    def roomy(self, requests_left: int | None, time_left_ms: float | None) -> bool:
        return (time_left_ms is None or time_left_ms > 2 * self.floor * self.execution_ms) and (
            requests_left is None or requests_left > 2 * self.floor * self.requests
        )


def _header_int(response: httpx.Response, name: str) -> int | None:
    value = response.headers.get(name)
    return int(value) if value is not None and value.strip().lstrip("-").isdigit() else None


class Identity:
    """One application user: its credential, cached token, Retry-After block and concurrency limit."""

    def __init__(
        self, name: str, credential: Credential, scope: str, *, max_concurrency: int, limits: ProtectionLimits
    ) -> None:
        self.name = name
        self.credential = credential
        self.scope = scope
        self.limits = limits
        self.limit = AdaptiveLimit(1, max_concurrency)
        self.blocked_until = 0.0
        self.cost_ms: float | None = None  # moving average of what one request spends of the execution budget
        self._last_time_left: tuple[float, int] | None = None  # (when, ms left) from the previous answer
        self._token: str | None = None
        self._expires_on = 0.0
        self._lock = asyncio.Lock()

    async def token(self, *, refresh: bool = False) -> str:
        async with self._lock:
            if refresh or self._token is None or time.time() > self._expires_on - TOKEN_MARGIN_S:
                getter = self.credential.get_token
                if inspect.iscoroutinefunction(getter):
                    access = await getter(self.scope)
                else:
                    access = await asyncio.to_thread(getter, self.scope)
                self._token, self._expires_on = access.token, float(access.expires_on)
            return self._token

    def block(self, seconds: float) -> None:
        self.blocked_until = max(self.blocked_until, time.monotonic() + seconds)

    def observe(self, response: httpx.Response, duration_ms: float) -> None:
        """Pace from Dataverse's remaining-budget headers, so the limits are approached and not tripped.

        Below the floor, the identity pauses until the window has refilled to it (at the limit's average refill
        rate) and then probes with one request. Above it, concurrency is capped so that the requests in flight
        (each costing about the moving average of a request's duration) fit in what is left above the floor.
        """
        requests_left = _header_int(response, "x-ms-ratelimit-burst-remaining-xrm-requests")
        time_left = _header_int(response, "x-ms-ratelimit-time-remaining-xrm-requests")
        self._learn_cost(time_left, duration_ms)
        pause = self.limits.pause_for(requests_left, time_left)
        if pause is not None:
            self.limit.limit = 1.0  # after the pause, one request probes the refilled window before others follow
            self.block(pause)
            return
        caps = []
        cost = self.cost_ms
        if time_left is not None and cost is not None and cost > 0:
            caps.append((time_left - self.limits.floor * self.limits.execution_ms) / cost)
        if requests_left is not None:
            caps.append(requests_left - self.limits.floor * self.limits.requests)
        cap = max(1.0, min(caps)) if caps else float(self.limit.maximum)
        if self.limit.limit > cap:
            self.limit.limit = cap
        elif self.limits.roomy(requests_left, time_left):
            self.limit.on_success()

    def _learn_cost(self, time_left: int | None, duration_ms: float) -> None:
        """A request's cost: the drop in the remaining time between two answers (each answer adds its own charge),
        plus what the window refilled meanwhile; the request's duration (an over-estimate) until headers come."""
        now = time.monotonic()
        sample: float | None = None
        if time_left is not None and self._last_time_left is not None:
            then, before = self._last_time_left
            refilled = self.limits.execution_ms / self.limits.window_s * (now - then)
            drop = before - time_left + refilled
            sample = drop if 0 < drop < 10 * duration_ms else None
        if time_left is not None:
            self._last_time_left = (now, time_left)
        if sample is None and self.cost_ms is not None:
            return
        value = sample if sample is not None else duration_ms
        self.cost_ms = value if self.cost_ms is None else 0.8 * self.cost_ms + 0.2 * value

    async def wait_unblocked(self, sleep: Sleep) -> None:
        while (remaining := self.blocked_until - time.monotonic()) > 0:
            await sleep(remaining)


@dataclass(frozen=True)
class DataverseClientConfig:
    org_url: str  # https://ORG.crm.dynamics.com
    chunk_size: int = 100
    max_concurrency: int = 52
    timeout_s: float = 120.0
    limits: ProtectionLimits = field(default_factory=ProtectionLimits)
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(attempts=8, total_s=300, base_s=1, cap_s=30))

    @property
    def scope(self) -> str:
        return f"{self.org_url.rstrip('/')}/.default"


class DataverseClient:
    def __init__(
        self,
        config: DataverseClientConfig,
        identities: Mapping[str, Credential],
        *,
        verify: Any = True,
        sleep: Sleep | None = None,
    ) -> None:
        if not identities:
            raise ValueError("at least one application user (credential) is needed")
        if not config.org_url.startswith("https://"):
            raise ValueError("the Dataverse URL must be https://")
        self.config = config
        self.stats = ClientStats()
        self._sleep = sleep or asyncio.sleep
        self.identities = [
            Identity(name, cred, config.scope, max_concurrency=config.max_concurrency, limits=config.limits)
            for name, cred in identities.items()
        ]
        self._http = httpx.AsyncClient(
            base_url=config.org_url.rstrip("/") + API_PATH + "/",
            timeout=httpx.Timeout(config.timeout_s),
            verify=verify,
            headers={"Accept": "application/json", "OData-MaxVersion": "4.0", "OData-Version": "4.0"},
            limits=httpx.Limits(max_connections=config.max_concurrency * len(identities)),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> DataverseClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- one request, through an identity ----

    def _pick(self) -> Identity:
        now = time.monotonic()
        return min(self.identities, key=lambda i: (i.blocked_until > now, i.limit.in_flight / i.limit.limit))

    async def _send_once(self, method: str, path: str, *, operation: str, **kwargs: Any) -> httpx.Response:
        while True:
            identity = self._pick()
            await identity.wait_unblocked(self._sleep)
            async with identity.limit.slot():
                if identity.blocked_until > time.monotonic():
                    continue  # blocked while this request waited for a slot: wait again, holding nothing
                return await self._attempt(identity, method, path, operation=operation, **kwargs)

    async def _attempt(
        self, identity: Identity, method: str, path: str, *, operation: str, **kwargs: Any
    ) -> httpx.Response:
        for refreshed in (False, True):
            token = await identity.token(refresh=refreshed)
            headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
            self.stats.requests += 1
            sent = time.monotonic()
            try:
                response = await self._http.request(method, path, headers=headers, **kwargs)
            except httpx.HTTPError as exc:
                self.stats.statuses["transport-error"] += 1
                raise transport_error(exc, system=SYSTEM, operation=operation) from None
            self.stats.statuses[str(response.status_code)] += 1
            if response.status_code == 401 and not refreshed:
                self.stats.unauthorized_refreshes += 1
                kwargs["headers"] = {k: v for k, v in headers.items() if k != "Authorization"}
                continue
            break
        try:
            classify(response, system=SYSTEM, operation=operation)
        except ThrottledError as exc:
            self.stats.throttled += 1
            identity.block(exc.retry_after if exc.retry_after is not None else 1.0)
            identity.limit.on_throttle()
            raise
        identity.observe(response, (time.monotonic() - sent) * 1000)
        return response

    async def _send(self, method: str, path: str, *, operation: str, **kwargs: Any) -> httpx.Response:
        async def once() -> httpx.Response:
            return await self._send_once(method, path, operation=operation, **dict(kwargs))

        return await call_with_retries(once, policy=self.config.retry, what=f"dataverse {operation}", sleep=self._sleep)

    async def connect(self) -> None:
        """WhoAmI for each identity: checks the credentials and sets concurrency from `x-ms-dop-hint`."""
        for identity in self.identities:
            async with identity.limit.slot():
                token = await identity.token()
                response = await self._http.get("WhoAmI", headers={"Authorization": f"Bearer {token}"})
            classify(response, system=SYSTEM, operation="WhoAmI")
            hint = response.headers.get("x-ms-dop-hint")
            if hint and hint.isdigit():
                identity.limit.limit = float(max(1, min(int(hint), self.config.max_concurrency)))

    # ---- writing ----

    @staticmethod
    def dedupe(rows: Sequence[UpsertRow]) -> tuple[list[UpsertRow], list[RowOutcome]]:
        """One row per key, the newest source version; the others are reported superseded, not dropped silently."""
        newest: dict[tuple[tuple[str, str], ...], UpsertRow] = {}
        superseded: list[RowOutcome] = []
        for row in rows:
            current = newest.get(row.key_tuple)
            if current is None or row.source_version >= current.source_version:
                if current is not None:
                    superseded.append(RowOutcome(current, "superseded"))
                newest[row.key_tuple] = row
            else:
                superseded.append(RowOutcome(row, "superseded"))
        return list(newest.values()), superseded

    async def upsert_many(self, table: TableRef, rows: Sequence[UpsertRow]) -> list[RowOutcome]:
        unique, outcomes = self.dedupe(rows)
        size = max(1, self.config.chunk_size)
        chunks = [unique[i : i + size] for i in range(0, len(unique), size)]
        write = self._write_chunk if table.bulk else self._write_batch
        results = await asyncio.gather(*(write(table, chunk) for chunk in chunks))
        for result in results:
            outcomes.extend(result)
        self.stats.rows_written += sum(o.status == "written" for o in outcomes)
        self.stats.rows_rejected += sum(o.status == "rejected" for o in outcomes)
        return outcomes

    async def _write_chunk(self, table: TableRef, rows: list[UpsertRow]) -> list[RowOutcome]:
        path = f"{table.entity_set}/Microsoft.Dynamics.CRM.UpsertMultiple"
        try:
            response = await self._send(
                "POST",
                path,
                operation=f"UpsertMultiple {table.entity_set}",
                json={"Targets": [r.target(table) for r in rows]},
            )
        except AuthError:
            raise
        except TransientError as exc:
            return [RowOutcome(r, "failed", error=exc.to_dict()) for r in rows]
        except FatalError as exc:
            if len(rows) == 1:
                return [RowOutcome(rows[0], "rejected", error=_row_error(exc))]
            self.stats.bisections += 1
            middle = len(rows) // 2
            halves = await asyncio.gather(
                self._write_chunk(table, rows[:middle]), self._write_chunk(table, rows[middle:])
            )
            return halves[0] + halves[1]
        ids = response.json().get("Ids") or [None] * len(rows)
        return [RowOutcome(r, "written", record_id=i) for r, i in zip(rows, ids, strict=False)]

    async def _write_batch(self, table: TableRef, rows: list[UpsertRow]) -> list[RowOutcome]:
        """Upserts as PATCH requests in one `$batch` (continue on error): each row gets its own answer."""
        pending: list[UpsertRow] = list(rows)
        done: list[RowOutcome] = []
        for _round in range(3):
            boundary = f"batch_{uuid.uuid4()}"
            parts = [
                f"--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
                f"Content-ID: {i + 1}\r\n\r\nPATCH {record_path(table.entity_set, row.key)} HTTP/1.1\r\n"
                f"Content-Type: application/json\r\n\r\n{json.dumps({**row.values, **row.key})}\r\n"
                for i, row in enumerate(pending)
            ]
            body = "".join(parts) + f"--{boundary}--\r\n"
            headers = {"Content-Type": f"multipart/mixed; boundary={boundary}", "Prefer": "odata.continue-on-error"}
            try:
                response = await self._send(
                    "POST", "$batch", operation=f"$batch {table.entity_set}", content=body.encode(), headers=headers
                )
            except AuthError:
                raise
            except (TransientError, FatalError) as exc:
                return done + [RowOutcome(r, "failed", error=exc.to_dict()) for r in pending]
            answers = parse_batch_response(response)
            retry: list[UpsertRow] = []
            for index, row in enumerate(pending):
                if index >= len(answers):
                    retry.append(row)
                    continue
                status, part_headers, part_body = answers[index]
                if 200 <= status < 300:
                    entity = part_headers.get("odata-entityid", "")
                    record_id = entity[entity.rfind("(") + 1 : -1] if entity.endswith(")") else None
                    done.append(RowOutcome(row, "written", record_id=record_id))
                elif status == 429 or status >= 500:
                    retry.append(row)
                else:
                    code, message = _part_error(part_body)
                    error = {"status_code": status, "code": code, "message": message, "type": "FatalError"}
                    done.append(RowOutcome(row, "rejected", error=error))
            if not retry:
                return done
            pending = retry
            await self._sleep(self.config.retry.wait(_round + 1, None))
        return done + [
            RowOutcome(r, "failed", error={"message": "no answer in $batch after 3 rounds"}) for r in pending
        ]

    async def delete(self, table: TableRef, key: Mapping[str, Any]) -> bool:
        """Delete one record by key; False when it was not there."""
        try:
            await self._send("DELETE", record_path(table.entity_set, key), operation=f"delete {table.entity_set}")
        except NotFoundError:
            return False
        return True

    # ---- reading ----

    async def get(
        self, table: TableRef, key: Mapping[str, Any], *, select: Sequence[str] = ()
    ) -> dict[str, Any] | None:
        params = {"$select": ",".join(select)} if select else None
        try:
            response = await self._send(
                "GET", record_path(table.entity_set, key), operation=f"get {table.entity_set}", params=params
            )
        except NotFoundError:
            return None
        body: dict[str, Any] = response.json()
        return body

    async def read_pages(
        self, table: TableRef, *, select: Sequence[str] = (), filter: str | None = None, page_size: int = 5000
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Every row, page by page (`Prefer: odata.maxpagesize`, following `@odata.nextLink`)."""
        params: dict[str, str] = {}
        if select:
            params["$select"] = ",".join(select)
        if filter:
            params["$filter"] = filter
        url: str | None = table.entity_set
        headers = {"Prefer": f"odata.maxpagesize={page_size}"}
        pages = 0
        while url:
            pages += 1
            if pages > 1_000_000:
                raise FatalError("dataverse read: too many pages", system=SYSTEM)
            response = await self._send(
                "GET", url, operation=f"read {table.entity_set}", params=params or None, headers=headers
            )
            body = response.json()
            yield list(body.get("value") or [])
            url, params = body.get("@odata.nextLink"), {}


def parse_batch_response(response: httpx.Response) -> list[tuple[int, dict[str, str], bytes]]:
    """The inner answers of a `$batch` response, in order: (status, headers in lower case, body)."""
    match = re.search(r'boundary="?([^";]+)"?', response.headers.get("content-type", ""))
    if not match:
        raise TransientError("dataverse $batch: the answer is not multipart", system=SYSTEM)
    answers = []
    for blob in response.content.split(b"--" + match.group(1).encode())[1:-1]:
        text = blob.replace(b"\r\n", b"\n").strip(b"\n")
        _, _, http = text.partition(b"\n\n")
        status_line, _, rest = http.partition(b"\n")
        head, _, body = rest.partition(b"\n\n")
        fields = status_line.split()
        status = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 500
        headers = {}
        for line in head.decode("utf-8", "replace").split("\n"):
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        answers.append((status, headers, body.strip()))
    return answers


def _part_error(body: bytes) -> tuple[str | None, str]:
    try:
        err = json.loads(body).get("error", {})
    except (ValueError, AttributeError):
        return None, body[:200].decode("utf-8", "replace")
    return err.get("code"), str(err.get("message", ""))[:500]


def _row_error(exc: SyncError) -> dict[str, Any]:
    """What a dead-letter row holds about Dataverse's refusal: its code and message, nothing of the request."""
    return {"status_code": exc.status_code, "code": exc.code, "message": str(exc), "type": type(exc).__name__}
