"""A synchronous queue function that sleeps (`name|seconds` in the body, else SLEEP_S) and records start and end."""

import os
import time

import azure.functions as func
from recorder import record

app = func.FunctionApp()


@app.queue_trigger(arg_name="msg", queue_name="%WORK_QUEUE%", connection="AzureWebJobsStorage")
def slow(msg: func.QueueMessage) -> None:
    body = msg.get_body().decode("utf-8")
    record(event="start", id=msg.id, body=body, dequeue_count=msg.dequeue_count)
    _, _, seconds = body.partition("|")
    time.sleep(float(seconds or os.environ.get("SLEEP_S", "0.5")))  # the slow work under test, not a test's wait
    record(event="end", id=msg.id, body=body)
