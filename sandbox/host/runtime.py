"""The local Functions host: loads an app, validates it against its settings, runs its triggers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from sandbox.faults import FaultProfile
from sandbox.host.config import HostConfig, Settings, load_host_json, load_local_settings
from sandbox.host.errors import HostStartupError
from sandbox.host.http import HttpDispatcher, HttpRoute, Keys, build_route
from sandbox.host.invoke import Invocation, Invoker
from sandbox.host.loader import SCRIPT_FILE_SETTING, FunctionSpec, load_app, unload_app
from sandbox.host.queues import QueueClients, QueueListener, encode, to_body
from sandbox.host.timers import (
    ScheduleMonitor,
    TimerListener,
    default_use_monitor,
    parse_schedule,
    utcnow,
)
from sandbox.servers import make_server

log = logging.getLogger("sandbox.host")
STORAGE_SETTING = "AzureWebJobsStorage"
FUNCTION_KEY_SETTING = "SANDBOX_HOST_FUNCTION_KEY"
MASTER_KEY_SETTING = "SANDBOX_HOST_MASTER_KEY"
_QUEUE_NAME = re.compile(r"^(?=.{3,63}$)[a-z0-9](?:[a-z0-9]|-(?!-))*[a-z0-9]$")


@dataclass
class HostOptions:
    app_dir: Path
    settings_file: Path | None = None
    faults: FaultProfile = field(default_factory=FaultProfile)
    http_host: str = "127.0.0.1"
    http_port: int | None = None  # None: Host.LocalHttpPort from the settings, else 7071; 0: any free port
    once: tuple[str, ...] = ()
    lease: timedelta = timedelta(minutes=10)
    drain_timeout: timedelta = timedelta(seconds=30)
    state_dir: Path | None = None
    visibility_timeout: timedelta | None = None  # tests: overrides host.json's queues.visibilityTimeout


def default_settings_file(app_dir: Path) -> Path | None:
    for name in ("local.settings.json", "local.settings.sample.json"):
        if (app_dir / name).is_file():
            return app_dir / name
    return None


@contextlib.contextmanager
def _scoped_environ(values: dict[str, str]) -> Iterator[None]:
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


class LocalHost:
    """Start with `async with LocalHost(options) as host:`; leaving the block drains and stops everything."""

    def __init__(self, options: HostOptions) -> None:
        self.options = options
        self.functions: list[FunctionSpec] = []
        self.queue_listeners: list[QueueListener] = []
        self.timer_listeners: dict[str, TimerListener] = {}
        self.routes: list[HttpRoute] = []
        self.keys: Keys | None = None
        self.http_url: str | None = None
        self._clients = QueueClients()
        self._monitor: ScheduleMonitor | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._server: uvicorn.Server | None = None
        self._env: contextlib.ExitStack | None = None
        self._invoker: Invoker | None = None
        self._outputs: dict[tuple[str, str], tuple[str, str]] = {}  # (function, binding) -> (queue, connection)
        self._admin_tasks: set[asyncio.Task[bool]] = set()
        self.config: HostConfig | None = None

    # ---- start-up: everything a user can get wrong is checked before anything runs ----

    def _prepare(self) -> None:
        opts = self.options
        app_dir = opts.app_dir.resolve()
        if not app_dir.is_dir():
            raise HostStartupError(f"{app_dir}: app folder not found")
        self.config = load_host_json(app_dir)
        for key in self.config.unknown_keys:
            log.warning("%s: %s is not a setting the local host knows; ignored", self.config.path, key)
        local = load_local_settings(opts.settings_file)
        settings = Settings(local.values, local.path)
        self._env = contextlib.ExitStack()
        self._env.enter_context(_scoped_environ(settings.environ()))
        if opts.http_port is None:
            opts.http_port = local.http_port if local.http_port is not None else 7071
        self.functions = load_app(app_dir, settings.get(SCRIPT_FILE_SETTING) or "function_app.py")
        names = {f.name for f in self.functions}
        threads = settings.get("PYTHON_THREADPOOL_THREAD_COUNT")
        self._invoker = Invoker(
            function_timeout=self.config.function_timeout, threads=int(threads) if threads else None
        )
        for name in opts.once:
            if name not in names or self._spec(name).trigger["type"] != "timerTrigger":
                raise HostStartupError(f"--once {name}: no timer function of that name (functions: {sorted(names)})")
        self.keys = self._keys(settings)
        for spec in self.functions:
            kind = spec.trigger["type"]
            for out in spec.outputs:
                if out["type"] == "queue":
                    self._outputs[(spec.name, out["name"])] = self._queue_binding(spec, out, settings)
            if kind == "queueTrigger":
                self._prepare_queue(spec, settings)
            elif kind == "timerTrigger":
                self._prepare_timer(spec, settings)
            else:
                self.routes.append(build_route(spec, self.config.route_prefix))

    def _spec(self, name: str) -> FunctionSpec:
        return next(f for f in self.functions if f.name == name)

    def _connection(self, spec: FunctionSpec, binding: dict[str, Any], settings: Settings) -> str:
        name = binding.get("connection") or STORAGE_SETTING
        value = settings.get(name)
        if value is None and any(
            settings.get(f"{name}__{suffix}") for suffix in ("queueServiceUri", "serviceUri", "accountName")
        ):
            raise HostStartupError(
                f"function {spec.name!r}: connection {name!r} is identity-based; the local host needs a connection "
                f"string (Azurite) in {name}"
            )
        return settings.require(name, needed_by=f"function {spec.name!r} (binding {binding['name']!r}, connection)")

    def _queue_binding(self, spec: FunctionSpec, binding: dict[str, Any], settings: Settings) -> tuple[str, str]:
        where = f"function {spec.name!r} (binding {binding['name']!r}, queueName)"
        queue = settings.resolve(str(binding.get("queueName") or ""), needed_by=where)
        if not _QUEUE_NAME.match(queue):
            raise HostStartupError(
                f"{where}: {queue!r} is not a valid queue name (3-63 lowercase letters, digits and single hyphens)"
            )
        return queue, self._connection(spec, binding, settings)

    def _prepare_queue(self, spec: FunctionSpec, settings: Settings) -> None:
        assert self.config is not None  # noqa: S101
        assert self._invoker is not None  # noqa: S101
        queue, conn = self._queue_binding(spec, spec.trigger, settings)
        queue_options = self.config.queues
        if self.options.visibility_timeout is not None:
            queue_options = dataclasses.replace(queue_options, visibility_timeout=self.options.visibility_timeout)
        self.queue_listeners.append(
            QueueListener(
                spec=spec,
                queue=queue,
                conn=conn,
                options=queue_options,
                invoker=self._invoker,
                clients=self._clients,
                send_outputs=self._send_outputs,
                faults=self.options.faults.host,
                rng=self.options.faults.rng(f"host:{spec.name}"),
                lease=self.options.lease,
            )
        )

    def _prepare_timer(self, spec: FunctionSpec, settings: Settings) -> None:
        assert self._invoker is not None  # noqa: S101
        trigger = spec.trigger
        where = f"function {spec.name!r} (binding {trigger['name']!r}, schedule)"
        text = settings.resolve(str(trigger.get("schedule") or ""), needed_by=where)
        schedule = parse_schedule(text, where=where, time_zone=settings.get("WEBSITE_TIME_ZONE"))
        use_monitor = trigger.get("useMonitor")
        if use_monitor is None:
            use_monitor = default_use_monitor(schedule, utcnow())
        monitor = None
        if use_monitor:
            if self._monitor is None:
                conn = settings.require(STORAGE_SETTING, needed_by=f"function {spec.name!r} (schedule monitor)")
                host_id = settings.get("AzureFunctionsWebHost__hostid") or _host_id(self.options.app_dir)
                self._monitor = ScheduleMonitor(conn, host_id)
            monitor = self._monitor
        self.timer_listeners[spec.name] = TimerListener(
            spec=spec,
            schedule=schedule,
            invoker=self._invoker,
            monitor=monitor,
            run_on_startup=bool(trigger.get("runOnStartup")),
            fire_at_start=spec.name in self.options.once,
        )

    def _keys(self, settings: Settings) -> Keys:
        function_key = settings.get(FUNCTION_KEY_SETTING)
        master_key = settings.get(MASTER_KEY_SETTING)
        if function_key and master_key:
            return Keys(function_key, master_key)
        keys = Keys(function_key or secrets.token_urlsafe(32), master_key or secrets.token_urlsafe(32))
        state = self.options.state_dir or Path.cwd() / ".local" / "host"
        state.mkdir(parents=True, exist_ok=True)
        path = state / "host-keys.json"
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text(json.dumps({"functionKey": keys.function, "masterKey": keys.master}), encoding="utf-8")
        log.info("Function keys generated for this run are in %s (set %s to fix them)", path, FUNCTION_KEY_SETTING)
        return keys

    # ---- running ----

    async def _send_outputs(self, spec: FunctionSpec, inv: Invocation) -> None:
        assert self.config is not None  # noqa: S101
        for binding in spec.outputs:
            if binding["type"] != "queue":
                continue
            value = inv.return_value if binding["name"] == "$return" else inv.outputs.get(binding["name"])
            if value is None:
                continue
            queue, conn = self._outputs[(spec.name, binding["name"])]
            for item in value if isinstance(value, list) else [value]:
                content = encode(to_body(item), self.config.queues.message_encoding)
                await self._clients.send(conn, queue, content)

    async def _admin(self, request: Request, path: str) -> Response:
        if path.rstrip("/") == "/admin/host/status":
            return JSONResponse({"state": "Running", "functions": [f.name for f in self.functions]})
        match = re.fullmatch(r"/admin/functions/([^/]+)/?", path)
        if match and request.method == "POST":
            name = match.group(1)
            timer = self.timer_listeners.get(name)
            if timer is None:
                return JSONResponse({"error": f"no timer function named {name!r}"}, status_code=404)
            task = asyncio.create_task(timer.fire(past_due=False))
            self._admin_tasks.add(task)
            task.add_done_callback(self._admin_tasks.discard)
            return Response(status_code=202)
        return JSONResponse({"error": f"unknown admin route {path}"}, status_code=404)

    async def start(self) -> None:
        self._prepare()
        assert self._invoker is not None  # noqa: S101
        assert self.keys is not None  # noqa: S101
        for listener in self.queue_listeners:
            self._tasks.append(asyncio.create_task(listener.run(self._stop), name=f"queue:{listener.spec.name}"))
        for timer in self.timer_listeners.values():
            self._tasks.append(asyncio.create_task(timer.run(self._stop), name=f"timer:{timer.spec.name}"))
        await self._start_http()
        log.info(
            "Local host started: %d function(s) (%s)",
            len(self.functions),
            ", ".join(f.name for f in self.functions),
        )

    async def _start_http(self) -> None:
        assert self._invoker is not None  # noqa: S101
        assert self.keys is not None  # noqa: S101
        port = self.options.http_port or 0
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.options.http_host, port))
        except OSError as exc:
            sock.close()
            raise HostStartupError(f"HTTP port {self.options.http_host}:{port} is not free: {exc.strerror}") from None
        sock.listen(128)
        dispatcher = HttpDispatcher(self.routes, self.keys, self._invoker, self._admin)
        self._server = make_server(dispatcher)  # the host owns SIGINT/SIGTERM and drains queues first
        bound_host, bound_port = sock.getsockname()[:2]
        self.http_url = f"http://{bound_host}:{bound_port}"
        self._tasks.append(asyncio.create_task(self._server.serve(sockets=[sock]), name="http"))
        for route in self.routes:
            methods = ",".join(sorted(route.methods)) if route.methods else "any"
            log.info(
                "  %s: [%s] %s/%s (auth: %s)", route.spec.name, methods, self.http_url, route.template, route.auth_level
            )

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        """Graceful shutdown: no new work, in-flight invocations finish (bounded), nothing is lost."""
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True
        drain = self.options.drain_timeout.total_seconds()
        await asyncio.gather(*(listener.drain(drain) for listener in self.queue_listeners))
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=drain)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._clients.close()
        if self._monitor is not None:
            await self._monitor.close()
        if self._invoker is not None:
            self._invoker.shutdown()
        if self._env is not None:
            self._env.close()
        unload_app(self.options.app_dir)
        log.info("Local host stopped")

    async def __aenter__(self) -> LocalHost:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _host_id(app_dir: Path) -> str:
    cleaned = re.sub(r"[^a-z0-9-]", "-", app_dir.resolve().name.lower()).strip("-")
    return (cleaned or "localhost")[:32]
