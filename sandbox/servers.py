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
        self._server = make_server(app, certfile=certfile, keyfile=keyfile)
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
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
