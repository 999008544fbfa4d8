"""Microsoft's own Dataverse SDK (PowerPlatform-Dataverse-Client) against the simulator: it must work unchanged.

The SDK is a test dependency only; it authenticates with azure-identity's ClientSecretCredential pointed at the
simulator's token endpoint, and trusts the simulator's local test CA through REQUESTS_CA_BUNDLE.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest
from azure.core.credentials import AccessToken
from azure.identity import ClientSecretCredential
from PowerPlatform.Dataverse.client import DataverseClient
from PowerPlatform.Dataverse.models.upsert import UpsertItem

from sandbox.dataverse_sim.run import RunningDataverse, dataverse_server
from shared.dataverse.client import DataverseClient as BulkClient
from shared.dataverse.client import DataverseClientConfig, TableRef, UpsertRow

SECRET = "sdk-test-secret"


@pytest.fixture(scope="module")
def dataverse() -> Iterator[RunningDataverse]:
    with dataverse_server(client_secret=SECRET) as running:
        yield running


@pytest.fixture
def sdk(dataverse: RunningDataverse, monkeypatch: pytest.MonkeyPatch) -> Iterator[DataverseClient]:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(dataverse.tls.ca_pem))
    credential = ClientSecretCredential(
        dataverse.tenant_id,
        "sdk-app-user",
        SECRET,
        authority=dataverse.authority,
        connection_verify=str(dataverse.tls.ca_pem),
        disable_instance_discovery=True,
    )
    client = DataverseClient(dataverse.url, credential)
    yield client
    client.close()


def test_sdk_upserts_one_row_by_alternate_key_and_reads_it_back(sdk: DataverseClient) -> None:
    sdk.records.upsert(
        "account",
        [UpsertItem(alternate_key={"accountnumber": "SDK-O'Brien"}, record={"name": "O'Brien & Co", "bcs_mrr": 99.5})],
    )
    rows = list(sdk.records.list("account", filter="accountnumber eq 'SDK-O''Brien'"))
    assert len(rows) == 1
    assert rows[0]["name"] == "O'Brien & Co"
    assert rows[0]["bcs_mrr"] == 99.5
    again = sdk.records.retrieve("account", rows[0]["accountid"])
    assert again is not None
    assert again["accountnumber"] == "SDK-O'Brien"
    assert sdk.records.retrieve("account", "0f8fad5b-d9cb-469f-a165-70867728950e") is None


def test_sdk_upserts_many_rows_and_a_second_upsert_updates_them(sdk: DataverseClient) -> None:
    items = [
        UpsertItem(alternate_key={"accountnumber": f"SDK-{i:03d}"}, record={"name": f"Clinic {i}"}) for i in range(25)
    ]
    sdk.records.upsert("account", items)
    sdk.records.upsert("account", [UpsertItem(alternate_key={"accountnumber": "SDK-007"}, record={"name": "Renamed"})])
    rows = list(sdk.records.list("account", filter="startswith(accountnumber,'SDK-0')", page_size=10))
    by_number = {r["accountnumber"]: r for r in rows}
    assert len(by_number) == 25
    assert by_number["SDK-007"]["name"] == "Renamed"
    assert by_number["SDK-008"]["name"] == "Clinic 8"


def test_sdk_list_with_a_filter_select_and_order(sdk: DataverseClient) -> None:
    sdk.records.upsert(
        "account",
        [
            UpsertItem(
                alternate_key={"accountnumber": f"LST-{i}"}, record={"name": f"List {i}", "bcs_providercount": i}
            )
            for i in range(6)
        ],
    )
    result = sdk.records.list(
        "account",
        filter="startswith(accountnumber,'LST-') and bcs_providercount ge 3",
        select=["name", "bcs_providercount"],
        orderby=["bcs_providercount desc"],
    )
    rows = list(result)
    assert [r["bcs_providercount"] for r in rows] == [5, 4, 3]
    assert "telephone1" not in rows[0]


def test_sdk_batch_with_a_change_set_and_continue_on_error(sdk: DataverseClient, dataverse: RunningDataverse) -> None:
    batch = sdk.batch.new()
    batch.records.create("account", {"name": "Batch one", "accountnumber": "SDK-B1"})
    with batch.changeset() as changeset:
        changeset.records.create("account", {"name": "In changeset", "accountnumber": "SDK-B2"})
        changeset.records.create("account", {"name": "x" * 200, "accountnumber": "SDK-B3"})  # fails: rolls back B2
    batch.records.create("account", {"name": "After the failure", "accountnumber": "SDK-B4"})
    result = batch.execute(continue_on_error=True)
    numbers = {r["accountnumber"] for r in sdk.records.list("account", filter="startswith(accountnumber,'SDK-B')")}
    assert numbers == {"SDK-B1", "SDK-B4"}
    assert any(getattr(item, "status_code", 0) == 400 for item in result.responses)


def test_the_sdk_reads_what_our_client_wrote_and_our_client_reads_what_the_sdk_wrote(
    sdk: DataverseClient, dataverse: RunningDataverse
) -> None:
    accounts = TableRef("account", "accounts")
    ours = [
        UpsertRow({"accountnumber": f"X-OURS-{i}"}, {"name": f"Ours {i}", "bcs_mrr": 10.0 + i}, 1) for i in range(3)
    ]

    async def write_then_read() -> dict[str, Any] | None:
        config = DataverseClientConfig(org_url=dataverse.url)
        credential = {"our-app": _Minted(dataverse)}
        verify = ssl.create_default_context(cafile=str(dataverse.tls.ca_pem))
        async with BulkClient(config, credential, verify=verify) as client:
            await client.upsert_many(accounts, ours)
            sdk.records.upsert(
                "account", [UpsertItem(alternate_key={"accountnumber": "X-SDK-1"}, record={"name": "From the SDK"})]
            )
            return await client.get(accounts, {"accountnumber": "X-SDK-1"})

    from_sdk = asyncio.run(write_then_read())
    assert from_sdk is not None
    assert from_sdk["name"] == "From the SDK"
    read_by_sdk = {
        r["accountnumber"]: r for r in sdk.records.list("account", filter="startswith(accountnumber,'X-OURS-')")
    }
    assert {k: v["bcs_mrr"] for k, v in read_by_sdk.items()} == {"X-OURS-0": 10.0, "X-OURS-1": 11.0, "X-OURS-2": 12.0}


class _Minted:
    def __init__(self, running: RunningDataverse) -> None:
        self.running = running

    def get_token(self, *scopes: str) -> AccessToken:
        return AccessToken(self.running.simulator.mint("our-app", 3600), int(time.time()) + 3600)
