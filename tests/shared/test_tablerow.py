"""The typed serializer between the state's dataclasses and Table rows: round trips, and rows of older versions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.billing.listing import ListingPosition
from shared.breaker import BreakerState
from shared.state import Checkpoint

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
positions = st.builds(
    ListingPosition,
    since=text,
    expected=st.integers(0, 10**9),
    round=st.integers(1, 3),
    pages=st.integers(0, 10**6),
    listed=st.integers(0, 10**9),
    params=st.none() | st.dictionaries(text, text, max_size=3),
    boundary=st.tuples(text, st.lists(text, max_size=5)),
)
checkpoints = st.builds(
    Checkpoint,
    entity=st.sampled_from(["customers", "invoices"]),
    watermark=text,
    run_id=text,
    listing_started=text,
    listing=positions,
    messages=st.integers(0, 10**9),
    last_completed=text,
    etag=st.none(),
)


@given(checkpoints)
def test_a_checkpoint_reads_back_as_it_was_written(checkpoint: Checkpoint) -> None:
    row = checkpoint.to_entity()
    assert all(isinstance(v, str | int | float | bool) for v in row.values())  # a Table row holds scalars
    assert Checkpoint.from_entity(row, etag=None) == checkpoint


def test_a_checkpoint_row_of_the_previous_version_still_reads() -> None:
    row = {"PartitionKey": "watermark", "RowKey": "invoices", "watermark": "2026-11-30T00:00:00.000000Z",
           "run_id": "r1", "since": "2026-11-29T23:58:00.000000Z", "listing_started": "2026-11-30T00:05:00.000000Z",
           "params": '{"cursor": "abc"}', "expected": 10, "listed": 4, "round": 2, "pages": 1, "messages": 1,
           "boundary": '["2026-11-29T23:59:00Z", ["in_1"]]', "last_completed": ""}  # fmt: skip
    cp = Checkpoint.from_entity(row, etag="W/1")
    assert (cp.entity, cp.run_id, cp.etag, cp.messages) == ("invoices", "r1", "W/1", 1)
    assert cp.listing == ListingPosition(since="2026-11-29T23:58:00.000000Z", expected=10, round=2, pages=1,
                                         listed=4, params={"cursor": "abc"},
                                         boundary=("2026-11-29T23:59:00Z", ["in_1"]))  # fmt: skip
    assert Checkpoint.from_entity({"RowKey": "customers"}, etag=None) == Checkpoint("customers")


def test_a_breaker_row_reads_back_and_an_unreadable_one_is_taken_as_closed() -> None:
    state = BreakerState(state="open", failures=5, opened_at=100.0, probe_at=0.0, unhealthy_since=90.0)
    assert BreakerState.from_entity(state.to_entity("billing")) == state
    old = {"PartitionKey": "breaker", "RowKey": "billing", "state": "open", "failures": 5, "opened_at": 100.0}
    assert BreakerState.from_entity(old).unhealthy_since == 100.0  # before unhealthy_since was kept
    assert BreakerState.from_entity({"RowKey": "billing", "state": "melted", "failures": "x"}) == BreakerState()
