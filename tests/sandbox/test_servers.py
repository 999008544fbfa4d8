"""The loopback server the simulators run in: a request still hanging when it stops ends quietly."""

from __future__ import annotations

import asyncio
import logging
import threading

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sandbox.servers import ThreadedServer
from tests.polling import wait_until


def _hanging_app(entered: threading.Event) -> Starlette:
    async def hang(request: Request) -> Response:
        entered.set()
        await asyncio.Event().wait()  # hangs until the server cancels it: nobody ever sets this event
        return PlainTextResponse("never")

    return Starlette(routes=[Route("/hang", hang)])


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def uvicorn_errors() -> list[str]:
    handler = _Records()
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    yield handler.messages  # type: ignore[misc]
    logger.removeHandler(handler)


def test_a_request_hanging_when_the_server_stops_is_answered_503_and_nothing_is_logged(
    uvicorn_errors: list[str],
) -> None:
    entered = threading.Event()
    answers: list[int | str] = []
    with ThreadedServer(_hanging_app(entered)) as server:

        def call() -> None:
            try:
                answers.append(httpx.get(f"{server.url}/hang", timeout=60).status_code)
            except httpx.HTTPError as exc:
                answers.append(type(exc).__name__)

        client = threading.Thread(target=call)
        client.start()
        assert entered.wait(30)
    client.join(60)
    wait_until(lambda: bool(answers), within=30)
    assert answers == [503]
    assert not [m for m in uvicorn_errors if "Exception in ASGI" in m or "Cancel" in m or "returned without" in m]
