"""Webhook coalescing (`shared.coalesce`) against Azurite: the events of a window become one drain message, an id
changed twice counts once, instances share one claim per window, and an event at a window's edge is not left behind.
The clock is faked: each call of `at(...)` answers the next of the times given."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import coalesce, messages
from shared.runtime import Runtime
from tests.shared.runtimes import runtime_for

pytestmark = pytest.mark.anyio
WIDTH = 2.0
MIDDLE = 1_000_000.5  # in the window [1_000_000, 1_000_002): far from its end


@pytest.fixture
async def runtime(conn: str) -> AsyncIterator[Runtime]:
    async with runtime_for(conn, WEBHOOK_COALESCE_SECONDS=str(WIDTH)) as built:
        yield built


def at(*times: float) -> Callable[[], float]:
    """A clock answering `times` in turn (the last one from then on)."""
    answers = iter(times)
    last = [times[0]]

    def now() -> float:
        last[0] = next(answers, last[0])
        return last[0]

    return now


async def on_queue(runtime: Runtime) -> int:
    return int((await runtime.queue.get_queue_properties()).approximate_message_count or 0)


async def test_the_events_of_a_window_wait_in_one_place_and_one_drain_message_is_sent(runtime: Runtime) -> None:
    windows = {await coalesce.add(runtime, "invoices", i, clock_s=at(MIDDLE)) for i in ("in_1", "in_2", "in_1", "in_3")}
    assert windows == {"invoices-500000"}
    assert sorted(await coalesce.pending(runtime, "invoices-500000")) == ["in_1", "in_2", "in_3"]  # in_1 once
    assert await on_queue(runtime) == 1  # the drain, invisible until the window closes
    coalesce._CLAIMED.clear()  # another instance, which has not seen the claim
    await coalesce.add(runtime, "invoices", "in_4", clock_s=at(MIDDLE + 0.5))
    assert await on_queue(runtime) == 1  # the claim holds across instances
    await coalesce.add(runtime, "customers", "cus_1", clock_s=at(MIDDLE))
    assert await on_queue(runtime) == 2  # each entity has its window


async def test_an_event_at_the_edge_of_a_window_goes_into_the_next_one(runtime: Runtime) -> None:
    edge = 1_000_001.8  # 0.2 s before its window closes: the drain could read before this row is written
    assert await coalesce.add(runtime, "invoices", "in_9", clock_s=at(edge)) == "invoices-500001"
    assert await on_queue(runtime) == 1  # the next window's drain alone


async def test_a_row_written_after_its_window_closed_is_also_sent_on_its_own(runtime: Runtime) -> None:
    slow = at(MIDDLE, 1_000_002.4)  # the write took until after the window closed: its drain may have read it
    assert await coalesce.add(runtime, "invoices", "in_7", clock_s=slow) == "invoices-500000"
    assert await on_queue(runtime) == 2  # the window's drain, and the event itself
    sent = [messages.parse(m.content) async for m in runtime.queue.receive_messages(max_messages=32)]
    assert [(m.kind, m.ids) for m in sent if m.kind == "sync"] == [("sync", ("in_7",))]  # (the drain may be visible)


async def test_a_drained_window_is_forgotten_and_old_windows_are_purged(runtime: Runtime) -> None:
    for record_id in ("in_1", "in_2"):
        await coalesce.add(runtime, "invoices", record_id, clock_s=at(MIDDLE))
    await coalesce.forget(runtime, "invoices-500000", ["in_1", "in_2"])
    await coalesce.forget(runtime, "invoices-500000", ["in_1"])  # a drain delivered twice: nothing left to delete
    assert await coalesce.pending(runtime, "invoices-500000") == []
    await coalesce.add(runtime, "invoices", "in_3", clock_s=at(MIDDLE))
    assert await coalesce.purge(runtime, older_than_s=3600) == 0
    assert await coalesce.purge(runtime, older_than_s=-60) == 2  # the row and the window's claim
    assert await coalesce.pending(runtime, "invoices-500000") == []


@given(st.floats(min_value=0, max_value=4e9), st.sampled_from([0.5, 1.0, 2.0, 2.5, 60.0]))
def test_every_moment_falls_in_exactly_one_window_and_its_key_names_it(now: float, width: float) -> None:
    key, closes = coalesce.window_of("invoices", now, width)
    assert closes - width <= now < closes
    later, _ = coalesce.window_of("invoices", closes, width)
    assert int(later.rsplit("-", 1)[1]) == int(key.rsplit("-", 1)[1]) + 1  # the next moment opens the next one
