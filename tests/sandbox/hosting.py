"""Helpers to run the local host in-process for a test, and to talk to Azurite queues."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

from sandbox.faults import FaultProfile
from sandbox.host.runtime import HostOptions, LocalHost


@asynccontextmanager
async def running_host(
    app_dir: Path,
    settings: Path,
    *,
    faults: FaultProfile | None = None,
    lease_s: float = 600,
    drain_s: float = 30,
    once: tuple[str, ...] = (),
) -> AsyncIterator[LocalHost]:
    options = HostOptions(
        app_dir=app_dir,
        settings_file=settings,
        faults=faults or FaultProfile(),
        http_port=0,
        once=once,
        lease=timedelta(seconds=lease_s),
        drain_timeout=timedelta(seconds=drain_s),
        state_dir=app_dir / ".state",
    )
    async with LocalHost(options) as host:
        yield host


def queue(conn: str, name: str, *, base64: bool = True, create: bool = True) -> QueueClient:
    """A sync client; base64 like the Functions host expects (the SDK's own default is no encoding)."""
    kwargs: dict[str, Any] = {}
    if base64:
        kwargs = {"message_encode_policy": TextBase64EncodePolicy(), "message_decode_policy": TextBase64DecodePolicy()}
    client = QueueClient.from_connection_string(conn, name, **kwargs)
    if create:
        client.create_queue()
    return client


def raw_messages(conn: str, name: str) -> list[str]:
    """Peek at up to 32 messages exactly as stored (no decoding)."""
    client = QueueClient.from_connection_string(conn, name)
    try:
        return [m.content for m in client.peek_messages(max_messages=32)]
    except Exception:  # the queue may not exist yet
        return []
    finally:
        client.close()


def approximate_count(conn: str, name: str) -> int:
    client = QueueClient.from_connection_string(conn, name)
    try:
        return int(client.get_queue_properties().approximate_message_count or 0)
    finally:
        client.close()
