"""The sync's state in Azure Tables (docs/sync.md, "State"), behind one module.

| table | PartitionKey | RowKey | holds |
|---|---|---|---|
| `syncstate` | `watermark` | entity | watermark, the open run and its cursor checkpoint |
| `syncruns` | `run` / run id | run id / batch id | the run ledger: a row per run, a row per batch (counts, error) |
| `synchashes` | entity + one hex digit | record id | content hash and source version last written |
| `deadletters` | `record-<entity>` / `message` | record id / message key | the DLQ (see `shared.dlq`) |
| `breakers` | `breaker` | system | circuit breaker state (`shared.breaker`) |

Record ids are keys as they are unless they hold a character Table keys forbid (`/ \\ # ?`, control
characters, `%`): those are percent-encoded, so every id has exactly one key. Transactions stay within one
partition and at most 100 operations (Azurite answers larger ones with an obscure parse error).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote

from azure.core import MatchConditions
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.data.tables import TableTransactionError, TransactionOperation, UpdateMode
from azure.data.tables.aio import TableClient, TableServiceClient

from shared.billing.listing import ListingPosition

MAX_TRANSACTION = 100
FILTER_KEYS = 15  # Table queries allow at most 15 discrete comparisons
TABLES = ("syncstate", "syncruns", "synchashes", "deadletters", "breakers")
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


def odata_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


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
            f"PartitionKey eq {odata_string(partition)} and ("
            + " or ".join(f"RowKey eq {odata_string(k)}" for k in chunk)
            + ")"
        )
        rows = []
        async for entity in table.query_entities(text, select=list(select) if select else None):
            rows.append({**entity, "__etag": entity.metadata.get("etag")})
        return rows

    chunks = [unique[i : i + FILTER_KEYS] for i in range(0, len(unique), FILTER_KEYS)]
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
        pos = self.listing
        return {
            "PartitionKey": "watermark",
            "RowKey": self.entity,
            "watermark": self.watermark,
            "run_id": self.run_id,
            "since": pos.since,
            "listing_started": self.listing_started,
            "params": json.dumps(pos.params) if pos.params is not None else "",
            "expected": pos.expected,
            "listed": pos.listed,
            "round": pos.round,
            "pages": pos.pages,
            "messages": self.messages,
            "boundary": json.dumps(list(pos.boundary)),
            "last_completed": self.last_completed,
        }

    @classmethod
    def from_entity(cls, entity: Mapping[str, Any], etag: str | None) -> Checkpoint:
        boundary = json.loads(entity.get("boundary") or '["", []]')
        params = entity.get("params")
        position = ListingPosition(
            since=str(entity.get("since") or ""),
            expected=int(entity.get("expected") or 0),
            round=int(entity.get("round") or 1),
            pages=int(entity.get("pages") or 0),
            listed=int(entity.get("listed") or 0),
            params=json.loads(params) if params else None,
            boundary=(str(boundary[0]), [str(i) for i in boundary[1]]),
        )
        return cls(
            entity=str(entity["RowKey"]),
            watermark=str(entity.get("watermark") or ""),
            run_id=str(entity.get("run_id") or ""),
            listing_started=str(entity.get("listing_started") or ""),
            listing=position,
            messages=int(entity.get("messages") or 0),
            last_completed=str(entity.get("last_completed") or ""),
            etag=etag,
        )


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
    entity = checkpoint.to_entity()
    try:
        if checkpoint.etag is None:
            meta = await table.create_entity(entity)
        else:
            meta = await table.update_entity(
                entity, mode=UpdateMode.REPLACE, etag=checkpoint.etag, match_condition=MatchConditions.IfNotModified
            )
    except (ResourceExistsError, HttpResponseError) as exc:
        if isinstance(exc, ResourceExistsError) or getattr(exc, "status_code", None) == 412:
            raise CheckpointConflict(f"checkpoint of {checkpoint.entity} moved under us") from None
        raise
    checkpoint.etag = meta.get("etag")
    return checkpoint


# ---- run ledger ----

BATCH_COUNTS = ("written", "unchanged", "stale", "invalid", "rejected", "not_found", "failed", "deferred")


async def start_run(tables: StateTables, run_id: str, entity: str, since: str, source: str) -> None:
    table = await tables.table("syncruns")
    await table.upsert_entity(
        {
            "PartitionKey": "run",
            "RowKey": run_id,
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
        {"PartitionKey": "run", "RowKey": run_id, **values}, mode=UpdateMode.MERGE, **RETRY_WRITES
    )


async def record_batch(tables: StateTables, run_id: str, batch_id: str, **values: Any) -> None:
    """One row per batch, overwritten by each delivery: a redelivered batch is counted once, as it last ended."""
    table = await tables.table("syncruns")
    await table.upsert_entity(
        {"PartitionKey": run_id, "RowKey": batch_id, "updated_at": iso(utcnow()), **values},
        mode=UpdateMode.MERGE,
        **RETRY_WRITES,
    )


async def read_batch(tables: StateTables, run_id: str, batch_id: str) -> dict[str, Any] | None:
    table = await tables.table("syncruns")
    try:
        return dict(await table.get_entity(run_id, batch_id))
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
    async for row in table.query_entities(f"PartitionKey eq {odata_string(run_id)}"):
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


async def read_hashes(tables: StateTables, entity: str, ids: Iterable[str]) -> dict[str, SyncedHash]:
    """The stored hash rows of `ids` with their ETags. Read them *before* fetching the records from billing:
    `write_hashes` is conditional on these ETags, which is what catches two workers writing one record at once."""
    table = await tables.table("synchashes")
    by_partition: dict[str, list[str]] = {}
    for record_id in dict.fromkeys(ids):
        by_partition.setdefault(hash_partition(entity, record_id), []).append(row_key(record_id))
    found = await asyncio.gather(
        *(query_keys(table, p, keys, select=["RowKey", "hash", "version"]) for p, keys in by_partition.items())
    )
    out: dict[str, SyncedHash] = {}
    for rows in found:
        for key, row in rows.items():
            record_id = from_row_key(key)
            out[record_id] = SyncedHash(
                record_id, str(row.get("hash") or ""), int(row.get("version") or 0), row.get("__etag")
            )
    return out


async def write_hashes(
    tables: StateTables, entity: str, new: Iterable[SyncedHash], before: Mapping[str, SyncedHash]
) -> list[str]:
    """Store the hashes of records just written, each on condition that its row is still as `before` had it.

    Returns the ids whose row changed meanwhile: another worker wrote the same record at the same time, and the CRM
    may now hold the older of the two versions. The caller re-syncs those ids (forced), so the latest one wins.
    """
    table = await tables.table("synchashes")
    now = iso(utcnow())
    ops: dict[str, list[tuple[SyncedHash, tuple[Any, ...]]]] = {}
    for h in new:
        entity_row = {
            "PartitionKey": hash_partition(entity, h.record_id),
            "RowKey": row_key(h.record_id),
            "hash": h.hash,
            "version": h.version,
            "synced_at": now,
        }
        old = before.get(h.record_id)
        if old is None or old.etag is None:
            op: tuple[Any, ...] = (TransactionOperation.CREATE, entity_row)
        else:
            op = (
                TransactionOperation.UPDATE,
                entity_row,
                {"mode": UpdateMode.REPLACE, "etag": old.etag, "match_condition": MatchConditions.IfNotModified},
            )
        ops.setdefault(str(entity_row["PartitionKey"]), []).append((h, op))

    async def one_by_one(items: list[tuple[SyncedHash, tuple[Any, ...]]]) -> list[str]:
        conflicts = []
        for h, op in items:
            try:
                if op[0] == TransactionOperation.CREATE:
                    await table.create_entity(op[1])
                else:
                    await table.update_entity(op[1], **op[2])
            except (ResourceExistsError, ResourceNotFoundError):
                conflicts.append(h.record_id)
            except HttpResponseError as exc:
                if exc.status_code not in (409, 412):
                    raise
                conflicts.append(h.record_id)
        return conflicts

    async def partition(items: list[tuple[SyncedHash, tuple[Any, ...]]]) -> list[str]:
        conflicts: list[str] = []
        for i in range(0, len(items), MAX_TRANSACTION):
            part = items[i : i + MAX_TRANSACTION]
            try:
                await table.submit_transaction([op for _, op in part], **RETRY_WRITES)
            except (TableTransactionError, ResourceExistsError, HttpResponseError):
                conflicts += await one_by_one(part)  # a conflict fails the whole transaction: find which
        return conflicts

    found = await asyncio.gather(*(partition(items) for items in ops.values()))
    return [record_id for ids in found for record_id in ids]
