"""JSON answers of the HTTP functions."""

from __future__ import annotations

import json
from typing import Any

import azure.functions as func


def json_response(value: Any, status: int = 200) -> func.HttpResponse:
    return func.HttpResponse(json.dumps(value, default=str, indent=1), status_code=status, mimetype="application/json")


def error_response(status: int, message: str) -> func.HttpResponse:
    """A refusal that says why: `{"error": "..."}`."""
    return json_response({"error": message}, status)
