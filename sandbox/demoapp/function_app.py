"""A small Functions app that exercises the local host: queue retries and poison, output binding, timer, HTTP.

Used by `python -m sandbox demo` until the sync pipeline lands; not part of the product.
"""

import json

import azure.functions as func

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
STATE = {"heartbeats": 0}


@app.queue_trigger(arg_name="msg", queue_name="%DEMO_QUEUE%", connection="AzureWebJobsStorage")
@app.queue_output(arg_name="done", queue_name="%DEMO_QUEUE%-done", connection="AzureWebJobsStorage")
def process(msg: func.QueueMessage, done: func.Out[str]) -> None:
    work = json.loads(msg.get_body())
    if work["fail"] == "always" or (msg.dequeue_count or 1) <= int(work["fail"]):
        raise RuntimeError(f"item {work['n']} failed on delivery {msg.dequeue_count}")
    done.set(json.dumps({"n": work["n"], "deliveries": msg.dequeue_count}))


@app.timer_trigger(arg_name="timer", schedule="%DEMO_SCHEDULE%", use_monitor=False)
def heartbeat(timer: func.TimerRequest) -> None:
    STATE["heartbeats"] += 1


@app.route(route="demo/status", methods=["GET"])
def status(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(STATE), mimetype="application/json")
