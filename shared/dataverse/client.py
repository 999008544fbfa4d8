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
import logging
import time
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


class Identity:
    """One application user: its credential, cached token, Retry-After block and concurrency limit."""

    def __init__(self, name: str, credential: Credential, scope: str, *, max_concurrency: int) -> None:
        self.name = name
        self.credential = credential
        self.scope = scope
        self.limit = AdaptiveLimit(1, max_concurrency)
        self.blocked_until = 0.0
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

    async def wait_unblocked(self, sleep: Sleep) -> None:
        while (remaining := self.blocked_until - time.monotonic()) > 0:
            await sleep(remaining)


@dataclass(frozen=True)
class DataverseClientConfig:
    org_url: str  # https://ORG.crm.dynamics.com
    chunk_size: int = 100
    max_concurrency: int = 52
    timeout_s: float = 120.0
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
            Identity(name, cred, config.scope, max_concurrency=config.max_concurrency)
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
        identity = self._pick()
        await identity.wait_unblocked(self._sleep)
        async with identity.limit.slot():
            for refreshed in (False, True):
                token = await identity.token(refresh=refreshed)
                headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
                self.stats.requests += 1
                try:
                    response = await self._http.request(method, path, headers=headers, **kwargs)
                except httpx.HTTPError as exc:
                    raise transport_error(exc, system=SYSTEM, operation=operation) from None
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
            identity.limit.on_success()
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
        results = await asyncio.gather(*(self._write_chunk(table, chunk) for chunk in chunks))
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


def _row_error(exc: SyncError) -> dict[str, Any]:
    """What a dead-letter row holds about Dataverse's refusal: its code and message, nothing of the request."""
    return {"status_code": exc.status_code, "code": exc.code, "message": str(exc), "type": type(exc).__name__}
