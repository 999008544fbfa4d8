"""A queue function that fails while the dequeue count is at most FAIL_TIMES (-1: always)."""

import os

import azure.functions as func
from recorder import record

app = func.FunctionApp()


@app.queue_trigger(arg_name="msg", queue_name="%WORK_QUEUE%", connection="AzureWebJobsStorage")
def flaky(msg: func.QueueMessage) -> None:
    body = msg.get_body().decode("utf-8")
    record(event="invoked", id=msg.id, dequeue_count=msg.dequeue_count, body=body, pop_receipt=msg.pop_receipt)
    fail_times = int(os.environ.get("FAIL_TIMES", "-1"))
    if fail_times < 0 or (msg.dequeue_count or 0) <= fail_times:
        raise RuntimeError(f"failing on delivery {msg.dequeue_count}")
    record(event="succeeded", id=msg.id, body=body)
