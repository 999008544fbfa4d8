"""The queue contract: versioned messages of billing IDs, parsed strictly, kept far below the 64 KiB limit.

```json
{"v": 1, "run_id": "...", "batch_id": "...", "entity": "invoices", "ids": ["in_1", "in_2"],
 "source": "fanout", "deferrals": 0, "force": false, "dlq_token": null, "kind": "sync", "dry_run": false}
```

A message that does not parse is `MalformedMessage`: it goes to the DLQ at once with the reason, since no number
of redeliveries can fix it.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from typing import Annotated, Any, Literal

from more_itertools import chunked
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1
MAX_IDS = 500
MAX_BYTES = 48 * 1024  # base64 adds a third: 64 KiB on the wire
# Run and batch ids are ours (`state.run_id_for`, `new_id`, `repair-…`, `reprocess-…`): letters, digits and `._:-`.
KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$"
# Record ids are billing's: any printable text up to 100 characters, never a control character (they reach logs,
# Table keys and URLs).
RECORD_ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]{1,100}$"
# Written into the DLQ rows a reprocess requeues and carried by the messages it sends: only a message holding a row's
# token may mark that row resolved (`dlq.resolve`).
TOKEN_PATTERN = r"^[0-9a-f]{32}$"  # noqa: S105 - the shape of a token, not one
Entity = Literal["customers", "invoices"]
Source = Literal["fanout", "webhook", "reprocess", "repair", "reconcile"]
Kind = Literal["sync", "reconcile", "orphans", "webhooks"]


class MalformedMessage(ValueError):
    """The message breaks the queue contract; `reason` says where."""


def from_queue(content: bytes) -> bytes:
    """The message's JSON from what the queue holds. Every producer writes base64 text (the SDK's
    TextBase64EncodePolicy), and host.json says `"messageEncoding": "none"`, so that the host hands over any
    content and decoding happens here: content that is not base64 becomes a malformed message at its first delivery
    instead of failing in the host, past every handler, on its way to `<queue>-poison-poison`."""
    try:
        return base64.b64decode(content.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedMessage(f"not base64 ({len(content)} bytes as the queue holds them)") from None


class SyncMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1]
    run_id: Annotated[str, Field(pattern=KEY_PATTERN)]
    batch_id: Annotated[str, Field(pattern=KEY_PATTERN)]
    entity: Entity
    ids: Annotated[tuple[Annotated[str, Field(pattern=RECORD_ID_PATTERN)], ...], Field(min_length=1)]
    source: Source = "fanout"
    deferrals: Annotated[int, Field(ge=0)] = 0
    force: bool = False  # write even when the stored hash matches (repairs after a concurrent write)
    dlq_token: Annotated[str, Field(pattern=TOKEN_PATTERN)] | None = None  # set by reprocess only
    kind: Kind = "sync"  # reconcile: compare with the CRM (shared.reconcile); orphans: CRM keys billing may lack;
    # webhooks: `ids` holds one window's key, whose changed ids wait in `webhookpending` (shared.coalesce)
    dry_run: bool = False

    def body(self) -> str:
        text = self.model_dump_json()
        size = len(text.encode())
        if size > MAX_BYTES:
            raise ValueError(f"message of {len(self.ids)} ids is {size} bytes, over {MAX_BYTES}")
        return text

    def deferred(self) -> SyncMessage:
        return self.model_copy(update={"deferrals": self.deferrals + 1})


def is_record_id(value: str) -> bool:
    return re.fullmatch(RECORD_ID_PATTERN, value) is not None  # fullmatch: `$` alone lets a final newline through


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def build(
    entity: Entity,
    ids: list[str],
    *,
    run_id: str,
    source: Source,
    batch_id: str | None = None,
    force: bool = False,
    kind: Kind = "sync",
    dry_run: bool = False,
    dlq_token: str | None = None,
) -> SyncMessage:
    return SyncMessage(
        v=1,
        run_id=run_id,
        batch_id=batch_id or new_id("b"),
        entity=entity,
        ids=tuple(ids),
        source=source,
        force=force,
        kind=kind,
        dry_run=dry_run,
        dlq_token=dlq_token,
    )


def split(
    entity: Entity, ids: list[str], *, size: int, run_id: str, source: Source, **options: Any
) -> list[SyncMessage]:
    """Messages of at most `size` ids each (and never more than MAX_IDS), order kept, duplicates removed; `options`
    are `build`'s (`force`, `kind`, `dry_run`, `dlq_token`)."""
    unique = list(dict.fromkeys(ids))
    step = max(1, min(size, MAX_IDS))
    return [build(entity, list(part), run_id=run_id, source=source, **options) for part in chunked(unique, step)]


def readable(content: bytes) -> bytes:
    """What a broken message says, for its DLQ row: the decoded body, or the content itself when it is not base64."""
    try:
        return from_queue(content)
    except MalformedMessage:
        return content


def _load(body: bytes | str) -> Any:
    """The body's JSON, bounded before it is parsed: too large, or nested deeper than the parser's stack, is
    malformed (a message is an object of scalars and one list: two levels)."""
    if len(body) > MAX_BYTES:
        raise MalformedMessage(f"{len(body)} bytes, over the {MAX_BYTES} a message may hold")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessage(f"not JSON ({type(exc).__name__} at position {getattr(exc, 'pos', '?')})") from None
    except RecursionError:
        raise MalformedMessage("nested too deep to be a message") from None


def parse(body: bytes | str) -> SyncMessage:
    """A SyncMessage, or MalformedMessage naming what is wrong (never the whole body)."""
    data = _load(body)
    if not isinstance(data, dict):
        raise MalformedMessage(f"expected a JSON object, got {type(data).__name__}")
    version = data.get("v")
    if version != SCHEMA_VERSION:
        raise MalformedMessage(f"v: unknown schema version {str(version)[:20]!r} (this worker reads {SCHEMA_VERSION})")
    ids = data.get("ids")
    if isinstance(ids, list) and len(ids) > MAX_IDS:  # anything else that is not a list the model refuses
        raise MalformedMessage(f"ids: {len(ids)} ids, at most {MAX_IDS} per message")
    try:
        return SyncMessage.model_validate(data)
    except ValidationError as exc:
        parts = []
        for err in exc.errors(include_url=False, include_input=False):
            where = ".".join(str(p) for p in err["loc"]) or "(message)"
            what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            if err["type"] == "literal_error" and err["loc"][:1] == ("entity",):
                what = "unknown entity (expected customers or invoices)"
            parts.append(f"{where}: {what}")
        raise MalformedMessage("; ".join(parts)) from None


def peek_ids(body: bytes | str) -> tuple[str | None, str | None, str | None]:
    """(run_id, batch_id, entity) from a body, as far as it can be read and as far as each is well formed: for DLQ
    rows of broken messages (anything else sent as an id, an email say, is not kept)."""
    try:
        data = _load(body)
    except MalformedMessage:
        return None, None, None
    if not isinstance(data, dict):
        return None, None, None

    def key(name: str) -> str | None:
        value = data.get(name)
        return value if isinstance(value, str) and re.fullmatch(KEY_PATTERN, value) else None

    entity = data.get("entity")
    return key("run_id"), key("batch_id"), entity if entity in ("customers", "invoices") else None
