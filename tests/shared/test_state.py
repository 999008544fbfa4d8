"""The state tables against Azurite: the conditional hash writes, and a dropped connection under a transaction."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from azure.core.exceptions import ServiceRequestError
from azure.core.pipeline.transport import AioHttpTransport
from azure.data.tables.aio import TableServiceClient

from shared import state
from shared.state import StateTables, SyncedHash

pytestmark = pytest.mark.anyio


class DropsFirst(AioHttpTransport):
    """A connection the server closed while idle: the first such request cannot write its body."""

    def __init__(self, method: str, path_ends: str = "") -> None:
        super().__init__()
        self.method, self.path_ends = method, path_ends
        self.dropped = 0

    async def send(self, request: Any, **kwargs: Any) -> Any:
        path = request.url.split("?")[0]
        if request.method == self.method and path.endswith(self.path_ends) and not self.dropped:
            self.dropped += 1
            raise ServiceRequestError("Can not write request body")
        return await super().send(request, **kwargs)


def tables_for(conn: str, **kwargs: Any) -> StateTables:
    return StateTables(TableServiceClient.from_connection_string(conn, **kwargs), f"t{uuid.uuid4().hex[:10]}")


async def prepared(conn: str, step: Callable[[StateTables], Awaitable[object]]) -> str:
    """Tables of a fresh prefix after `step`, through a client without faults; the prefix."""
    tables = tables_for(conn)
    try:
        await step(tables)
    finally:
        await tables.close()
    return tables.prefix


async def test_a_transaction_whose_connection_drops_is_sent_again_not_failed(conn: str) -> None:
    prefix = await prepared(conn, lambda tables: tables.table("synchashes"))  # the table exists before the fault
    transport = DropsFirst("POST", "$batch")
    tables = StateTables(TableServiceClient.from_connection_string(conn, transport=transport), prefix)
    try:
        new = [SyncedHash(f"inv_{i}", f"h{i}", 1) for i in range(5)]
        conflicts = await state.write_hashes(tables, "invoices", new, {})
        stored = await state.read_hashes(tables, "invoices", [h.record_id for h in new])
    finally:
        await tables.close()
    assert transport.dropped == 1
    assert conflicts == []
    assert {i: (h.hash, h.version) for i, h in stored.items()} == {f"inv_{i}": (f"h{i}", 1) for i in range(5)}


async def test_a_hash_row_changed_since_it_was_read_is_a_conflict_and_the_others_are_written(conn: str) -> None:
    tables = tables_for(conn)
    try:
        await state.write_hashes(tables, "invoices", [SyncedHash("a", "h1", 1), SyncedHash("b", "h1", 1)], {})
        before = await state.read_hashes(tables, "invoices", ["a", "b"])
        await state.write_hashes(tables, "invoices", [SyncedHash("a", "other", 2)], before)  # another worker
        conflicts = await state.write_hashes(
            tables, "invoices", [SyncedHash("a", "h2", 2), SyncedHash("b", "h2", 2), SyncedHash("c", "h1", 1)], before
        )
        after = await state.read_hashes(tables, "invoices", ["a", "b", "c"])
    finally:
        await tables.close()
    assert conflicts == ["a"]
    assert {i: h.hash for i, h in after.items()} == {"a": "other", "b": "h2", "c": "h1"}


async def test_a_ledger_write_whose_connection_drops_is_sent_again_not_failed(conn: str) -> None:
    prefix = await prepared(conn, lambda tables: state.start_run(tables, "run-1", "invoices", "", "fanout"))
    transport = DropsFirst("PATCH")
    tables = StateTables(TableServiceClient.from_connection_string(conn, transport=transport), prefix)
    try:
        await state.record_batch(tables, "run-1", "b-1", written=3)
        await state.update_run(tables, "run-1", status="completed")
        batch = await state.read_batch(tables, "run-1", "b-1")
        runs = await state.recent_runs(tables)
    finally:
        await tables.close()
    assert transport.dropped == 1
    assert batch is not None
    assert batch["written"] == 3
    assert [(r["RowKey"], r["status"]) for r in runs] == [("run-1", "completed")]


@pytest.mark.parametrize("record_id", ["plain", "with/slash", "hash#and?query", "per%cent", "tab\there", "ünï"])
def test_every_record_id_has_exactly_one_table_key_and_it_reads_back(record_id: str) -> None:
    key = state.row_key(record_id)
    assert not set(key) & set("/\\#?")
    assert all(ord(c) >= 32 for c in key)
    assert state.from_row_key(key) == record_id


async def test_an_invoices_line_keys_are_kept_with_its_hash_and_unknown_when_not_given_or_too_long(conn: str) -> None:
    tables = tables_for(conn)
    many = tuple(f"il_{n:08d}_{'x' * 40}" for n in range(1000))  # over 30,000 characters as JSON
    try:
        await state.write_hashes(tables, "invoices", [
            SyncedHash("two", "h", 1, lines=("il_1", "il_2")), SyncedHash("none", "h", 1, lines=()),
            SyncedHash("unknown", "h", 1), SyncedHash("many", "h", 1, lines=many),
        ], {})  # fmt: skip
        stored = await state.read_hashes(tables, "invoices", ["two", "none", "unknown", "many"])
        await state.write_hashes(tables, "invoices", [SyncedHash("two", "h2", 2)], stored)  # written without lines
        again = await state.read_hashes(tables, "invoices", ["two"])
    finally:
        await tables.close()
    assert {i: h.lines for i, h in stored.items()} == {"two": ("il_1", "il_2"), "none": (), "unknown": None,
                                                       "many": None}  # fmt: skip
    assert again["two"].lines is None  # the row is replaced: stale line keys never linger
