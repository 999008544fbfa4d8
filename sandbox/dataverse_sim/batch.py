"""OData `$batch` (multipart/mixed, change sets, `Prefer: odata.continue-on-error`) for the Dataverse simulator."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from sandbox.dataverse_sim.store import DataverseError

MAX_REQUESTS = 1000
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


@dataclass
class InnerRequest:
    method: str
    path: str  # decoded, relative to /api/data/v9.2
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class InnerResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


Part = InnerRequest | list[InnerRequest]  # a request, or a change set of requests
Runner = Callable[[InnerRequest], Awaitable[InnerResponse]]


def boundary_of(content_type: str) -> str:
    match = _BOUNDARY.search(content_type)
    if not match or not content_type.lower().startswith("multipart/mixed"):
        raise DataverseError(400, "0x80060888", "A $batch body must be multipart/mixed with a boundary.")
    return match.group(1)


def _split(body: bytes, boundary: str) -> list[bytes]:
    delimiter = b"--" + boundary.encode()
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].lstrip().startswith(b"--"):
        raise DataverseError(400, "0x80060888", f"The $batch body is not closed by --{boundary}--.")
    return [c.strip(b"\r\n") for c in chunks[1:-1]]


def _headers_and_rest(blob: bytes) -> tuple[dict[str, str], bytes]:
    head, _, rest = blob.replace(b"\r\n", b"\n").partition(b"\n\n")
    headers: dict[str, str] = {}
    for line in head.decode("utf-8").split("\n"):
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return headers, rest


def _inner(blob: bytes, api_path: str) -> InnerRequest:
    _, http = _headers_and_rest(blob)
    request_line, _, after = http.partition(b"\n")
    parts = request_line.decode("utf-8").strip().split(" ")
    if len(parts) < 2:
        raise DataverseError(400, "0x80060888", "A $batch part holds no request line.")
    method, target = parts[0].upper(), " ".join(parts[1:-1]) if len(parts) > 2 else parts[1]
    headers, body = _headers_and_rest(after)
    url = urlsplit(target)
    path = unquote(url.path)
    if path.startswith(api_path):
        path = path[len(api_path) :]
    return InnerRequest(method, path.lstrip("/"), url.query, headers, body.rstrip(b"\n"))


def parse(body: bytes, content_type: str, api_path: str) -> list[Part]:
    parts: list[Part] = []
    count = 0
    for blob in _split(body, boundary_of(content_type)):
        headers, rest = _headers_and_rest(blob)
        kind = headers.get("content-type", "")
        if kind.lower().startswith("multipart/mixed"):
            changeset = [_inner(b, api_path) for b in _split(rest, boundary_of(kind))]
            count += len(changeset)
            parts.append(changeset)
        else:
            count += 1
            parts.append(_inner(blob, api_path))
    if count > MAX_REQUESTS:
        raise DataverseError(400, "0x80060888", f"A $batch may hold at most {MAX_REQUESTS} requests, not {count}.")
    return parts


def _render(response: InnerResponse) -> bytes:
    reason = {
        200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 404: "Not Found",
        412: "Precondition Failed", 500: "Internal Server Error",
    }  # fmt: skip
    lines = [f"HTTP/1.1 {response.status} {reason.get(response.status, '')}".rstrip()]
    lines += [f"{k}: {v}" for k, v in response.headers.items()]
    head = (
        "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n" + "\r\n".join(lines) + "\r\n\r\n"
    )
    return head.encode() + response.body


async def execute(
    parts: list[Part], run: Runner, *, transaction: Callable[[], object], continue_on_error: bool
) -> tuple[bytes, str]:
    """Run the parts in order; a change set is all or nothing. Returns the multipart body and its content type."""
    boundary = f"batchresponse_{uuid.uuid4()}"
    out: list[bytes] = []
    for part in parts:
        if isinstance(part, InnerRequest):
            response = await run(part)
            out.append(_render(response))
            if response.status >= 400 and not continue_on_error:
                break
            continue
        responses: list[InnerResponse] = []
        failed: InnerResponse | None = None
        try:
            with transaction():  # type: ignore[attr-defined]
                for request in part:
                    response = await run(request)
                    if response.status >= 400:
                        failed = response
                        raise _Rollback  # noqa: TRY301 - unwinds the change set's transaction
                    responses.append(response)
        except _Rollback:
            pass
        if failed is not None:
            out.append(_render(failed))
            if not continue_on_error:
                break
            continue
        inner = f"changesetresponse_{uuid.uuid4()}"
        nested = b"".join(b"--" + inner.encode() + b"\r\n" + _render(r) + b"\r\n" for r in responses)
        nested += b"--" + inner.encode() + b"--\r\n"
        out.append(f"Content-Type: multipart/mixed; boundary={inner}\r\n\r\n".encode() + nested)
    body = (
        b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in out) + b"--" + boundary.encode() + b"--\r\n"
    )
    return body, f"multipart/mixed; boundary={boundary}"


class _Rollback(Exception):
    """Unwinds a change set's transaction."""
