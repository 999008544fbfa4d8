"""Reconcile's comparison (`shared.reconcile.compare`): the data dictionary's normalisation and one category per
kind of difference, each naming the record and the columns."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.billing.models import Customer, Invoice, InvoiceLine
from shared.dataverse.client import UpsertRow
from shared.mapping import CUSTOMER_MAP, Column, customer_row, invoice_rows
from shared.reconcile import compare
from shared.reconcile.compare import Mismatch
from shared.telemetry import MISMATCH_CATEGORIES
from tests.shared.test_mapping import customers

NOW = datetime(2026, 11, 30, 9, 30, tzinfo=UTC)


def as_crm(row: UpsertRow) -> dict[str, Any]:
    """The row as Dataverse answers a read of it: amounts with four decimals, its key among the columns."""
    values = {k: v for k, v in row.values.items() if not k.endswith("@odata.bind")}
    out = {k: v.quantize(Decimal("0.0001")) if isinstance(v, Decimal) else v for k, v in values.items()}
    return {**out, **row.key}


def invoice(**changes: Any) -> Invoice:
    line = {"product_code": "P1", "quantity": "2", "unit_price": "10.00", "amount": "20.00"}
    lines = tuple(InvoiceLine.model_validate({**line, "id": f"li_{n}", "position": n}) for n in (1, 2))
    base = Invoice(id="in_1", number="INV-1", customer_id="cus_1", status="open", currency="EUR", issued_at=NOW,
                   due_at=NOW, paid_at=None, subtotal="40.00", tax="8.00", total="48.00",
                   amount_paid="0.00", amount_due="48.00", lines=lines, created_at=NOW, updated_at=NOW,
                   version=3)  # fmt: skip
    return base.model_copy(update=changes)


def compared(record: Invoice, crm: dict[str, Any] | None = None, crm_lines: list[dict[str, Any]] | None = None,
             ) -> list[Mismatch]:  # fmt: skip
    row, lines = invoice_rows(record)
    crm_row = as_crm(row) | (crm or {})
    crm_line_rows = crm_lines if crm_lines is not None else [as_crm(line) for line in lines]
    return compare.compare("invoices", record.id, row, [crm_row], lines=(lines, crm_line_rows))


@settings(max_examples=200, deadline=None)
@given(customers, st.sampled_from(["", " ", "\t"]), st.booleans())
def test_a_customer_as_the_crm_holds_it_has_no_mismatch(customer: Customer, pad: str, upper: bool) -> None:
    """Four decimal places, padding, an email the CRM upper-cased, null for empty text: none of it is a mismatch."""
    row = customer_row(customer)
    crm = as_crm(row)
    crm = {k: (f"{pad}{v}{pad}" if isinstance(v, str) and k != "accountnumber" else v) for k, v in crm.items()}
    if upper and crm.get("emailaddress1"):
        crm["emailaddress1"] = crm["emailaddress1"].upper()
    crm |= {k: None for k, v in crm.items() if v == ""}
    assert compare.compare("customers", customer.id, row, [crm]) == []


def test_an_invoice_as_the_sync_wrote_it_has_no_mismatch() -> None:
    assert compared(invoice()) == []


@pytest.mark.parametrize(
    ("crm", "category", "difference"),
    [({"totalamount": Decimal("60.0000")}, "amount_over", Decimal("12.00")),
     ({"bcs_amountdue": Decimal("40.0000")}, "amount_under", Decimal("-8.00"))],
)  # fmt: skip
def test_an_amount_the_crm_shows_wrong_is_over_or_under_with_the_difference_and_currency(
    crm: dict[str, Any], category: str, difference: Decimal
) -> None:
    (found,) = compared(invoice(), crm)
    assert (found.category, found.columns, found.difference, found.currency) == (
        category, tuple(crm), difference, "EUR"
    )  # fmt: skip


def test_other_columns_edited_in_the_crm_are_one_field_mismatch_naming_each_with_personal_data_masked() -> None:
    customer = Customer(id="cus_1", name="Acme", email="ann.lee@acme.example", status="active", currency="EUR",
                        balance="0.00", mrr="0.00", created_at=NOW, updated_at=NOW, version=2)  # fmt: skip
    row = customer_row(customer)
    crm = as_crm(row) | {"emailaddress1": "bob@other.example", "bcs_billingstatus": "churned"}
    (found,) = compare.compare("customers", "cus_1", row, [crm])
    assert (found.category, found.columns) == ("field_mismatch", ("emailaddress1", "bcs_billingstatus"))
    assert found.billing == ("a***@acme.example", "active")
    assert found.crm == ("b***@other.example", "churned")


def test_an_older_version_in_the_crm_that_shows_is_stale_not_an_edit() -> None:
    found = compared(invoice(), {"bcs_sourceversion": 2, "totalamount": Decimal("40.00"), "bcs_billingstatus": "draft"})
    assert [(m.category, m.columns) for m in found] == [("stale", ("bcs_billingstatus", "totalamount"))]
    assert compared(invoice(), {"bcs_sourceversion": 2}) == []  # a version that changed nothing shown: in step


def test_no_row_and_two_rows_are_missing_and_duplicate() -> None:
    row, _ = invoice_rows(invoice())
    assert [m.category for m in compare.compare("invoices", "in_1", row, [])] == ["missing_in_crm"]
    two = compare.compare("invoices", "in_1", row, [as_crm(row), as_crm(row)])
    assert [(m.category, m.healable) for m in two] == [("duplicate_in_crm", False)]


def test_lines_are_compared_as_a_set_per_invoice() -> None:
    _, lines = invoice_rows(invoice())
    crm_lines = [as_crm(lines[0]) | {"quantity": Decimal("3.0000")}, as_crm(replace(lines[1], key={
        "bcs_billinglineid": "li_9"}))]  # fmt: skip
    found = {m.category: m for m in compared(invoice(), crm_lines=crm_lines)}
    assert found["lines_missing"].columns == ("li_2",)
    assert found["lines_extra"].columns == ("li_9",)
    assert found["field_mismatch"].columns == ("lines.li_1.quantity",)
    assert (found["field_mismatch"].billing, found["field_mismatch"].crm) == (("2.00",), ("3.00",))


@given(st.decimals(min_value=-(10**9), max_value=10**9, places=4, allow_nan=False, allow_infinity=False))
def test_money_is_compared_to_the_cent_within_the_column_tolerance(amount: Decimal) -> None:
    exact = Column("x", "x", "money")
    loose = Column("x", "x", "money", tolerance=Decimal("0.01"))
    cents = amount.quantize(Decimal("0.01"))  # half to even, as the comparison rounds
    assert compare.same(exact, cents, amount)
    assert not compare.same(exact, cents + Decimal("0.01"), amount)
    assert compare.same(loose, cents + Decimal("0.01"), amount)
    assert not compare.same(loose, cents + Decimal("0.03"), amount)
    assert compare.normalise(exact, compare.normalise(exact, amount)) == compare.normalise(exact, amount)


@pytest.mark.parametrize(
    ("transform", "billing", "crm"),
    [("utc datetime", "2026-11-30T09:30:00Z", "2026-11-30T10:30:00+01:00"),
     ("utc datetime", "2026-11-30T09:30:00Z", "2026-11-30T09:30:00.000Z"),
     ("date", "2026-11-30", "2026-11-30T00:00:00Z"),
     ("text", None, ""), ("text", "Acme ", " Acme"), ("integer", 3, "3")],
)  # fmt: skip
def test_values_the_crm_writes_another_way_are_the_same(transform: str, billing: Any, crm: Any) -> None:
    assert compare.same(Column("x", "x", transform), billing, crm)


@pytest.mark.parametrize("crm", ["not a date", "12,50", Decimal("1E+2")])
def test_a_crm_value_that_cannot_be_read_as_its_type_differs(crm: Any) -> None:
    assert not compare.same(Column("x", "x", "utc datetime"), "2026-11-30T09:30:00Z", crm)


def test_orphans_are_crm_keys_billing_does_not_have() -> None:
    assert compare.orphans("customers", ["cus_1", "cus_gone"], {"cus_1"}) == [
        Mismatch("customers", "cus_gone", "orphan_in_crm")
    ]
    assert CUSTOMER_MAP.key.column == "accountnumber"


def test_the_categories_are_the_ones_the_metrics_registry_declares() -> None:
    assert compare.CATEGORIES == MISMATCH_CATEGORIES
