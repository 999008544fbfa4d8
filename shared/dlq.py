"""The dead-letter table: every record or message the sync could not deliver, with its reason. Nothing is deleted.

Rows (table `deadletters`):

- records: PartitionKey `record-<entity>`, RowKey the record id. One row per record, however often it fails: a
  record that is still invalid in the next run updates its row (`last_seen`, `occurrences`), it does not add one.
- messages: PartitionKey `message`, RowKey the batch id (or a digest of a body without one): malformed messages
  and messages that reached the poison queue, with the body, the last error recorded for the batch and its attempts.

`status` is `open` (needs an operator), `requeued` (reprocess sent it again) or `resolved` (it synced after being
requeued). Personal data is masked before anything is stored (`shared.redact`): an email keeps its first letter and
domain, a phone number its last four digits: enough to find the record, not enough to contact anyone. A message
that parsed holds ids only and is stored verbatim, so reprocess replays exactly what failed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import UpdateMode

from shared import logs, messages
from shared.clock import iso, utcnow
from shared.odata import literal
from shared.redact import mask, printable
from shared.state import StateTables, from_row_key, query_keys, row_key

log = logs.get_logger("shared.dlq")
Kind = Literal["record", "message"]
MAX_TEXT = 2000
MAX_BODY = 30_000  # a Table string property holds 64 KiB (32K UTF-16 characters)
MAX_RAW = 16 * 1024  # bytes of a malformed message kept as they came, base64-encoded (under MAX_BODY characters)
DEPTH_CAP = 10_000


def _short(text: str, limit: int = MAX_TEXT) -> str:
    """What a DLQ row may hold of outside text: masked, control characters escaped, capped."""
    return _fits(printable(mask(text), limit))


def _body_parts(text: str) -> dict[str, str]:
    """A verbatim body whole, over as many properties as it needs (`body`, `body_1`, ...): a message may hold 48 KiB,
    more than one Table property does, and reprocess must send it again exactly. `body_of` joins them."""
    parts: dict[str, str] = {}
    while text or not parts:
        piece = _fits(text)
        parts["body" if not parts else f"body_{len(parts)}"] = piece
        text = text[len(piece) :]
    return parts


def body_of(row: dict[str, Any]) -> str:
    """The message body a row keeps, its parts joined."""
    text, n = str(row.get("body") or ""), 1
    while f"body_{n}" in row:
        text += str(row[f"body_{n}"])
        n += 1
    return text


def _fits(text: str, units: int = MAX_BODY) -> str:
    """`text` cut to what a Table string property holds: it counts UTF-16 code units (64 KiB), not characters, and
    a character outside the BMP (an emoji) takes two."""
    encoded = text.encode("utf-16-le", "surrogatepass")
    if len(encoded) <= 2 * units:
        return text
    return encoded[: 2 * units].decode("utf-16-le", "ignore")  # a pair cut in half is dropped


@dataclass(frozen=True)
class RecordFailure:
    entity: str
    record_id: str
    reason_kind: str  # one of telemetry.DLQ_REASONS: invalid, rejected, dependency, not_found
    reason: str
    error: dict[str, Any] | None = None


async def put_records(tables: StateTables, failures: Sequence[RecordFailure], *, run_id: str, batch_id: str) -> None:
    """Write (or refresh) one row per failed record, status `open`."""
    table = await tables.table("deadletters")
    now = iso(utcnow())
    for f in failures:
        row = {
            "PartitionKey": f"record-{f.entity}",
            "RowKey": row_key(f.record_id),
            "kind": "record",
            "entity": f.entity,
            "record_id": printable(f.record_id, 200),  # a well-formed id as it is
            "reason_kind": f.reason_kind,
            "reason": _short(f.reason),
            "error": _short(json.dumps(f.error, default=str)) if f.error else "",
            "run_id": run_id,
            "batch_id": batch_id,
            "status": "open",
            "last_seen": now,
        }
        await _create_or_refresh(table, row, now)


async def put_message(
    tables: StateTables,
    *,
    body: str,
    reason_kind: str,
    reason: str,
    run_id: str | None,
    batch_id: str | None,
    entity: str | None,
    attempts: int | None = None,
    last_error: str | None = None,
    first_failed: str | None = None,
    verbatim: bool = False,
    raw: bytes | None = None,
    key: str | None = None,
) -> str:
    """A row for a whole message (malformed, or poisoned); its RowKey. A `verbatim` body (one that parsed: ids only)
    is kept as it was, for reprocess to send again (masking would rewrite a run id that looks like a phone number)."""
    table = await tables.table("deadletters")
    now = iso(utcnow())
    key = key or (row_key(batch_id) if batch_id else "body-" + hashlib.sha256(body.encode()).hexdigest()[:32])
    row = {
        "PartitionKey": "message",
        "RowKey": key,
        "kind": "message",
        "entity": entity or "",
        "record_id": "",
        "reason_kind": reason_kind,
        "reason": _short(reason),
        "error": _short(last_error or ""),
        "run_id": run_id or "",
        "batch_id": batch_id or "",
        **(_body_parts(body) if verbatim else {"body": _short(body, MAX_BODY)}),
        "attempts": attempts if attempts is not None else 0,
        "first_failed": first_failed or "",
        "status": "open",
        "last_seen": now,
    }
    await _create_or_refresh(table, row | _raw(raw), now)
    return key


def _raw(content: bytes | None) -> dict[str, Any]:
    """The content as the queue held it, for a message that did not parse: base64, capped, and its full size."""
    if content is None:
        return {}
    return {"raw_base64": base64.b64encode(content[:MAX_RAW]).decode("ascii"), "raw_bytes": len(content)}


async def put_malformed(tables: StateTables, content: bytes, reason: str, *, attempts: int = 1) -> str:
    """A row for content that breaks the queue contract (`content` as the queue held it, whatever the bytes): the
    reason, the ids as far as they can be read and are well formed, the body as readable masked text, and the raw
    content base64-encoded (`raw_base64`, the first MAX_RAW bytes of `raw_bytes`) for whoever must find out what
    sent it. Returns its RowKey."""
    body = messages.readable(content)
    run_id, batch_id, entity = messages.peek_ids(body)
    return await put_message(
        tables,
        body=body.decode("utf-8", "replace"),
        reason_kind="malformed",
        reason=reason,
        run_id=run_id,
        batch_id=batch_id,
        entity=entity,
        attempts=attempts,
        raw=content,
    )


async def _create_or_refresh(table: Any, row: dict[str, Any], now: str) -> None:
    with contextlib.suppress(ResourceExistsError):
        await table.create_entity({**row, "first_seen": now, "occurrences": 1, "requeue_count": 0})
        return
    existing = await table.get_entity(row["PartitionKey"], row["RowKey"])
    await table.update_entity({**row, "occurrences": int(existing.get("occurrences") or 0) + 1}, mode=UpdateMode.MERGE)


@dataclass(frozen=True)
class Selection:
    """Which rows: all of them, or by run, by reason (substring of reason_kind or reason), by record ids."""

    all: bool = False
    run_id: str | None = None
    reason: str | None = None
    ids: tuple[str, ...] = ()
    entity: str | None = None
    statuses: tuple[str, ...] = ("open",)

    def matches(self, row: dict[str, Any]) -> bool:
        if self.statuses and row.get("status") not in self.statuses:
            return False
        if self.entity and row.get("entity") != self.entity:
            return False
        if self.run_id and row.get("run_id") != self.run_id:
            return False
        if self.reason:
            needle = self.reason.lower()
            if (
                needle not in str(row.get("reason_kind", "")).lower()
                and needle not in str(row.get("reason", "")).lower()
            ):
                return False
        if self.ids and row.get("record_id") not in self.ids and row.get("batch_id") not in self.ids:
            return False
        return self.all or bool(self.run_id or self.reason or self.ids or self.entity)


def _filter(selection: Selection) -> str | None:
    parts = []
    if len(selection.statuses) == 1:
        parts.append(f"status eq {literal(selection.statuses[0])}")
    if selection.run_id:
        parts.append(f"run_id eq {literal(selection.run_id)}")
    if selection.entity:
        parts.append(f"entity eq {literal(selection.entity)}")
    return " and ".join(parts) or None


async def rows(tables: StateTables, selection: Selection, *, limit: int = 1000) -> list[dict[str, Any]]:
    table = await tables.table("deadletters")
    query = _filter(selection)
    out: list[dict[str, Any]] = []
    entities = table.query_entities(query) if query else table.list_entities()
    async for entity in entities:
        row = dict(entity)
        if selection.matches(row):
            out.append(row)
            if len(out) >= limit:
                break
    return out


async def depth(tables: StateTables) -> int:
    """Open rows, counted up to DEPTH_CAP."""
    table = await tables.table("deadletters")
    count = 0
    async for _ in table.query_entities("status eq 'open'", select=["RowKey"]):
        count += 1
        if count >= DEPTH_CAP:
            break
    return count


async def open_by_reason(tables: StateTables) -> Counter[str]:
    """Open rows by reason, counted up to DEPTH_CAP in all."""
    table = await tables.table("deadletters")
    counts: Counter[str] = Counter()
    async for row in table.query_entities("status eq 'open'", select=["reason_kind"]):
        counts[str(row.get("reason_kind") or "unknown")] += 1
        if counts.total() >= DEPTH_CAP:
            break
    return counts


async def mark_requeued(tables: StateTables, keyed: Iterable[tuple[str, str]], token: str) -> int:
    """Mark rows, given as (PartitionKey, RowKey), `requeued` under `token`, the one the messages sent for them
    carry; rows that do not exist are passed over. Written before the messages are sent, so no message can come back
    before its rows know its token."""
    table = await tables.table("deadletters")
    now = iso(utcnow())
    changed = 0
    for partition, key in keyed:
        try:
            existing = await table.get_entity(partition, key)
            await table.update_entity(
                {"PartitionKey": partition, "RowKey": key, "status": "requeued", "requeued_at": now,
                 "requeue_token": token, "requeue_count": int(existing.get("requeue_count") or 0) + 1},
                mode=UpdateMode.MERGE,
            )  # fmt: skip
            changed += 1
        except ResourceNotFoundError:
            continue
    return changed


async def resolve(tables: StateTables, partition: str, keys: Iterable[str], token: str | None) -> int:
    """Mark `resolved` the rows of `partition` among `keys` that a reprocess requeued under `token` (and that no
    later reprocess requeued again): a message without the token, or with another row's, resolves nothing."""
    if token is None:
        return 0
    table = await tables.table("deadletters")
    now = iso(utcnow())
    found = await query_keys(table, partition, keys, select=["RowKey", "status", "requeue_token"])
    changed = 0
    for key, row in found.items():
        if row.get("status") != "requeued" or row.get("requeue_token") != token:
            continue
        try:
            await table.update_entity(
                {"PartitionKey": partition, "RowKey": key, "status": "resolved", "resolved_at": now},
                mode=UpdateMode.MERGE, etag=row["__etag"], match_condition=MatchConditions.IfNotModified,
            )  # fmt: skip
        except (ResourceModifiedError, ResourceNotFoundError):
            continue  # requeued again meanwhile: the newer token resolves it
        except HttpResponseError as exc:
            if exc.status_code != 412:
                raise
            continue
        changed += 1
    return changed


def public(row: dict[str, Any], *, with_body: bool = False) -> dict[str, Any]:
    """A row as the admin API shows it."""
    keep = (
        "kind", "entity", "record_id", "reason_kind", "reason", "error", "run_id", "batch_id", "status",
        "first_seen", "last_seen", "occurrences", "requeue_count", "requeued_at", "resolved_at", "attempts",
        "first_failed", "raw_bytes",
    )  # fmt: skip
    out = {k: row[k] for k in keep if k in row and row[k] not in (None, "")}
    out["key"] = f"{row['PartitionKey']}/{from_row_key(str(row['RowKey']))}"
    if with_body:
        out |= {"body": body_of(row)} if row.get("body") else {}
        out |= {"raw_base64": row["raw_base64"]} if row.get("raw_base64") else {}
    return out
