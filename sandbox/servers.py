"""Run an ASGI app on loopback with uvicorn: in a background thread (tests, demo) or in the foreground (CLI)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: whoever runs it owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _EndsQuietly:
    """ASGI wrapper: the server cancels its own requests still running when it stops (a simulated hang), and they
    end here with a 503 (or the end of the body already started), so uvicorn logs no traceback for them."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.stopping = False
        self.running: set[asyncio.Task[Any]] = set()

    def cancel_all(self) -> None:
        self.stopping = True
        for task in self.running:
            task.cancel()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - uvicorn runs each request in a task
        started = False

        async def tracked(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        self.running.add(task)
        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            if not self.stopping:
                raise
            await _end(send, started)
        finally:
            self.running.discard(task)


async def _end(send: Any, started: bool) -> None:
    if not started:
        headers = [(b"content-type", b"application/json"), (b"retry-after", b"1")]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
    body = b"" if started else b'{"error": {"code": "Stopping", "message": "the server is stopping"}}'
    await send({"type": "http.response.body", "body": body, "more_body": False})


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(512)
    return sock


def make_server(app: Any, *, certfile: Path | None = None, keyfile: Path | None = None) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
        timeout_graceful_shutdown=1,
    )
    return _QuietServer(config)


class ThreadedServer:
    """An ASGI app served on a loopback port from a daemon thread with its own event loop."""

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        certfile: Path | None = None,
        keyfile: Path | None = None,
    ) -> None:
        self._sock = bind(host, port)
        self._app = _EndsQuietly(app)
        self._server = make_server(self._app, certfile=certfile, keyfile=keyfile)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="sim-server", daemon=True)
        scheme = "https" if certfile else "http"
        bound_host, bound_port = self._sock.getsockname()[:2]
        self.url = f"{scheme}://{bound_host}:{bound_port}"
        self.port: int = bound_port

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._server.serve(sockets=[self._sock]))
        finally:
            # Keep-alive clients (requests sessions, TLS) may still hold connections: cut them, let them close.
            for connection in list(self._server.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abort()
            # Sockets accepted but never handed to uvicorn (a client gone in the middle of its TLS handshake) are
            # known only to the loop: cut them too, or they outlive the server unclosed.
            for stray in list(getattr(self.loop, "_transports", {}).values()):
                if stray is not None and not stray.is_closing():
                    stray.abort()
            self.loop.run_until_complete(asyncio.sleep(0.05))
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def start(self, timeout_s: float = 30.0) -> ThreadedServer:
        self._thread.start()
        deadline = self.loop.time() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread died during start-up")
            if self.loop.time() > deadline:
                raise TimeoutError(f"server did not start within {timeout_s:.0f} s")
            threading.Event().wait(0.01)
        return self

    def stop(self) -> None:
        if not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended meanwhile: nothing left to cancel
                self.loop.call_soon_threadsafe(self._app.cancel_all)
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
