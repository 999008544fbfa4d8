"""Queue trigger listener with the Storage Queues extension's semantics (docs/local-platform.md).

- polls with randomized exponential back-off from 100 ms up to `maxPollingInterval` while the queue is empty;
- fetches `batchSize` messages, and fetches again only when in-flight invocations drop to `newBatchThreshold`,
  so at most `batchSize + newBatchThreshold` run at once;
- holds each message invisible for a lease (10 minutes, renewed at half-time) while the function runs;
- success deletes; failure makes the message visible again after `visibilityTimeout`; a message that failed on
  its `maxDequeueCount`-th delivery, or arrives with a higher dequeue count, is copied unchanged to
  `<queue>-poison` (created if missing) and deleted; a body that does not decode is poisoned at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.functions.queue import QueueMessage as FuncQueueMessage
from azure.storage.queue import QueueMessage
from azure.storage.queue.aio import QueueClient

from sandbox.faults import HostFaults
from sandbox.host.config import QueueOptions
from sandbox.host.invoke import Invocation, Invoker
from sandbox.host.loader import FunctionSpec

log = logging.getLogger("sandbox.host")
MIN_POLL_S = 0.1
MAX_RECEIVE = 32  # the queue service's limit per Get Messages call


def next_poll_delay(previous: float, maximum: float, rng: random.Random) -> float:
    """Randomized exponential back-off for an empty queue, as the host's RandomizedExponentialBackoffStrategy."""
    return max(MIN_POLL_S, min(maximum, previous * 2 * rng.uniform(0.8, 1.2)))


def encode(body: bytes, encoding: str) -> str:
    return base64.b64encode(body).decode("ascii") if encoding == "base64" else body.decode("utf-8")


def decode(content: str, encoding: str) -> bytes:
    if encoding == "base64":
        return base64.b64decode(content.encode("ascii"), validate=True)
    return content.encode("utf-8")


def to_body(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"queue output must be str or bytes (or a list of them), got {type(value).__name__}")


@dataclass
class ListenerStats:
    invocations: int = 0
    succeeded: int = 0
    failed: int = 0
    poisoned: int = 0
    duplicated: int = 0
    crashed: int = 0
    released_on_shutdown: int = 0
    max_in_flight: int = 0


class QueueClients:
    """One async client per (connection string, queue), closed together. Messages are sent and read raw:
    the host, not the SDK, applies `messageEncoding`."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str, str], QueueClient] = {}

    def get(self, conn: str, queue: str) -> QueueClient:
        key = (conn, queue)
        if key not in self._clients:
            self._clients[key] = QueueClient.from_connection_string(conn, queue)
        return self._clients[key]

    async def send(self, conn: str, queue: str, content: str, *, create: bool = True) -> None:
        client = self.get(conn, queue)
        try:
            await client.send_message(content)
        except ResourceNotFoundError:
            if not create:
                raise
            with contextlib.suppress(ResourceExistsError):
                await client.create_queue()
            await client.send_message(content)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


OutputSender = Callable[[FunctionSpec, Invocation], Awaitable[None]]


@dataclass
class QueueListener:
    spec: FunctionSpec
    queue: str
    conn: str
    options: QueueOptions
    invoker: Invoker
    clients: QueueClients
    send_outputs: OutputSender
    faults: HostFaults = field(default_factory=HostFaults)
    rng: random.Random = field(default_factory=random.Random)
    lease: timedelta = timedelta(minutes=10)
    stats: ListenerStats = field(default_factory=ListenerStats)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    _holding: dict[str, str] = field(default_factory=dict, init=False)  # message id -> current pop receipt
    _slot_freed: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    @property
    def poison_queue(self) -> str:
        return f"{self.queue}-poison"

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def run(self, stop: asyncio.Event) -> None:
        client = self.clients.get(self.conn, self.queue)
        delay = MIN_POLL_S
        missing_logged = False
        max_delay = max(self.options.max_polling_interval.total_seconds(), MIN_POLL_S)
        while not stop.is_set():
            if self.in_flight > self.options.new_batch_threshold:
                self._slot_freed.clear()
                await _first(stop.wait(), self._slot_freed.wait())
                continue
            messages: list[QueueMessage] = []
            try:
                async for message in client.receive_messages(
                    messages_per_page=min(self.options.batch_size, MAX_RECEIVE),
                    max_messages=self.options.batch_size,
                    visibility_timeout=int(self.lease.total_seconds()),
                ):
                    messages.append(message)
            except ResourceNotFoundError:
                if not missing_logged:
                    log.warning("Queue '%s' does not exist yet; polling until it does", self.queue)
                    missing_logged = True
            except AzureError as exc:
                log.warning("Polling queue '%s' failed: %s", self.queue, type(exc).__name__)
            for message in messages:
                task = asyncio.create_task(self._process(message), name=f"{self.spec.name}:{message.id}")
                self._tasks.add(task)
                task.add_done_callback(self._done)
            self.stats.max_in_flight = max(self.stats.max_in_flight, self.in_flight)
            if messages:
                delay = MIN_POLL_S
                continue
            delay = next_poll_delay(delay, max_delay, self.rng)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("Queue listener for '%s' failed on a message: %r", self.queue, task.exception())

    async def _process(self, message: QueueMessage) -> None:
        self._holding[message.id] = message.pop_receipt or ""
        cancelled = False
        try:
            await self._handle(message)
        except asyncio.CancelledError:
            cancelled = True  # shutdown gave up waiting: the message stays held and drain() releases it
            raise
        finally:
            if not cancelled:
                self._holding.pop(message.id, None)

    async def _handle(self, message: QueueMessage) -> None:
        if message.dequeue_count is not None and message.dequeue_count > self.options.max_dequeue_count:
            await self._poison(message, reason=f"dequeue count {message.dequeue_count} already past the limit")
            return
        try:
            body = decode(message.content, self.options.message_encoding)
        except (binascii.Error, ValueError):
            log.error(
                "Message %s on queue '%s' is not valid %s; moving it to '%s'. Check messageEncoding "
                "in host.json and the producer's encode policy.",
                message.id, self.queue, self.options.message_encoding, self.poison_queue,
            )  # fmt: skip
            await self._poison(message, reason="decoding failed")
            return
        if self.faults.duplicate_delivery_rate and self.rng.random() < self.faults.duplicate_delivery_rate:
            self.stats.duplicated += 1
            await self.clients.send(self.conn, self.queue, message.content)
        fmsg = FuncQueueMessage(  # type: ignore[no-untyped-call]
            id=message.id,
            body=body,
            dequeue_count=message.dequeue_count,
            insertion_time=message.inserted_on,
            expiration_time=message.expires_on,
            time_next_visible=message.next_visible_on,
            pop_receipt=message.pop_receipt,
        )
        renewer = asyncio.create_task(self._renew(message.id))
        try:
            self.stats.invocations += 1
            inv = await self.invoker.invoke(
                self.spec,
                fmsg,
                reason=f"New queue message detected on '{self.queue}'.",
                retry_count=(message.dequeue_count or 1) - 1,
                max_retries=self.options.max_dequeue_count - 1,
            )
            if inv.succeeded:
                try:
                    await self.send_outputs(self.spec, inv)
                except (AzureError, TypeError) as exc:
                    inv.error = exc
                    log.error("Output bindings of 'Functions.%s' failed: %s", self.spec.name, exc)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
        if inv.succeeded:
            self.stats.succeeded += 1
            if self.faults.crash_after_success_rate and self.rng.random() < self.faults.crash_after_success_rate:
                self.stats.crashed += 1
                log.warning("Injected fault: worker 'crashed' before deleting message %s", message.id)
                return
            await self._delete(message.id)
        else:
            self.stats.failed += 1
            if (message.dequeue_count or 1) >= self.options.max_dequeue_count:
                await self._poison(message, reason=f"failed {message.dequeue_count} deliveries")
            else:
                await self._release(message.id, self.options.visibility_timeout)

    async def _renew(self, message_id: str) -> None:
        client = self.clients.get(self.conn, self.queue)
        lease_s = int(self.lease.total_seconds())
        while True:
            await asyncio.sleep(max(lease_s / 2, 0.5))
            try:
                updated = await client.update_message(
                    message_id, pop_receipt=self._holding[message_id], visibility_timeout=lease_s
                )
                self._holding[message_id] = updated.pop_receipt or ""
            except AzureError as exc:
                log.warning("Renewing the lease of message %s failed: %s", message_id, type(exc).__name__)

    async def _delete(self, message_id: str) -> None:
        client = self.clients.get(self.conn, self.queue)
        try:
            await client.delete_message(message_id, pop_receipt=self._holding[message_id])
        except ResourceNotFoundError:
            log.debug("Message %s was already gone or taken over (pop receipt mismatch)", message_id)
        except HttpResponseError as exc:
            if exc.status_code not in (400, 404, 409):
                raise
            log.debug("Message %s could not be deleted: %s", message_id, exc.status_code)

    async def _release(self, message_id: str, visibility: timedelta) -> None:
        client = self.clients.get(self.conn, self.queue)
        try:
            await client.update_message(
                message_id,
                pop_receipt=self._holding[message_id],
                visibility_timeout=int(visibility.total_seconds()),
            )
        except (ResourceNotFoundError, HttpResponseError) as exc:
            log.debug("Message %s could not be released: %s", message_id, type(exc).__name__)

    async def _poison(self, message: QueueMessage, *, reason: str) -> None:
        log.warning(
            "Message %s has reached MaxDequeueCount of %d (%s). Moving message to queue '%s'.",
            message.id, self.options.max_dequeue_count, reason, self.poison_queue,
        )  # fmt: skip
        await self.clients.send(self.conn, self.poison_queue, message.content)
        self.stats.poisoned += 1
        await self._delete(message.id)

    async def drain(self, timeout_s: float) -> None:
        """Wait for in-flight invocations; after `timeout_s` cancel them and make their messages visible again."""
        if self._tasks:
            log.info("Waiting for %d in-flight invocation(s) of '%s'", len(self._tasks), self.spec.name)
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for message_id in list(self._holding):
            await self._release(message_id, timedelta(0))
            self.stats.released_on_shutdown += 1
            self._holding.pop(message_id, None)


async def _first(*aws: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
