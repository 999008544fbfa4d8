"""Calling a user function the way the Python worker does: sync ones on a thread pool, async ones on the loop."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar

import azure.functions as func
from azure.functions import _abc

from sandbox.host.loader import FunctionSpec

log = logging.getLogger("sandbox.host")
T = TypeVar("T")


class Out(func.Out[T], Generic[T]):
    """An output binding value holder (`func.Out[...]`)."""

    def __init__(self) -> None:
        self._value: T | None = None

    def set(self, val: T) -> None:
        self._value = val

    def get(self) -> T:
        return self._value  # type: ignore[return-value]


class _TraceContext(_abc.TraceContext):
    def __init__(self) -> None:
        self._parent = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"

    @property
    def trace_parent(self) -> str:
        return self._parent

    @property
    def trace_state(self) -> str:
        return ""

    @property
    def attributes(self) -> dict[str, str]:
        return {}


class _RetryContext(_abc.RetryContext):
    def __init__(self, retry_count: int, max_retry_count: int) -> None:
        self._count = retry_count
        self._max = max_retry_count

    @property
    def retry_count(self) -> int:
        return self._count

    @property
    def max_retry_count(self) -> int:
        return self._max

    @property
    def exception(self) -> Any:
        return None


class Context(func.Context):
    """The `context` argument of an invocation."""

    _tls = threading.local

    def __init__(self, spec: FunctionSpec, invocation_id: str, retry_count: int = 0, max_retries: int = 0) -> None:
        self._spec = spec
        self._id = invocation_id
        self._retry = _RetryContext(retry_count, max_retries)
        self._trace = _TraceContext()

    @property
    def invocation_id(self) -> str:
        return self._id

    @property
    def thread_local_storage(self) -> type[threading.local]:
        return self._tls

    @property
    def function_name(self) -> str:
        return self._spec.name

    @property
    def function_directory(self) -> str:
        return str(Path(self._spec.script).parent)

    @property
    def trace_context(self) -> _abc.TraceContext:
        return self._trace

    @property
    def retry_context(self) -> _abc.RetryContext:
        return self._retry


@dataclass
class Invocation:
    spec: FunctionSpec
    invocation_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    return_value: Any = None
    outputs: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    duration_ms: float = 0.0

    @property
    def succeeded(self) -> bool:
        return self.error is None


class FunctionTimeoutError(Exception):
    """The invocation ran past host.json's functionTimeout."""


class Invoker:
    """Runs invocations; owns the worker's thread pool (PYTHON_THREADPOOL_THREAD_COUNT, default min(32, cpus+4))."""

    def __init__(self, *, function_timeout: timedelta | None, threads: int | None = None) -> None:
        count = threads or min(32, (os.cpu_count() or 1) + 4)
        self._pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="worker")
        self._timeout = function_timeout.total_seconds() if function_timeout else None

    async def invoke(
        self,
        spec: FunctionSpec,
        trigger_value: Any,
        *,
        reason: str,
        retry_count: int = 0,
        max_retries: int = 0,
    ) -> Invocation:
        inv = Invocation(spec)
        kwargs: dict[str, Any] = {spec.trigger["name"]: trigger_value}
        outs: dict[str, Out[Any]] = {}
        for binding in spec.outputs:
            if binding["name"] != "$return":
                outs[binding["name"]] = kwargs[binding["name"]] = Out()
        if spec.accepts_context:
            kwargs["context"] = Context(spec, inv.invocation_id, retry_count, max_retries)
        log.info("Executing 'Functions.%s' (Reason='%s', Id=%s)", spec.name, reason, inv.invocation_id)
        started = time.perf_counter()
        try:
            if spec.is_async:
                call = spec.callable(**kwargs)
            else:
                loop = asyncio.get_running_loop()
                call = loop.run_in_executor(self._pool, lambda: spec.callable(**kwargs))
            if self._timeout is None:
                inv.return_value = await call
            else:
                try:
                    inv.return_value = await asyncio.wait_for(call, self._timeout)
                except TimeoutError:
                    raise FunctionTimeoutError(
                        f"Timeout value of {timedelta(seconds=self._timeout)} was exceeded by function "
                        f"'Functions.{spec.name}'"
                    ) from None
        except Exception as exc:  # the function's failure is a result, not a host crash  # noqa: BLE001
            inv.error = exc
        inv.duration_ms = (time.perf_counter() - started) * 1000
        inv.outputs = {name: out.get() for name, out in outs.items() if out.get() is not None}
        if inv.succeeded:
            log.info(
                "Executed 'Functions.%s' (Succeeded, Id=%s, Duration=%.0fms)",
                spec.name, inv.invocation_id, inv.duration_ms,
            )  # fmt: skip
        else:
            log.error(
                "Executed 'Functions.%s' (Failed, Id=%s, Duration=%.0fms): %s: %s",
                spec.name, inv.invocation_id, inv.duration_ms, type(inv.error).__name__, inv.error,
            )  # fmt: skip
        return inv

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
