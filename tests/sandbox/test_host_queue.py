"""Queue-trigger semantics of the local host, against Azurite."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from azure.storage.queue import QueueClient

from sandbox.faults import FaultProfile, HostFaults
from tests.conftest import AppFactory, read_records
from tests.polling import eventually
from tests.sandbox.hosting import queue, raw_messages, running_host

pytestmark = pytest.mark.anyio
FAST = {"maxPollingInterval": "00:00:00.200", "visibilityTimeout": "00:00:00"}


async def test_message_failing_every_time_is_poisoned_after_max_dequeue_count(
    make_app: AppFactory, conn: str, queue_name: str
) -> None:
    app_dir, settings, records = make_app("flaky", queues={**FAST, "maxDequeueCount": 4}, WORK_QUEUE=queue_name)
    work = queue(conn, queue_name)
    work.send_message("always fails: O'Brien & co ✓")
    stored = raw_messages(conn, queue_name)
    async with running_host(app_dir, settings):
        await eventually(lambda: raw_messages(conn, f"{queue_name}-poison"), what="a poison message")
    invoked = [r for r in read_records(records) if r["event"] == "invoked"]
    assert [r["dequeue_count"] for r in invoked] == [1, 2, 3, 4]
    assert {r["body"] for r in invoked} == {"always fails: O'Brien & co ✓"}
    assert raw_messages(conn, f"{queue_name}-poison") == stored  # body byte-for-byte unchanged
    assert raw_messages(conn, queue_name) == []


async def test_message_that_succeeds_on_a_retry_is_deleted_not_poisoned(
    make_app: AppFactory, conn: str, queue_name: str
) -> None:
    app_dir, settings, records = make_app("flaky", queues=FAST, WORK_QUEUE=queue_name, FAIL_TIMES="2")
    queue(conn, queue_name).send_message("third time lucky")
    async with running_host(app_dir, settings):
        await eventually(lambda: any(r["event"] == "succeeded" for r in read_records(records)), what="success")
        await eventually(lambda: not raw_messages(conn, queue_name), what="the message to be deleted")
    assert [r["dequeue_count"] for r in read_records(records) if r["event"] == "invoked"] == [1, 2, 3]
    assert raw_messages(conn, f"{queue_name}-poison") == []


async def test_failed_message_is_invisible_for_visibility_timeout(
    make_app: AppFactory, conn: str, queue_name: str
) -> None:
    queues = {"maxPollingInterval": "00:00:00.100", "visibilityTimeout": "00:00:02", "maxDequeueCount": 2}
    app_dir, settings, records = make_app("flaky", queues=queues, WORK_QUEUE=queue_name)
    queue(conn, queue_name).send_message("retry me later")
    async with running_host(app_dir, settings):
        await eventually(lambda: raw_messages(conn, f"{queue_name}-poison"), what="poison")
    first, second = [r["t"] for r in read_records(records) if r["event"] == "invoked"]
    assert second - first >= 1.9


async def test_sdk_message_sent_with_base64_policy_is_decoded(make_app: AppFactory, conn: str, queue_name: str) -> None:
    app_dir, settings, records = make_app("asyncapp", queues=FAST, WORK_QUEUE=queue_name)
    queue(conn, queue_name, base64=True).send_message('{"ids": ["A-1", "B/2"]}')
    async with running_host(app_dir, settings):
        await eventually(lambda: any(r["event"] == "end" for r in read_records(records)), what="the invocation")
    assert read_records(records)[0]["body"] == '{"ids": ["A-1", "B/2"]}'


async def test_message_encoding_none_passes_the_raw_text(make_app: AppFactory, conn: str, queue_name: str) -> None:
    app_dir, settings, records = make_app("asyncapp", queues={**FAST, "messageEncoding": "none"}, WORK_QUEUE=queue_name)
    queue(conn, queue_name, base64=False).send_message("plain text, not base64!")
    async with running_host(app_dir, settings):
        await eventually(lambda: any(r["event"] == "end" for r in read_records(records)), what="the invocation")
    assert read_records(records)[0]["body"] == "plain text, not base64!"


async def test_undecodable_message_is_poisoned_without_invocation(
    make_app: AppFactory, conn: str, queue_name: str
) -> None:
    app_dir, settings, records = make_app("asyncapp", queues=FAST, WORK_QUEUE=queue_name)
    queue(conn, queue_name, base64=False).send_message("not base64 at all!")
    async with running_host(app_dir, settings):
        poison = await eventually(lambda: raw_messages(conn, f"{queue_name}-poison"), what="poison")
    assert poison == ["not base64 at all!"]
    assert read_records(records) == []


async def test_message_already_past_max_dequeue_count_is_poisoned_without_invocation(
    make_app: AppFactory, conn: str, queue_name: str
) -> None:
    """A worker that died mid-invocation leaves a message whose next delivery exceeds maxDequeueCount."""
    app_dir, settings, records = make_app("asyncapp", queues={**FAST, "maxDequeueCount": 2}, WORK_QUEUE=queue_name)
    work = queue(conn, queue_name)
    work.send_message("crashed twice")
    for _ in range(2):  # two deliveries whose workers 'died': received, never deleted
        msgs = list(work.receive_messages(visibility_timeout=1, max_messages=1))
        assert len(msgs) == 1
        await eventually(lambda: raw_messages(conn, queue_name), within=5, what="visibility to lapse")
    async with running_host(app_dir, settings):
        await eventually(lambda: raw_messages(conn, f"{queue_name}-poison"), what="poison")
    assert read_records(records) == []


async def test_concurrency_never_exceeds_batch_size_plus_new_batch_threshold(
    make_app: AppFactory, conn: str, queue_name: str
) -> None:
    queues = {**FAST, "batchSize": 4, "newBatchThreshold": 2}
    app_dir, settings, records = make_app("slow", queues=queues, WORK_QUEUE=queue_name, SLEEP_S="0.4")
    work = queue(conn, queue_name)
    for n in range(24):
        work.send_message(f"m{n}|{0.1 + (n * 7 % 11) / 20}")  # uneven durations, so slots free one by one
    async with running_host(app_dir, settings):
        await eventually(
            lambda: sum(r["event"] == "end" for r in read_records(records)) == 24, within=60, what="24 invocations"
        )
    running = peak = 0
    for r in sorted(read_records(records), key=lambda r: (r["t"], r["event"] == "start")):
        running += 1 if r["event"] == "start" else -1
        peak = max(peak, running)
    assert peak <= 6
    assert peak >= 5  # it does run in parallel: the bound is reached, not merely respected by running serially


async def test_async_function_gets_context_and_runs_concurrently_on_the_loop(
    make_app: AppFactory, conn: str, queue_name: str
) -> None:
    queues = {**FAST, "batchSize": 8, "newBatchThreshold": 0}
    app_dir, settings, records = make_app("asyncapp", queues=queues, WORK_QUEUE=queue_name, SLEEP_S="0.5")
    work = queue(conn, queue_name)
    for n in range(8):
        work.send_message(f"a{n}")
    async with running_host(app_dir, settings):
        await eventually(lambda: sum(r["event"] == "end" for r in read_records(records)) == 8, what="8 invocations")
    starts = [r for r in read_records(records) if r["event"] == "start"]
    assert {r["function_name"] for r in starts} == {"handle"}
    assert len({r["invocation_id"] for r in starts}) == 8
    assert {r["retry_count"] for r in starts} == {0}
    ends = [r["t"] for r in read_records(records) if r["event"] == "end"]
    assert max(ends) - min(r["t"] for r in starts) < 8 * 0.5  # overlapped, not one after another


async def test_function_timeout_fails_the_invocation_and_the_message_is_retried(
    make_app: AppFactory, conn: str, queue_name: str
) -> None:
    app_dir, settings, records = make_app(
        "asyncapp",
        queues={**FAST, "maxDequeueCount": 2},
        host={"functionTimeout": "00:00:01"},
        WORK_QUEUE=queue_name,
        SLEEP_S="30",
    )
    queue(conn, queue_name).send_message("too slow")
    async with running_host(app_dir, settings):
        await eventually(lambda: raw_messages(conn, f"{queue_name}-poison"), what="poison after two timeouts")
    starts = [r for r in read_records(records) if r["event"] == "start"]
    assert [r["dequeue_count"] for r in starts] == [1, 2]
    assert not [r for r in read_records(records) if r["event"] == "end"]


async def test_queue_output_binding_writes_base64_to_the_output_queue(
    make_app: AppFactory, conn: str, queue_name: str
) -> None:
    app_dir, settings, _ = make_app("outputs", queues=FAST, WORK_QUEUE=queue_name)
    queue(conn, queue_name).send_message("hello")
    queue(conn, f"{queue_name}-out")
    async with running_host(app_dir, settings):
        out = await eventually(lambda: raw_messages(conn, f"{queue_name}-out"), what="an output message")
    assert [base64.b64decode(m).decode() for m in out] == ["HELLO"]


async def test_listener_waits_for_a_queue_created_after_start(make_app: AppFactory, conn: str, queue_name: str) -> None:
    app_dir, settings, records = make_app("asyncapp", queues=FAST, WORK_QUEUE=queue_name)
    async with running_host(app_dir, settings):
        queue(conn, queue_name).send_message("late queue")
        await eventually(lambda: read_records(records), what="the invocation")


async def test_duplicate_delivery_fault_delivers_the_body_twice(
    make_app: AppFactory, conn: str, queue_name: str
) -> None:
    app_dir, settings, records = make_app("asyncapp", queues=FAST, WORK_QUEUE=queue_name)
    queue(conn, queue_name).send_message("twice")
    faults = FaultProfile(host=HostFaults(duplicate_delivery_rate=1.0))
    async with running_host(app_dir, settings, faults=faults) as host:
        await eventually(lambda: host.queue_listeners[0].stats.succeeded >= 2, what="two deliveries")
    bodies = [r["body"] for r in read_records(records) if r["event"] == "start"]
    assert bodies[:2] == ["twice", "twice"]


async def test_crash_after_success_fault_redelivers_after_the_lease(
    make_app: AppFactory, conn: str, queue_name: str
) -> None:
    app_dir, settings, records = make_app("asyncapp", queues=FAST, WORK_QUEUE=queue_name)
    queue(conn, queue_name).send_message("crash after me")
    faults = FaultProfile(host=HostFaults(crash_after_success_rate=1.0))
    async with running_host(app_dir, settings, faults=faults, lease_s=1) as host:
        await eventually(lambda: host.queue_listeners[0].stats.succeeded >= 2, what="a redelivery")
    starts = [r["dequeue_count"] for r in read_records(records) if r["event"] == "start"]
    assert starts[:2] == [1, 2]


def test_queue_clients_send_raw_content(conn: str, queue_name: str) -> None:
    """Guard for the helpers above: the SDK's default policy sends text unencoded."""
    client = QueueClient.from_connection_string(conn, queue_name)
    client.create_queue()
    client.send_message("abc")
    assert [m.content for m in client.peek_messages()] == ["abc"]
    client.close()


def test_records_helper_reads_nothing_from_a_missing_file(tmp_path: Path) -> None:
    assert read_records(tmp_path / "none.jsonl") == []


async def test_lease_is_renewed_while_a_long_invocation_runs(make_app: AppFactory, conn: str, queue_name: str) -> None:
    """A 2 s lease and a 4 s function: without renewal the message would reappear and run twice."""
    app_dir, settings, records = make_app("asyncapp", queues=FAST, WORK_QUEUE=queue_name, SLEEP_S="4")
    queue(conn, queue_name).send_message("long job")
    async with running_host(app_dir, settings, lease_s=2) as host:
        await eventually(lambda: host.queue_listeners[0].stats.succeeded == 1, what="the invocation")
        await eventually(lambda: not raw_messages(conn, queue_name), what="the delete")
    assert [r["dequeue_count"] for r in read_records(records) if r["event"] == "start"] == [1]
