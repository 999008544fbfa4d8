"""What every function needs, built once per worker (per event loop) from the validated settings.

Clients keep their connection pools across invocations. Nothing here does I/O until a function first runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import weakref
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import ResourceExistsError
from azure.storage.blob.aio import BlobServiceClient
from azure.storage.queue import TextBase64DecodePolicy, TextBase64EncodePolicy
from azure.storage.queue.aio import QueueClient

from shared import logs
from shared.billing.client import BillingClient, BillingClientConfig
from shared.breaker import BreakerConfig, CircuitBreaker
from shared.callpolicy import Answered, Hooks, RetryPolicy
from shared.dataverse.client import Credential, DataverseClient, DataverseClientConfig, ProtectionLimits
from shared.errors import SilentThrottleError
from shared.messages import SyncMessage
from shared.settings import Settings
from shared.state import StateTables
from shared.telemetry import Instruments, instruments

log = logs.get_logger("shared.runtime")


@dataclass
class Runtime:
    settings: Settings
    tables: StateTables
    queue: QueueClient
    poison: QueueClient
    reconcile_queue: QueueClient  # reconcile's batches: they yield to the sync's queue
    billing: BillingClient
    dataverse: DataverseClient
    billing_breaker: CircuitBreaker
    dataverse_breaker: CircuitBreaker
    metrics: Instruments
    blobs: BlobServiceClient  # the reconcile reports (container `reports`)

    def queue_for(self, msg: SyncMessage) -> QueueClient:
        """The queue a message belongs on: reconcile's (`reconcile`, `orphans`) or the sync's (the others)."""
        return self.reconcile_queue if msg.kind in ("reconcile", "orphans") else self.queue

    async def aclose(self) -> None:
        await self.billing.aclose()
        await self.dataverse.aclose()
        for identity in self.dataverse.identities:
            close = getattr(identity.credential, "close", None)
            if close is not None:
                result = close()
                if asyncio.iscoroutine(result):
                    await result
        await self.queue.close()
        await self.poison.close()
        await self.reconcile_queue.close()
        await self.tables.close()
        await self.blobs.close()


def _storage_credential(settings: Settings) -> Any:
    from azure.identity.aio import DefaultAzureCredential, ManagedIdentityCredential  # noqa: PLC0415 - Azure only

    if settings.storage_client_id:
        return ManagedIdentityCredential(client_id=settings.storage_client_id)
    return DefaultAzureCredential()


def _queue(settings: Settings, name: str) -> QueueClient:
    encode, decode = TextBase64EncodePolicy(), TextBase64DecodePolicy()  # base64 text; the app decodes it
    if settings.storage_connection:
        return QueueClient.from_connection_string(
            settings.storage_connection, name, message_encode_policy=encode, message_decode_policy=decode
        )
    return QueueClient(
        settings.queue_service_url,
        name,
        credential=_storage_credential(settings),
        message_encode_policy=encode,
        message_decode_policy=decode,
    )


def _blobs(settings: Settings) -> BlobServiceClient:
    if settings.storage_connection:
        return BlobServiceClient.from_connection_string(settings.storage_connection)
    return BlobServiceClient(settings.blob_service_url, credential=_storage_credential(settings))


def _tables(settings: Settings) -> StateTables:
    if settings.storage_connection:
        return StateTables.from_connection_string(settings.storage_connection, settings.table_prefix)
    return StateTables.from_account(settings.table_service_url, _storage_credential(settings), settings.table_prefix)


def dataverse_credentials(settings: Settings) -> dict[str, Credential]:
    """One credential per application user: client secrets (a pool of users), or the app's managed identity."""
    if settings.dataverse_auth == "managed_identity":
        from azure.identity import ManagedIdentityCredential  # noqa: PLC0415

        return {"managed-identity": ManagedIdentityCredential(client_id=settings.storage_client_id)}
    from azure.identity import ClientSecretCredential  # noqa: PLC0415

    extra: dict[str, Any] = {}
    if settings.dataverse_authority:
        extra = {"authority": settings.dataverse_authority, "disable_instance_discovery": True}
    if settings.dataverse_ca_bundle:
        extra["connection_verify"] = settings.dataverse_ca_bundle
    assert settings.dataverse_tenant_id is not None  # noqa: S101 - validated
    return {
        client_id: ClientSecretCredential(
            settings.dataverse_tenant_id, client_id, settings.client_secret_for(i), **extra
        )
        for i, client_id in enumerate(settings.client_ids)
    }


def _verify(ca_bundle: str | None) -> Any:
    return ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True


def api_hooks(metrics: Instruments, system: str) -> Hooks:
    """The call policy's hooks: every answer counted by status, every throttling (said or silent) counted."""

    def on_request(answer: Answered) -> None:
        metrics.api_requests.add(1, {"system": system, "status": answer.status})
        if answer.status == "429":
            metrics.throttled.add(1, {"system": system})

    def on_retry(error: BaseException | None) -> None:
        if error is None or isinstance(error, SilentThrottleError):  # a partial answer, an empty page when due
            metrics.throttled.add(1, {"system": system})

    return Hooks(on_request=on_request, on_retry=on_retry)


def retry_policies(settings: Settings) -> tuple[RetryPolicy, RetryPolicy]:
    """Billing's and Dataverse's retry numbers; the first back-off is short, later ones double up to the cap."""
    billing = RetryPolicy(
        attempts=settings.billing_retry_attempts,
        total_s=settings.billing_retry_s,
        base_s=0.5,
        cap_s=settings.billing_backoff_max_s,
    )
    dataverse = RetryPolicy(
        attempts=settings.dataverse_retry_attempts,
        total_s=settings.dataverse_retry_s,
        base_s=1.0,
        cap_s=settings.dataverse_backoff_max_s,
    )
    return billing, dataverse


def _billing(settings: Settings, breaker: CircuitBreaker, retry: RetryPolicy, metrics: Instruments) -> BillingClient:
    config = BillingClientConfig(
        base_url=settings.billing_url,
        api_key=settings.billing_api_key.get_secret_value(),
        pagination=settings.billing_pagination,
        rate_limit_rps=settings.billing_rate_limit_rps,
        page_size=settings.billing_page_size,
        retry=retry,
    )
    hooks = api_hooks(metrics, "billing")
    return BillingClient(config, breaker=breaker, hooks=hooks, verify=_verify(settings.billing_ca_bundle))


def _dataverse(
    settings: Settings, breaker: CircuitBreaker, retry: RetryPolicy, metrics: Instruments
) -> DataverseClient:
    limits = ProtectionLimits(
        window_s=settings.dataverse_limit_window_s,
        requests=settings.dataverse_limit_requests,
        execution_ms=settings.dataverse_limit_execution_s * 1000.0,
        fleet_size=settings.dataverse_fleet_size,
    )
    config = DataverseClientConfig(
        org_url=settings.dataverse_url,
        chunk_size=settings.dataverse_chunk_size,
        max_concurrency=settings.dataverse_max_concurrency,
        limits=limits,
        retry=retry,
    )
    return DataverseClient(
        config,
        dataverse_credentials(settings),
        verify=_verify(settings.dataverse_ca_bundle),
        breaker=breaker,
        hooks=api_hooks(metrics, "dataverse"),
    )


async def build(settings: Settings) -> Runtime:
    tables = _tables(settings)
    breakers = await tables.table("breakers")
    config = BreakerConfig(failure_threshold=settings.breaker_failure_threshold, open_for_s=settings.breaker_open_s)
    billing_breaker = CircuitBreaker(breakers, "billing", config)
    dataverse_breaker = CircuitBreaker(breakers, "dataverse", config)
    billing_retry, dataverse_retry = retry_policies(settings)
    metrics = instruments()
    queue, poison = _queue(settings, settings.queue_name), _queue(settings, settings.poison_queue)
    reconcile_queue = _queue(settings, settings.reconcile_queue)
    for client in (queue, poison, reconcile_queue):
        with contextlib.suppress(ResourceExistsError):
            await client.create_queue()
    for name in (settings.queue_name, settings.reconcile_queue):  # report zero, not nothing: alerts tell them apart
        metrics.poison.add(0, {"queue": name})
    return Runtime(
        settings=settings,
        tables=tables,
        queue=queue,
        poison=poison,
        reconcile_queue=reconcile_queue,
        billing=_billing(settings, billing_breaker, billing_retry, metrics),
        dataverse=_dataverse(settings, dataverse_breaker, dataverse_retry, metrics),
        billing_breaker=billing_breaker,
        dataverse_breaker=dataverse_breaker,
        metrics=metrics,
        blobs=_blobs(settings),
    )


_RUNTIMES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Runtime] = weakref.WeakKeyDictionary()
_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


async def get_runtime(settings: Settings) -> Runtime:
    """The runtime of the running event loop, built on first use."""
    loop = asyncio.get_running_loop()
    runtime = _RUNTIMES.get(loop)
    if runtime is not None and runtime.settings is settings:
        return runtime
    lock = _LOCKS.setdefault(loop, asyncio.Lock())
    async with lock:
        runtime = _RUNTIMES.get(loop)
        if runtime is not None and runtime.settings is settings:
            return runtime
        runtime = await build(settings)
        _RUNTIMES[loop] = runtime
        return runtime


async def close_runtime() -> None:
    runtime = _RUNTIMES.pop(asyncio.get_running_loop(), None)
    if runtime is not None:
        await runtime.aclose()
