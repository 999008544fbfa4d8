"""Shared fixtures: one Azurite per test session, throw-away app folders, and bounded waits."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.azurite import Azurite

APPS = Path(__file__).parent / "apps"
ROOT = Path(__file__).resolve().parent.parent


def _our_azurites() -> list[int]:
    """PIDs of Azurite processes started from this checkout."""
    marker = str(ROOT / "node_modules").encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmdline and b"azurite" in cmdline:
                pids.append(int(entry.name))
    return pids


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """`make test` must leave no process behind: fail the run if any Azurite of ours survived it."""
    if not Path("/proc").is_dir():
        return
    deadline = time.monotonic() + 10
    while (left := _our_azurites()) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nFAILED: Azurite processes left running after the tests: {left}")


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    with Azurite() as emulator:
        yield emulator


@pytest.fixture
def conn(azurite: Azurite) -> str:
    return azurite.connection_string


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def queue_name() -> str:
    return f"q{uuid.uuid4().hex[:20]}"


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class AppFactory:
    def __init__(self, tmp_path: Path, conn: str) -> None:
        self.tmp_path = tmp_path
        self.conn = conn

    def __call__(
        self, template: str, *, queues: dict[str, Any] | None = None, host: dict[str, Any] | None = None, **values: Any
    ) -> tuple[Path, Path, Path]:
        """Copy tests/apps/<template> with its own host.json and settings. Returns (app dir, settings, records)."""
        app_dir = self.tmp_path / f"{template}-{uuid.uuid4().hex[:6]}"
        shutil.copytree(APPS / template, app_dir)
        shutil.copy(APPS / "recorder.py", app_dir / "recorder.py")  # each app imports it from its own folder
        host_json: dict[str, Any] = {"version": "2.0", **(host or {})}
        if queues is not None:
            host_json.setdefault("extensions", {})["queues"] = queues
        (app_dir / "host.json").write_text(json.dumps(host_json), encoding="utf-8")
        records = app_dir / "records.jsonl"
        settings = app_dir / "local.settings.json"
        all_values = {"AzureWebJobsStorage": self.conn, "RECORD_FILE": str(records), **values}
        settings.write_text(json.dumps({"IsEncrypted": False, "Values": all_values}), encoding="utf-8")
        return app_dir, settings, records


@pytest.fixture
def make_app(tmp_path: Path, conn: str) -> AppFactory:
    return AppFactory(tmp_path, conn)
