"""The simulated organization's data in SQLite: one table per Dataverse table, columns named by logical name."""

from __future__ import annotations

import re
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sandbox.dataverse_sim.odata import GUID, ODataError, parse_key
from sandbox.dataverse_sim.schema import AMOUNT_KINDS, BY_SET, TABLES, Column, Table, amount_of, stored_amount

_SQL_TYPES = {
    "string": "TEXT", "memo": "TEXT", "integer": "INTEGER", "decimal": "INTEGER", "money": "INTEGER",
    "datetime": "TEXT", "date": "TEXT", "boolean": "INTEGER", "lookup": "TEXT", "guid": "TEXT",
}  # fmt: skip
_BIND = re.compile(rf"^/?(?P<set>\w+)\((?P<key>{GUID}|.+)\)$")


class DataverseError(Exception):
    """An error Dataverse would answer: HTTP status, its hexadecimal code, its message."""

    def __init__(self, status: int, code: str, message: str, *, index: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.index = index

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


def not_found(table: Table, key: dict[str, Any]) -> DataverseError:
    if list(key) == [table.primary_id]:
        return DataverseError(
            404, "0x80040217", f"{table.logical_name} With Id = {key[table.primary_id]} Does Not Exist"
        )
    return DataverseError(
        404, "0x80040217", f"A record with the specified key values does not exist in {table.logical_name} entity"
    )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Stored:
    id: str
    created: bool


class DataverseStore:
    def __init__(self, db: Path | None = None) -> None:
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(db) if db else ":memory:", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._version = 1000
        self._savepoint = 0
        self.reverted: dict[str, set[str]] = {}  # table -> columns a plugin puts back on update (a fault profile's)
        for table in TABLES.values():
            cols = ", ".join(
                f'"{c.name}" {_SQL_TYPES[c.type]}' + (" PRIMARY KEY" if c.name == table.primary_id else "")
                for c in table.columns
            )
            self._db.execute(f'CREATE TABLE IF NOT EXISTS "{table.logical_name}" ({cols})')
            key = ", ".join(f'"{k}"' for k in table.alternate_key)
            self._db.execute(
                f'CREATE UNIQUE INDEX IF NOT EXISTS "{table.logical_name}_key" ON "{table.logical_name}" ({key})'
            )
            for c in table.columns:
                if c.type == "lookup":
                    index = f"{table.logical_name}_{c.name}"
                    self._db.execute(f'CREATE INDEX IF NOT EXISTS "{index}" ON "{table.logical_name}" ("{c.name}")')
            row = self._db.execute(f'SELECT MAX(versionnumber) FROM "{table.logical_name}"').fetchone()
            self._version = max(self._version, int(row[0] or 0))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All or nothing (a bulk message on a standard table, a $batch change set); may nest."""
        with self._lock:
            self._savepoint += 1
            name = f"sp{self._savepoint}"
            self._db.execute(f"SAVEPOINT {name}")
            try:
                yield
            except BaseException:
                self._db.execute(f"ROLLBACK TO {name}")
                self._db.execute(f"RELEASE {name}")
                raise
            self._db.execute(f"RELEASE {name}")

    # ---- reading ----

    def find(self, table: Table, key: dict[str, Any]) -> sqlite3.Row | None:
        for name in key:
            if name != table.primary_id and name not in table.alternate_key:
                raise DataverseError(
                    400, "0x80060888", f"'{name}' is not the primary key nor an alternate key of {table.logical_name}"
                )
        if set(key) != {table.primary_id} and set(key) != set(table.alternate_key):
            raise DataverseError(
                400, "0x80060888", f"the key of {table.logical_name} is {', '.join(table.alternate_key)}"
            )
        where = " AND ".join(f'"{k}" = ?' for k in key)
        with self._lock:
            row: sqlite3.Row | None = self._db.execute(
                f'SELECT * FROM "{table.logical_name}" WHERE {where}', list(key.values())
            ).fetchone()
            return row

    def query(
        self,
        table: Table,
        *,
        where: str = "",
        params: Sequence[Any] = (),
        orderby: Sequence[tuple[str, bool]] = (),
        limit: int | None = None,
        offset: int = 0,
    ) -> list[sqlite3.Row]:
        order = [f'"{c}" {"DESC" if desc else "ASC"}' for c, desc in orderby] + [f'"{table.primary_id}" ASC']
        sql = f'SELECT * FROM "{table.logical_name}"' + (f" WHERE {where}" if where else "")
        sql += " ORDER BY " + ", ".join(order)
        sql += f" LIMIT {int(limit) if limit is not None else -1} OFFSET {int(offset)}"
        with self._lock:
            return list(self._db.execute(sql, list(params)))

    def count(self, table: Table, where: str = "", params: Sequence[Any] = ()) -> int:
        sql = f'SELECT COUNT(*) FROM "{table.logical_name}"' + (f" WHERE {where}" if where else "")
        with self._lock:
            return int(self._db.execute(sql, list(params)).fetchone()[0])

    def table_counts(self) -> dict[str, int]:
        return {name: self.count(table) for name, table in TABLES.items()}

    # ---- writing ----

    def _resolve_bind(self, column: Column, reference: Any) -> str:
        match = _BIND.match(str(reference).strip())
        target = TABLES[column.target or ""]
        if not match or BY_SET.get(match.group("set")) is not target:
            raise DataverseError(
                400, "0x80060888", f"'{column.navigation}@odata.bind' must reference {target.entity_set}(...)"
            )
        try:
            key = parse_key(match.group("key"), target)
        except ODataError as exc:
            raise DataverseError(400, "0x80060888", str(exc)) from None
        row = self.find(target, key)
        if row is None:
            raise not_found(target, key)
        return str(row[target.primary_id])

    def _values(self, table: Table, payload: dict[str, Any]) -> dict[str, Any]:
        """Validate a payload the way Dataverse does and turn it into column values."""
        values: dict[str, Any] = {}
        for name, value in payload.items():
            if name.startswith("@odata.") or (name.startswith("@") and "." in name):
                continue
            if name.endswith("@odata.bind"):
                column = table.lookup_by_navigation(name[: -len("@odata.bind")])
                if column is None:
                    raise DataverseError(
                        400, "0x80060888",
                        f"An undeclared property '{name[: -len('@odata.bind')]}' which only has property annotations "
                        "in the payload but no property value was found in the payload.",
                    )  # fmt: skip
                values[column.name] = None if value is None else self._resolve_bind(column, value)
                continue
            column = table.by_name.get(name)
            if column is None or column.type == "lookup" or (column.read_only and name != table.primary_id):
                raise DataverseError(
                    400, "0x80060888",
                    f"The property '{name}' does not exist on type 'Microsoft.Dynamics.CRM.{table.logical_name}'. "
                    "Make sure to only use property names that are defined by the type.",
                )  # fmt: skip
            values[name] = _convert(table, column, value)
        return values

    def _check_required(self, table: Table, row: dict[str, Any]) -> None:
        for column in table.columns:
            if column.required and row.get(column.name) in (None, ""):
                what = f"{column.navigation}@odata.bind" if column.type == "lookup" else column.name
                raise DataverseError(400, "0x80040203", f"Required field '{what}' is missing for {table.logical_name}")

    def _next_version(self) -> int:
        self._version += 1
        return self._version

    def write(
        self,
        table: Table,
        key: dict[str, Any] | None,
        payload: dict[str, Any],
        *,
        create: bool = True,
        update: bool = True,
    ) -> Stored:
        """Create, update or upsert one row. `key` comes from the URL (or @odata.id); the payload may hold it too."""
        with self._lock:
            values = self._values(table, payload)
            lookup_key = dict(key or {})
            if not lookup_key:
                alternate = {k: values.get(k) for k in table.alternate_key}
                if update and all(v not in (None, "") for v in alternate.values()):
                    lookup_key = alternate
                elif values.get(table.primary_id):
                    lookup_key = {table.primary_id: values[table.primary_id]}
            for k, v in lookup_key.items():
                if k in values and values[k] != v:
                    raise DataverseError(400, "0x80060888", f"the key in the URL and '{k}' in the body differ")
            existing = self.find(table, lookup_key) if lookup_key else None
            if existing is None:
                if not create:
                    raise not_found(table, lookup_key or {table.primary_id: "(none)"})
                row: dict[str, Any] = {c.name: None for c in table.columns}
                row.update({k: v for k, v in lookup_key.items() if k != table.primary_id})
                row.update(values)
                row[table.primary_id] = str(
                    lookup_key.get(table.primary_id) or values.get(table.primary_id) or uuid.uuid4()
                )
                row.update(createdon=_now(), modifiedon=_now(), statecode=row.get("statecode") or 0)
                row["versionnumber"] = self._next_version()
                self._check_required(table, row)
                self._insert(table, row)
                return Stored(row[table.primary_id], True)
            if not update:
                raise DataverseError(
                    412, "0x80040237",
                    f"A record with matching key values already exists in {table.logical_name}.",
                )  # fmt: skip
            row = dict(existing)
            row.update(values)
            row.update({c: existing[c] for c in self.reverted.get(table.logical_name, ())})  # the plugin
            row.update(modifiedon=_now(), versionnumber=self._next_version())
            self._check_required(table, row)
            assignments = ", ".join(f'"{c}" = :{c}' for c in row if c != table.primary_id)
            try:
                self._db.execute(
                    f'UPDATE "{table.logical_name}" SET {assignments} WHERE "{table.primary_id}" = :{table.primary_id}',
                    row,
                )
            except sqlite3.IntegrityError:
                raise _duplicate(table) from None
            return Stored(str(row[table.primary_id]), False)

    def _insert(self, table: Table, row: dict[str, Any]) -> None:
        cols = ", ".join(f'"{c}"' for c in row)
        marks = ", ".join(f":{c}" for c in row)
        try:
            self._db.execute(f'INSERT INTO "{table.logical_name}" ({cols}) VALUES ({marks})', row)
        except sqlite3.IntegrityError:
            raise _duplicate(table) from None

    def delete(self, table: Table, key: dict[str, Any]) -> None:
        with self._lock:
            row = self.find(table, key)
            if row is None:
                raise not_found(table, key)
            self._db.execute(
                f'DELETE FROM "{table.logical_name}" WHERE "{table.primary_id}" = ?', (row[table.primary_id],)
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _duplicate(table: Table) -> DataverseError:
    keys = ", ".join(table.alternate_key)
    return DataverseError(
        412, "0x80040237",
        f"A record that has the attribute values {keys} already exists. The entity key requires that this set of "
        "attributes contains unique values.",
    )  # fmt: skip


def _convert(table: Table, column: Column, value: Any) -> Any:
    where = f"'{column.name}' of '{table.logical_name}'"
    if value is None:
        return None
    kind = column.type
    if kind in ("string", "memo"):
        if not isinstance(value, str):
            raise DataverseError(
                400, "0x80060888", f"Cannot convert the literal '{value}' to the expected type 'Edm.String'."
            )
        if column.max_length is not None and len(value) > column.max_length:
            raise DataverseError(
                400, "0x80044331",
                f"A validation error occurred. The length of the '{column.name}' attribute of the "
                f"'{table.logical_name}' entity exceeded the maximum allowed length of '{column.max_length}'.",
            )  # fmt: skip
        return value
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataverseError(400, "0x80060888", f"{where}: expected Edm.Int32")
        return value
    if kind in AMOUNT_KINDS:
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
            raise DataverseError(
                400, "0x80060888", f"Cannot convert the literal '{value}' to the expected type 'Edm.Decimal'."
            )
        try:
            return stored_amount(value)
        except ValueError:
            raise DataverseError(
                400, "0x80044331", f"A validation error occurred. {where}: {value} is out of range."
            ) from None
    if kind == "boolean":
        if not isinstance(value, bool):
            raise DataverseError(400, "0x80060888", f"{where}: expected Edm.Boolean")
        return int(value)
    if kind == "date":
        try:
            return date.fromisoformat(str(value)).isoformat()
        except ValueError:
            raise DataverseError(400, "0x80060888", f"{where}: expected Edm.Date (YYYY-MM-DD)") from None
    if kind == "datetime":
        try:
            moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            raise DataverseError(400, "0x80060888", f"{where}: expected Edm.DateTimeOffset") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if kind == "guid":
        text = str(value).lower()
        if not re.fullmatch(GUID, text):
            raise DataverseError(400, "0x80060888", f"{where}: expected Edm.Guid")
        return text
    raise DataverseError(400, "0x80060888", f"{where}: cannot be written")


def to_json(table: Table, row: sqlite3.Row, select: Sequence[str] | None = None) -> dict[str, Any]:
    """A row as the Web API answers it: lookups as `_x_value`, an ETag, only the selected columns."""
    out: dict[str, Any] = {"@odata.etag": f'W/"{row["versionnumber"]}"'}
    wanted = set(select) if select else None
    for column in table.columns:
        name = f"_{column.name}_value" if column.type == "lookup" else column.name
        if wanted is not None and name not in wanted and column.name not in wanted and column.name != table.primary_id:
            continue
        out[name] = _answered(column, row[column.name])
    return out


def decoded(table: Table, row: sqlite3.Row) -> dict[str, Any]:
    """A stored row with its values as the Web API answers them (amounts as Decimal, booleans as bool)."""
    return {column.name: _answered(column, row[column.name]) for column in table.columns}


def _answered(column: Column, value: Any) -> Any:
    if value is None:
        return None
    if column.type == "boolean":
        return bool(value)
    if column.type in AMOUNT_KINDS:
        return amount_of(value)
    return value
