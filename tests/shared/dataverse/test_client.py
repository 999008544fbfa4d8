"""The Dataverse bulk client against the Dataverse simulator (HTTPS, tokens, service protection: all real)."""

from __future__ import annotations

import math
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from azure.core.credentials import AccessToken
from azure.identity import ClientSecretCredential
from hypothesis import given
from hypothesis import strategies as st

from bench.dataverse_ceiling import run as run_benchmark
from sandbox.dataverse_sim.run import RunningDataverse, dataverse_server
from sandbox.dataverse_sim.schema import TABLES
from sandbox.faults import DataverseFaults, FaultProfile, ServiceProtection
from shared.callpolicy import RetryPolicy
from shared.dataverse.client import (
    DataverseClient,
    DataverseClientConfig,
    ProtectionLimits,
    TableRef,
    UpsertRow,
    filter_chunks,
)
from shared.errors import AuthError
from shared.odata import bind

pytestmark = pytest.mark.anyio
SECRET = "client-test-secret"
ACCOUNTS = TableRef("account", "accounts")
INVOICES = TableRef("invoice", "invoices")
FAST = RetryPolicy(attempts=8, total_s=120, base_s=0.05, cap_s=2)


@dataclass
class SimCredential:
    """Tokens minted by the simulator itself; `expired_first` hands out one dead token to start with."""

    running: RunningDataverse
    identity: str
    expired_first: int = 0
    calls: int = 0

    def get_token(self, *scopes: str) -> AccessToken:
        self.calls += 1
        ttl = -1 if self.calls <= self.expired_first else 3600
        return AccessToken(self.running.simulator.mint(self.identity, ttl), int(time.time()) + 3600)


@pytest.fixture(scope="module")
def dv() -> Iterator[RunningDataverse]:
    with dataverse_server(client_secret=SECRET) as running:
        yield running


def make_client(running: RunningDataverse, *identities: str, chunk_size: int = 100, **config: Any) -> DataverseClient:
    creds = {name: SimCredential(running, name) for name in (identities or ("app-1",))}
    cfg = DataverseClientConfig(org_url=running.url, chunk_size=chunk_size, retry=config.pop("retry", FAST), **config)
    return DataverseClient(cfg, creds, verify=ssl.create_default_context(cafile=str(running.tls.ca_pem)))


def account(number: str, version: int = 1, **values: Any) -> UpsertRow:
    return UpsertRow({"accountnumber": number}, {"name": f"Account {number}", **values}, version)


async def test_rows_are_written_and_read_back_by_a_key_that_needs_escaping(dv: RunningDataverse) -> None:
    odd = ["O'Brien & co", "A#1", "north/south", "Zürich ✓", "50% off?"]
    async with make_client(dv) as client:
        outcomes = await client.upsert_many(ACCOUNTS, [account(n, bcs_mrr=10.5) for n in odd])
        assert {o.status for o in outcomes} == {"written"}
        for number in odd:
            row = await client.get(ACCOUNTS, {"accountnumber": number}, select=["name", "accountnumber"])
            assert row is not None
            assert row["accountnumber"] == number
        assert await client.get(ACCOUNTS, {"accountnumber": "nobody's"}) is None


async def test_a_chunk_of_1000_with_3_bad_rows_writes_997_and_isolates_3_cheaply(dv: RunningDataverse) -> None:
    rows = [account(f"B-{i:04d}") for i in range(1000)]
    for bad in (17, 500, 999):
        rows[bad] = account(f"B-{bad:04d}", name="x" * 200)  # longer than account.name allows
    async with make_client(dv, chunk_size=1000) as client:
        outcomes = await client.upsert_many(ACCOUNTS, rows)
        requests = sum(client.policy.stats.requests.values())
    written = [o for o in outcomes if o.status == "written"]
    rejected = [o for o in outcomes if o.status == "rejected"]
    assert len(written) == 997
    assert sorted(o.row.key["accountnumber"] for o in rejected) == ["B-0017", "B-0500", "B-0999"]
    assert all(o.error and o.error["code"] == "0x80044331" for o in rejected)
    assert all("exceeded the maximum allowed length" in (o.error or {}).get("message", "") for o in rejected)
    assert requests - 1 <= 2 * 3 * math.ceil(math.log2(1000))
    assert all(o.record_id for o in written)


async def test_records_are_deleted_many_to_a_batch_and_one_already_gone_counts_as_deleted(dv: RunningDataverse) -> None:
    rows = [account(f"DEL-{i:03d}") for i in range(250)]
    async with make_client(dv, chunk_size=100) as client:
        await client.upsert_many(ACCOUNTS, rows)
        before = sum(client.policy.stats.requests.values())
        keys = [{"accountnumber": f"DEL-{i:03d}"} for i in range(250)] + [{"accountnumber": "DEL-never-there"}]
        outcomes = await client.delete_many(ACCOUNTS, keys)
        requests = sum(client.policy.stats.requests.values()) - before
        left = [await client.get(ACCOUNTS, {"accountnumber": f"DEL-{i:03d}"}) for i in (0, 249)]
    assert [o.status for o in outcomes] == ["written"] * 251  # deleted (the last was gone already)
    assert requests == 3  # 251 keys, 100 to a $batch
    assert left == [None, None]


async def test_duplicates_inside_a_request_keep_the_newest_source_version(dv: RunningDataverse) -> None:
    rows = [account("D-1", 3, telephone1="v3"), account("D-1", 5, telephone1="v5"), account("D-1", 4, telephone1="v4")]
    async with make_client(dv) as client:
        outcomes = await client.upsert_many(ACCOUNTS, rows)
        row = await client.get(ACCOUNTS, {"accountnumber": "D-1"})
    assert sorted(o.status for o in outcomes) == ["superseded", "superseded", "written"]
    assert row is not None
    assert row["telephone1"] == "v5"


async def test_bad_rows_are_rejected_with_the_reason_and_the_rest_written(dv: RunningDataverse) -> None:
    async with make_client(dv) as client:
        await client.upsert_many(ACCOUNTS, [account("P-1")])
        rows = [
            UpsertRow(
                {"invoicenumber": "I-1"},
                {"name": "ok", "customerid_account@odata.bind": bind("accounts", {"accountnumber": "P-1"})},
            ),
            UpsertRow(
                {"invoicenumber": "I-2"},
                {"name": "orphan", "customerid_account@odata.bind": bind("accounts", {"accountnumber": "NONE"})},
            ),
            UpsertRow(
                {"invoicenumber": "I-3"},
                {
                    "name": "unknown column",
                    "nosuch": 1,
                    "customerid_account@odata.bind": bind("accounts", {"accountnumber": "P-1"}),
                },
            ),
            UpsertRow(
                {"invoicenumber": "I-'4'"},
                {"name": "quotes", "customerid_account@odata.bind": bind("accounts", {"accountnumber": "P-1"})},
            ),
        ]
        outcomes = {o.row.key["invoicenumber"]: o for o in await client.upsert_many(INVOICES, rows)}
    assert outcomes["I-1"].status == "written"
    assert outcomes["I-'4'"].status == "written"
    assert outcomes["I-2"].status == "rejected"
    assert (outcomes["I-2"].error or {})["code"] == "0x80040217"
    assert outcomes["I-3"].status == "rejected"
    assert "nosuch" in (outcomes["I-3"].error or {})["message"]


async def test_an_expired_token_is_refreshed_once(dv: RunningDataverse) -> None:
    credential = SimCredential(dv, "app-refresh", expired_first=1)
    config = DataverseClientConfig(org_url=dv.url, retry=FAST)
    verify = ssl.create_default_context(cafile=str(dv.tls.ca_pem))
    async with DataverseClient(config, {"app-refresh": credential}, verify=verify) as client:
        outcomes = await client.upsert_many(ACCOUNTS, [account("T-1")])
    assert outcomes[0].status == "written"
    assert client.stats.unauthorized_refreshes == 1
    assert credential.calls == 2


async def test_rejected_credentials_are_fatal(dv: RunningDataverse) -> None:
    class Forged:
        def get_token(self, *scopes: str) -> AccessToken:
            return AccessToken("sim.e30.forged", int(time.time()) + 3600)

    config = DataverseClientConfig(org_url=dv.url, retry=FAST)
    verify = ssl.create_default_context(cafile=str(dv.tls.ca_pem))
    async with DataverseClient(config, {"forged": Forged()}, verify=verify) as client:
        with pytest.raises(AuthError, match="HTTP 401"):
            await client.upsert_many(ACCOUNTS, [account("F-1")])


async def test_azure_identity_client_secret_credential_works_end_to_end(dv: RunningDataverse) -> None:
    credential = ClientSecretCredential(
        dv.tenant_id, "app-identity", SECRET, authority=dv.authority,
        connection_verify=str(dv.tls.ca_pem), disable_instance_discovery=True,
    )  # fmt: skip
    config = DataverseClientConfig(org_url=dv.url, retry=FAST)
    verify = ssl.create_default_context(cafile=str(dv.tls.ca_pem))
    async with DataverseClient(config, {"app-identity": credential}, verify=verify) as client:
        outcomes = await client.upsert_many(ACCOUNTS, [account("AI-1")])
    assert outcomes[0].status == "written"


async def test_paged_reader_follows_next_links(dv: RunningDataverse) -> None:
    async with make_client(dv) as client:
        await client.upsert_many(ACCOUNTS, [account(f"R-{i:03d}") for i in range(57)])
        pages = [
            p
            async for p in client.read_pages(
                ACCOUNTS, select=["accountnumber"], filter="startswith(accountnumber,'R-')", page_size=20
            )
        ]
    assert [len(p) for p in pages] == [20, 20, 17]
    assert sorted(r["accountnumber"] for p in pages for r in p) == [f"R-{i:03d}" for i in range(57)]


async def test_rows_are_read_by_many_keys_in_few_requests_with_every_key_escaped(dv: RunningDataverse) -> None:
    odd = ["W'Brien & co", "W#1", "w/south", "Wörth ✓", "W 50% off?"]
    numbers = [f"W-{i:04d}" for i in range(400)] + odd
    async with make_client(dv) as client:
        await client.upsert_many(ACCOUNTS, [account(n, bcs_mrr=1) for n in numbers])
        before = sum(client.policy.stats.requests.values())
        rows = await client.read_where(ACCOUNTS, "accountnumber", [*numbers, "W-nobody", "W-0001"],
                                       select=["accountnumber", "bcs_mrr"])  # fmt: skip
        requests = sum(client.policy.stats.requests.values()) - before
    assert sorted(r["accountnumber"] for r in rows) == sorted(numbers)
    assert requests == math.ceil((len(numbers) + 1) / 100)  # 100 keys a request: 1/100 per key


@given(st.lists(st.text(min_size=1, max_size=40), max_size=60), st.integers(200, 2000))
def test_key_filters_hold_every_value_once_and_stay_under_their_encoded_limit(values: list[str], limit: int) -> None:
    filters = filter_chunks("accountnumber", values, limit=limit)
    terms = [t for f in filters for t in f.split(" or accountnumber eq ")]
    assert len(terms) == len(dict.fromkeys(values))
    assert all(len(quote(f)) <= limit or " or " not in f for f in filters)


async def test_throttling_is_waited_out_per_identity_and_nothing_is_lost() -> None:
    limits = ServiceProtection(window_s=2, requests=6, execution_ms=10**9, concurrent=4)
    profile = FaultProfile(dataverse=DataverseFaults(service_protection=limits, error_rate=0.05))
    with dataverse_server(client_secret=SECRET, profile=profile) as running:
        known = ProtectionLimits(window_s=2, requests=6, execution_ms=10**9)
        async with make_client(running, "app-a", "app-b", chunk_size=10, limits=known) as client:
            rows = [account(f"S-{i:03d}") for i in range(300)]
            outcomes = await client.upsert_many(ACCOUNTS, rows)
            answers = client.policy.stats.by_status()
        stored = running.store.count(TABLES["account"], '"accountnumber" LIKE ?', ["S-%"])
        by_identity = running.simulator.stats.by_identity
    assert {o.status for o in outcomes} == {"written"}
    assert stored == 300
    assert answers["429"] > 0
    assert by_identity["app-a"] > 0
    assert by_identity["app-b"] > 0  # the load was spread over both application users


@pytest.mark.slow
async def test_at_the_service_protection_ceiling_nothing_is_lost_and_few_requests_are_refused() -> None:
    """The benchmark's profile (bench/dataverse_ceiling.py): the counts and the 429 share, never a time."""
    outcome = await run_benchmark(rows=30_000, chunk_size=100, users=1)
    assert outcome.written == 30_000
    assert outcome.distinct_in_store == 30_000  # nothing lost, nothing duplicated
    assert outcome.share_429 < 0.02


async def test_tables_without_bulk_messages_go_through_batch_with_an_answer_per_row(dv: RunningDataverse) -> None:
    lines = TableRef("invoicedetail", "invoicedetails", bulk=False)
    async with make_client(dv, chunk_size=50) as client:
        await client.upsert_many(ACCOUNTS, [account("BL-P")])
        await client.upsert_many(
            INVOICES,
            [
                UpsertRow(
                    {"invoicenumber": "BL-I"},
                    {"name": "i", "customerid_account@odata.bind": bind("accounts", {"accountnumber": "BL-P"})},
                )
            ],
        )
        parent = bind("invoices", {"invoicenumber": "BL-I"})
        rows = [
            UpsertRow(
                {"bcs_billinglineid": f"il/{i} & 'x'"},
                {"invoiceid@odata.bind": parent, "quantity": i, "productdescription": f"line {i}"},
            )
            for i in range(120)
        ]
        rows[7] = UpsertRow(
            {"bcs_billinglineid": "il/7 & 'x'"}, {"invoiceid@odata.bind": parent, "productdescription": "p" * 600}
        )
        rows[99] = UpsertRow(
            {"bcs_billinglineid": "il/99 & 'x'"}, {"invoiceid@odata.bind": bind("invoices", {"invoicenumber": "NONE"})}
        )
        outcomes = await client.upsert_many(lines, rows)
        requests = sum(client.policy.stats.requests.values())
        stored = [r async for page in client.read_pages(lines, select=["bcs_billinglineid"]) for r in page]
    by_key = {o.row.key["bcs_billinglineid"]: o for o in outcomes}
    assert sum(o.status == "written" for o in outcomes) == 118
    assert (by_key["il/7 & 'x'"].error or {})["code"] == "0x80044331"
    assert (by_key["il/99 & 'x'"].error or {})["code"] == "0x80040217"
    assert requests == 2 + 3  # two parents, three $batch requests of at most 50 rows
    assert {r["bcs_billinglineid"] for r in stored} >= {f"il/{i} & 'x'" for i in (0, 1, 50, 119)}


async def test_bulk_messages_are_refused_where_the_table_has_none(dv: RunningDataverse) -> None:
    lines = TableRef("invoicedetail", "invoicedetails", bulk=True)  # misconfigured on purpose
    async with make_client(dv) as client:
        outcomes = await client.upsert_many(lines, [UpsertRow({"bcs_billinglineid": "x"}, {"quantity": 1})])
    assert outcomes[0].status == "rejected"
    assert "UpsertMultiple is not enabled" in (outcomes[0].error or {})["message"]
