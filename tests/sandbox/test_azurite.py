"""Azurite management: free ports, readiness, and nothing left behind."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import pytest
from azure.data.tables import TableServiceClient
from azure.storage.queue import QueueClient

from sandbox.azurite import Azurite, AzuriteError, azurite_binary
from sandbox.procutil import spawn, stop
from tests.polling import wait_until
from tests.sandbox.test_host_startup import run_cli


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_serves_all_three_services_and_stop_leaves_nothing(tmp_path: Path) -> None:
    emulator = Azurite()
    endpoints = emulator.start()
    proc = emulator._proc
    assert proc is not None
    tmpdir = emulator._tmpdir
    try:
        assert len({endpoints.blob_port, endpoints.queue_port, endpoints.table_port}) == 3
        q = QueueClient.from_connection_string(emulator.connection_string, "probe")
        q.create_queue()
        q.send_message("x")
        assert [m.content for m in q.peek_messages()] == ["x"]
        q.close()
        tables = TableServiceClient.from_connection_string(emulator.connection_string)
        tables.create_table("probe")
        tables.close()
    finally:
        emulator.stop()
    assert not _alive(proc.pid)
    assert tmpdir is not None
    assert not tmpdir.exists()
    emulator.stop()  # idempotent


def test_persistent_location_keeps_data_between_runs(tmp_path: Path) -> None:
    with Azurite(location=tmp_path) as first:
        QueueClient.from_connection_string(first.connection_string, "kept").create_queue()
    assert any(tmp_path.iterdir())
    with Azurite(location=tmp_path) as second:
        q = QueueClient.from_connection_string(second.connection_string, "kept")
        assert q.get_queue_properties().name == "kept"
        q.close()


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AzuriteError, match="npm ci"):
        azurite_binary(tmp_path)


def test_cli_azurite_prints_a_connection_string_and_stops_on_sigterm() -> None:
    root = Path(__file__).resolve().parents[2]
    proc = spawn([sys.executable, "-m", "sandbox", "azurite"], cwd=root)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(line.rstrip() for line in proc.stdout or []), daemon=True).start()
    try:
        conn_line = wait_until(
            lambda: next((line for line in lines if line.startswith("AzureWebJobsStorage=")), None),
            within=60,
            what="the connection string",
        )
        conn = conn_line.split("=", 1)[1]
        q = QueueClient.from_connection_string(conn, "cli-probe")
        q.create_queue()
        q.close()
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        stop(proc)
    assert run_cli("azurite", "--help").returncode == 0
