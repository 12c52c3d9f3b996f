"""Starting a stream and waiting until it is under way: what a test does before it loads the service further."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from client.stream_client import Event, StreamResult, stream_audio


@dataclass
class StartedStream:
    result: asyncio.Task[StreamResult]
    events: list[Event]  # so far

    @property
    def session_id(self) -> str:
        return next(event["session_id"] for event in self.events if event["type"] == "ready")


async def started_stream(url: str, token: str, voice_id: str, audio_48k: np.ndarray) -> StartedStream:
    """A real-time stream, returned once its first converted block came back (it holds its converter slot), or once
    it ended without one (awaiting its result then says why)."""
    converting = asyncio.Event()
    events: list[Event] = []

    def on_event(event: Event) -> None:
        events.append(event)
        if event["type"] == "block":
            converting.set()

    result = asyncio.create_task(stream_audio(url, token, voice_id, audio_48k, realtime=True, on_event=on_event))
    first_block = asyncio.create_task(converting.wait())
    await asyncio.wait({result, first_block}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
    first_block.cancel()
    assert converting.is_set() or result.done(), "no block within 120 s"
    return StartedStream(result, events)
