"""Bad input at start-up: one clear line naming the file, the setting or the binding; exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.host.errors import HostStartupError
from sandbox.host.runtime import HostOptions, LocalHost
from tests.conftest import AppFactory

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "sandbox", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_error(app_dir: Path, settings: Path) -> str:
    result = run_cli("host", "--app-dir", str(app_dir), "--settings", str(settings), "--port", "0")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_broken_host_json_names_the_file_and_position(make_app: AppFactory) -> None:
    app_dir, settings, _ = make_app("asyncapp", WORK_QUEUE="q-broken")
    (app_dir / "host.json").write_text('{"version": "2.0",\n  "extensions": {,}\n}')
    line = start_error(app_dir, settings)
    assert f"{app_dir / 'host.json'}:2:" in line
    assert "invalid JSON" in line


def test_missing_setting_referenced_by_percent_name_is_named(make_app: AppFactory) -> None:
    app_dir, settings, _ = make_app("asyncapp")  # WORK_QUEUE not defined anywhere
    line = start_error(app_dir, settings)
    assert "'WORK_QUEUE'" in line
    assert "function 'handle'" in line
    assert str(settings) in line


def test_app_that_fails_to_import_names_file_and_line(make_app: AppFactory) -> None:
    app_dir, settings, _ = make_app("asyncapp", WORK_QUEUE="q-import")
    script = app_dir / "function_app.py"
    script.write_text(script.read_text() + "\nimport module_that_does_not_exist\n")
    line = start_error(app_dir, settings)
    assert f"{script}:" in line
    assert "ModuleNotFoundError" in line


def test_unsupported_binding_is_named(make_app: AppFactory) -> None:
    app_dir, settings, _ = make_app("asyncapp", WORK_QUEUE="q-blob")
    (app_dir / "function_app.py").write_text(
        "import azure.functions as func\napp = func.FunctionApp()\n"
        "@app.blob_trigger(arg_name='blob', path='c/{name}', connection='AzureWebJobsStorage')\n"
        "def on_blob(blob: func.InputStream) -> None: ...\n"
    )
    line = start_error(app_dir, settings)
    assert "'blob'" in line
    assert "blobTrigger" in line
    assert "not supported" in line


@pytest.mark.parametrize(
    ("queues", "expected"),
    [
        ({"batchSize": 64}, "extensions.queues.batchSize"),
        ({"maxPollingInterval": 2000}, "extensions.queues.maxPollingInterval"),
        ({"visibilityTimeout": "30 seconds"}, "extensions.queues.visibilityTimeout"),
        ({"messageEncoding": "utf8"}, "extensions.queues.messageEncoding"),
    ],
)
def test_invalid_queue_options_are_named(make_app: AppFactory, queues: dict[str, object], expected: str) -> None:
    app_dir, settings, _ = make_app("asyncapp", queues=queues, WORK_QUEUE="q-options")
    assert expected in start_error(app_dir, settings)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("template", "values", "expected"),
    [
        ("asyncapp", {"WORK_QUEUE": "Bad_Queue"}, "'Bad_Queue' is not a valid queue name"),
        ("asyncapp", {"WORK_QUEUE": "q-ok", "AzureWebJobsStorage": ""}, "'AzureWebJobsStorage'"),
        ("timers", {"TICK_SCHEDULE": "*/5 * * * *"}, "has 5 fields; NCRONTAB needs 6"),
        ("timers", {"TICK_SCHEDULE": "0 0 25 * * *"}, "not a valid NCRONTAB expression"),
        ("timers", {"TICK_SCHEDULE": "0 * * * * *", "WEBSITE_TIME_ZONE": "Mars/Olympus"}, "WEBSITE_TIME_ZONE"),
    ],
)
async def test_invalid_bindings_fail_start_up(
    make_app: AppFactory, template: str, values: dict[str, str], expected: str
) -> None:
    app_dir, settings, _ = make_app(template, **values)
    host = LocalHost(HostOptions(app_dir=app_dir, settings_file=settings, http_port=0, state_dir=app_dir / ".s"))
    with pytest.raises(HostStartupError, match=expected.replace("(", r"\(").replace("*", r"\*")):
        async with host:
            pass


def test_settings_file_that_is_not_json_is_named(make_app: AppFactory) -> None:
    app_dir, settings, _ = make_app("asyncapp", WORK_QUEUE="q-settings")
    settings.write_text("{ not json")
    assert str(settings) in start_error(app_dir, settings)


def test_unknown_fault_profile_key_is_named(make_app: AppFactory, tmp_path: Path) -> None:
    app_dir, settings, _ = make_app("asyncapp", WORK_QUEUE="q-faults")
    profile = tmp_path / "faults.json"
    profile.write_text(json.dumps({"host": {"duplicate_delivery_rat": 0.1}}))
    result = run_cli("host", "--app-dir", str(app_dir), "--settings", str(settings), "--faults", str(profile))
    assert result.returncode == 2
    assert "host.duplicate_delivery_rat: unknown key" in result.stderr


def test_help_documents_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("azurite", "host", "up", "demo"):
        assert command in result.stdout
    host_help = run_cli("host", "--help").stdout
    for option in ("--app-dir", "--settings", "--port", "--faults", "--once", "--lease-seconds", "--drain-seconds"):
        assert option in host_help


def test_parameters_that_do_not_match_bindings_are_named(make_app: AppFactory) -> None:
    app_dir, settings, _ = make_app("asyncapp", WORK_QUEUE="q-params")
    (app_dir / "function_app.py").write_text(
        "import azure.functions as func\napp = func.FunctionApp()\n"
        "@app.queue_trigger(arg_name='msg', queue_name='q-params', connection='AzureWebJobsStorage')\n"
        "def handler(message: func.QueueMessage) -> None: ...\n"
    )
    line = start_error(app_dir, settings)
    assert "function 'handler'" in line
    assert "bindings without a parameter: msg" in line
    assert "parameters without a binding: message" in line


def test_unloading_an_app_leaves_a_sys_path_entry_the_caller_already_had(tmp_path: Path) -> None:
    """Before, unloading removed the app folder from sys.path even when it was there first (pytest puts the repository
    root there): a later `import function_app` failed in the same process."""
    from sandbox.host.loader import load_app, unload_app  # noqa: PLC0415 - the host's own loader, in-process

    app = tmp_path / "app"
    app.mkdir()
    (app / "function_app.py").write_text(
        "import azure.functions as func\napp = func.FunctionApp()\n\n"
        "@app.route(route='ping')\ndef ping(req: func.HttpRequest) -> func.HttpResponse:\n"
        "    return func.HttpResponse('pong')\n"
    )
    sys.path.insert(0, str(app.resolve()))
    try:
        load_app(app)
        unload_app(app)
        assert str(app.resolve()) in sys.path
        sys.path.remove(str(app.resolve()))
        load_app(app)  # an entry it put there itself is taken away
        unload_app(app)
        assert str(app.resolve()) not in sys.path
    finally:
        while str(app.resolve()) in sys.path:
            sys.path.remove(str(app.resolve()))
