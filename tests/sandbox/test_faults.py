"""Fault profiles: the contract's keys, built-ins, and errors that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox.faults import BUILTIN, FaultProfileError, load_profile, parse_profile

CONTRACT_EXAMPLE = {
    "seed": 1,
    "billing": {
        "rate_limit": {"requests_per_second": 5, "burst": 5, "mode": "silent"},
        "error_rate": 0.05,
        "timeout_rate": 0.0,
        "latency_ms": {"min": 5, "max": 50},
        "outages": [{"start_s": 10, "duration_s": 10}],
        "pagination": "offset",
        "mutations_per_second": 20,
        "drop_ids_rate": 0.02,
        "invalid_record_rate": 0.01,
    },
    "dataverse": {
        "service_protection": {"window_s": 300, "requests": 6000, "execution_ms": 1200000, "concurrent": 52},
        "ms_per_record": 5,
        "error_rate": 0.02,
        "latency_ms": {"min": 5, "max": 50},
        "outages": [],
        "reject_rate": 0.0,
        "token_ttl_s": 3600,
    },
    "host": {"duplicate_delivery_rate": 0.01, "crash_after_success_rate": 0.01},
}


def test_the_contract_example_is_a_valid_profile() -> None:
    profile = parse_profile(json.dumps(CONTRACT_EXAMPLE), source="example")
    assert profile.billing.rate_limit is not None
    assert profile.billing.rate_limit.mode == "silent"
    assert profile.dataverse.service_protection is not None
    assert profile.dataverse.service_protection.concurrent == 52


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_profiles_load(name: str) -> None:
    assert load_profile(name).model_dump() is not None


def test_empty_profile_means_no_fault() -> None:
    profile = parse_profile("{}", source="empty")
    assert profile.host.duplicate_delivery_rate == 0
    assert profile.billing.rate_limit is None
    assert profile.dataverse.outages == ()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"billing": {"rate_limit": {"requests_per_second": 5, "bursts": 5}}},
            "billing.rate_limit.bursts: unknown key",
        ),
        ({"hosts": {}}, "hosts: unknown key"),
        ({"billing": {"error_rate": 1.5}}, "billing.error_rate: "),
        ({"billing": {"pagination": "page"}}, "billing.pagination: "),
        ({"dataverse": {"latency_ms": {"min": 50, "max": 5}}}, "dataverse.latency_ms: "),
    ],
)
def test_bad_profiles_name_the_key(data: object, expected: str) -> None:
    with pytest.raises(FaultProfileError, match=expected.replace(".", r"\.")):
        parse_profile(json.dumps(data), source="p.json")


def test_unknown_name_and_bad_json_are_explained(tmp_path: Path) -> None:
    with pytest.raises(FaultProfileError, match="neither a built-in profile"):
        load_profile("chaotic")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(FaultProfileError, match=r"bad\.json:1:2: invalid JSON"):
        load_profile(str(bad))


def test_random_streams_are_repeatable_and_independent() -> None:
    profile = parse_profile('{"seed": 3}', source="s")
    a1 = [profile.rng("a").random() for _ in range(3)]
    a2 = [profile.rng("a").random() for _ in range(3)]
    b = [profile.rng("b").random() for _ in range(3)]
    assert a1 == a2
    assert a1 != b
