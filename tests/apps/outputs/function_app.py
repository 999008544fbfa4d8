"""A queue function with a queue output binding (Out[str]) and one returning a list through `$return`."""

import azure.functions as func
from recorder import record

app = func.FunctionApp()


@app.queue_trigger(arg_name="msg", queue_name="%WORK_QUEUE%", connection="AzureWebJobsStorage")
@app.queue_output(arg_name="out", queue_name="%WORK_QUEUE%-out", connection="AzureWebJobsStorage")
def forward(msg: func.QueueMessage, out: func.Out[str]) -> None:
    record(event="invoked", body=msg.get_body().decode())
    out.set(msg.get_body().decode().upper())
