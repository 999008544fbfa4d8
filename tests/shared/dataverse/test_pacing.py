"""Pacing many instances that share one application user: the arithmetic, then forty clients against the simulator."""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.dataverse_fleet import run as run_fleet
from shared.dataverse.client import Identity, ProtectionLimits, RatePacer
from tests.polling import eventually

LIMITS = ProtectionLimits(window_s=10, requests=1000, execution_ms=100_000)  # 100 requests/s, 10 s of work per s


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_an_instance_paces_at_its_share_of_what_the_user_refills() -> None:
    clock = Clock()
    pacer = RatePacer(LIMITS, clock)
    for i in range(25):
        pacer.counted(clock.now - 5 + i * 0.1)  # 25 of ours in the window
    pacer.update(cost_ms=200, window_requests=100)  # of 100 counted for the user
    pacer.slow(headroom=0.5)
    assert pacer.share == pytest.approx(24.5 / 100)  # the count just rose by the request answered: half of it
    assert not pacer.alone
    # the user's ceiling: 10,000 ms of work per second / 200 ms a request = 50 requests/s (under 100 requests/s)
    assert pacer.rate == pytest.approx(50 * 0.245 * LIMITS.pace_margin)
    pacer.slow(headroom=LIMITS.floor)
    assert pacer.rate == pytest.approx(50 * 0.245 * LIMITS.pace_margin * 0.25)  # near the floor: a quarter


def test_requests_that_left_the_window_no_longer_count_towards_the_share() -> None:
    clock = Clock()
    pacer = RatePacer(LIMITS, clock)
    for _ in range(50):
        pacer.counted(clock.now - 11)  # older than the window
    for _ in range(10):
        pacer.counted(clock.now - 1)
    pacer.update(cost_ms=200, window_requests=100)
    assert pacer.share == pytest.approx(9.5 / 100)


def test_an_instance_alone_on_its_user_is_not_paced() -> None:
    clock = Clock()
    pacer = RatePacer(LIMITS, clock)
    for _ in range(40):
        pacer.counted(clock.now - 1)
    pacer.update(cost_ms=200, window_requests=40)
    pacer.slow(headroom=0.5)
    assert pacer.alone

    async def turns() -> None:
        for _ in range(100):
            await pacer.turn(clock.sleep)

    asyncio.run(turns())
    assert clock.slept == []


def test_a_paced_instance_spaces_its_requests_one_interval_apart() -> None:
    clock = Clock()
    pacer = RatePacer(LIMITS, clock)
    pacer.counted(clock.now)
    pacer.update(cost_ms=200, window_requests=200)  # share 1/400: floored at half of 1/40
    pacer.slow(headroom=0.5)
    interval = 1 / pacer.rate if pacer.rate else 0.0
    assert pacer.share == pytest.approx(0.5 / 200)
    assert interval == pytest.approx(pacer.interval)
    assert interval == pytest.approx(1 / (50 * 0.5 / LIMITS.fleet_size * LIMITS.pace_margin))

    async def turns() -> list[float]:
        taken = []
        for _ in range(4):
            await pacer.turn(clock.sleep)
            taken.append(clock.now)
        return taken

    taken = asyncio.run(turns())
    gaps = [b - a for a, b in itertools.pairwise(taken)]
    assert gaps == [pytest.approx(interval)] * 3


def test_a_turn_taken_late_does_not_push_the_next_ones_back() -> None:
    clock = Clock()
    pacer = RatePacer(LIMITS, clock)
    pacer.counted(clock.now)
    pacer.update(cost_ms=200, window_requests=40)
    pacer.slow(headroom=0.5)
    interval = pacer.interval

    async def turn() -> float:
        await pacer.turn(clock.sleep)
        return clock.now

    first = asyncio.run(turn())
    clock.now += interval * 1.5  # the event loop was busy: the second turn is taken half an interval late
    assert pacer.interval == interval
    second = asyncio.run(turn())
    third = asyncio.run(turn())
    assert second == pytest.approx(first + 1.5 * interval)
    assert third == pytest.approx(first + 2 * interval)  # on the schedule, not an interval after the late one


def test_in_the_first_window_a_pause_lasts_until_this_instances_oldest_requests_leave_it() -> None:
    clock = Clock()
    pacer = RatePacer(LIMITS, clock)
    start = clock.now
    for i in range(10):
        pacer.counted(start + i)  # one request a second, from the window's start
    clock.now = start + 9.5
    pacer.update(cost_ms=200, window_requests=100)  # a tenth of the user's requests
    assert pacer.share == pytest.approx(0.095)
    # 25 requests short: about 2.4 of ours must leave, so the third oldest (sent at start + 2) at start + 12 s
    assert pacer.refill_wait(25) == pytest.approx(start + 2 + LIMITS.window_s - clock.now)
    assert pacer.refill_wait(500) is None  # more than our history can tell: the average refill rate decides
    assert 0 <= pacer.spread() <= pacer.interval


def test_an_instance_alone_waits_by_the_average_refill_rate_and_is_not_spread() -> None:
    clock = Clock()
    pacer = RatePacer(LIMITS, clock)
    for i in range(10):
        pacer.counted(clock.now - i)
    pacer.update(cost_ms=200, window_requests=10)
    assert pacer.alone
    assert pacer.refill_wait(5) is None
    assert pacer.spread() == 0.0


def test_before_any_answer_requests_go_one_at_a_time_whatever_the_first_one_ends_in() -> None:
    clock = Clock()
    pacer = RatePacer(LIMITS, clock)

    async def scenario() -> list[str]:
        events: list[str] = []
        waiting: set[asyncio.Task[Any]] = set()
        ended = asyncio.Event()

        async def sleep_until_one_ends(seconds: float) -> None:
            """The pacer's sleep: fake time passes, and the waiter wakes when a request ends."""
            clock.now += seconds
            task = asyncio.current_task()
            assert task is not None
            waiting.add(task)
            await asyncio.wait_for(ended.wait(), timeout=30)
            waiting.discard(task)

        async def request(name: str) -> None:
            await pacer.turn(sleep_until_one_ends)
            others = 3 - sum(e.endswith("sent") for e in events) - 1
            events.append(f"{name} sent")
            # held out until every request not yet sent is waiting for its turn
            await eventually(lambda: len(waiting) >= others, within=30, what="the other requests waiting")
            events.append(f"{name} ended")
            pacer.settle()  # a failure ends it too: the client settles in a finally
            ended.set()
            ended.clear()

        await asyncio.gather(request("a"), request("b"), request("c"))
        return events

    events = asyncio.run(scenario())
    starts = [e for e in events if e.endswith("sent")]
    assert len(starts) == 3
    for i in range(0, 6, 2):  # sent, ended, sent, ended...: never two out at once
        assert events[i].endswith("sent")
        assert events[i + 1].endswith("ended")


@given(st.floats(min_value=0, max_value=1), st.floats(min_value=0, max_value=1))
def test_the_headroom_correction_never_speeds_up_as_the_budget_empties(a: float, b: float) -> None:
    low, high = sorted((a, b))
    assert 0.25 <= LIMITS.boost(low) <= LIMITS.boost(high) <= 1.0
    assert LIMITS.boost(LIMITS.slow_below) == 1.0
    assert LIMITS.boost(LIMITS.floor) == pytest.approx(0.25)


def _answer(requests_left: int, time_left_ms: int) -> httpx.Response:
    return httpx.Response(
        200,
        headers={
            "x-ms-ratelimit-burst-remaining-xrm-requests": str(requests_left),
            "x-ms-ratelimit-time-remaining-xrm-requests": str(time_left_ms),
        },
    )


def test_a_tenant_with_more_budget_than_configured_is_paced_by_what_dataverse_reports(
    caplog: pytest.LogCaptureFixture,
) -> None:
    identity = Identity("app-1", credential=None, scope="s", max_concurrency=8, limits=LIMITS)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="shared.dataverse"):
        identity.observe(_answer(2500, 90_000), duration_ms=20)
        identity.observe(_answer(2400, 300_000), duration_ms=20)
    assert identity.limits.requests == 2500
    assert identity.limits.execution_ms == 300_000
    assert identity.pacer.limits == identity.limits
    assert [r.getMessage() for r in caplog.records if "DATAVERSE_LIMIT_REQUESTS" in r.getMessage()]
    assert "app-1" in caplog.text


def test_configured_limits_stand_while_dataverse_reports_less_left() -> None:
    identity = Identity("app-1", credential=None, scope="s", max_concurrency=8, limits=LIMITS)  # type: ignore[arg-type]
    identity.observe(_answer(900, 95_000), duration_ms=20)
    assert identity.limits == LIMITS


@pytest.mark.slow
def test_forty_instances_sharing_one_user_lose_nothing_and_few_requests_are_refused() -> None:
    """The fleet benchmark (bench/dataverse_fleet.py), smaller: counts and the 429 share, never a time."""
    outcome = run_fleet(rows=60_000, instances=40, prefix="FT-")
    assert outcome.written == 60_000
    assert outcome.failed == 0
    assert outcome.distinct_in_store == 60_000  # nothing lost, nothing duplicated
    assert outcome.share_429 < 0.02, outcome


def test_an_instance_alone_counts_its_requests_in_flight_and_is_not_paced_while_they_run() -> None:
    """The window's count holds every request Dataverse admitted, ours still running included: left out, an
    instance alone with many requests in flight would see a share of a half and pace itself for nothing."""
    clock = Clock()
    pacer = RatePacer(LIMITS, clock)
    for _ in range(5):
        pacer.counted(clock.now)
    pacer.update(cost_ms=200, window_requests=10, in_flight=5)
    assert pacer.share == pytest.approx(9.5 / 10)
    assert pacer.alone
