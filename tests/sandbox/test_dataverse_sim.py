"""The Dataverse simulator's Web API: what clients rely on, its errors, tokens and service protection."""

from __future__ import annotations

import json
import os
import signal
import ssl
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox.dataverse_sim.run import RunningDataverse, dataverse_server
from sandbox.faults import DataverseFaults, FaultProfile, ServiceProtection
from sandbox.procutil import spawn, stop
from tests.polling import wait_until

SECRET = "sim-secret"


@pytest.fixture(scope="module")
def dv() -> Iterator[RunningDataverse]:
    with dataverse_server(client_secret=SECRET) as running:
        yield running


def trust(running: RunningDataverse) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(running.tls.ca_pem))


def client(running: RunningDataverse, identity: str = "app-1", ttl: float | None = None) -> httpx.Client:
    token = running.simulator.mint(identity, ttl)
    return httpx.Client(base_url=running.api + "/", verify=trust(running), headers={"Authorization": f"Bearer {token}"})


def upsert_account(http: httpx.Client, number: str, **values: Any) -> httpx.Response:
    key = number.replace("'", "''")
    return http.patch(f"accounts(accountnumber='{key}')", json={"name": f"Account {number}", **values})


def test_patch_by_alternate_key_creates_then_updates(dv: RunningDataverse) -> None:
    with client(dv) as http:
        assert upsert_account(http, "K-1", telephone1="1").status_code == 204
        first = http.get("accounts(accountnumber='K-1')").json()
        assert upsert_account(http, "K-1", telephone1="2").status_code == 204
        second = http.get(f"accounts({first['accountid']})").json()
    assert second["accountid"] == first["accountid"]
    assert second["telephone1"] == "2"
    assert second["@odata.etag"] != first["@odata.etag"]


def test_if_match_and_if_none_match_turn_upsert_into_update_or_create(dv: RunningDataverse) -> None:
    with client(dv) as http:
        missing = http.patch("accounts(accountnumber='K-2')", json={"name": "x"}, headers={"If-Match": "*"})
        created = http.patch("accounts(accountnumber='K-2')", json={"name": "x"}, headers={"If-None-Match": "*"})
        again = http.patch("accounts(accountnumber='K-2')", json={"name": "y"}, headers={"If-None-Match": "*"})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "0x80040217"
    assert created.status_code == 204
    assert again.status_code == 412
    assert again.json()["error"]["code"] == "0x80040237"


@pytest.mark.parametrize(
    ("payload", "code", "words"),
    [
        ({"name": "x" * 161}, "0x80044331", "exceeded the maximum allowed length of '160'"),
        ({"name": "ok", "nosuchcolumn": 1}, "0x80060888", "'nosuchcolumn' does not exist"),
        ({"name": "ok", "bcs_mrr": "12.50"}, "0x80060888", "Edm.Decimal"),
        ({"telephone1": "5"}, "0x80040203", "Required field 'name'"),
        ({"name": "ok", "createdon": "2024-01-01T00:00:00Z"}, "0x80060888", "'createdon' does not exist"),
    ],
)
def test_bad_rows_get_dataverse_errors(dv: RunningDataverse, payload: dict[str, Any], code: str, words: str) -> None:
    with client(dv) as http:
        response = http.patch("accounts(accountnumber='BAD-1')", json=payload)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code
    assert words in response.json()["error"]["message"]


def test_lookups_bind_by_alternate_key_and_a_missing_parent_is_an_error(dv: RunningDataverse) -> None:
    with client(dv) as http:
        upsert_account(http, "PARENT-1")
        ok = http.patch(
            "invoices(invoicenumber='INV-1')",
            json={"name": "INV-1", "customerid_account@odata.bind": "/accounts(accountnumber='PARENT-1')"},
        )
        orphan = http.patch(
            "invoices(invoicenumber='INV-2')",
            json={"name": "INV-2", "customerid_account@odata.bind": "/accounts(accountnumber='NOBODY')"},
        )
        invoice = http.get("invoices(invoicenumber='INV-1')").json()
        parent = http.get("accounts(accountnumber='PARENT-1')").json()
    assert ok.status_code == 204
    assert invoice["_customerid_value"] == parent["accountid"]
    assert orphan.status_code == 404
    assert orphan.json()["error"]["code"] == "0x80040217"


def test_upsert_multiple_is_all_or_nothing(dv: RunningDataverse) -> None:
    targets = [
        {"@odata.type": "Microsoft.Dynamics.CRM.account", "accountnumber": f"UM-{i}", "name": f"Bulk {i}"}
        for i in range(10)
    ]
    targets[6]["name"] = "y" * 200
    with client(dv) as http:
        failed = http.post("accounts/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": targets})
        assert http.get("accounts(accountnumber='UM-0')").status_code == 404  # nothing was written
        targets[6]["name"] = "fixed"
        ok = http.post("accounts/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": targets})
    assert failed.status_code == 400
    assert failed.json()["error"]["code"] == "0x80044331"
    assert "Targets[6]" in failed.json()["error"]["message"]
    assert ok.status_code == 200
    assert len(ok.json()["Ids"]) == 10


def test_a_duplicate_key_inside_targets_is_refused(dv: RunningDataverse) -> None:
    targets = [{"accountnumber": "DUP-1", "name": "a"}, {"accountnumber": "DUP-1", "name": "b"}]
    with client(dv) as http:
        response = http.post("accounts/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": targets})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "0x80040237"


def test_create_multiple_refuses_existing_keys_and_update_multiple_missing_ones(dv: RunningDataverse) -> None:
    with client(dv) as http:
        upsert_account(http, "CM-1")
        create = http.post(
            "accounts/Microsoft.Dynamics.CRM.CreateMultiple", json={"Targets": [{"accountnumber": "CM-1", "name": "x"}]}
        )
        update = http.post(
            "accounts/Microsoft.Dynamics.CRM.UpdateMultiple",
            json={"Targets": [{"accountnumber": "CM-404", "name": "x"}]},
        )
    assert create.status_code == 412
    assert update.status_code == 400
    assert update.json()["error"]["code"] == "0x80040217"


def test_paging_with_maxpagesize_next_link_count_and_top(dv: RunningDataverse) -> None:
    with client(dv) as http:
        targets = [{"accountnumber": f"PG-{i:03d}", "name": f"Page {i}"} for i in range(23)]
        http.post("accounts/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": targets})
        seen: list[str] = []
        url: str | None = "accounts?$filter=startswith(accountnumber,'PG-')&$select=accountnumber&$count=true"
        headers = {"Prefer": "odata.maxpagesize=10"}
        while url:
            body = http.get(url, headers=headers).json()
            assert body["@odata.count"] == 23
            seen += [r["accountnumber"] for r in body["value"]]
            url = body.get("@odata.nextLink")
        top = http.get("accounts?$filter=startswith(accountnumber,'PG-')&$top=5", headers=headers).json()
    assert sorted(seen) == [f"PG-{i:03d}" for i in range(23)]
    assert len(top["value"]) == 5
    assert "@odata.nextLink" not in top


def test_a_filter_of_hundreds_of_or_terms_is_answered(dv: RunningDataverse) -> None:
    """Before, `a or b or c ...` became nested SQL pairs and SQLite's parser overflowed (a 500) past about 100."""
    with client(dv) as http:
        http.post("accounts/Microsoft.Dynamics.CRM.UpsertMultiple",
                  json={"Targets": [{"accountnumber": f"OR-{i:03d}", "name": "x"} for i in range(3)]})  # fmt: skip
        terms = " or ".join(f"accountnumber eq 'OR-{i:03d}'" for i in range(500))
        response = http.get(f"accounts?$filter=({terms}) and name eq 'x'&$select=accountnumber")
    assert response.status_code == 200
    assert sorted(r["accountnumber"] for r in response.json()["value"]) == ["OR-000", "OR-001", "OR-002"]


def test_filter_errors_are_400_with_the_reason(dv: RunningDataverse) -> None:
    with client(dv) as http:
        response = http.get("accounts?$filter=nosuch eq 1")
    assert response.status_code == 400
    assert "nosuch" in response.json()["error"]["message"]


def test_metadata_the_sdk_asks_for(dv: RunningDataverse) -> None:
    with client(dv) as http:
        query = {"$select": "LogicalName,EntitySetName,PrimaryIdAttribute", "$filter": "LogicalName eq 'invoicedetail'"}
        definitions = http.get("EntityDefinitions", params=query).json()
        picklists = http.get(
            "EntityDefinitions(LogicalName='account')/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
        ).json()
        who = http.get("WhoAmI")
    assert definitions["value"][0]["EntitySetName"] == "invoicedetails"
    assert definitions["value"][0]["PrimaryIdAttribute"] == "invoicedetailid"
    assert picklists == {"value": []}
    assert int(who.headers["x-ms-dop-hint"]) >= 1
    assert set(who.json()) == {"BusinessUnitId", "UserId", "OrganizationId"}


def test_tokens_are_checked_and_expire(dv: RunningDataverse) -> None:
    with httpx.Client(base_url=dv.api + "/", verify=trust(dv)) as anonymous:
        assert anonymous.get("WhoAmI").status_code == 401
    with client(dv, ttl=60) as fresh, client(dv, ttl=-1) as expired:
        assert fresh.get("WhoAmI").status_code == 200
        assert expired.get("WhoAmI").status_code == 401
    forged = dv.simulator.mint("app-1").rsplit(".", 1)[0] + ".0000"
    with httpx.Client(base_url=dv.api + "/", verify=trust(dv), headers={"Authorization": f"Bearer {forged}"}) as h:
        assert h.get("WhoAmI").status_code == 401


def test_token_endpoint_issues_tokens_for_the_client_secret_only(dv: RunningDataverse) -> None:
    url = f"{dv.url}/{dv.tenant_id}/oauth2/v2.0/token"
    form = {"grant_type": "client_credentials", "client_id": "app-9", "scope": "https://x/.default"}
    with httpx.Client(verify=trust(dv)) as http:
        good = http.post(url, data={**form, "client_secret": SECRET})
        bad = http.post(url, data={**form, "client_secret": "nope"})
    assert good.status_code == 200
    assert good.json()["token_type"] == "Bearer"
    assert bad.status_code == 401


def test_service_protection_counts_requests_per_identity() -> None:
    limits = ServiceProtection(window_s=60, requests=5, execution_ms=10**9, concurrent=50)
    with (
        dataverse_server(
            client_secret=SECRET, profile=FaultProfile(dataverse=DataverseFaults(service_protection=limits))
        ) as running,
        client(running, "user-a") as a,
        client(running, "user-b") as b,
    ):
        codes_a = [a.get("WhoAmI").status_code for _ in range(7)]
        throttled = a.get("WhoAmI")
        codes_b = [b.get("WhoAmI").status_code for _ in range(5)]
    assert codes_a == [200] * 5 + [429] * 2
    assert throttled.json()["error"]["code"] == "0x80072322"
    assert int(throttled.headers["Retry-After"]) >= 1
    assert codes_b == [200] * 5  # another application user has its own budget


def test_service_protection_charges_execution_time_per_record() -> None:
    limits = ServiceProtection(window_s=60, requests=1000, execution_ms=100, concurrent=50)
    faults = DataverseFaults(service_protection=limits, ms_per_record=5)
    with (
        dataverse_server(client_secret=SECRET, profile=FaultProfile(dataverse=faults)) as running,
        client(running) as http,
    ):
        targets = [{"accountnumber": f"EX-{i}", "name": "n"} for i in range(30)]
        first = http.post("accounts/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": targets})
        second = http.get("WhoAmI")
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "0x80072321"


def test_rejections_are_decided_per_record_so_retries_agree() -> None:
    faults = DataverseFaults(reject_rate=0.2)
    with (
        dataverse_server(client_secret=SECRET, profile=FaultProfile(seed=3, dataverse=faults)) as running,
        client(running) as http,
    ):
        first = [upsert_account(http, f"RJ-{i}").status_code for i in range(50)]
        second = [upsert_account(http, f"RJ-{i}").status_code for i in range(50)]
    assert first == second
    assert 3 <= first.count(400) <= 20


def test_cli_serves_https_with_its_ca_until_sigterm(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "DATAVERSE_CLIENT_SECRET": SECRET}
    argv = [sys.executable, "-m", "sandbox", "dataverse-sim", "--ca-dir", str(tmp_path), "--db", str(tmp_path / "d.db")]
    proc = spawn(argv, cwd=root, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(line.rstrip() for line in proc.stdout or []), daemon=True).start()
    try:
        line = wait_until(lambda: next((x for x in lines if "listening on" in x), None), within=60, what="the URL")
        url = line.split("listening on ")[1].split()[0]
        form = {"grant_type": "client_credentials", "client_id": "cli", "client_secret": SECRET}
        with httpx.Client(verify=ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))) as http:
            token = http.post(f"{url}/tenant/oauth2/v2.0/token", data=form).json()["access_token"]
            who = http.get(f"{url}/api/data/v9.2/WhoAmI", headers={"Authorization": f"Bearer {token}"})
        assert who.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        stop(proc)


def _batch(parts: list[str], boundary: str = "batch_t") -> str:
    body = ""
    for part in parts:
        body += f"--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n{part}\r\n"
    return body + f"--{boundary}--\r\n"


def _patch(number: str, name: str) -> str:
    return f"PATCH accounts(accountnumber='{number}') HTTP/1.1\r\nContent-Type: application/json\r\n\r\n" + json.dumps(
        {"name": name}
    )


@pytest.mark.parametrize(("prefer", "written"), [("", {"BT-1"}), ("odata.continue-on-error", {"BT-1", "BT-3"})])
def test_batch_stops_at_the_first_error_unless_asked_to_go_on(
    dv: RunningDataverse, prefer: str, written: set[str]
) -> None:
    suffix = prefer.replace(".", "")[-5:]
    numbers = [f"BT-1{suffix}", f"BT-2{suffix}", f"BT-3{suffix}"]
    body = _batch([_patch(numbers[0], "ok"), _patch(numbers[1], "y" * 200), _patch(numbers[2], "ok")])
    headers = {"Content-Type": "multipart/mixed; boundary=batch_t", "Prefer": prefer}
    with client(dv) as http:
        response = http.post("$batch", content=body, headers=headers)
        present = {
            n.replace(suffix, "") for n in numbers if http.get(f"accounts(accountnumber='{n}')").status_code == 200
        }
    assert response.status_code == 200
    assert response.text.count("HTTP/1.1 ") == (3 if prefer else 2)
    assert present == written


def test_malformed_or_oversized_batches_are_refused(dv: RunningDataverse) -> None:
    with client(dv) as http:
        no_boundary = http.post("$batch", content=b"x", headers={"Content-Type": "application/json"})
        unclosed = http.post(
            "$batch",
            content=b"--b\r\n\r\nGET WhoAmI HTTP/1.1\r\n",
            headers={"Content-Type": "multipart/mixed; boundary=b"},
        )
        huge = http.post(
            "$batch",
            content=_batch(["GET WhoAmI HTTP/1.1\r\n\r\n"] * 1001),
            headers={"Content-Type": "multipart/mixed; boundary=batch_t"},
        )
    assert [no_boundary.status_code, unclosed.status_code, huge.status_code] == [400, 400, 400]
    assert "at most 1000" in huge.json()["error"]["message"]
