"""The host as a user runs it: `python -m sandbox host` in its own process, stopped with SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sandbox.procutil import spawn, stop
from tests.conftest import AppFactory, read_records
from tests.polling import wait_until
from tests.sandbox.hosting import queue, raw_messages

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def host_process(*args: str) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    proc = spawn([sys.executable, "-m", "sandbox", "host", "--port", "0", *args], cwd=ROOT)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())

    threading.Thread(target=read, daemon=True).start()
    try:
        wait_until(
            lambda: any("Local host listening on" in line for line in lines) or proc.poll() is not None,
            within=60,
            what="the host to start",
        )
        assert proc.poll() is None, "\n".join(lines)
        yield proc, lines
    finally:
        stop(proc)


def test_sigterm_lets_the_running_invocation_finish_and_delete_its_message(
    make_app: AppFactory, conn: str, queue_name: str
) -> None:
    app_dir, settings, records = make_app(
        "slow", queues={"maxPollingInterval": "00:00:00.200"}, WORK_QUEUE=queue_name, SLEEP_S="2"
    )
    queue(conn, queue_name).send_message("in flight at shutdown")
    with host_process("--app-dir", str(app_dir), "--settings", str(settings)) as (proc, lines):
        wait_until(lambda: read_records(records), what="the invocation to start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "\n".join(lines)
    assert [r["event"] for r in read_records(records)] == ["start", "end"]
    assert raw_messages(conn, queue_name) == []  # deleted after success, not lost nor left for redelivery
    assert raw_messages(conn, f"{queue_name}-poison") == []


def test_shutdown_past_the_drain_bound_makes_the_message_visible_again(
    make_app: AppFactory, conn: str, queue_name: str
) -> None:
    app_dir, settings, records = make_app(
        "asyncapp", queues={"maxPollingInterval": "00:00:00.200"}, WORK_QUEUE=queue_name, SLEEP_S="60"
    )
    queue(conn, queue_name).send_message("too long to wait for")
    args = ("--app-dir", str(app_dir), "--settings", str(settings), "--drain-seconds", "1")
    with host_process(*args) as (proc, _):
        wait_until(lambda: read_records(records), what="the invocation to start")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    # Released at once (not after the 10-minute lease): the next host picks it up again.
    assert wait_until(lambda: raw_messages(conn, queue_name), within=30, what="the message") != []


def test_foreign_app_with_an_always_failing_queue_trigger_ends_in_poison(tmp_path: Path, conn: str) -> None:
    """Done-means of the local-platform issue: an app folder that is not ours, run from the command line."""
    app = tmp_path / "someone-elses-app"
    app.mkdir()
    (app / "host.json").write_text(
        '{"version": "2.0", "extensions": {"queues": {"maxDequeueCount": 3, "maxPollingInterval": "00:00:00.500"}}}'
    )
    (app / "function_app.py").write_text(
        textwrap.dedent(
            """
            import azure.functions as func

            app = func.FunctionApp()

            @app.queue_trigger(arg_name="item", queue_name="orders", connection="Storage")
            def always_raises(item: func.QueueMessage) -> None:
                raise ValueError("nope")
            """
        )
    )
    (app / "local.settings.json").write_text(f'{{"Values": {{"Storage": "{conn}"}}}}')
    orders = queue(conn, "orders")
    orders.send_message("order #1")
    with host_process("--app-dir", str(app)) as (_, lines):
        poison = wait_until(lambda: raw_messages(conn, "orders-poison"), within=60, what="the poison queue")
    assert len(poison) == 1
    assert sum("Executed 'Functions.always_raises' (Failed" in line for line in lines) == 3
    assert raw_messages(conn, "orders") == []
