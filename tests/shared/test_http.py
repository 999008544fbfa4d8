"""Response classification and Retry-After."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import httpx
import pytest

from shared.errors import (
    AuthError,
    FatalError,
    NotFoundError,
    SyncError,
    ThrottledError,
    TransientError,
)
from shared.http import classify, parse_retry_after, transport_error

NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, None),
        (204, None),
        (400, FatalError),
        (401, AuthError),
        (403, AuthError),
        (404, NotFoundError),
        (408, TransientError),
        (409, FatalError),
        (422, FatalError),
        (429, ThrottledError),
        (500, TransientError),
        (502, TransientError),
        (503, TransientError),
        (504, TransientError),
    ],
)
def test_status_decides_what_happens_next(status: int, expected: type[SyncError] | None) -> None:
    response = httpx.Response(status, json={"error": {"code": "0x80040237", "message": "detail"}})
    if expected is None:
        classify(response, system="billing", operation="list")
        return
    with pytest.raises(expected) as info:
        classify(response, system="billing", operation="list")
    assert type(info.value) is expected
    assert info.value.status_code == status
    assert info.value.code == "0x80040237"
    assert str(info.value).startswith(f"billing list: HTTP {status}")


def test_429_carries_retry_after_and_no_header_value_leaks() -> None:
    response = httpx.Response(
        429, headers={"Retry-After": "7", "Authorization": "Bearer s3cret"}, json={"error": {"code": "rate_limited"}}
    )
    with pytest.raises(ThrottledError) as info:
        classify(response, system="billing", operation="bulk fetch")
    assert info.value.retry_after == 7
    assert "s3cret" not in str(info.value)
    assert "s3cret" not in str(info.value.to_dict())


def test_non_json_error_bodies_are_cut_short() -> None:
    with pytest.raises(TransientError) as info:
        classify(httpx.Response(502, text="<html>" + "x" * 5000), system="billing", operation="list")
    assert len(str(info.value)) < 300


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        ("100000", 300.0),
        ("Sun, 22 Nov 2026 12:00:30 GMT", 30.0),
        ("Sun, 22 Nov 2026 11:59:00 GMT", 0.0),
        ("soon", None),
        ("", None),
        (None, None),
        ("nan", None),
        ("inf", 300.0),
    ],
)
def test_retry_after_is_seconds_or_an_http_date_clamped(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ConnectError("refused"), TransientError),
        (httpx.ReadTimeout("slow"), TransientError),
        (httpx.RemoteProtocolError("dropped"), TransientError),
        (httpx.InvalidURL("bad"), FatalError),
    ],
)
def test_transport_errors(exc: httpx.HTTPError, expected: type[SyncError]) -> None:
    assert type(transport_error(exc, system="billing", operation="list")) is expected


@pytest.mark.parametrize(
    "content",
    [
        json.dumps({"error": {"code": "0x8004\n", "message": "bad\nINFO forged log line\x00\u2028end"}}).encode(),
        b"<html>\r\nproxy error\x1b[31m</html>",
        b"[" * 10_000 + b"]" * 10_000,  # a RecursionError in the parser before
    ],
)
def test_an_error_body_reaches_the_error_printable_and_never_raises_anything_else(content: bytes) -> None:
    response = httpx.Response(500, content=content)
    with pytest.raises(TransientError) as info:
        classify(response, system="dataverse", operation="UpsertMultiple accounts")
    text = str(info.value) + str(info.value.code or "")
    assert not [c for c in text if ord(c) < 32 or 127 <= ord(c) < 160 or c in "\u2028\u2029"]
    assert len(text) < 400
