"""Small stand-ins shared by the unit tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket


class FakeClock:
    """A clock that moves only when a test sets or advances `now`."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def websocket_server(path: str, endpoint: Callable[[WebSocket], Awaitable[None]]) -> AsyncIterator[int]:
    """`endpoint` at `path` behind uvicorn on a free loopback port; yields the port."""
    app = Starlette(routes=[WebSocketRoute(path, endpoint)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                await asyncio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
