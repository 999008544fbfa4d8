"""A runtime built as production builds it, against Azurite, with tables and queues of its own."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

from shared.runtime import Runtime, build
from shared.settings import load_settings


@contextlib.asynccontextmanager
async def runtime_for(conn: str, **values: str) -> AsyncIterator[Runtime]:
    """`values` are app settings over the defaults; billing and Dataverse point nowhere unless given."""
    settings = load_settings({
        "AzureWebJobsStorage": conn,
        "SYNC_TABLE_PREFIX": f"t{uuid.uuid4().hex[:12]}",
        "SYNC_QUEUE": f"q{uuid.uuid4().hex[:12]}",
        "BILLING_BASE_URL": "http://127.0.0.1:9",
        "BILLING_API_KEY": "test-billing-key",
        "DATAVERSE_URL": "https://127.0.0.1:9",
        "DATAVERSE_TENANT_ID": "00000000-0000-0000-0000-000000000001",
        "DATAVERSE_CLIENT_ID": "test-client",
        "DATAVERSE_CLIENT_SECRET": "test-client-secret",
        **values,
    })  # fmt: skip
    built = await build(settings)
    try:
        yield built
    finally:
        await built.aclose()
