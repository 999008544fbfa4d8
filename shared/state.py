"""The sync's state in Azure Tables (docs/sync.md, "State"), behind one module.

| table | PartitionKey | RowKey | holds |
|---|---|---|---|
| `syncstate` | `watermark` | entity | watermark, the open run and its cursor checkpoint |
| `syncruns` | `run` / run id | run id / batch id | the run ledger: a row per run, a row per batch (counts, error) |
| `synchashes` | entity + one hex digit | record id | hash, source version and (invoices) line keys last written |
| `deadletters` | `record-<entity>` / `message` | record id / message key | the DLQ (see `shared.dlq`) |
| `breakers` | `breaker` | system | circuit breaker state (`shared.breaker`) |
| `webhookevents` | `event` | event id (or signed-bytes digest) | webhook events accepted lately: replays refused |
| `webhookpending` | `<entity>-<n>` / `window` | record id / window | webhook changes waiting; windows claimed |
| `mismatches` | entity | record id | what reconcile found differing (`shared.reconcile.findings`) |
| `reconcileruns` | `run` / run id | run id / batch id | reconcile's runs and batches |

Record ids are keys as they are unless they hold a character Table keys forbid (`/ \\ # ?`, control
characters, `%`): those are percent-encoded, so every id has exactly one key. Transactions stay within one
partition and at most 100 operations (Azurite answers larger ones with an obscure parse error).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote

from azure.core import MatchConditions
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableTransactionError, TransactionOperation, UpdateMode
from azure.data.tables.aio import TableClient, TableServiceClient
from more_itertools import chunked

from shared.billing.listing import ListingPosition
from shared.clock import iso, parse_iso, utcnow
from shared.odata import literal
from shared.tablerow import from_row, to_row

MAX_TRANSACTION = 100
FILTER_KEYS = 15  # Table queries allow at most 15 discrete comparisons
TABLES = ("syncstate", "syncruns", "synchashes", "deadletters", "breakers", "webhookevents", "webhookpending")
_FORBIDDEN = set("/\\#?%")
# The Tables SDK sends a request again after a dropped connection for GET, PUT and DELETE only. A transaction is a
# POST; sending one again is safe here: its writes are conditional, so one applied twice ends as conflicts, which
# re-sync the records.
# (Seen locally: Azurite closes idle connections after 5 s and the next transaction on one fails to write its body.)
# The ledger's merges (PATCH) are idempotent and are sent again likewise.
RETRY_WRITES: dict[str, Any] = {
    "retry_on_methods": frozenset({"HEAD", "GET", "PUT", "DELETE", "OPTIONS", "TRACE", "POST", "PATCH", "MERGE"})
}


def row_key(record_id: str) -> str:
    if any(c in _FORBIDDEN or ord(c) < 32 or 127 <= ord(c) < 160 for c in record_id):
        return quote(record_id, safe="")
    return record_id


def from_row_key(key: str) -> str:
    return unquote(key) if "%" in key else key


class RowMoved(Exception):
    """A conditional write found the row not as it was read: someone else wrote (or created, or deleted) it first."""


async def write_if_unchanged(table: TableClient, row: Mapping[str, Any], etag: str | None) -> str | None:
    """Create `row` (`etag` None: it must not exist yet) or replace it if it is still at `etag`; its new ETag.
    Every optimistic-concurrency write of the state tables goes through here."""
    try:
        if etag is None:
            meta = await table.create_entity(row, **RETRY_WRITES)
        else:
            meta = await table.update_entity(
                row, mode=UpdateMode.REPLACE, etag=etag, match_condition=MatchConditions.IfNotModified
            )
    except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError):
        raise RowMoved(f"{row['PartitionKey']}/{row['RowKey']}") from None
    except HttpResponseError as exc:
        if exc.status_code in (409, 412):
            raise RowMoved(f"{row['PartitionKey']}/{row['RowKey']}") from None
        raise
    etag_after: str | None = meta.get("etag")
    return etag_after


class StateTables:
    """The state tables of one storage account; tables are created on first use."""

    def __init__(self, service: TableServiceClient, prefix: str = "") -> None:
        self.service = service
        self.prefix = prefix
        self._ready: dict[str, TableClient] = {}
        self._lock = asyncio.Lock()

    @classmethod
    def from_connection_string(cls, conn: str, prefix: str = "") -> StateTables:
        return cls(TableServiceClient.from_connection_string(conn), prefix)

    @classmethod
    def from_account(cls, endpoint: str, credential: AsyncTokenCredential, prefix: str = "") -> StateTables:
        return cls(TableServiceClient(endpoint=endpoint, credential=credential), prefix)

    async def table(self, name: str) -> TableClient:
        client = self._ready.get(name)
        if client is not None:
            return client
        async with self._lock:
            client = self._ready.get(name)
            if client is None:
                client = self.service.get_table_client(self.prefix + name)
                with contextlib.suppress(ResourceExistsError):
                    await client.create_table()
                self._ready[name] = client
        return client

    async def close(self) -> None:
        for client in self._ready.values():
            await client.close()
        self._ready.clear()
        await self.service.close()


async def query_keys(
    table: TableClient, partition: str, keys: Iterable[str], *, select: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """The rows of `partition` whose RowKey is among `keys`, by RowKey (15 keys a query, queries in parallel)."""
    unique = list(dict.fromkeys(keys))

    async def one(chunk: Sequence[str]) -> list[dict[str, Any]]:
        text = (
            f"PartitionKey eq {literal(partition)} and (" + " or ".join(f"RowKey eq {literal(k)}" for k in chunk) + ")"
        )
        rows = []
        async for entity in table.query_entities(text, select=list(select) if select else None):
            rows.append({**entity, "__etag": entity.metadata.get("etag")})
        return rows

    chunks = list(chunked(unique, FILTER_KEYS))
    results = await asyncio.gather(*(one(c) for c in chunks))
    return {str(row["RowKey"]): row for rows in results for row in rows}


# ---- watermark and cursor checkpoint ----


@dataclass
class Checkpoint:
    """An entity's sync position. `run_id` set means a listing is under way and `listing` is where it resumes."""

    entity: str
    watermark: str = ""  # when the last complete listing started (ISO); "" = never
    run_id: str = ""
    listing_started: str = ""
    listing: ListingPosition = field(default_factory=ListingPosition)
    messages: int = 0
    last_completed: str = ""
    etag: str | None = None

    def to_entity(self) -> dict[str, Any]:
        return to_row(self, partition="watermark", row_key=self.entity, exclude=("etag", "entity"))

    @classmethod
    def from_entity(cls, entity: Mapping[str, Any], etag: str | None) -> Checkpoint:
        return from_row(cls, entity, entity=str(entity["RowKey"]), etag=etag)


class CheckpointConflict(Exception):
    """Someone else moved the checkpoint since we read it (two fan-outs at once): stop, the other one goes on."""


async def read_checkpoint(tables: StateTables, entity: str) -> Checkpoint:
    table = await tables.table("syncstate")
    try:
        row = await table.get_entity("watermark", entity)
    except ResourceNotFoundError:
        return Checkpoint(entity)
    return Checkpoint.from_entity(row, row.metadata.get("etag"))


async def write_checkpoint(tables: StateTables, checkpoint: Checkpoint) -> Checkpoint:
    """Write with optimistic concurrency; returns the checkpoint with its new ETag."""
    table = await tables.table("syncstate")
    try:
        checkpoint.etag = await write_if_unchanged(table, checkpoint.to_entity(), checkpoint.etag)
    except RowMoved:
        raise CheckpointConflict(f"checkpoint of {checkpoint.entity} moved under us") from None
    return checkpoint


# ---- run ledger ----

BATCH_COUNTS = ("written", "unchanged", "stale", "invalid", "rejected", "not_found", "failed", "deferred")


async def start_run(tables: StateTables, run_id: str, entity: str, since: str, source: str) -> None:
    table = await tables.table("syncruns")
    await table.upsert_entity(
        {
            "PartitionKey": "run",
            "RowKey": row_key(run_id),
            "entity": entity,
            "source": source,
            "since": since,
            "started_at": iso(utcnow()),
            "status": "listing",
            "listed": 0,
            "messages": 0,
        },
        mode=UpdateMode.MERGE,
        **RETRY_WRITES,
    )


async def update_run(tables: StateTables, run_id: str, **values: Any) -> None:
    table = await tables.table("syncruns")
    await table.upsert_entity(
        {"PartitionKey": "run", "RowKey": row_key(run_id), **values}, mode=UpdateMode.MERGE, **RETRY_WRITES
    )


async def record_batch(tables: StateTables, run_id: str, batch_id: str, **values: Any) -> None:
    """One row per batch, overwritten by each delivery: a redelivered batch is counted once, as it last ended."""
    table = await tables.table("syncruns")
    await table.upsert_entity(
        {"PartitionKey": row_key(run_id), "RowKey": row_key(batch_id), "updated_at": iso(utcnow()), **values},
        mode=UpdateMode.MERGE,
        **RETRY_WRITES,
    )


async def read_batch(tables: StateTables, run_id: str, batch_id: str) -> dict[str, Any] | None:
    table = await tables.table("syncruns")
    try:
        return dict(await table.get_entity(row_key(run_id), row_key(batch_id)))
    except ResourceNotFoundError:
        return None


async def recent_runs(tables: StateTables, *, limit: int = 20) -> list[dict[str, Any]]:
    """The newest runs first (run ids sort newest first)."""
    table = await tables.table("syncruns")
    rows: list[dict[str, Any]] = []
    async for row in table.query_entities("PartitionKey eq 'run'", results_per_page=limit):
        rows.append(dict(row))
        if len(rows) >= limit:
            break
    return rows


async def run_batches(tables: StateTables, run_id: str) -> AsyncIterator[dict[str, Any]]:
    table = await tables.table("syncruns")
    async for row in table.query_entities(f"PartitionKey eq {literal(row_key(run_id))}"):
        yield dict(row)


def run_id_for(entity: str, now: datetime | None = None) -> str:
    """Run ids sort newest first: an inverted millisecond clock, then the entity and a random tail."""
    moment = now or utcnow()
    inverted = 10**13 - int(moment.timestamp() * 1000)
    return f"{inverted:013d}-{entity}-{hashlib.sha256(str(moment).encode()).hexdigest()[:6]}"


# ---- content hashes ----


def hash_partition(entity: str, record_id: str) -> str:
    return f"{entity}-{hashlib.sha256(record_id.encode()).hexdigest()[0]}"


@dataclass(frozen=True)
class SyncedHash:
    record_id: str
    hash: str
    version: int
    etag: str | None = None  # as read: a write of this record is conditional on it
    lines: tuple[str, ...] | None = None  # an invoice's line keys as last written; None: not known (read the CRM)


MAX_LINES_TEXT = 30_000  # `lines` as JSON in one Table string property (32K UTF-16 units); longer is not kept


def _lines(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    try:
        lines = json.loads(str(value))
    except ValueError:
        return None
    return tuple(str(line) for line in lines) if isinstance(lines, list) else None


async def read_hashes(tables: StateTables, entity: str, ids: Iterable[str]) -> dict[str, SyncedHash]:
    """The stored hash rows of `ids` with their ETags. Read them *before* fetching the records from billing:
    `write_hashes` is conditional on these ETags, which is what catches two workers writing one record at once."""
    table = await tables.table("synchashes")
    by_partition: dict[str, list[str]] = {}
    for record_id in dict.fromkeys(ids):
        by_partition.setdefault(hash_partition(entity, record_id), []).append(row_key(record_id))
    found = await asyncio.gather(
        *(query_keys(table, p, keys, select=["RowKey", "hash", "version", "lines"]) for p, keys in by_partition.items())
    )
    out: dict[str, SyncedHash] = {}
    for rows in found:
        for key, row in rows.items():
            record_id = from_row_key(key)
            out[record_id] = SyncedHash(
                record_id,
                str(row.get("hash") or ""),
                int(row.get("version") or 0),
                row.get("__etag"),
                _lines(row.get("lines")),
            )
    return out


async def write_hashes(
    tables: StateTables, entity: str, new: Iterable[SyncedHash], before: Mapping[str, SyncedHash]
) -> list[str]:
    """Store the hashes of records just written, each on condition that its row is still as `before` had it.

    Returns the ids whose row changed meanwhile: another worker wrote the same record at the same time, and the CRM
    may now hold the older of the two versions. The caller re-syncs those ids (forced), so the latest one wins.
    Rows go in transactions per partition (at most 100 each); a transaction with a conflict fails as a whole, and
    its rows are then written one by one to find which.
    """
    table = await tables.table("synchashes")
    now = iso(utcnow())
    by_partition: dict[str, list[_HashWrite]] = {}
    for h in new:
        row = {"PartitionKey": hash_partition(entity, h.record_id), "RowKey": row_key(h.record_id), "hash": h.hash,
               "version": h.version, "synced_at": now}  # fmt: skip
        lines = json.dumps(list(h.lines)) if h.lines is not None else ""
        if lines and len(lines) <= MAX_LINES_TEXT:
            row["lines"] = lines
        old = before.get(h.record_id)
        by_partition.setdefault(str(row["PartitionKey"]), []).append(
            _HashWrite(h.record_id, row, old.etag if old else None)
        )
    found = await asyncio.gather(*(_write_partition(table, writes) for writes in by_partition.values()))
    return [record_id for ids in found for record_id in ids]


@dataclass(frozen=True)
class _HashWrite:
    record_id: str
    row: dict[str, Any]
    etag: str | None  # None: the row must not exist yet

    def operation(self) -> tuple[Any, ...]:
        if self.etag is None:
            return (TransactionOperation.CREATE, self.row)
        condition = {"mode": UpdateMode.REPLACE, "etag": self.etag, "match_condition": MatchConditions.IfNotModified}
        return (TransactionOperation.UPDATE, self.row, condition)


async def _write_partition(table: TableClient, writes: list[_HashWrite]) -> list[str]:
    conflicts: list[str] = []
    for part in chunked(writes, MAX_TRANSACTION):
        try:
            await table.submit_transaction([w.operation() for w in part], **RETRY_WRITES)
        except (TableTransactionError, ResourceExistsError, HttpResponseError):
            conflicts += await _one_by_one(table, part)  # a conflict fails the whole transaction: find which
    return conflicts


async def _one_by_one(table: TableClient, writes: list[_HashWrite]) -> list[str]:
    conflicts = []
    for write in writes:
        try:
            await write_if_unchanged(table, write.row, write.etag)
        except RowMoved:
            conflicts.append(write.record_id)
    return conflicts


# ---- webhook events seen ----


async def remember_event(tables: StateTables, key: str, *, window_s: float) -> bool:
    """True the first time `key` is seen within `window_s` (a row is created); False for a repeat inside it. A row
    older than the window is a new event that happens to reuse an id: it is taken, and the row renewed."""
    table = await tables.table("webhookevents")
    now = utcnow()
    row = {"PartitionKey": "event", "RowKey": key, "seen_at": iso(now), "receipt": uuid.uuid4().hex}
    try:
        await table.create_entity(row, **RETRY_WRITES)
    except ResourceExistsError:
        existing = await table.get_entity("event", key)
    else:
        return True
    if existing.get("receipt") == row["receipt"]:
        return True  # our own create, sent again after its answer was lost
    if (now - parse_iso(str(existing["seen_at"]))).total_seconds() <= window_s:
        return False
    try:
        await write_if_unchanged(table, row, existing.metadata.get("etag"))
    except RowMoved:
        return False  # another instance took it first
    return True


async def forget_events(tables: StateTables, *, older_than_s: float) -> int:
    """Delete the rows of events seen more than `older_than_s` ago (they can no longer verify); how many."""
    table = await tables.table("webhookevents")
    cutoff = iso(utcnow() - timedelta(seconds=older_than_s))
    stale = table.query_entities(f"PartitionKey eq 'event' and seen_at lt {literal(cutoff)}", select=["RowKey"])
    keys = [str(row["RowKey"]) async for row in stale]
    await delete_rows(table, "event", keys)
    return len(keys)


async def delete_rows(table: TableClient, partition: str, keys: Sequence[str]) -> None:
    """Delete rows of one partition, 100 a transaction; a transaction holding a row gone already (deleted by
    another worker, or by an earlier delivery of the same message) is done again one row at a time."""
    for part in chunked(keys, MAX_TRANSACTION):
        try:
            await table.submit_transaction([("delete", {"PartitionKey": partition, "RowKey": k}) for k in part])
        except (TableTransactionError, HttpResponseError):
            for key in part:
                with contextlib.suppress(ResourceNotFoundError):
                    await table.delete_entity(partition, key)
