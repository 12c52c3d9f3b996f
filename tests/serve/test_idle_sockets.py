"""A thousand sockets that never start no longer block a real stream (the real service, loopback only).

Each open WebSocket is an ongoing request of its ingress replica for as long as it is open, and a replica takes at
most `max_ongoing_requests` (1000, as in both serve configs): a thousand sockets that connect and send nothing,
which needs no credential, used to hold every slot forever, and a real client waited for one. With the start-message
timeout (3 s here) they are closed, and the real stream goes through once they are: it is measured from the moment
all thousand are open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator

import pytest
import websockets

from bench.harness import BASE_URL, ServeApp, local_ray, start_app
from bench.parity import ParitySet
from client.stream_client import stream_audio

pytestmark = pytest.mark.serve

SOCKETS = 1000
START_TIMEOUT_S = 3.0
WS_URL = BASE_URL.replace("http", "ws") + "/v1/stream"


@pytest.fixture(scope="module")
def app(parity: ParitySet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    with local_ray():
        yield start_app(
            parity,
            tmp_path_factory.mktemp("voices"),
            converters=1,
            ingress={"start_timeout_s": START_TIMEOUT_S},
            options={"Ingress": {"max_ongoing_requests": SOCKETS}},
        )


async def idle_socket() -> websockets.ClientConnection:
    return await websockets.connect(WS_URL, open_timeout=60, ping_interval=None)


async def closed_with(ws: websockets.ClientConnection) -> str | None:
    """The code of the error event the server closed an idle socket with."""
    with contextlib.suppress(websockets.ConnectionClosed):
        async with asyncio.timeout(60):
            return str(json.loads(await ws.recv())["code"])
    return None


def test_a_thousand_idle_sockets_do_not_block_a_real_stream(app: ServeApp) -> None:
    audio = app.source_48k(1.0)

    async def scenario() -> tuple[float, float, list[str | None]]:
        started = time.monotonic()
        idle: list[websockets.ClientConnection] = []
        for _ in range(SOCKETS // 100):  # in batches, so that the handshakes do not time out on 2 cores
            idle += await asyncio.gather(*(idle_socket() for _ in range(100)))
        opened = time.monotonic() - started
        waiting = time.monotonic()
        result = await asyncio.wait_for(
            stream_audio(BASE_URL, app.token, app.voice_id, audio, realtime=False), timeout=120
        )
        streamed = time.monotonic() - waiting
        assert result.error is None and result.end is not None, result.error
        codes = await asyncio.gather(*(closed_with(ws) for ws in idle))
        return opened, streamed, codes

    opened, streamed, codes = asyncio.run(scenario())
    print(f"\n[{SOCKETS} idle sockets] opened in {opened:.1f} s; a real 1 s stream then took {streamed:.1f} s")
    assert codes.count("not_started") == SOCKETS
