"""The queue contract: strict parsing with reasons, and splitting that keeps every id once, in order."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import messages
from shared.messages import MAX_BYTES, MalformedMessage

ids = st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=30), max_size=700)


@given(ids, st.integers(min_value=1, max_value=600))
def test_splitting_keeps_every_id_once_in_order_and_stays_under_the_limits(values: list[str], size: int) -> None:
    batch = messages.split("customers", values, size=size, run_id="r", source="fanout")
    out = [i for m in batch for i in m.ids]
    assert out == list(dict.fromkeys(values))
    for m in batch:
        assert 1 <= len(m.ids) <= min(size, messages.MAX_IDS)
        assert len(m.body().encode()) <= MAX_BYTES
        assert messages.parse(m.body()) == m
    assert len({m.batch_id for m in batch}) == len(batch)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"run_id": "r"}', "unknown schema version"),
        ('{"v": 1, "run_id": "r", "batch_id": "b", "entity": "orders", "ids": ["a"]}', "entity: unknown entity"),
        ('{"v": 1, "run_id": "r", "batch_id": "b", "entity": "invoices", "ids": []}', "ids:"),
        ('{"v": 1, "run_id": "r", "batch_id": "b", "entity": "invoices", "ids": ["a"], "x": 1}', "x: unknown key"),
    ],
)
def test_a_message_that_breaks_the_contract_says_where(body: str | bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        messages.parse(body)


def test_too_many_ids_is_malformed_before_validation() -> None:
    body = json.dumps({"v": 1, "run_id": "r", "batch_id": "b", "entity": "customers", "ids": ["a"] * 501})
    with pytest.raises(MalformedMessage, match="at most 500"):
        messages.parse(body)


def test_ids_of_a_broken_message_are_read_as_far_as_possible() -> None:
    assert messages.peek_ids('{"run_id": "r1", "batch_id": 5, "entity": "invoices"}') == ("r1", None, "invoices")
    assert messages.peek_ids("nope") == (None, None, None)


def _message(**fields: object) -> str:
    return json.dumps({"v": 1, "run_id": "r", "batch_id": "b", "entity": "invoices", "ids": ["in_1"], **fields})


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("[" * 10_000 + "]" * 10_000, "nested too deep"),  # RecursionError in the parser before
        ('{"v": 1, "x": ' + "[" * 10_000 + "]" * 10_000 + "}", "nested too deep"),
        ('{"v": 1, "ids": ["' + "a" * MAX_BYTES + '"]}', "bytes, over"),
        (_message(run_id="run/1"), "run_id: String should match pattern"),  # a Table key could not hold it
        (_message(batch_id="b#1?x"), "batch_id: String should match pattern"),
        (_message(run_id="ann@example.com"), "run_id: String should match pattern"),
        (_message(ids=["in_1", "bad\nid"]), "ids.1: String should match pattern"),  # would forge a log line
        (_message(ids=["nul\x00"]), "ids.0: String should match pattern"),
        (_message(ids=True), "ids: Input should be a valid tuple"),  # found by the fuzz suite: a TypeError before
        (_message(ids=7), "ids: Input should be a valid tuple"),
    ],
)
def test_hostile_messages_are_malformed_with_the_place_named(body: str, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        messages.parse(body)


def test_only_well_formed_ids_are_kept_from_a_broken_message() -> None:
    """An email or a path sent as a run or batch id is neither a Table key nor personal data the DLQ may keep."""
    body = '{"run_id": "ann@example.com", "batch_id": "b/../x", "entity": "orders"}'
    assert messages.peek_ids(body) == (None, None, None)
    assert messages.peek_ids("[" * 10_000) == (None, None, None)
    assert messages.peek_ids(_message(run_id="run-1\n", batch_id="b\n")) == (None, None, "invoices")  # `$` alone
    assert not messages.is_record_id("in_1\n")


@given(st.text(max_size=200) | st.binary(max_size=200))
def test_any_body_parses_or_is_malformed_and_nothing_else(body: str | bytes) -> None:
    with contextlib.suppress(MalformedMessage):
        messages.parse(body)
    messages.peek_ids(body)
