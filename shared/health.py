"""The health endpoint's answer. The pipeline adds runs, lag, DLQ depth and breaker states to it."""

from __future__ import annotations

import json
from typing import Any

import azure.functions as func

from shared import __version__


def status() -> dict[str, Any]:
    return {"status": "ok", "version": __version__}


def respond() -> func.HttpResponse:
    return func.HttpResponse(json.dumps(status()), status_code=200, mimetype="application/json")
