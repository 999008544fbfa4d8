"""The data dictionary: mapping, hashing, the generated document, and agreement with the Dataverse schema."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox.billing_sim.store import Store, to_api
from sandbox.dataverse_sim.run import RunningDataverse, dataverse_server
from sandbox.dataverse_sim.schema import TABLES
from shared.billing.models import Customer, Invoice, parse_record
from shared.dataverse.client import DataverseClient, DataverseClientConfig, UpsertRow
from shared.errors import InvalidRecord
from shared.mapping import (
    CUSTOMER_MAP,
    MAPS,
    content_hash,
    customer_row,
    invoice_rows,
    render_markdown,
)

ROOT = Path(__file__).resolve().parents[2]

money = st.decimals(min_value=0, max_value=10**6, places=2, allow_nan=False, allow_infinity=False).map(str)
customers = st.builds(
    Customer,
    id=st.text("abcdef0123456789_", min_size=1, max_size=20),
    name=st.text(min_size=1, max_size=160).filter(str.strip),
    email=st.none() | st.emails().map(str),
    status=st.sampled_from(["active", "suspended", "churned"]),
    currency=st.sampled_from(["USD", "EUR", "GBP"]),
    balance=money,
    mrr=money,
    go_live_date=st.none() | st.dates(min_value=date(2000, 1, 1), max_value=date(2100, 1, 1)),
    provider_count=st.integers(min_value=0, max_value=10_000),
    product_flags=st.lists(st.sampled_from(["sms", "api", "payments"]), max_size=3).map(tuple),
    created_at=st.just(datetime(2024, 1, 1, tzinfo=UTC)),
    updated_at=st.datetimes(
        min_value=datetime(2020, 1, 1),  # noqa: DTZ001 - hypothesis bounds are naive; the zone is added
        max_value=datetime(2030, 1, 1),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
    version=st.integers(min_value=1, max_value=10**6),
)


def test_the_generated_dictionary_is_up_to_date() -> None:
    on_disk = (ROOT / "docs" / "data-dictionary.md").read_text(encoding="utf-8")
    assert on_disk == render_markdown(), "run: python -m sandbox data-dictionary --write"


@pytest.mark.parametrize("entity_map", MAPS, ids=lambda m: m.name)
def test_every_mapped_column_exists_in_dataverse_with_a_fitting_type(entity_map: Any) -> None:
    table = TABLES[entity_map.table.logical_name]
    assert entity_map.key.column in table.alternate_key
    for column in (entity_map.key, *entity_map.columns):
        assert column.column in table.by_name, column.column
        if column.transform == "money":
            assert table.by_name[column.column].type in ("money", "decimal")
    for lookup in entity_map.lookups:
        assert table.lookup_by_navigation(lookup.navigation) is not None
    assert table.bulk_messages == entity_map.table.bulk


@settings(max_examples=200, deadline=None)
@given(customers)
def test_a_customer_maps_to_its_key_and_every_billing_owned_column(customer: Customer) -> None:
    row = customer_row(customer)
    assert row.key == {"accountnumber": customer.id}
    assert set(row.values) == {c.column for c in CUSTOMER_MAP.owned}
    assert "description" not in row.values  # sales own it; the sync never writes it
    assert isinstance(row.values["bcs_mrr"], Decimal)  # never a float: a float loses digits of large amounts
    assert row.values["bcs_mrr"] == Decimal(customer.mrr)
    assert row.source_version == customer.version


@settings(max_examples=200, deadline=None)
@given(customers, st.integers(min_value=1, max_value=10**6))
def test_the_hash_ignores_a_new_version_that_changes_nothing(customer: Customer, version: int) -> None:
    bumped = customer.model_copy(update={"version": version, "updated_at": datetime(2031, 1, 1, tzinfo=UTC)})
    assert content_hash([customer_row(customer)]) == content_hash([customer_row(bumped)])


@settings(max_examples=200, deadline=None)
@given(customers, st.sampled_from(["name", "email", "status", "balance", "provider_count", "product_flags"]))
def test_the_hash_changes_when_a_mapped_value_changes(customer: Customer, field: str) -> None:
    new: dict[str, Any] = {
        "name": customer.name + "x",
        "email": (customer.email or "") + "z@example.org",
        "status": "churned" if customer.status != "churned" else "active",
        "balance": customer.balance + 1,
        "provider_count": customer.provider_count + 1,
        "product_flags": (*customer.product_flags, "telehealth"),
    }
    changed = customer.model_copy(update={field: new[field]})
    assert content_hash([customer_row(customer)]) != content_hash([customer_row(changed)])


def test_invoice_lines_become_rows_bound_to_their_invoice() -> None:
    store = Store()
    store.seed(invoices=3, seed=1)
    row = store.list_offset("invoices", "", 0, 1)[0]
    invoice = parse_record("invoices", to_api("invoices", row, store.lines_of([row["id"]])[row["id"]]))
    assert isinstance(invoice, Invoice)
    head, lines = invoice_rows(invoice)
    assert head.values["customerid_account@odata.bind"] == f"/accounts(accountnumber='{invoice.customer_id}')"
    assert len(lines) == len(invoice.lines)
    assert {line.values["invoiceid@odata.bind"] for line in lines} == {f"/invoices(invoicenumber='{invoice.number}')"}


class _Minted:
    def __init__(self, running: RunningDataverse) -> None:
        self.running = running

    def get_token(self, *scopes: str) -> AccessToken:
        return AccessToken(self.running.simulator.mint("mapping-test", 3600), int(time.time()) + 3600)


@pytest.mark.anyio
async def test_mapped_billing_data_is_accepted_by_dataverse() -> None:
    """Billing's generated data, validated and mapped, written to the Dataverse simulator: the two sides agree."""
    store = Store()
    store.seed(invoices=200, seed=5, invalid_rate=0.0)
    customers_ = [
        parse_record("customers", to_api("customers", r)) for r in store.list_offset("customers", "", 0, 1000)
    ]
    rows = store.list_offset("invoices", "", 0, 1000)
    lines = store.lines_of([r["id"] for r in rows])
    invoices = [parse_record("invoices", to_api("invoices", r, lines[r["id"]])) for r in rows]
    assert not [r for r in (*customers_, *invoices) if isinstance(r, InvalidRecord)]
    with dataverse_server(client_secret="mapping") as dv:
        config = DataverseClientConfig(org_url=dv.url)
        verify = ssl.create_default_context(cafile=str(dv.tls.ca_pem))
        async with DataverseClient(config, {"mapping-test": _Minted(dv)}, verify=verify) as client:
            accounts = await client.upsert_many(CUSTOMER_MAP.table, [customer_row(c) for c in customers_])  # type: ignore[arg-type]
            mapped = [invoice_rows(i) for i in invoices]  # type: ignore[arg-type]
            heads = await client.upsert_many(MAPS[1].table, [h for h, _ in mapped])
            details = await client.upsert_many(MAPS[2].table, [line for _, ls in mapped for line in ls])
        counts = dv.store.table_counts()
    assert {o.status for o in (*accounts, *heads, *details)} == {"written"}
    assert counts == {"account": 50, "invoice": 200, "invoicedetail": sum(len(i.lines) for i in invoices)}  # type: ignore[union-attr]


def test_the_hash_of_ordinary_amounts_is_what_it_was_when_amounts_went_as_floats() -> None:
    """Upgrading must not rewrite every record: amounts a float holds exactly hash as they did before."""
    row = UpsertRow({"accountnumber": "C-1"}, {"name": "Acme", "bcs_mrr": Decimal("1250.50")})
    before = UpsertRow({"accountnumber": "C-1"}, {"name": "Acme", "bcs_mrr": 1250.5})
    assert content_hash([row]) == content_hash([before])


def test_an_amount_change_beyond_a_floats_digits_changes_the_hash() -> None:
    a = UpsertRow({"accountnumber": "C-1"}, {"bcs_balance": Decimal("123456789012345.6781")})
    b = UpsertRow({"accountnumber": "C-1"}, {"bcs_balance": Decimal("123456789012345.6782")})
    assert float(a.values["bcs_balance"]) == float(b.values["bcs_balance"])  # a float cannot tell them apart
    assert content_hash([a]) != content_hash([b])


# any amount billing may send (up to 15 digits before the point and 4 after, either sign: shared.billing.models)
# that fits Dataverse's money column (up to 922,337,203,685,477); a larger one is rejected, see the test below
CRM_MONEY_MAX = Decimal("922337203685477")
amounts = (
    st.decimals(min_value=-CRM_MONEY_MAX, max_value=CRM_MONEY_MAX, places=4).map(str)
    | st.from_regex(r"^-?\d{1,15}(\.\d{1,4})?$", fullmatch=True)
).filter(lambda text: abs(Decimal(text)) <= CRM_MONEY_MAX)


@pytest.fixture(scope="module")
def crm() -> Iterator[RunningDataverse]:
    with dataverse_server(client_secret="amounts") as running:
        yield running


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(balance=amounts, mrr=amounts)
def test_the_crm_receives_billings_amounts_exactly(crm: RunningDataverse, balance: str, mrr: str) -> None:
    """Billing's decimal strings, through the model, the mapping, the request body and Dataverse, read back by the
    client: the same number, digit for digit (a float on the way loses digits beyond about 15)."""
    customer = parse_record("customers", _customer_api(balance, mrr))
    assert isinstance(customer, Customer)

    async def write_and_read() -> dict[str, Any] | None:
        config = DataverseClientConfig(org_url=crm.url)
        verify = ssl.create_default_context(cafile=str(crm.tls.ca_pem))
        async with DataverseClient(config, {"mapping-test": _Minted(crm)}, verify=verify) as client:
            outcomes = await client.upsert_many(CUSTOMER_MAP.table, [customer_row(customer)])
            assert [o.status for o in outcomes] == ["written"]
            return await client.get(
                CUSTOMER_MAP.table, {"accountnumber": customer.id}, select=["bcs_balance", "bcs_mrr"]
            )

    stored = asyncio.run(write_and_read())
    assert stored is not None
    assert stored["bcs_balance"] == Decimal(balance)
    assert stored["bcs_mrr"] == Decimal(mrr)


def _customer_api(balance: str, mrr: str) -> dict[str, Any]:
    return {
        "id": "C-AMOUNTS", "name": "Amounts Ltd", "email": None, "phone": None, "address": None, "status": "active",
        "currency": "EUR", "balance": balance, "mrr": mrr, "go_live_date": None, "provider_count": 0,
        "product_flags": [], "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z", "version": 1,
    }  # fmt: skip


@pytest.mark.anyio
async def test_an_amount_beyond_the_crms_range_is_rejected_with_a_reason_not_rounded(crm: RunningDataverse) -> None:
    customer = parse_record("customers", _customer_api("922337203685477.0001", "0"))
    assert isinstance(customer, Customer)
    config = DataverseClientConfig(org_url=crm.url)
    verify = ssl.create_default_context(cafile=str(crm.tls.ca_pem))
    async with DataverseClient(config, {"mapping-test": _Minted(crm)}, verify=verify) as client:
        outcomes = await client.upsert_many(CUSTOMER_MAP.table, [customer_row(customer)])
    assert [o.status for o in outcomes] == ["rejected"]
    assert outcomes[0].error is not None
    assert "out of range" in outcomes[0].error["message"]
