"""Paginators against an in-memory model of the billing list API, with mutations interleaved anywhere."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.billing.models import Light
from shared.billing.pagination import (
    CursorPaginator,
    KeysetOverOffset,
    Page,
    Paginator,
    looks_throttled,
    parse_page,
)
from shared.errors import ContractError
from tests.shared.billing.naive import NaiveOffsetPaginator


def stamp(n: int) -> str:
    return f"2026-01-01T00:00:00.{n:06d}Z"


@dataclass
class FakeListApi:
    """The platform's list semantics: inclusive `updated_since`, order (updated_at, id), offset or keyset cursor."""

    stamps: dict[str, int]
    clock: int = field(default=0)

    def __post_init__(self) -> None:
        self.clock = max(self.stamps.values(), default=0)

    def ordered(self, since: int) -> list[tuple[int, str]]:
        return sorted((ts, rid) for rid, ts in self.stamps.items() if ts >= since)

    def page(self, params: dict[str, str], limit: int) -> Page:
        since = int(params["updated_since"][-7:-1]) if "updated_since" in params else 0
        rows = self.ordered(since)
        if "cursor" in params:
            ts, rid = params["cursor"].split("|")
            rows = [r for r in rows if r > (int(ts), rid)]
        else:
            rows = rows[int(params.get("offset", "0")) :]
        chunk, more = rows[:limit], len(rows) > limit
        cursor = f"{chunk[-1][0]}|{chunk[-1][1]}" if more else None
        return Page(tuple(Light(id=rid, updated_at=stamp(ts)) for ts, rid in chunk), more, cursor)

    def mutate(self, rid: str) -> None:
        self.clock += 1
        self.stamps[rid] = self.clock


def run(paginator: Paginator, api: FakeListApi, limit: int, changes: list[list[int]]) -> set[str]:
    """List to the end; after page i, change the records at positions `changes[i]` of the current order."""
    seen: set[str] = set()
    params: dict[str, str] | None = paginator.start()
    page_no = 0
    while params is not None:
        page = api.page(params, limit)
        seen.update(r.id for r in page.records)
        for pos in changes[page_no] if page_no < len(changes) else []:
            order = api.ordered(0)
            api.mutate(order[pos % len(order)][1])
        page_no += 1
        assert page_no < 10_000
        params = paginator.next_params(page)
    return seen


dataset = st.dictionaries(
    st.text("abcdefghij", min_size=1, max_size=4), st.integers(min_value=1, max_value=60), min_size=1, max_size=80
)
schedules = st.lists(st.lists(st.integers(min_value=0, max_value=200), max_size=4), max_size=30)


@settings(max_examples=300, deadline=None)
@given(dataset, schedules, st.integers(min_value=1, max_value=25))
def test_keyset_over_offset_loses_nothing_whatever_changes_when(
    stamps: dict[str, int], changes: list[list[int]], limit: int
) -> None:
    groups = {ts: sum(1 for v in stamps.values() if v == ts) for ts in stamps.values()}
    page = max(limit, max(groups.values()) + 1)  # documented limit: a page must outgrow any one-timestamp group
    api = FakeListApi(dict(stamps))
    assert run(KeysetOverOffset(stamp(0)), api, page, changes) == set(stamps)


@settings(max_examples=300, deadline=None)
@given(dataset, schedules, st.integers(min_value=1, max_value=25))
def test_cursor_pagination_loses_nothing_whatever_changes_when(
    stamps: dict[str, int], changes: list[list[int]], limit: int
) -> None:
    api = FakeListApi(dict(stamps))
    assert run(CursorPaginator(stamp(0)), api, limit, changes) == set(stamps)


@pytest.mark.parametrize(
    ("records", "has_more", "previous_has_more", "records_due", "throttled"),
    [
        (0, False, True, False, True),  # the previous page promised more: an empty page cannot be the end
        (0, False, False, True, True),  # the count says there are records and none has been listed
        (0, False, False, False, False),  # nothing changed since the watermark: a true empty listing
        (3, False, True, True, False),  # records came: not throttled, whatever was expected
        (3, True, False, False, False),
    ],
)
def test_silent_throttle_detection(
    records: int, has_more: bool, previous_has_more: bool, records_due: bool, throttled: bool
) -> None:
    page = Page(tuple(Light(id=f"r{i}", updated_at=stamp(i)) for i in range(records)), has_more)
    assert looks_throttled(page, previous_has_more=previous_has_more, records_due=records_due) is throttled


def test_naive_offset_loop_skips_a_record_when_an_earlier_one_changes() -> None:
    api = FakeListApi({f"r{i:02d}": i + 1 for i in range(10)})
    seen = run(NaiveOffsetPaginator(stamp(0)), api, 3, [[0]])  # after page 1, the first record changes
    assert seen != set(api.stamps)
    assert "r03" not in seen  # it shifted into the slot the loop had already passed


def test_a_repeated_request_is_a_loop_not_an_endless_listing() -> None:
    paginator = CursorPaginator("")
    paginator.start()
    page = Page((Light(id="a", updated_at=stamp(1)),), True, "same")
    paginator.next_params(page)
    with pytest.raises(ContractError, match="pagination loop"):
        paginator.next_params(page)


def test_has_more_without_a_cursor_is_a_contract_error() -> None:
    with pytest.raises(ContractError, match="next_cursor is missing"):
        CursorPaginator("").next_params(Page((Light(id="a", updated_at=stamp(1)),), True, None))


def test_has_more_on_an_empty_offset_page_is_a_contract_error() -> None:
    with pytest.raises(ContractError, match="empty page"):
        KeysetOverOffset("").next_params(Page((), True))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "not a JSON object"),
        ({"data": []}, "has_more"),
        ({"data": [], "has_more": "yes"}, "has_more"),
        ({"has_more": False}, "'data' list"),
        ({"data": [{"updated_at": stamp(1)}], "has_more": False}, "record 0 of the page has no id"),
        ({"data": [{"id": "", "updated_at": stamp(1)}], "has_more": False}, "record 0 of the page has no id"),
        ({"data": [{"id": "x"}], "has_more": False}, "'x' has no updated_at"),
    ],
)
def test_malformed_pages_are_named(body: object, message: str) -> None:
    with pytest.raises(ContractError, match=message):
        parse_page(body, entity="invoices")
