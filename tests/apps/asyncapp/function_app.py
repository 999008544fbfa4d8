"""An `async def` queue function with a context argument; sleeps SLEEP_S seconds without blocking the loop."""

import asyncio
import os

import azure.functions as func
from recorder import record

app = func.FunctionApp()


@app.queue_trigger(arg_name="msg", queue_name="%WORK_QUEUE%", connection="AzureWebJobsStorage")
async def handle(msg: func.QueueMessage, context: func.Context) -> None:
    body = msg.get_body().decode("utf-8")
    record(
        event="start",
        id=msg.id,
        body=body,
        dequeue_count=msg.dequeue_count,
        invocation_id=context.invocation_id,
        function_name=context.function_name,
        retry_count=context.retry_context.retry_count,
    )
    await asyncio.sleep(float(os.environ.get("SLEEP_S", "0")))
    record(event="end", id=msg.id, body=body)
