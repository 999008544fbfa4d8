"""The call policy: retries bounded by attempts, Retry-After, partial answers, the breaker and the hooks."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.callpolicy import PARTIAL, Answered, CallPolicy, Hooks, RetryPolicy
from shared.errors import AuthError, CircuitOpenError, SilentThrottleError, ThrottledError, TransientError

pytestmark = pytest.mark.anyio


@dataclass
class Slept:
    seconds: list[float] = field(default_factory=list)

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


@dataclass
class FakeBreaker:
    """Counts what the policy tells it; refuses every call when `open`."""

    open: bool = False
    checks: int = 0
    failures: int = 0
    successes: int = 0

    async def before_call(self) -> None:
        self.checks += 1
        if self.open:
            raise CircuitOpenError("breaker 'x' is open", system="x")

    async def record_success(self) -> None:
        self.successes += 1

    async def record_failure(self) -> None:
        self.failures += 1


async def test_retries_are_bounded_by_attempts_and_the_last_error_propagates() -> None:
    calls, slept, breaker = 0, Slept(), FakeBreaker()

    async def always_transient() -> None:
        nonlocal calls
        calls += 1
        raise TransientError(f"failure {calls}")

    policy = CallPolicy("x", RetryPolicy(attempts=4), breaker=breaker, sleep=slept)
    with pytest.raises(TransientError, match="failure 4"):
        await policy.call(always_transient, what="t")
    assert calls == 4
    assert len(slept.seconds) == 3
    assert (breaker.checks, breaker.failures, breaker.successes) == (1, 1, 0)  # one call, counted once
    assert policy.stats.retried == {"TransientError": 3}


async def test_fatal_errors_are_not_retried_and_do_not_count_against_the_breaker() -> None:
    calls, breaker = 0, FakeBreaker()

    async def fatal() -> None:
        nonlocal calls
        calls += 1
        raise AuthError("no")

    with pytest.raises(AuthError):
        await CallPolicy("x", RetryPolicy(attempts=5), breaker=breaker).call(fatal, what="t")
    assert calls == 1
    assert (breaker.failures, breaker.successes) == (0, 0)


async def test_an_open_breaker_refuses_the_call_before_anything_is_sent() -> None:
    calls = 0

    async def attempt() -> int:
        nonlocal calls
        calls += 1
        return 1

    with pytest.raises(CircuitOpenError):
        await CallPolicy("x", RetryPolicy(), breaker=FakeBreaker(open=True)).call(attempt, what="t")
    assert calls == 0


@settings(max_examples=50, deadline=None)
@given(st.floats(min_value=0, max_value=10_000, allow_nan=False))
async def test_retry_after_is_obeyed_up_to_its_cap(retry_after: float) -> None:
    slept = Slept()
    answers = [ThrottledError("429", retry_after=retry_after)]

    async def attempt() -> str:
        if answers:
            raise answers.pop()
        return "ok"

    policy = CallPolicy("x", RetryPolicy(attempts=2, total_s=10**6, cap_s=20), sleep=slept)
    assert await policy.call(attempt, what="t") == "ok"
    assert slept.seconds == [min(retry_after, 80.0)]


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=2, max_value=12))
async def test_backoff_is_full_jitter_below_a_doubling_ceiling(attempts: int) -> None:
    slept = Slept()

    async def failing() -> None:
        raise TransientError("again")

    policy = CallPolicy("x", RetryPolicy(attempts=attempts, total_s=10**6, base_s=0.5, cap_s=20), sleep=slept)
    with pytest.raises(TransientError):
        await policy.call(failing, what="t")
    assert len(slept.seconds) == attempts - 1
    for n, seconds in enumerate(slept.seconds, start=1):
        assert 0 <= seconds <= min(20, 0.5 * 2**n)


async def test_a_partial_answer_is_asked_again_and_the_last_one_returned_when_attempts_run_out() -> None:
    breaker, slept = FakeBreaker(), Slept()
    left = [5, 3, 2, 2]

    async def attempt() -> list[int]:
        return list(range(left.pop(0)))

    policy = CallPolicy("x", RetryPolicy(attempts=4), breaker=breaker, sleep=slept)
    assert await policy.call(attempt, what="t", partial=bool) == [0, 1]
    assert policy.stats.retried == {PARTIAL: 3}
    assert (breaker.failures, breaker.successes) == (1, 0)  # still partial at the end: a failure


async def test_a_partial_answer_completed_on_a_later_attempt_is_a_success() -> None:
    breaker = FakeBreaker()
    left = [[1, 2], [2], []]

    async def attempt() -> list[int]:
        return left.pop(0)

    policy = CallPolicy("x", RetryPolicy(attempts=6), breaker=breaker, sleep=Slept())
    assert await policy.call(attempt, what="t", partial=bool) == []
    assert (breaker.failures, breaker.successes) == (0, 1)


async def test_the_hooks_see_every_answer_and_every_retry() -> None:
    answers: list[Answered] = []
    retries: list[BaseException | None] = []
    outcomes: list[BaseException | None] = [SilentThrottleError("empty page"), None]
    policy = CallPolicy("x", RetryPolicy(attempts=3), hooks=Hooks(answers.append, retries.append), sleep=Slept())

    async def attempt() -> str:
        policy.answered("GET", "/v1/invoices", 200)
        error = outcomes.pop(0)
        if error is not None:
            raise error
        return "ok"

    assert await policy.call(attempt, what="t") == "ok"
    assert answers == [Answered("GET", "/v1/invoices", "200")] * 2
    assert [type(e).__name__ for e in retries] == ["SilentThrottleError"]
    assert policy.stats.by_status() == {"200": 2}
