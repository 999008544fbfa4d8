"""Empty-queue polling back-off."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from sandbox.host.queues import MIN_POLL_S, next_poll_delay


@given(st.integers(min_value=0, max_value=2**32), st.floats(min_value=0.1, max_value=600))
def test_backoff_grows_to_the_maximum_and_stays_within_bounds(seed: int, maximum: float) -> None:
    rng = random.Random(seed)
    delay = MIN_POLL_S
    delays = []
    for _ in range(40):
        delay = next_poll_delay(delay, maximum, rng)
        delays.append(delay)
    assert all(MIN_POLL_S <= d <= max(maximum, MIN_POLL_S) for d in delays)
    assert delays[-1] == max(maximum, MIN_POLL_S)  # 40 doublings reach any maximum up to 10 minutes


def test_first_delays_double_roughly() -> None:
    rng = random.Random(1)
    first = next_poll_delay(MIN_POLL_S, 60, rng)
    second = next_poll_delay(first, 60, rng)
    assert 0.16 <= first <= 0.24
    assert 1.6 * first <= second <= 2.4 * first
