"""Dataverse service protection, per caller identity, over a sliding window (docs/dataverse.md)."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from sandbox.faults import ServiceProtection

# Dataverse's own codes and messages for the three limits.
REQUESTS = ("0x80072322", "Number of requests exceeded the limit of {limit} over time window of {window} seconds.")
EXECUTION = (
    "0x80072321",
    "Combined execution time of incoming requests exceeded limit of {limit} milliseconds over time window of "
    "{window} seconds. Decrease number of concurrent requests or reduce the duration of requests and try again later.",
)
CONCURRENCY = ("0x80072326", "Number of concurrent requests exceeded the limit of {limit}.")


@dataclass
class Refusal:
    code: str
    message: str
    retry_after_s: float


@dataclass
class _Caller:
    requests: deque[float] = field(default_factory=deque)
    execution: deque[tuple[float, float]] = field(default_factory=deque)
    execution_total: float = 0.0
    in_flight: int = 0


class Protection:
    def __init__(self, limits: ServiceProtection, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._callers: defaultdict[str, _Caller] = defaultdict(_Caller)

    def _expire(self, caller: _Caller, now: float) -> None:
        horizon = now - self.limits.window_s
        while caller.requests and caller.requests[0] <= horizon:
            caller.requests.popleft()
        while caller.execution and caller.execution[0][0] <= horizon:
            caller.execution_total -= caller.execution.popleft()[1]

    def admit(self, identity: str) -> Refusal | None:
        """Count a request in, or say why it is refused and for how long."""
        caller = self._callers[identity]
        now = self.clock()
        self._expire(caller, now)
        w = int(self.limits.window_s)
        if caller.in_flight >= self.limits.concurrent:
            code, text = CONCURRENCY
            return Refusal(code, text.format(limit=self.limits.concurrent), 1.0)
        if len(caller.requests) >= self.limits.requests:
            code, text = REQUESTS
            wait = caller.requests[0] + self.limits.window_s - now
            return Refusal(code, text.format(limit=self.limits.requests, window=w), max(wait, 0.1))
        if caller.execution_total >= self.limits.execution_ms:
            code, text = EXECUTION
            # Enough of the oldest charges must leave the window to get back under the limit.
            excess, wait = caller.execution_total - self.limits.execution_ms, 0.0
            for stamp, ms in caller.execution:
                excess -= ms
                wait = stamp + self.limits.window_s - now
                if excess < 0:
                    break
            return Refusal(code, text.format(limit=int(self.limits.execution_ms), window=w), max(wait, 0.1))
        caller.requests.append(now)
        caller.in_flight += 1
        return None

    def remaining(self, identity: str) -> tuple[int, int]:
        """Requests and execution milliseconds left in the window: Dataverse's x-ms-ratelimit-*-remaining-* headers."""
        caller = self._callers[identity]
        self._expire(caller, self.clock())
        return (
            max(0, self.limits.requests - len(caller.requests)),
            max(0, int(self.limits.execution_ms - caller.execution_total)),
        )

    def finish(self, identity: str, execution_ms: float) -> None:
        caller = self._callers[identity]
        caller.in_flight = max(0, caller.in_flight - 1)
        if execution_ms > 0:
            caller.execution.append((self.clock(), execution_ms))
            caller.execution_total += execution_ms
