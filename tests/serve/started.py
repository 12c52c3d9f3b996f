"""Starting a stream and waiting until it is under way: what a test does before it loads the service further."""

from __future__ import annotations

import asyncio

import numpy as np

from client.stream_client import Event, StreamResult, stream_audio


async def started_stream(url: str, token: str, voice_id: str, audio_48k: np.ndarray) -> asyncio.Task[StreamResult]:
    """A real-time stream, returned once its first converted block came back (it holds its converter slot), or once
    it ended without one (awaiting the task then says why)."""
    converting = asyncio.Event()

    def on_event(event: Event) -> None:
        if event["type"] == "block":
            converting.set()

    stream = asyncio.create_task(stream_audio(url, token, voice_id, audio_48k, realtime=True, on_event=on_event))
    first_block = asyncio.create_task(converting.wait())
    await asyncio.wait({stream, first_block}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
    first_block.cancel()
    assert converting.is_set() or stream.done(), "no block within 120 s"
    return stream
