"""The worker's CRM writes (`shared.writes`) against the Dataverse simulator: typed outcomes per record, lines
upserted with their invoice, lines billing removed deleted, a refused line naming itself in its invoice's reason."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from sandbox.dataverse_sim.run import RunningDataverse, dataverse_server
from shared.billing.models import Customer, Invoice
from shared.dataverse.client import DataverseClient
from shared.mapping import INVOICE_LINES, LINE_MAP
from shared.plan import planned
from shared.writes import write_records
from tests.shared.dataverse.test_client import SECRET, make_client

pytestmark = pytest.mark.anyio
WHEN = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def crm() -> Iterator[RunningDataverse]:
    with dataverse_server(client_secret=SECRET) as running:
        yield running


def customer(customer_id: str) -> Customer:
    return Customer(id=customer_id, name=f"Customer {customer_id}", status="active", currency="USD", balance="0",
                    mrr="10", created_at=WHEN, updated_at=WHEN, version=1)  # fmt: skip


def invoice(number: str, customer_id: str, lines: dict[str, str], version: int = 1) -> Invoice:
    """`lines`: line id -> description."""
    rows = [
        {"id": line_id, "position": i, "description": text, "quantity": "1", "unit_price": "5", "amount": "5"}
        for i, (line_id, text) in enumerate(lines.items())
    ]
    return Invoice.model_validate({
        "id": f"in_{number}", "number": number, "customer_id": customer_id, "status": "open", "currency": "USD",
        "subtotal": "5", "tax": "0", "total": "5", "amount_paid": "0", "amount_due": "5", "lines": rows,
        "created_at": WHEN, "updated_at": WHEN, "version": version,
    })  # fmt: skip


async def crm_lines(client: DataverseClient) -> set[str]:
    key = LINE_MAP.key.column
    return {str(r[key]) async for page in client.read_pages(INVOICE_LINES, select=[key]) for r in page}


async def test_an_invoice_is_written_with_its_lines_and_a_line_billing_removed_is_deleted(
    crm: RunningDataverse,
) -> None:
    async with make_client(crm) as client:
        accounts = await write_records(client, "customers", [planned(customer("cus_w1"))])
        first = await write_records(
            client, "invoices", [planned(invoice("W-1", "cus_w1", {"l1": "a", "l2": "b", "l3": "c"}))]
        )
        lines_first = await crm_lines(client)
        second = await write_records(
            client, "invoices", [planned(invoice("W-1", "cus_w1", {"l1": "a", "l2": "b"}, version=2))]
        )
        lines_second = await crm_lines(client)
    assert [p.record_id for p in accounts.written] == ["cus_w1"]
    assert [p.record_id for p in first.written] == ["in_W-1"]
    assert (first.rejected, first.failed) == ([], [])
    assert set(first.record_ids) == {"in_W-1"}
    assert {"l1", "l2", "l3"} <= lines_first
    assert [p.record_id for p in second.written] == ["in_W-1"]
    assert "l3" not in lines_second
    assert {"l1", "l2"} <= lines_second


async def test_a_refused_line_rejects_its_invoice_with_the_line_named_and_the_others_are_written(
    crm: RunningDataverse,
) -> None:
    async with make_client(crm) as client:
        await write_records(client, "customers", [planned(customer("cus_w2"))])
        outcome = await write_records(
            client,
            "invoices",
            [
                planned(invoice("W-2", "cus_w2", {"l21": "fine", "l22": "p" * 600})),  # longer than the column allows
                planned(invoice("W-3", "cus_w2", {"l31": "fine"})),
            ],
        )
    assert [p.record_id for p in outcome.written] == ["in_W-3"]
    assert [(f.record_id, f.reason_kind) for f in outcome.rejected] == [("in_W-2", "rejected")]
    reason: Any = outcome.rejected[0].reason
    assert reason.startswith("line l22: Dataverse refused the invoice (0x80044331)")
    assert outcome.failed == []


async def test_an_invoice_whose_account_does_not_exist_is_rejected_not_failed(crm: RunningDataverse) -> None:
    async with make_client(crm) as client:
        outcome = await write_records(client, "invoices", [planned(invoice("W-4", "cus_nobody", {"l41": "x"}))])
    assert outcome.written == []
    assert [f.record_id for f in outcome.rejected] == ["in_W-4"]
    assert outcome.failed == []
