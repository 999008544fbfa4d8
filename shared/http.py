"""One place that sorts HTTP outcomes into the error groups and reads Retry-After (`shared.callpolicy` retries)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Self

import httpx

from shared.errors import AuthError, FatalError, NotFoundError, SyncError, ThrottledError, TransientError
from shared.redact import printable

MAX_RETRY_AFTER_S = 300.0
_BODY_SNIPPET = 200


def parse_retry_after(
    value: str | None, *, now: datetime | None = None, cap_s: float = MAX_RETRY_AFTER_S
) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), clamped to [0, cap_s]."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None if math.isnan(seconds) else cap_s
    return min(max(seconds, 0.0), cap_s)


def error_detail(content: bytes, *, limit: int = _BODY_SNIPPET) -> tuple[str | None, str]:
    """The error code and a short message from an error body: JSON `{"error": {"code", "message"}}` as Dataverse and
    billing send it (a whole answer, or one part of a `$batch`), else the start of the text. Outside text: made
    printable (control characters escaped) and capped before it reaches an error, a log line or a DLQ row."""
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):
        return None, printable(content[:limit].decode("utf-8", "replace"), limit)
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return None, printable(str(body)[: limit * 2], limit)
    code = err.get("code")
    return (printable(str(code), 100) if code is not None else None), printable(str(err.get("message", "")), limit)


def classify(response: httpx.Response, *, system: str, operation: str) -> None:
    """Raise the error that says what to do next, or return for a 2xx answer."""
    status = response.status_code
    if 200 <= status < 300:
        return
    code, message = error_detail(response.content)
    request_id = response.headers.get("x-ms-service-request-id") or response.headers.get("x-request-id")
    text = f"{system} {operation}: HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    kwargs: dict[str, Any] = {"system": system, "status_code": status, "code": code, "request_id": request_id}
    if status == 429:
        raise ThrottledError(text, retry_after=parse_retry_after(response.headers.get("retry-after")), **kwargs)
    if status in (408, 425) or status >= 500:
        raise TransientError(text, retry_after=parse_retry_after(response.headers.get("retry-after")), **kwargs)
    if status in (401, 403):
        raise AuthError(text, **kwargs)
    if status == 404:
        raise NotFoundError(text, **kwargs)
    raise FatalError(text, **kwargs)


def transport_error(exc: httpx.HTTPError, *, system: str, operation: str) -> SyncError:
    """Timeouts and connection failures are transient; anything else httpx raises is a bug of ours."""
    if isinstance(exc, httpx.TimeoutException | httpx.TransportError):
        return TransientError(f"{system} {operation}: {type(exc).__name__}", system=system)
    return FatalError(f"{system} {operation}: {type(exc).__name__}", system=system)


class PooledClient:
    """An outside system's client over one httpx connection pool (`_http`), closed by `aclose()` or `async with`."""

    _http: httpx.AsyncClient

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
