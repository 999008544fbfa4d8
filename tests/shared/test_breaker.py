"""The circuit breaker: its state machine, its shared state in Azure Tables, and two processes seeing one state."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from azure.data.tables.aio import TableClient

from shared.breaker import BreakerConfig, CircuitBreaker
from shared.errors import CircuitOpenError

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def table(conn: str) -> AsyncIterator[TableClient]:
    client = TableClient.from_connection_string(conn, f"breakers{uuid.uuid4().hex[:10]}")
    await client.create_table()
    yield client
    await client.delete_table()
    await client.close()


def breaker(table: TableClient, clock: FakeClock, **config: float) -> CircuitBreaker:
    settings = {"failure_threshold": 3, "open_for_s": 30.0, "cache_s": 0.0, **config}
    return CircuitBreaker(table, "billing", BreakerConfig(**settings), clock=clock)  # type: ignore[arg-type]


async def test_closed_until_the_threshold_then_open(table: TableClient) -> None:
    clock = FakeClock()
    b = breaker(table, clock)
    for _ in range(2):
        await b.record_failure()
        await b.before_call()  # still closed
    await b.record_failure()
    assert (await b.read()).state == "open"
    with pytest.raises(CircuitOpenError, match="open: calls paused for 30 s") as info:
        await b.before_call()
    assert info.value.retry_after == 30


async def test_a_success_resets_the_count_of_failures(table: TableClient) -> None:
    clock = FakeClock()
    b = breaker(table, clock)
    await b.record_failure()
    await b.record_failure()
    await b.record_success()
    await b.record_failure()
    assert (await b.read()).state == "closed"
    assert (await b.read()).failures == 1


async def test_after_the_open_period_one_caller_probes_and_others_wait(table: TableClient) -> None:
    clock = FakeClock()
    first, second = breaker(table, clock), breaker(table, clock)
    for _ in range(3):
        await first.record_failure()
    clock.now += 31
    await first.before_call()  # the probe
    assert (await first.read()).state == "half_open"
    with pytest.raises(CircuitOpenError, match="half-open"):
        await second.before_call()
    await first.record_success()
    assert (await second.read()).state == "closed"
    await second.before_call()


async def test_a_failed_probe_opens_again(table: TableClient) -> None:
    clock = FakeClock()
    b = breaker(table, clock)
    for _ in range(3):
        await b.record_failure()
    clock.now += 31
    await b.before_call()
    await b.record_failure()
    state = await b.read()
    assert (state.state, state.opened_at) == ("open", clock.now)
    with pytest.raises(CircuitOpenError):
        await b.before_call()


async def test_an_abandoned_probe_is_taken_over_after_the_open_period(table: TableClient) -> None:
    clock = FakeClock()
    b = breaker(table, clock)
    for _ in range(3):
        await b.record_failure()
    clock.now += 31
    await b.before_call()  # this probe never reports back (its worker died)
    clock.now += 31
    await breaker(table, clock).before_call()  # another instance may probe now
    assert (await b.read()).probe_at == clock.now


async def test_concurrent_failures_are_all_counted(table: TableClient) -> None:
    clock = FakeClock()
    instances = [breaker(table, clock, failure_threshold=100) for _ in range(8)]
    await asyncio.gather(*(b.record_failure() for b in instances for _ in range(3)))
    assert (await instances[0].read()).failures == 24


async def test_more_writers_than_write_attempts_are_all_counted(table: TableClient) -> None:
    """Forty concurrent failures against twenty attempts each: without a randomised pause between lost races, the
    writers retry in lock-step and the unlucky ones run out of attempts (CI saw it at 24 writers on a busy machine)."""
    clock = FakeClock()
    instances = [breaker(table, clock, failure_threshold=1000) for _ in range(8)]
    await asyncio.gather(*(b.record_failure() for b in instances for _ in range(5)))
    assert (await instances[0].read()).failures == 40


async def test_two_processes_share_one_state(table: TableClient, conn: str) -> None:
    """This process opens the breaker; a separate Python process sees it open and refuses the call."""
    b = CircuitBreaker(table, "billing", BreakerConfig(failure_threshold=2, open_for_s=600))
    await b.record_failure()
    await b.record_failure()
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from azure.data.tables.aio import TableClient
        from shared.breaker import CircuitBreaker, BreakerConfig
        from shared.errors import CircuitOpenError

        async def main() -> int:
            async with TableClient.from_connection_string(sys.argv[1], {table.table_name!r}) as t:
                b = CircuitBreaker(t, "billing", BreakerConfig(failure_threshold=2, open_for_s=600))
                try:
                    await b.before_call()
                except CircuitOpenError as exc:
                    print("refused:", exc)
                    await b.record_success()  # the other process may also close it for everyone
                    return 0
                print("let through")
                return 1

        sys.exit(asyncio.run(main()))
        """
    )
    with anyio.fail_after(60):
        result = await anyio.run_process([sys.executable, "-c", script, conn], cwd=ROOT, check=False)
    out = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, out
    assert "refused: breaker 'billing' is open" in out
    assert (await b.read()).state == "closed"  # ... and this process sees what the other one wrote
