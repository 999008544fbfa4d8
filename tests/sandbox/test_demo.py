"""`python -m sandbox demo` (the platform demonstration until the pipeline lands) ends in agreement."""

from __future__ import annotations

import pytest

from sandbox.faults import FaultProfile, HostFaults
from sandbox.platform_demo import run_platform_demo

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def test_demo_accounts_for_every_item_under_host_faults() -> None:
    profile = FaultProfile(seed=5, host=HostFaults(duplicate_delivery_rate=0.05, crash_after_success_rate=0.05))
    assert await run_platform_demo(messages=60, profile=profile, timeout_s=120)
