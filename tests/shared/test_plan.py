"""The worker's pure decisions (`shared.plan`): what to write, skip or block, for any stored state."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from shared.billing.models import Customer
from shared.plan import blocked_invoices, invoices_by_customer, plan_records, planned
from shared.state import SyncedHash
from tests.shared.test_mapping import customers

# For each record: nothing stored, or a stored row with an older / the same / a newer version, and the same hash or
# another one.
stored_states = st.one_of(st.none(), st.tuples(st.sampled_from([-1, 0, 1]), st.booleans()))


def _stored(customer: Customer, state: tuple[int, bool] | None) -> SyncedHash | None:
    if state is None:
        return None
    version_delta, same_hash = state
    digest = planned(customer).hash if same_hash else "another hash"
    return SyncedHash(customer.id, digest, max(1, customer.version + version_delta))


@given(st.lists(st.tuples(customers, stored_states), max_size=30, unique_by=lambda p: p[0].id), st.booleans())
def test_every_record_is_written_skipped_as_unchanged_or_skipped_as_stale_exactly_once(
    pairs: list[tuple[Customer, tuple[int, bool] | None]], force: bool
) -> None:
    records = {c.id: c for c, _ in pairs}
    stored = {c.id: s for c, state in pairs if (s := _stored(c, state)) is not None}
    decided = plan_records(records, stored, force=force)
    written = [p.record_id for p in decided.write]
    assert sorted(written + decided.unchanged + decided.stale) == sorted(records)
    for record_id in decided.stale:  # an older version never overwrites a newer one, forced or not
        assert records[record_id].version < stored[record_id].version
    for record_id in decided.unchanged:
        assert not force
        assert stored[record_id].hash == planned(records[record_id]).hash
    for record_id in written:
        before = stored.get(record_id)
        assert before is None or records[record_id].version >= before.version
        assert force or before is None or before.hash != planned(records[record_id]).hash


@given(customers)
def test_the_planned_hash_is_what_is_stored_and_depends_on_content_not_on_the_version(customer: Customer) -> None:
    first = planned(customer)
    assert first.synced == SyncedHash(customer.id, first.hash, customer.version)
    assert planned(customer.model_copy(update={"version": customer.version + 1})).hash == first.hash
    assert planned(customer.model_copy(update={"name": customer.name + " Ltd"})).hash != first.hash


@given(
    st.dictionaries(
        st.sampled_from(["c1", "c2", "c3", "c4"]), st.lists(st.text("abc", min_size=1), max_size=4, unique=True)
    ),
    st.dictionaries(st.sampled_from(["c1", "c2", "c9"]), st.text(min_size=1)),
)
def test_invoices_are_blocked_exactly_when_their_account_cannot_be_written(
    by_customer: dict[str, list[str]], reasons: dict[str, str]
) -> None:
    by_customer = {c: [f"{c}-{i}" for i in invoices] for c, invoices in by_customer.items()}  # an invoice has one
    blocked = blocked_invoices(by_customer, reasons)
    expected = {i: reasons[c] for c, invoices in by_customer.items() if c in reasons for i in invoices}
    assert blocked == expected


def test_invoices_are_grouped_by_the_customer_they_bind_to() -> None:
    class Inv:
        def __init__(self, id: str, customer_id: str) -> None:
            self.id, self.customer_id = id, customer_id

    grouped = invoices_by_customer([Inv("i1", "c1"), Inv("i2", "c2"), Inv("i3", "c1")])  # type: ignore[list-item]
    assert grouped == {"c1": ["i1", "i3"], "c2": ["i2"]}
