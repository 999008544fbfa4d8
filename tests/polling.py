"""Waiting for a condition in tests: poll it with a generous bound, never a fixed sleep."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import pytest


class _Deadline:
    def __init__(self, within: float, what: str) -> None:
        self.within = within
        self.what = what
        self.at = time.monotonic() + within

    def check(self) -> None:
        if time.monotonic() > self.at:
            pytest.fail(f"timed out after {self.within:.0f} s waiting for {self.what}")


def wait_until(predicate: Callable[[], Any], *, within: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll `predicate` until it returns something truthy, and return that; fail the test after `within` seconds."""
    deadline = _Deadline(within, what or repr(predicate))
    while not (result := predicate()):
        deadline.check()
        time.sleep(interval)
    return result


async def eventually(
    predicate: Callable[[], Any], *, within: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """`wait_until` inside an event loop; `predicate` may be a coroutine function."""
    deadline = _Deadline(within, what or repr(predicate))
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        deadline.check()
        await asyncio.sleep(interval)
