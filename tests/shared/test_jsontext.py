"""JSON text with exact decimal amounts: what goes out is what comes back, digit for digit."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import jsontext

plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_a_decimal_goes_out_as_a_number_and_comes_back_equal(amount: Decimal) -> None:
    text = jsontext.dumps({"amount": amount})
    back = jsontext.loads(text)["amount"]
    assert back == amount
    assert json.loads(text)["amount"] is not None  # any JSON parser reads it as a number
    assert not isinstance(json.loads(text)["amount"], str)


@given(plain)
def test_everything_else_is_written_as_the_standard_library_writes_it(value: Any) -> None:
    assert json.loads(jsontext.dumps(value)) == value


def test_digits_a_float_would_lose_are_kept() -> None:
    amount = Decimal("123456789012345.6789")
    assert jsontext.dumps([amount]) == "[123456789012345.6789]"
    assert json.dumps([float(amount)]) != "[123456789012345.6789]"


@pytest.mark.parametrize("bad", [Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity")])
def test_a_non_finite_amount_is_refused(bad: Decimal) -> None:
    with pytest.raises(ValueError, match="not a JSON number"):
        jsontext.dumps(bad)
