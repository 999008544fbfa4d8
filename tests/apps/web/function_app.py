"""HTTP functions at every auth level, with route parameters, and one that raises."""

import json

import azure.functions as func
from recorder import record

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


@app.route(route="items/{id:int}", methods=["GET", "PUT"])
def item(req: func.HttpRequest) -> func.HttpResponse:
    payload = {
        "id": req.route_params["id"],
        "method": req.method,
        "q": req.params.get("q"),
        "body": req.get_body().decode() if req.get_body() else None,
        "header": req.headers.get("x-custom"),
    }
    return func.HttpResponse(json.dumps(payload), status_code=201, mimetype="application/json", headers={"x-out": "1"})


@app.route(route="open/{*rest}", auth_level=func.AuthLevel.ANONYMOUS)
def open_door(req: func.HttpRequest) -> str:
    return "open:" + req.route_params.get("rest", "")


@app.route(route="admin-only", auth_level=func.AuthLevel.ADMIN, methods=["POST"])
def admin_only(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("admin ok")


@app.route(route="boom", auth_level=func.AuthLevel.ANONYMOUS)
def boom(req: func.HttpRequest) -> func.HttpResponse:
    record(event="boom")
    raise RuntimeError("this function always fails")


@app.timer_trigger(arg_name="timer", schedule="0 0 0 1 1 *", use_monitor=False)
def nightly(timer: func.TimerRequest) -> None:
    record(event="nightly", past_due=timer.past_due)
