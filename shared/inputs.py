"""HTTP inputs at the boundary: every endpoint parses its body or query string through one pydantic model, and
whatever a caller sends (wrong types, unknown keys, deep nesting, a body too large) answers 400 with a JSON body
naming the field: `{"error": "...", "fields": [{"field": "ids.0", "problem": "..."}]}`.

`guarded` is the last resort around every HTTP handler: an error nobody planned for answers 500 with an error id in
JSON, and the log line holding the traceback carries the same id. It is never the plan: the fuzz suite
(`tests/shared/test_fuzz.py`) sends arbitrary input to every endpoint and expects 2xx or 4xx.
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ParamSpec, TypeVar

import azure.functions as func
from pydantic import BaseModel, ValidationError

from shared import logs
from shared.redact import printable
from shared.responses import json_response

log = logs.get_logger("shared.inputs")
MAX_BODY_BYTES = 64 * 1024
Model = TypeVar("Model", bound=BaseModel)
P = ParamSpec("P")


class BadRequest(ValueError):
    """What is wrong with a request, field by field."""

    def __init__(self, message: str, fields: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.fields = fields or []

    def response(self) -> func.HttpResponse:
        body: dict[str, Any] = {"error": str(self)}
        if self.fields:
            body["fields"] = self.fields
        return json_response(body, 400)


def problems(exc: ValidationError) -> list[dict[str, str]]:
    """A pydantic error as `[{"field": "ids.0", "problem": "..."}]`; never the input itself."""
    out = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        where = ".".join(str(p) for p in err["loc"]) or "(body)"
        what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        out.append({"field": printable(where, 100), "problem": printable(what, 200)})
    return out


def validate(model: type[Model], data: Any) -> Model:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        found = problems(exc)
        summary = "; ".join(f"{p['field']}: {p['problem']}" for p in found[:5])
        raise BadRequest(summary or "the request does not match its schema", found) from None


def load_json(body: bytes, *, what: str = "the body") -> Any:
    """JSON from a request body, bounded before it is parsed (size; nesting past the parser's stack)."""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"{what} is {len(body)} bytes, over the {MAX_BODY_BYTES} this endpoint reads")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadRequest(f"{what} is not JSON") from None
    except RecursionError:
        raise BadRequest(f"{what} is nested too deep") from None


def body(req: func.HttpRequest, model: type[Model], *, empty: Any = None) -> Model:
    """The request's JSON body as `model` (an empty body is `empty`, when the endpoint allows one)."""
    raw = req.get_body() or b""
    if not raw.strip() and empty is not None:
        return validate(model, empty)
    data = load_json(raw)
    if not isinstance(data, dict):
        raise BadRequest(f"the body must be a JSON object, not {type(data).__name__}")
    return validate(model, data)


def query(req: func.HttpRequest, model: type[Model], *, ignore: tuple[str, ...] = ("code",)) -> Model:
    """The query string as `model`; `code` (a function key sent in the URL) is the host's, not the endpoint's."""
    params: Mapping[str, str] = req.params
    return validate(model, {k: v for k, v in params.items() if k not in ignore})


def guarded(handler: Callable[P, Awaitable[func.HttpResponse]]) -> Callable[P, Awaitable[func.HttpResponse]]:
    """A BadRequest raised anywhere below answers 400; any other error 500 with an error id, logged with it."""

    @functools.wraps(handler)
    async def answer(*args: P.args, **kwargs: P.kwargs) -> func.HttpResponse:
        try:
            return await handler(*args, **kwargs)
        except BadRequest as exc:
            return exc.response()
        except Exception:
            error_id = uuid.uuid4().hex[:16]
            log.exception("%s failed: error id %s", handler.__name__, error_id)
            return json_response({"error": "internal error; the logs hold the details", "error_id": error_id}, 500)

    return answer
