"""One call policy per outside system: how every call to billing, or to Dataverse, is made.

In the spirit of stamina's and dlt's retry helpers, one small object owns, for one system:

- the circuit breaker (`shared.breaker`): asked before every call, told how the call ended once its retries are
  spent; an open breaker raises `CircuitOpenError` before anything is sent;
- the rate limiter, when the system has one budget per client (billing): every attempt waits its turn. Dataverse
  paces per application user inside its client (`shared.dataverse.client.RatePacer`) and passes none;
- retries, with tenacity: `TransientError` (timeouts, 5xx, 429, silent throttling), bounded by attempts *and* total
  time; `Retry-After` honoured when given (capped), full-jitter exponential back-off otherwise; an answer that is
  only partly there (`partial`) retried the same way, its last state returned when the attempts run out;
- hooks: `on_request` for every HTTP answer and `on_retry` for every retry, which the runtime points at the API
  metrics (`shared.telemetry`); the same events are counted in `stats` for summaries and tests.

The numbers come from `Settings` (README, configuration: `*_RETRY_ATTEMPTS`, `*_RETRY_SECONDS`,
`*_RETRY_BACKOFF_MAX_SECONDS`, `BREAKER_FAILURE_THRESHOLD`, `BREAKER_OPEN_SECONDS`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from aiolimiter import AsyncLimiter
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    retry_if_result,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from shared import logs
from shared.errors import SyncError, TransientError

log = logs.get_logger("shared.callpolicy")
T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
TRANSPORT_ERROR = "transport-error"  # the status of a request that got no HTTP answer


class Breaker(Protocol):
    async def before_call(self) -> None: ...
    async def record_success(self) -> None: ...
    async def record_failure(self) -> None: ...


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded by attempts and by total time; back-off with full jitter from `base_s` up to `cap_s`."""

    attempts: int = 6
    total_s: float = 60.0
    base_s: float = 0.5
    cap_s: float = 20.0

    @property
    def retry_after_cap_s(self) -> float:
        """The longest `Retry-After` obeyed as given (a longer one is cut to this)."""
        return self.cap_s * 4


@dataclass(frozen=True)
class Answered:
    """One HTTP answer: the route is a template (`/v1/invoices/{id}`), never a record's id."""

    method: str
    route: str
    status: str  # "200", "429", ... or TRANSPORT_ERROR


PARTIAL = "partial answer"  # the retry reason of an answer that was only partly there


@dataclass
class CallStats:
    requests: Counter[Answered] = field(default_factory=Counter)
    retried: Counter[str] = field(default_factory=Counter)  # by reason: the error's class name, or PARTIAL

    @property
    def retries(self) -> int:
        return sum(self.retried.values())

    def by_status(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for answered, n in self.requests.items():
            out[answered.status] += n
        return out


@dataclass(frozen=True)
class Hooks:
    on_request: Callable[[Answered], None] | None = None
    on_retry: Callable[[BaseException | None], None] | None = None  # None: a partial answer is asked again


class _RetryAfterOr:
    """tenacity wait: the error's `Retry-After` when it has one (capped), else the fallback back-off."""

    def __init__(self, fallback: Callable[[RetryCallState], float], cap_s: float) -> None:
        self.fallback, self.cap_s = fallback, cap_s

    def __call__(self, state: RetryCallState) -> float:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None and outcome.failed else None
        if isinstance(error, SyncError) and error.retry_after is not None:
            return min(error.retry_after, self.cap_s)
        return self.fallback(state)


class CallPolicy:
    def __init__(
        self,
        system: str,
        retry: RetryPolicy,
        *,
        breaker: Breaker | None = None,
        limiter: AsyncLimiter | None = None,
        hooks: Hooks | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        self.system = system
        self.retry = retry
        self.breaker = breaker
        self.limiter = limiter
        self.hooks = hooks or Hooks()
        self.stats = CallStats()
        self._sleep = sleep
        backoff = wait_random_exponential(multiplier=retry.base_s, max=retry.cap_s)  # full jitter
        self._wait = _RetryAfterOr(backoff, retry.retry_after_cap_s)

    async def pace(self) -> None:
        """Before every attempt: the rate limiter's turn (none: at once)."""
        if self.limiter is not None:
            await self.limiter.acquire()

    def answered(self, method: str, route: str, status: int | str) -> None:
        """After every attempt: count the answer and tell the hook."""
        answer = Answered(method, route, str(status))
        self.stats.requests[answer] += 1
        if self.hooks.on_request is not None:
            self.hooks.on_request(answer)

    async def call(
        self, attempt: Callable[[], Awaitable[T]], *, what: str, partial: Callable[[T], bool] | None = None
    ) -> T:
        """Run `attempt` through the breaker and the retries. The last error propagates; with `partial`, an answer
        still partial when the attempts run out is returned (and counted as a failure by the breaker)."""
        if self.breaker is not None:
            await self.breaker.before_call()
        try:
            result = await self._retrying(attempt, what, partial)
        except TransientError:
            if self.breaker is not None:
                await self.breaker.record_failure()
            raise
        if self.breaker is not None:
            await (self.breaker.record_failure() if partial and partial(result) else self.breaker.record_success())
        return result

    async def _retrying(self, attempt: Callable[[], Awaitable[T]], what: str, partial: Callable[[T], bool] | None) -> T:
        retry: Any = retry_if_exception_type(TransientError)
        if partial is not None:
            retry = retry | retry_if_result(partial)
        extra: dict[str, Any] = {"sleep": self._sleep} if self._sleep is not None else {}
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.retry.attempts) | stop_after_delay(self.retry.total_s),
            wait=self._wait,
            retry=retry,
            before_sleep=lambda state: self._before_sleep(state, what),
            retry_error_callback=_last_answer,
            **extra,
        )
        result: T = await retrying(attempt)
        return result

    def _before_sleep(self, state: RetryCallState, what: str) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None and outcome.failed else None
        self.stats.retried[type(error).__name__ if error is not None else PARTIAL] += 1
        log.warning(
            "%s: attempt %d %s; again in %.2f s", what, state.attempt_number,
            f"failed ({error})" if error is not None else "answered only in part", state.upcoming_sleep,
        )  # fmt: skip
        if self.hooks.on_retry is not None:
            self.hooks.on_retry(error)


def _last_answer(state: RetryCallState) -> Any:
    """When the attempts run out: the last error is raised, or the last (partial) answer returned."""
    outcome = state.outcome
    assert outcome is not None  # noqa: S101 - tenacity calls this after an attempt
    return outcome.result()
