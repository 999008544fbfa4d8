"""Microsoft's own Dataverse SDK (PowerPlatform-Dataverse-Client) against the simulator: it must work unchanged.

The SDK is a test dependency only; it authenticates with azure-identity's ClientSecretCredential pointed at the
simulator's token endpoint, and trusts the simulator's local test CA through REQUESTS_CA_BUNDLE.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from azure.identity import ClientSecretCredential
from PowerPlatform.Dataverse.client import DataverseClient
from PowerPlatform.Dataverse.models.upsert import UpsertItem

from sandbox.dataverse_sim.run import RunningDataverse, dataverse_server

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
