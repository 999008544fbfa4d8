"""HTTP triggers: route templates under the route prefix, methods, auth levels with keys, admin API."""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import azure.functions as func
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sandbox.host.errors import HostStartupError
from sandbox.host.invoke import Invoker
from sandbox.host.loader import FunctionSpec

log = logging.getLogger("sandbox.host")

_CONSTRAINTS = {
    "int": r"-?\d+",
    "long": r"-?\d+",
    "double": r"-?\d+(?:\.\d+)?",
    "decimal": r"-?\d+(?:\.\d+)?",
    "bool": r"(?i:true|false)",
    "alpha": r"[A-Za-z]+",
    "guid": r"[0-9A-Fa-f]{8}-?(?:[0-9A-Fa-f]{4}-?){3}[0-9A-Fa-f]{12}",
}
_PARAM = re.compile(r"\{(?P<star>\*)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<constraint>[a-z]+))?(?P<opt>\?)?\}")
AUTH_LEVELS = ("anonymous", "function", "admin")


def compile_route(template: str, *, where: str) -> re.Pattern[str]:
    """Turn an ASP.NET-style route template (`items/{id:int}`, `files/{*path}`, `dlq/{id?}`) into a regex."""
    pattern = ""
    for segment in [s for s in template.strip("/").split("/") if s]:
        parts: list[str] = []
        optional = False
        pos = 0
        for match in _PARAM.finditer(segment):
            parts.append(re.escape(segment[pos : match.start()]))
            constraint = match["constraint"]
            if constraint and constraint not in _CONSTRAINTS:
                raise HostStartupError(
                    f"{where}: route constraint {constraint!r} is not supported (supported: {', '.join(_CONSTRAINTS)})"
                )
            body = ".*" if match["star"] else _CONSTRAINTS.get(constraint or "", "[^/]+")
            parts.append(f"(?P<{match['name']}>{body})")
            optional = optional or bool(match["opt"]) or bool(match["star"])
            pos = match.end()
        rest = segment[pos:]
        if "{" in rest or "}" in rest:
            raise HostStartupError(f"{where}: route template {template!r} has a malformed parameter")
        parts.append(re.escape(rest))
        piece = "/" + "".join(parts)
        pattern += f"(?:{piece})?" if optional else piece
    return re.compile(f"^{pattern}/?$", re.IGNORECASE)


@dataclass(frozen=True)
class HttpRoute:
    spec: FunctionSpec
    template: str
    pattern: re.Pattern[str]
    methods: frozenset[str] | None
    auth_level: str


def build_route(spec: FunctionSpec, prefix: str) -> HttpRoute:
    trigger = spec.trigger
    where = f"function {spec.name!r}"
    template = trigger.get("route") or spec.name
    full = f"{prefix}/{template}" if prefix else template
    level = str(trigger.get("authLevel") or "function").lower()
    if level not in AUTH_LEVELS:
        raise HostStartupError(f"{where}: authLevel {level!r} is not one of {', '.join(AUTH_LEVELS)}")
    methods = trigger.get("methods")
    allowed = frozenset(str(m).upper() for m in methods) if methods else None
    return HttpRoute(spec, full, compile_route(full, where=where), allowed, level)


@dataclass(frozen=True)
class Keys:
    function: str
    master: str

    def level_of(self, presented: str | None) -> str:
        if not presented:
            return "anonymous"
        if hmac.compare_digest(presented, self.master):
            return "admin"
        if hmac.compare_digest(presented, self.function):
            return "function"
        return "anonymous"


def presented_key(request: Request) -> str | None:
    return request.headers.get("x-functions-key") or request.query_params.get("code")


def _granted(required: str, held: str) -> bool:
    return AUTH_LEVELS.index(held) >= AUTH_LEVELS.index(required)


def to_starlette(result: Any) -> Response:
    if isinstance(result, func.HttpResponse):
        headers = dict(result.headers)
        media = result.mimetype
        if media and result.charset and (media.startswith("text/") or media == "application/json"):
            media = f"{media}; charset={result.charset}"
        headers.pop("content-type", None)
        headers.pop("Content-Type", None)
        return Response(content=result.get_body(), status_code=result.status_code, headers=headers, media_type=media)
    if isinstance(result, str | bytes):
        return Response(content=result, status_code=200, media_type="text/plain")
    raise TypeError(f"an HTTP function must return func.HttpResponse, str or bytes, not {type(result).__name__}")


AdminHandler = Callable[[Request, str], Awaitable[Response]]


class HttpDispatcher:
    """An ASGI app: dispatches `/<prefix>/...` to HTTP functions and `/admin/...` to the admin API."""

    def __init__(self, routes: list[HttpRoute], keys: Keys, invoker: Invoker, admin: AdminHandler) -> None:
        self.routes = routes
        self.keys = keys
        self.invoker = invoker
        self.admin = admin

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        response = await self.handle(request)
        await response(scope, receive, send)

    async def handle(self, request: Request) -> Response:
        path = request.url.path
        held = self.keys.level_of(presented_key(request))
        if path.startswith("/admin/"):
            if held != "admin":
                return JSONResponse({"error": "the admin API needs the master key"}, status_code=401)
            return await self.admin(request, path)
        matched = [(r, m) for r in self.routes if (m := r.pattern.match(path))]
        if not matched:
            return JSONResponse({"error": f"no function serves {path}"}, status_code=404)
        for route, found in matched:
            if route.methods is None or request.method.upper() in route.methods:
                match = found
                break
        else:
            allowed = sorted({m for r, _ in matched for m in (r.methods or ())})
            return JSONResponse(
                {"error": f"{request.method} is not allowed on {path}"},
                status_code=405,
                headers={"Allow": ", ".join(allowed)},
            )
        if not _granted(route.auth_level, held):
            return JSONResponse(
                {"error": f"'{route.spec.name}' needs a {route.auth_level} key (x-functions-key header or code)"},
                status_code=401,
            )
        body = await request.body()
        params = dict(request.query_params.items())
        route_params = {k: v for k, v in match.groupdict().items() if v is not None}
        req = func.HttpRequest(
            method=request.method,
            url=str(request.url),
            headers=dict(request.headers),
            params=params,
            route_params=route_params,
            body=body,
        )
        inv = await self.invoker.invoke(route.spec, req, reason="This function was programmatically called via HTTP.")
        if not inv.succeeded:
            return Response(status_code=500)
        result = inv.return_value
        try:
            return to_starlette(result)
        except TypeError as exc:
            log.error("Function '%s' returned an unusable value: %s", route.spec.name, exc)
            return Response(status_code=500)
