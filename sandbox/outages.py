"""Outage windows of a fault profile, shared by the simulators: connections cut after the status line."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from sandbox.faults import Outage


class Drop(Exception):
    """Raised after the status line is sent: uvicorn then closes the connection, and the client sees a transport
    error, as when the service is down (the listening socket stays open: to a client, refused and cut are alike)."""


class _HideDrops(logging.Filter):
    """Outages cut connections on purpose; uvicorn would log each one as an application error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], Drop))


logging.getLogger("uvicorn.error").addFilter(_HideDrops())


class OutageClock:
    """Outage windows count from the first request the simulator serves."""

    def __init__(self, outages: Sequence[Outage]) -> None:
        self.outages = tuple(outages)
        self.first_request: float | None = None

    def start(self) -> bool:
        """Note the first request; True the first time (when background work should start)."""
        if self.first_request is not None:
            return False
        self.first_request = time.monotonic()
        return True

    def down(self) -> bool:
        if self.first_request is None:
            return False
        elapsed = time.monotonic() - self.first_request
        return any(o.start_s <= elapsed < o.start_s + o.duration_s for o in self.outages)
