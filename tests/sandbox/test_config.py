"""host.json and settings parsing."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox.host.config import Settings, load_host_json, load_local_settings, parse_timespan
from sandbox.host.errors import HostStartupError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("00:00:30", timedelta(seconds=30)),
        ("00:01:00", timedelta(minutes=1)),
        ("1.02:03:04", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        ("00:00:00.100", timedelta(milliseconds=100)),
        ("00:00:00.0000010", timedelta(microseconds=1)),
    ],
)
def test_timespans_parse_like_dotnet(text: str, expected: timedelta) -> None:
    assert parse_timespan(text, where="x") == expected


@pytest.mark.parametrize("value", [2000, "2000", "30s", "00:60:00", "25:00:00", None, "00:00"])
def test_values_that_are_not_timespans_are_refused_with_the_place(value: object) -> None:
    with pytest.raises(HostStartupError, match=r"^host\.json: extensions"):
        parse_timespan(value, where="host.json: extensions.queues.visibilityTimeout")


@given(st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=99)))
def test_timespan_round_trips(delta: timedelta) -> None:
    hours, rest = divmod(delta.seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    text = f"{delta.days}.{hours:02}:{minutes:02}:{seconds:02}.{delta.microseconds:06}0"
    assert parse_timespan(text, where="x") == delta


def _host(tmp_path: Path, body: object) -> Path:
    (tmp_path / "host.json").write_text(json.dumps(body))
    return tmp_path


def test_queue_defaults_are_the_extension_defaults(tmp_path: Path) -> None:
    config = load_host_json(_host(tmp_path, {"version": "2.0"}))
    q = config.queues
    assert (q.batch_size, q.max_dequeue_count, q.message_encoding) == (16, 5, "base64")
    assert q.visibility_timeout == timedelta(0)
    assert q.max_polling_interval == timedelta(minutes=1)
    assert q.new_batch_threshold == (os.cpu_count() or 1) * 16 // 2
    assert config.route_prefix == "api"
    assert config.function_timeout == timedelta(minutes=30)


def test_keys_are_case_insensitive_and_unknown_ones_reported(tmp_path: Path) -> None:
    body = {
        "version": "2.0",
        "functionTimeout": "00:05:00",
        "extensions": {
            "queues": {"BatchSize": 4, "newbatchthreshold": 1, "visibilityTimeout": "00:00:10", "prefetch": 3},
            "http": {"routePrefix": ""},
        },
    }
    config = load_host_json(_host(tmp_path, body))
    assert config.queues.batch_size == 4
    assert config.queues.new_batch_threshold == 1
    assert config.queues.max_concurrency == 5
    assert config.queues.visibility_timeout == timedelta(seconds=10)
    assert config.unknown_keys == ("extensions.queues.prefetch",)
    assert config.route_prefix == ""
    assert config.function_timeout == timedelta(minutes=5)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, '"version" must be "2.0"'),
        ([], "must be a JSON object"),
        ({"version": "2.0", "extensions": {"queues": {"batchSize": 0}}}, "batchSize"),
        ({"version": "2.0", "extensions": {"queues": {"maxDequeueCount": True}}}, "maxDequeueCount"),
        ({"version": "2.0", "extensions": {"queues": {"maxPollingInterval": "00:00:00.050"}}}, "at least"),
        ({"version": "2.0", "functionTimeout": 300}, "functionTimeout"),
    ],
)
def test_invalid_host_json_is_refused_naming_the_key(tmp_path: Path, body: object, expected: str) -> None:
    with pytest.raises(HostStartupError, match=expected) as info:
        load_host_json(_host(tmp_path, body))
    assert str(tmp_path / "host.json") in str(info.value)


def test_missing_host_json_is_named(tmp_path: Path) -> None:
    with pytest.raises(HostStartupError, match=r"host\.json: not found"):
        load_host_json(tmp_path)


def test_environment_wins_over_local_settings_and_percent_names_resolve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "local.settings.json"
    path.write_text(json.dumps({"Values": {"A": "from-file", "B": "b", "FLAG": True, "N": 3}}))
    monkeypatch.setenv("A", "from-env")
    local = load_local_settings(path)
    settings = Settings(local.values, local.path)
    assert settings.get("A") == "from-env"
    assert settings.resolve("%A%-%B%-x", needed_by="test") == "from-env-b-x"
    assert (settings.get("FLAG"), settings.get("N")) == ("true", "3")
    assert "A" not in settings.environ()
    with pytest.raises(HostStartupError, match=r"setting 'MISSING' needed by f is not defined .*local\.settings"):
        settings.resolve("%MISSING%", needed_by="f")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"IsEncrypted": true, "Values": {}}', "IsEncrypted"),
        ('{"Values": {"X": {"nested": 1}}}', 'Values\\["X"\\]'),
        ('{"Values": [1]}', '"Values" must be an object'),
        ('{"Host": {"LocalHttpPort": "7071"}}', "LocalHttpPort"),
        ('{"Values": ', "invalid JSON"),
    ],
)
def test_bad_local_settings_are_named(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "local.settings.json"
    path.write_text(content)
    with pytest.raises(HostStartupError, match=expected):
        load_local_settings(path)


def test_sample_settings_define_every_setting_the_app_needs() -> None:
    root = Path(__file__).resolve().parents[2]
    sample = json.loads((root / "local.settings.sample.json").read_text())
    assert sample["IsEncrypted"] is False
    assert sample["Values"]["FUNCTIONS_WORKER_RUNTIME"] == "python"
    assert "AzureWebJobsStorage" in sample["Values"]
