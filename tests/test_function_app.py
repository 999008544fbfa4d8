"""The app's registrations, read the way the host reads them, and the plain functions they call."""

from __future__ import annotations

import importlib
import json

import azure.functions as func

from shared import __version__, health


def test_functions_are_registered_with_their_triggers() -> None:
    module = importlib.import_module("function_app")
    functions = {f.get_function_name(): json.loads(f.get_function_json()) for f in module.app.get_functions()}
    trigger = functions["health_check"]["bindings"][0]
    assert trigger["type"] == "httpTrigger"
    assert trigger["route"] == "health"
    assert trigger["authLevel"] == "FUNCTION"
    assert trigger["methods"] == ["GET"]


def test_health_answers_ok_with_the_version() -> None:
    response = health.respond()
    assert isinstance(response, func.HttpResponse)
    assert response.status_code == 200
    assert json.loads(response.get_body()) == {"status": "ok", "version": __version__}
