"""A bulk Dataverse client that writes close to the service-protection limits without tripping them for long.

- rows are upserted by alternate key with `UpsertMultiple`, in chunks, duplicates removed inside a request (the
  newest source version wins);
- a chunk Dataverse rejects (bulk messages are all-or-nothing on standard tables) is bisected until each bad row
  stands alone, so k bad rows in n cost about 2·k·log2(n) extra requests and every good row is written;
- each application user (identity) has its own token, refreshed once on 401, its own `Retry-After` block (a 429
  pauses every request of that identity, not just the one that got it), and its own concurrency limit that starts
  at 1, halves on 429 and climbs back one step per round of successes, capped by what the budget left can carry;
- many instances of the app may share one application user's budget without knowing of each other: each paces
  its requests at its share of what the budget refills, its share read from the remaining-budget headers
  (`RatePacer`; docs/scaling.md says why and what it measured);
- every value put into a URL goes through `shared.dataverse.odata`.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import random
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol
from urllib.parse import quote

import httpx
from more_itertools import chunked

from shared import jsontext, logs
from shared.callpolicy import TRANSPORT_ERROR, Breaker, CallPolicy, Hooks, RetryPolicy, Sleep
from shared.errors import AuthError, FatalError, NotFoundError, SyncError, ThrottledError, TransientError
from shared.http import PooledClient, classify, error_detail, transport_error
from shared.odata import literal, record_path

log = logs.get_logger("shared.dataverse")
BATCH_LIMIT = 1000  # operations in one $batch request (Dataverse's documented maximum)
SYSTEM = "dataverse"
# A `$filter` of `or`-joined keys, percent-encoded, stays far below the 32,768 characters Dataverse takes in a URL,
# and holds at most MAX_FILTER_TERMS conditions.
MAX_FILTER_CHARS = 8000
MAX_FILTER_TERMS = 100
API_PATH = "/api/data/v9.2"
TOKEN_MARGIN_S = 300.0
PACE_RECHECK_S = 0.5  # a paced request re-reads its rate at least this often, so a raised rate frees it sooner
MIN_WINDOW_REQUESTS = 5  # fewer requests in the window say little about shares or costs


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
    """What the writes did; requests, answers and retries are the call policy's (`DataverseClient.policy.stats`)."""

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
    pace_margin: float = 0.95  # an instance paces at this share of its share of the ceiling
    alone_above: float = 0.9  # an instance with at least this share of its user's traffic is alone: unpaced
    slow_below: float = 0.10  # below this share of the tighter budget left, pacing slows down towards the floor
    fleet_size: int = 40  # an instance's share is at least half of 1/this (the plan's maximum instance count)

    def boost(self, headroom: float) -> float:
        """The pacing's correction from the headroom: 1 above `slow_below` left, falling to a quarter at the floor
        (for when the fleet spends more than its shares say, or in a first window, which refills nothing). Not
        lower: an instance learns only from answers, and one that barely sends would not see the budget recover."""
        if headroom < self.slow_below:
            return max(0.25, 0.25 + 0.75 * (headroom - self.floor) / (self.slow_below - self.floor))
        return 1.0

    def headroom(self, requests_left: int | None, time_left_ms: float | None) -> float:
        """The tighter of the two budgets, as the share of it left (1.0 when the headers say nothing)."""
        shares = [1.0]
        if time_left_ms is not None:
            shares.append(time_left_ms / self.execution_ms)
        if requests_left is not None:
            shares.append(requests_left / self.requests)
        return max(0.0, min(shares))

    def ceiling_rps(self, cost_ms: float) -> float:
        """Requests per second one application user sustains: the refill rate of the tighter budget."""
        return min(self.execution_ms / self.window_s / max(cost_ms, 1e-3), self.requests / self.window_s)

    def pause_for(self, requests_left: int | None, time_left_ms: float | None) -> float | None:
        """Seconds to wait so that the window refills back to the floor; None when there is room to spare."""
        waits = []
        if time_left_ms is not None and time_left_ms < self.floor * self.execution_ms:
            waits.append((self.floor * self.execution_ms - time_left_ms) / (self.execution_ms / self.window_s) / 1000)
        if requests_left is not None and requests_left < self.floor * self.requests:
            waits.append((self.floor * self.requests - requests_left) / (self.requests / self.window_s))
        return max(waits) if waits else None

    def shortfall(self, requests_left: int | None, time_left_ms: float | None, cost_ms: float) -> float:
        """How far below the floor the budget is, in requests of `cost_ms` each (0 when it is not)."""
        short = 0.0
        if time_left_ms is not None:
            short = (self.floor * self.execution_ms - time_left_ms) / max(cost_ms, 1e-3)
        if requests_left is not None:
            short = max(short, self.floor * self.requests - requests_left)
        return max(0.0, short)

    def roomy(self, requests_left: int | None, time_left_ms: float | None) -> bool:
        return (time_left_ms is None or time_left_ms > 2 * self.floor * self.execution_ms) and (
            requests_left is None or requests_left > 2 * self.floor * self.requests
        )


class RatePacer:
    """Requests per second this instance allows itself for one application user: its share of what the user's
    budget refills.

    Every instance signed in as the same application user spends one budget, and none is told how many others
    there are. The requests-remaining header counts the requests of all of them within the window; the instance
    knows its own, so own / all is its share (1 alone, about 1/40 among forty busy ones), a ratio of two window
    counts that holds steady while instances come and go. Its rate is that share (at least `0.5/fleet_size`, so an
    instance that was idle is not starved) of the user's ceiling, the refill rate of the tighter budget (from the
    cost of a request the headers imply), slowed as the budget nears the floor (`ProtectionLimits.boost`). The
    fleet then spends at about the rate the window refills, steadily, rather than draining the budget and all
    waiting for it at once. Before its first answer an instance sends one request alone. An instance that has the
    user to itself (a share of at least `alone_above`) is not paced: the floor pause and the concurrency caps take
    it closer to the ceiling than pacing would. docs/scaling.md has the measurements behind each choice.
    """

    def __init__(self, limits: ProtectionLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self.rate: float | None = None  # None: no answer yet
        self.alone = False  # nobody else spends this user's budget: the floor and the concurrency caps suffice
        self.share = 1.0
        self._learned = False
        self._full_rate = 0.0
        self._counted: deque[float] = deque()
        self._last_turn = float("-inf")  # when the previous turn was due (not when it was taken)
        self._probing = False  # a request is out before any answer has set the rate

    def counted(self, sent_at: float) -> None:
        """One of our requests the service counted (answered, not refused), by when it was sent."""
        self._counted.append(sent_at)

    def update(self, cost_ms: float, window_requests: int | None, in_flight: int = 0) -> None:
        """Learn the share from one answer's window count (which holds our `in_flight` requests too, admitted but not
        answered yet); the rate it allows is set by `slow`."""
        horizon = self._clock() - self.limits.window_s
        while self._counted and self._counted[0] <= horizon:
            self._counted.popleft()
        if window_requests is not None and window_requests >= MIN_WINDOW_REQUESTS:
            # the count just went up by the request answered: half a request less is its average since the last
            # answer (without that, forty instances' shares add up to about 1.1 and together they overspend)
            sample = min(1.0, max(0.5, len(self._counted) + in_flight - 0.5) / window_requests)
            self.share = sample if not self._learned else 0.5 * self.share + 0.5 * sample
            self._learned = True
        self.alone = self._learned and self.share >= self.limits.alone_above
        share = max(self.share, 0.5 / self.limits.fleet_size)  # at least half a fair share: none starves
        self._full_rate = self.limits.ceiling_rps(cost_ms) * share * self.limits.pace_margin

    @property
    def interval(self) -> float:
        """Seconds from one of this instance's requests to its next, at the pace before any slowing down."""
        return 1.0 / self._full_rate if self._full_rate else 0.0

    def slow(self, headroom: float) -> None:
        """Set the rate: the share's, slowed as the budget left nears the floor."""
        self.rate = self._full_rate * self.limits.boost(headroom)

    async def turn(self, sleep: Sleep) -> None:
        """Wait until 1 / rate seconds have passed since this instance's previous turn was due, and take the turn.
        Until an answer has set the rate, requests go one at a time: each waits for the one before it to end
        (`settle`), however it ends."""
        while not self.alone:
            now = self._clock()
            if self.rate is None:
                if not self._probing:
                    self._probing = True
                    self._last_turn = now
                    return
                await sleep(PACE_RECHECK_S)
                continue
            interval = 1.0 / self.rate
            due = self._last_turn + interval
            if now >= due:
                # the next turn is due one interval after this one was, not after it was taken: a turn taken late
                # (a busy event loop) does not push every later one back; after an idle spell, no burst either
                self._last_turn = due if now - due < interval else now
                return
            await sleep(min(due - now, PACE_RECHECK_S))

    def refill_wait(self, shortfall: float) -> float | None:
        """Seconds until the window has refilled by `shortfall` requests, from when this instance's own requests leave
        it: at its share, each of its requests leaving stands for 1/share of the user's. A window refills with what
        was spent one window ago, which is nothing at all in the first window: the limit's average refill rate would
        bring every instance back too early into a budget still empty. None without the history to tell."""
        if self.alone or not self._learned or not self._counted:
            return None
        needed = max(1, math.ceil(shortfall * self.share))
        if needed > len(self._counted):
            return None
        return max(0.0, self._counted[needed - 1] + self.limits.window_s - self._clock())

    def spread(self) -> float:
        """A random part of this instance's interval between requests: added to a pause at the floor, so that the
        instances which all saw the budget low at about the same moment come back one by one, at about the rate the
        fleet paces at, and not all at once into a window that holds room for a few."""
        if self.alone:
            return 0.0
        return random.uniform(0.0, self.interval)  # noqa: S311 - spreading requests, not a secret

    def settle(self) -> None:
        """A request that took its turn has ended (answered, refused, or failed on the way)."""
        self._probing = False


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
        self.pacer = RatePacer(limits)
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
        """Pause this identity's requests; up to a quarter longer at random, so that instances told the same
        Retry-After do not all come back at the same moment."""
        jitter = random.uniform(1.0, 1.25)  # noqa: S311 - spreading retries, not a secret
        self.blocked_until = max(self.blocked_until, time.monotonic() + seconds * jitter)

    def observe(self, response: httpx.Response, duration_ms: float) -> None:
        """Pace from Dataverse's remaining-budget headers, so the limits are approached and not tripped.

        The rate of requests follows this instance's share of the user's refill (`RatePacer`). Below the floor,
        the identity pauses until the window has refilled to it (read from when this instance's own requests leave
        the window while it shares the user, at the limit's average refill rate alone) and then probes with one
        request. Above it, concurrency is capped so that the requests in flight (each costing about a request's
        average cost) fit in what is left above the floor.
        """
        requests_left = _header_int(response, "x-ms-ratelimit-burst-remaining-xrm-requests")
        time_left = _header_int(response, "x-ms-ratelimit-time-remaining-xrm-requests")
        self._raise_limits(requests_left, time_left)
        self._learn_cost(time_left, duration_ms)
        window_requests = None if requests_left is None else max(0, self.limits.requests - requests_left)
        window_cost = self._window_cost(window_requests, time_left, duration_ms)
        self.pacer.update(window_cost, window_requests, in_flight=self.limit.in_flight - 1)  # less the one answered
        self.pacer.slow(self.limits.headroom(requests_left, time_left))
        pause = self.limits.pause_for(requests_left, time_left)
        if pause is not None:
            shortfall = self.limits.shortfall(requests_left, time_left, window_cost)
            from_history = self.pacer.refill_wait(shortfall)
            pause = from_history if from_history is not None else pause
            self.limit.limit = 1.0  # after the pause, one request probes the refilled window before others follow
            self.block(pause + self.pacer.spread())
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

    def _raise_limits(self, requests_left: int | None, time_left: int | None) -> None:
        """A budget can never have more left than it holds: more left than configured means the tenant's limits are
        higher than the settings say. Use what the headers show, and say so when it changes."""
        requests = max(self.limits.requests, requests_left or 0)
        execution_ms = max(self.limits.execution_ms, float(time_left or 0))
        if (requests, execution_ms) == (self.limits.requests, self.limits.execution_ms):
            return
        log.warning(
            "dataverse: application user %s has more budget left than DATAVERSE_LIMIT_REQUESTS / "
            "DATAVERSE_LIMIT_EXECUTION_SECONDS allow (%d requests, %.0f s); pacing with what Dataverse reports",
            self.name,
            requests,
            execution_ms / 1000,
        )
        self.limits = replace(self.limits, requests=requests, execution_ms=execution_ms)
        self.pacer.limits = self.limits

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

    def _window_cost(self, window_requests: int | None, time_left: int | None, duration_ms: float) -> float:
        """What a request costs on average across everyone signed in as this user: the execution time spent in the
        window over the requests made in it (the drop between two answers of one instance also holds what other
        instances spent meanwhile). The request's duration, which errs high, until the window says enough."""
        if window_requests is not None and time_left is not None and window_requests >= MIN_WINDOW_REQUESTS:
            return max(1.0, self.limits.execution_ms - time_left) / window_requests
        return duration_ms

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


class DataverseClient(PooledClient):
    def __init__(
        self,
        config: DataverseClientConfig,
        identities: Mapping[str, Credential],
        *,
        verify: Any = True,
        breaker: Breaker | None = None,
        hooks: Hooks | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        if not identities:
            raise ValueError("at least one application user (credential) is needed")
        if not config.org_url.startswith("https://"):
            raise ValueError("the Dataverse URL must be https://")
        self.config = config
        self.stats = ClientStats()
        self._sleep = sleep or asyncio.sleep
        # No rate limiter here: each application user paces itself (RatePacer) inside `_send_once`.
        self.policy = CallPolicy(SYSTEM, config.retry, breaker=breaker, hooks=hooks, sleep=sleep)
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

    # ---- one request, through an identity ----

    def _pick(self) -> Identity:
        now = time.monotonic()
        return min(self.identities, key=lambda i: (i.blocked_until > now, i.limit.in_flight / i.limit.limit))

    async def _send_once(self, method: str, path: str, *, operation: str, **kwargs: Any) -> httpx.Response:
        while True:
            identity = self._pick()
            await identity.wait_unblocked(self._sleep)
            await identity.pacer.turn(self._sleep)
            try:
                async with identity.limit.slot():
                    if identity.blocked_until > time.monotonic():
                        continue  # blocked while this request waited for a slot: wait again, holding nothing
                    return await self._attempt(identity, method, path, operation=operation, **kwargs)
            finally:
                identity.pacer.settle()

    async def _attempt(
        self, identity: Identity, method: str, path: str, *, operation: str, **kwargs: Any
    ) -> httpx.Response:
        for refreshed in (False, True):
            token = await identity.token(refresh=refreshed)
            headers = {"Authorization": f"Bearer {token}", **kwargs.pop("headers", {})}
            sent = time.monotonic()
            try:
                response = await self._http.request(method, path, headers=headers, **kwargs)
            except httpx.HTTPError as exc:
                self.policy.answered(method, operation, TRANSPORT_ERROR)
                raise transport_error(exc, system=SYSTEM, operation=operation) from None
            self.policy.answered(method, operation, response.status_code)
            if response.status_code != 429:
                identity.pacer.counted(sent)
            if response.status_code == 401 and not refreshed:
                self.stats.unauthorized_refreshes += 1
                kwargs["headers"] = {k: v for k, v in headers.items() if k != "Authorization"}
                continue
            break
        try:
            classify(response, system=SYSTEM, operation=operation)
        except ThrottledError as exc:
            identity.block(exc.retry_after if exc.retry_after is not None else 1.0)
            identity.limit.on_throttle()
            raise
        identity.observe(response, (time.monotonic() - sent) * 1000)
        return response

    async def _send(self, method: str, path: str, *, operation: str, **kwargs: Any) -> httpx.Response:
        async def once() -> httpx.Response:
            return await self._send_once(method, path, operation=operation, **dict(kwargs))

        return await self.policy.call(once, what=f"dataverse {operation}")

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
        chunks = list(chunked(unique, size))
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
                content=jsontext.dumps({"Targets": [r.target(table) for r in rows]}).encode(),
                headers={"Content-Type": "application/json"},
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

    async def _write_batch(self, table: TableRef, rows: list[UpsertRow], method: str = "PATCH") -> list[RowOutcome]:
        """Upserts as PATCH requests (or deletes, DELETE) in one `$batch` (continue on error): each row gets its own
        answer. Rows answered 429 or 5xx make the answer partial: the call policy sends those again in a new
        `$batch`."""
        pending: list[UpsertRow] = list(rows)
        done: list[RowOutcome] = []

        async def once() -> list[UpsertRow]:
            nonlocal pending
            body, headers = _batch_request(table, pending, method)
            response = await self._send_once(
                "POST", "$batch", operation=f"$batch {table.entity_set}", content=body, headers=headers
            )
            settled, pending = _batch_outcomes(pending, parse_batch_response(response), gone_is_done=method == "DELETE")
            done.extend(settled)
            return pending

        try:
            left = await self.policy.call(once, what=f"dataverse $batch {table.entity_set}", partial=bool)
        except AuthError:
            raise
        except (TransientError, FatalError) as exc:
            return done + [RowOutcome(r, "failed", error=exc.to_dict()) for r in pending]
        unanswered = {"message": f"no answer in $batch after {self.config.retry.attempts} attempts"}
        return done + [RowOutcome(r, "failed", error=unanswered) for r in left]

    async def delete_many(self, table: TableRef, keys: Sequence[Mapping[str, Any]]) -> list[RowOutcome]:
        """Delete records by key, DELETE requests in `$batch`es of up to `chunk_size`: one request for many records,
        never one each. Each outcome's status is `written` when the record is deleted (or was gone already),
        `rejected` or `failed` otherwise, as for upserts."""
        rows = [UpsertRow(dict(key), {}) for key in keys]
        outcomes: list[RowOutcome] = []
        for part in chunked(rows, max(1, min(self.config.chunk_size, BATCH_LIMIT))):
            outcomes += await self._write_batch(table, list(part), method="DELETE")
        return outcomes

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
        body: dict[str, Any] = jsontext.loads(response.content)  # amounts as Decimal, exactly as the CRM holds them
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
            body = jsontext.loads(response.content)
            yield list(body.get("value") or [])
            url, params = body.get("@odata.nextLink"), {}

    async def read_where(
        self, table: TableRef, column: str, values: Iterable[Any], *, select: Sequence[str] = ()
    ) -> list[dict[str, Any]]:
        """The rows whose `column` holds one of `values` (alternate keys, or a lookup's `_x_value` GUIDs): `$filter`s
        of `or`-joined `eq` terms, as many values a request as fit (MAX_FILTER_CHARS, MAX_FILTER_TERMS), every page
        followed, the requests `max_concurrency` at a time. Never a GET per record."""
        filters = filter_chunks(column, values)
        gate = asyncio.Semaphore(max(1, self.config.max_concurrency))

        async def one(text: str) -> list[dict[str, Any]]:
            async with gate:
                return [row async for page in self.read_pages(table, select=select, filter=text) for row in page]

        return [row for rows in await asyncio.gather(*(one(f) for f in filters)) for row in rows]


def filter_chunks(
    column: str, values: Iterable[Any], *, limit: int = MAX_FILTER_CHARS, terms_max: int = MAX_FILTER_TERMS
) -> list[str]:
    """`column eq v1 or column eq v2 ...` filters, each at most `limit` characters once percent-encoded as a URL
    carries it (a non-ASCII key takes up to twelve), every value once, escaped."""
    out: list[str] = []
    terms: list[str] = []
    size = 0
    for value in dict.fromkeys(values):
        term = f"{column} eq {literal(value)}"
        cost = len(quote(term)) + len("%20or%20")
        if terms and (size + cost > limit or len(terms) >= terms_max):
            out.append(" or ".join(terms))
            terms, size = [], 0
        terms.append(term)
        size += cost
    if terms:
        out.append(" or ".join(terms))
    return out


def _batch_request(table: TableRef, rows: Sequence[UpsertRow], method: str = "PATCH") -> tuple[bytes, dict[str, str]]:
    boundary = f"batch_{uuid.uuid4()}"
    parts = [
        f"--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
        f"Content-ID: {i + 1}\r\n\r\n{method} {record_path(table.entity_set, row.key)} HTTP/1.1\r\n"
        + (
            f"Content-Type: application/json\r\n\r\n{jsontext.dumps({**row.values, **row.key})}\r\n"
            if method == "PATCH"
            else "\r\n\r\n"
        )
        for i, row in enumerate(rows)
    ]
    body = "".join(parts) + f"--{boundary}--\r\n"
    return body.encode(), {"Content-Type": f"multipart/mixed; boundary={boundary}", "Prefer": "odata.continue-on-error"}


def _batch_outcomes(
    rows: Sequence[UpsertRow], answers: Sequence[tuple[int, dict[str, str], bytes]], *, gone_is_done: bool = False
) -> tuple[list[RowOutcome], list[UpsertRow]]:
    """Each row's answer: written or rejected (settled), or to send again (429, 5xx, no answer at all)."""
    settled: list[RowOutcome] = []
    again: list[UpsertRow] = []
    for index, row in enumerate(rows):
        status, part_headers, part_body = answers[index] if index < len(answers) else (503, {}, b"")
        if 200 <= status < 300 or (gone_is_done and status == 404):
            entity = part_headers.get("odata-entityid", "")
            record_id = entity[entity.rfind("(") + 1 : -1] if entity.endswith(")") else None
            settled.append(RowOutcome(row, "written", record_id=record_id))
        elif status == 429 or status >= 500:
            again.append(row)
        else:
            code, message = error_detail(part_body, limit=500)
            error = {"status_code": status, "code": code, "message": message, "type": "FatalError"}
            settled.append(RowOutcome(row, "rejected", error=error))
    return settled, again


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


def _row_error(exc: SyncError) -> dict[str, Any]:
    """What a dead-letter row holds about Dataverse's refusal: its code and message, nothing of the request."""
    return {"status_code": exc.status_code, "code": exc.code, "message": str(exc), "type": type(exc).__name__}
