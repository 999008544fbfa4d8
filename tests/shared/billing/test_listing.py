"""The listing's de-duplication at page boundaries: keyset-over-offset re-reads the records at the last timestamp."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.billing.listing import ListingPosition, new_ids
from shared.billing.models import Light

records = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 40)), max_size=80, unique_by=lambda r: r[1])


@given(records, st.integers(min_value=1, max_value=9))
def test_pages_that_repeat_the_boundary_timestamp_send_each_id_once(rows: list[tuple[int, int]], size: int) -> None:
    ordered = sorted(rows)
    lights = [Light(id=f"r{i}", updated_at=f"2025-01-01T00:00:{t:02d}.000000Z") for t, i in ordered]
    position = ListingPosition()
    sent: list[str] = []
    start = 0
    while start < len(lights):
        page = lights[start : start + size]
        sent += new_ids(position, tuple(page))
        last = page[-1].updated_at
        nxt = start + len(page)
        # the next request starts at the last timestamp seen (inclusive), as KeysetOverOffset asks
        first_at_last = next(i for i, r in enumerate(lights) if r.updated_at == last)
        start = nxt if all(r.updated_at == last for r in page) else max(first_at_last, start + 1)
    assert sent == [light.id for light in lights]
