"""The Functions app: a table of contents. Decorators only; every function makes one call into `shared/`."""

import azure.functions as func

from shared import health

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)


@app.route(route="health", methods=["GET"])
def health_check(req: func.HttpRequest) -> func.HttpResponse:
    return health.respond()
