"""The billing API client: every changed record, exactly once, at its latest version.

- listing: one light page at a time through a paginator strategy (`shared.billing.listing` drives the listing);
- fetching: bulk by up to 100 IDs, re-asking for IDs the platform left out while many are missing and answers
  bring more, then confirming each still-missing ID once on its own, so "not found" is a fact and never a
  throttled answer taken at face value, and an unknown ID costs one bulk answer and one single fetch;
- silent throttling (a 200 that cannot be right) is raised as SilentThrottleError and retried like a 429;
- one client-side rate limiter paces every request below the platform's published limit;
- an optional circuit breaker turns a run of failed operations into CircuitOpenError for the caller to defer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import httpx
from aiolimiter import AsyncLimiter
from more_itertools import chunked

from shared import logs
from shared.billing.models import Entity, Record, parse_record
from shared.billing.pagination import (
    CursorPaginator,
    KeysetOverOffset,
    Page,
    Paginator,
    looks_throttled,
    parse_page,
)
from shared.callpolicy import PARTIAL, TRANSPORT_ERROR, Breaker, CallPolicy, CallStats, Hooks, RetryPolicy, Sleep
from shared.errors import (
    ContractError,
    InvalidRecord,
    NotFoundError,
    SilentThrottleError,
    TransientError,
)
from shared.http import PooledClient, classify, transport_error

log = logs.get_logger("shared.billing")
SYSTEM = "billing"
MAX_BULK = 100
CONFIRM_ONE_BY_ONE = 3  # ids a bulk answer may leave out that are confirmed one by one at once, not asked again


@dataclass(frozen=True)
class BillingClientConfig:
    base_url: str
    api_key: str = field(repr=False)
    pagination: Literal["cursor", "offset"] = "cursor"
    page_size: int = 1000
    rate_limit_rps: float = 10.0
    timeout_s: float = 30.0
    bulk_concurrency: int = 4
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass
class FetchResult:
    records: dict[str, Record] = field(default_factory=dict)
    invalid: list[InvalidRecord] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)


class BillingClient(PooledClient):
    """Reuse one instance (and its connection pool) across invocations; close it with `aclose()`."""

    def __init__(
        self,
        config: BillingClientConfig,
        *,
        breaker: Breaker | None = None,
        hooks: Hooks | None = None,
        sleep: Sleep | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        verify: Any = True,
    ) -> None:
        self.config = config
        self.left_out_found = 0  # ids a bulk answer left out that a single fetch then found
        # A smooth pace a little under the limit: bursts are what trips a token bucket.
        limiter = AsyncLimiter(1, 1.0 / (config.rate_limit_rps * 0.95))
        self.policy = CallPolicy(SYSTEM, config.retry, breaker=breaker, limiter=limiter, hooks=hooks, sleep=sleep)
        self._http = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {config.api_key}", "Accept": "application/json"},
            timeout=httpx.Timeout(config.timeout_s),
            limits=httpx.Limits(max_connections=max(8, config.bulk_concurrency * 2)),
            transport=transport,
            verify=verify,
        )

    @property
    def stats(self) -> CallStats:
        return self.policy.stats

    @property
    def silent_throttles(self) -> int:
        """Answers that were throttling without saying so: empty pages where records were due, short bulk fetches."""
        retried = self.stats.retried
        return retried[SilentThrottleError.__name__] + retried[PARTIAL] + self.left_out_found

    # ---- one request ----

    async def _request(self, method: str, path: str, *, operation: str, **kwargs: Any) -> Any:
        """One attempt: paced, counted, classified; the JSON body."""
        await self.policy.pace()
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            self.policy.answered(method, _template(path), TRANSPORT_ERROR)
            raise transport_error(exc, system=SYSTEM, operation=operation) from None
        self.policy.answered(method, _template(path), response.status_code)
        classify(response, system=SYSTEM, operation=operation)
        try:
            return response.json()
        except json.JSONDecodeError:
            raise TransientError(f"billing {operation}: the answer is not JSON", system=SYSTEM) from None

    # ---- count and list ----

    async def count(self, entity: Entity, since: str) -> int:
        async def once() -> int:
            body = await self._request("GET", f"/v1/{entity}/count", operation=f"count {entity}", params=_since(since))
            count = body.get("count") if isinstance(body, dict) else None
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ContractError(f"billing count {entity}: no whole 'count' in the answer", system=SYSTEM)
            return count

        return await self.policy.call(once, what=f"billing count {entity}")

    def paginator(self, since: str) -> Paginator:
        return CursorPaginator(since) if self.config.pagination == "cursor" else KeysetOverOffset(since)

    async def list_page(self, entity: Entity, params: dict[str, str], *, expect_records: bool) -> Page:
        """One light page; an empty page where records are due is silent throttling (raised, retried)."""
        query = {**params, "limit": str(self.config.page_size), "fields": "id,updated_at,version"}

        async def once() -> Page:
            body = await self._request("GET", f"/v1/{entity}", operation=f"list {entity}", params=query)
            page = parse_page(body, entity=entity)
            if looks_throttled(page, previous_has_more=False, records_due=expect_records):
                raise SilentThrottleError(
                    f"billing list {entity}: an empty page where records were due (silent throttling)",
                    system=SYSTEM,
                )
            return page

        return await self.policy.call(once, what=f"billing list {entity}")

    # ---- fetch ----

    async def _bulk(self, entity: Entity, ids: Sequence[str]) -> list[Any]:
        body = await self._request(
            "POST", f"/v1/{entity}/bulk", operation=f"bulk fetch {entity}", json={"ids": list(ids)}
        )
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise ContractError(f"billing bulk fetch {entity}: no 'data' list", system=SYSTEM)
        return data

    async def _bulk_part(
        self, entity: Entity, ids: Sequence[str], result: FetchResult, gate: asyncio.Semaphore
    ) -> list[str]:
        """Ask for `ids` in bulk; the ids the answers left out. A short answer is asked again (silent throttling
        leaves records out) only while many ids are missing and the last answer brought some of them: ids billing
        does not know cost one bulk answer, then one single fetch each (`fetch`), not a round of retries."""
        pending = list(dict.fromkeys(ids))
        few = max(CONFIRM_ONE_BY_ONE, len(pending) // 10)
        progress = True

        async def once() -> list[str]:
            nonlocal pending, progress
            async with gate:
                data = await self._bulk(entity, pending)
            wanted = set(pending)
            for raw in data:
                record_id = raw.get("id") if isinstance(raw, dict) else None
                if record_id in wanted:  # not asked for, or a repeat in the answer: ignored
                    wanted.discard(record_id)
                    self._take(entity, raw, result)
            progress = len(wanted) < len(pending)
            pending = [i for i in pending if i in wanted]
            return pending

        def worth_asking_again(left: list[str]) -> bool:
            return len(left) > few and progress

        return await self.policy.call(once, what=f"billing bulk fetch {entity}", partial=worth_asking_again)

    async def _one(self, entity: Entity, record_id: str) -> Any | None:
        async def once() -> Any | None:
            try:
                return await self._request(
                    "GET", f"/v1/{entity}/{_path_segment(record_id)}", operation=f"fetch {entity}"
                )
            except NotFoundError:
                return None

        return await self.policy.call(once, what=f"billing fetch {entity}")

    async def fetch(self, entity: Entity, ids: Sequence[str]) -> FetchResult:
        """Full records for `ids`: each ends fetched (valid or invalid) or, confirmed one by one, not found."""
        result = FetchResult()
        unique = list(dict.fromkeys(ids))
        gate = asyncio.Semaphore(self.config.bulk_concurrency)
        parts = list(chunked(unique, MAX_BULK))
        left_out = await asyncio.gather(*(self._bulk_part(entity, part, result, gate) for part in parts))
        missing = [i for part in left_out for i in part]

        async def confirm(record_id: str) -> None:  # a single fetch's 404 is the "not found" we believe
            async with gate:
                raw = await self._one(entity, record_id)
            if raw is None:
                result.not_found.append(record_id)
            else:
                self.left_out_found += 1  # it exists: the bulk answer was short (silent throttling, a dropped id)
                self._take(entity, raw, result, asked=record_id)

        await asyncio.gather(*(confirm(i) for i in missing))
        result.not_found.sort(key=missing.index)
        return result

    @staticmethod
    def _take(entity: Entity, raw: Any, result: FetchResult, *, asked: str | None = None) -> None:
        parsed = parse_record(entity, raw)
        if isinstance(parsed, InvalidRecord):
            if parsed.record_id is None and asked is not None:
                parsed = InvalidRecord(entity, asked, parsed.reason)
            result.invalid.append(parsed)
        elif asked is not None and parsed.id != asked:
            result.invalid.append(InvalidRecord(entity, asked, f"id: asked for {asked!r}, the answer was another id"))
        else:
            result.records[parsed.id] = parsed


def _since(since: str) -> dict[str, str]:
    return {"updated_since": since} if since else {}


def _path_segment(value: str) -> str:
    """One URL path segment: every reserved character escaped, '/' included."""
    return quote(value, safe="")


def _template(path: str) -> str:
    parts = path.strip("/").split("/")
    if len(parts) == 3 and parts[2] not in ("count", "bulk"):
        return f"/{parts[0]}/{parts[1]}/{{id}}"
    return path
