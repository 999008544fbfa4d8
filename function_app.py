"""The Functions app: a table of contents. Decorators only; every function makes one call into `shared/`.

Settings are validated here, at start-up: a missing or invalid one stops the app with a message naming it.
"""

import azure.functions as func

from shared import dlq_api, fanout, health, poison, webhook, worker
from shared.observability import configure_telemetry
from shared.reconcile import api as reconcile_api
from shared.reconcile import page as reconcile_page
from shared.runtime import get_runtime
from shared.settings import load_settings

SETTINGS = load_settings()
configure_telemetry(SETTINGS)

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


@app.timer_trigger(schedule="%SYNC_SCHEDULE%", arg_name="timer", use_monitor=True)
async def fan_out(timer: func.TimerRequest) -> None:
    await fanout.fan_out(await get_runtime(SETTINGS))


@app.queue_trigger(arg_name="msg", queue_name="%SYNC_QUEUE%", connection="AzureWebJobsStorage")
async def sync_batch(msg: func.QueueMessage) -> None:
    await worker.handle(await get_runtime(SETTINGS), msg.get_body(), dequeue_count=msg.dequeue_count or 1)


@app.queue_trigger(arg_name="msg", queue_name="%SYNC_QUEUE%-poison", connection="AzureWebJobsStorage")
async def poison_to_dlq(msg: func.QueueMessage) -> None:
    await poison.handle_poison(await get_runtime(SETTINGS), msg.get_body(), dequeue_count=msg.dequeue_count or 1)


@app.queue_trigger(arg_name="msg", queue_name="%SYNC_QUEUE%-reconcile", connection="AzureWebJobsStorage")
async def reconcile_batch(msg: func.QueueMessage) -> None:
    await worker.handle(await get_runtime(SETTINGS), msg.get_body(), dequeue_count=msg.dequeue_count or 1)


@app.queue_trigger(arg_name="msg", queue_name="%SYNC_QUEUE%-reconcile-poison", connection="AzureWebJobsStorage")
async def reconcile_poison_to_dlq(msg: func.QueueMessage) -> None:
    runtime = await get_runtime(SETTINGS)
    await poison.handle_poison(runtime, msg.get_body(), dequeue_count=msg.dequeue_count or 1, queue="reconcile")


@app.timer_trigger(schedule="%RECONCILE_SCHEDULE%", arg_name="timer", use_monitor=True)
async def reconcile(timer: func.TimerRequest) -> None:
    await reconcile_api.on_timer(await get_runtime(SETTINGS))


@app.route(route="reconcile", methods=["POST"])
async def reconcile_start(req: func.HttpRequest) -> func.HttpResponse:
    return await reconcile_api.begin(await get_runtime(SETTINGS), req)


@app.route(route="reconcile/latest", methods=["GET"])
async def reconcile_latest(req: func.HttpRequest) -> func.HttpResponse:
    return await reconcile_api.latest(await get_runtime(SETTINGS), req)


@app.route(route="report", methods=["GET"])
async def report_page(req: func.HttpRequest) -> func.HttpResponse:
    return await reconcile_page.page(await get_runtime(SETTINGS), req)


@app.route(route="report/csv", methods=["GET"])
async def report_csv(req: func.HttpRequest) -> func.HttpResponse:
    return await reconcile_page.csv_file(await get_runtime(SETTINGS), req)


@app.route(route="dlq", methods=["GET"])
async def dlq_list(req: func.HttpRequest) -> func.HttpResponse:
    return await dlq_api.list_dlq(await get_runtime(SETTINGS), req)


@app.route(route="dlq/reprocess", methods=["POST"])
async def dlq_reprocess(req: func.HttpRequest) -> func.HttpResponse:
    return await dlq_api.reprocess(await get_runtime(SETTINGS), req)


@app.route(route="health", methods=["GET"])
async def health_check(req: func.HttpRequest) -> func.HttpResponse:
    return await health.health(await get_runtime(SETTINGS))


@app.route(route="webhooks/billing", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
async def billing_webhook(req: func.HttpRequest) -> func.HttpResponse:
    return await webhook.receive(await get_runtime(SETTINGS), req)
