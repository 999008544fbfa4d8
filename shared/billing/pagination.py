"""Paginators: small strategies with one method each, and a template method that refuses to loop.

`KeysetOverOffset` is how we list an offset-paginated account without losing records. The platform orders by
`updated_at` and counts `offset` from the start of `updated_since`; a record that changes during the listing moves
to the end, and every record behind it shifts one place forward, so a plain `offset += len(page)` loop skips one
record per change. Instead, each request starts at the `updated_at` of the last record seen (`updated_since` is
inclusive) with offset 0, so a record that moves can shift only records we have already read; the records ahead of
us stay put. The records at exactly that timestamp are read twice (usually one), and the listing keeps the newest
sighting of each id, so a record that moves ahead of us is simply read again at its new place. Only when a whole page
shares one timestamp (a bulk import) does it step through that timestamp by offset; there a change inside the group
could still shift a record past us, which the count check of the listing catches.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from shared.billing.models import Light
from shared.errors import ContractError


@dataclass(frozen=True)
class Page:
    records: tuple[Light, ...]
    has_more: bool
    next_cursor: str | None = None


MAX_LISTED_ID = 1000  # what a listing position can hold; the queue contract's 100 is checked by fan-out


def parse_page(body: Any, *, entity: str) -> Page:
    """A list answer, strictly: a page without `has_more` or with a broken record is a contract error."""
    if not isinstance(body, dict):
        raise ContractError(f"billing list {entity}: the answer is not a JSON object")
    if not isinstance(body.get("has_more"), bool):
        raise ContractError(f"billing list {entity}: the page has no boolean 'has_more'")
    data = body.get("data")
    if not isinstance(data, list):
        raise ContractError(f"billing list {entity}: the page has no 'data' list")
    records = []
    for i, raw in enumerate(data):
        if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"]:
            raise ContractError(f"billing list {entity}: record {i} of the page has no id")
        if not isinstance(raw.get("updated_at"), str):
            raise ContractError(f"billing list {entity}: record {raw['id']!r} has no updated_at")
        version = raw.get("version")  # only a hint for the listing: one that is not a whole number is left out
        version = version if isinstance(version, int) and not isinstance(version, bool) and version > 0 else None
        if len(raw["id"]) > MAX_LISTED_ID:
            raise ContractError(
                f"billing list {entity}: record {i} of the page has an id of {len(raw['id'])} characters"
            )
        records.append(Light(id=raw["id"], updated_at=raw["updated_at"], version=version))
    cursor = body.get("next_cursor")
    return Page(tuple(records), body["has_more"], cursor if isinstance(cursor, str) else None)


def looks_throttled(page: Page, *, previous_has_more: bool, records_due: bool) -> bool:
    """An empty page is silent throttling when the previous page promised more, or when records are due (the count
    endpoint says there are some and none has been listed yet). An empty page is never taken as "no more data"."""
    return not page.records and (previous_has_more or records_due)


class Paginator(ABC):
    """`first()` gives the first request's parameters; `next_params(page)` the next one's, or None at the end."""

    def __init__(self) -> None:
        self._asked: set[tuple[tuple[str, str], ...]] = set()

    @abstractmethod
    def first(self) -> dict[str, str]: ...

    @abstractmethod
    def advance(self, page: Page) -> dict[str, str] | None: ...

    def next_params(self, page: Page) -> dict[str, str] | None:
        params = self.advance(page)
        if params is None:
            return None
        key = tuple(sorted(params.items()))
        if key in self._asked:
            raise ContractError(f"pagination loop: the next page would repeat a request already made ({params})")
        self._asked.add(key)
        return params

    def start(self) -> dict[str, str]:
        params = self.first()
        self._asked.add(tuple(sorted(params.items())))
        return params

    def resume(self, params: dict[str, str]) -> dict[str, str]:
        """Go on from a checkpoint: `params` are the next request's, as `next_params` gave them."""
        self._restore(params)
        self._asked.add(tuple(sorted(params.items())))
        return params

    def _restore(self, params: dict[str, str]) -> None:  # noqa: B027 - a hook: stateless strategies keep it empty
        """Set the strategy's state from a request's parameters (stateless strategies need nothing)."""


class CursorPaginator(Paginator):
    def __init__(self, since: str) -> None:
        super().__init__()
        self.since = since

    def first(self) -> dict[str, str]:
        return {"updated_since": self.since} if self.since else {}

    def advance(self, page: Page) -> dict[str, str] | None:
        if not page.has_more:
            return None
        if not page.next_cursor:
            raise ContractError("cursor pagination: has_more is true but next_cursor is missing")
        return {**self.first(), "cursor": page.next_cursor}


@dataclass
class KeysetOverOffset(Paginator):
    """Keyset pagination on (updated_at, position among equal timestamps) over an offset API (module docstring)."""

    since: str
    _window: str = field(init=False)
    _offset: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        super().__init__()
        self._window = self.since

    def _params(self) -> dict[str, str]:
        params = {"offset": str(self._offset)}
        if self._window:
            params["updated_since"] = self._window
        return params

    def first(self) -> dict[str, str]:
        return self._params()

    def _restore(self, params: dict[str, str]) -> None:
        self._window = params.get("updated_since", self.since)
        self._offset = int(params.get("offset", "0"))

    def advance(self, page: Page) -> dict[str, str] | None:
        if not page.has_more:
            return None
        if not page.records:
            raise ContractError("offset pagination: has_more is true on an empty page")
        last = page.records[-1].updated_at
        if last != self._window:
            self._window, self._offset = last, 0  # restart at the last timestamp seen; repeats are de-duplicated
        else:
            self._offset += len(page.records)  # the whole page sat at one timestamp: step through it
        return self._params()
