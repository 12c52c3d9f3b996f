"""What a connection has converted and not sent yet: events and 20 ms audio frames, in protocol order, bounded.

Blocks are converted as fast as their input comes, and sent at 20 ms a frame. A client that sends faster than real
time (allowed up to `max_audio_speed`, for catching up) but reads in real time makes converted audio pile up here:
at 3x for hours, gigabytes per replica. So the frames waiting are bounded: past `max_frames`, the oldest frame goes
(late audio is worth less than current audio, as on the input side), and `dropped_frames` counts them so that the
connection can tell its client. Events are never dropped: they are small, one or a few per block, and they leave
as soon as the frames before them have, so they cannot pile up once the frames cannot.

For a connection that is not paced (a file, `realtime: false`) nothing is worth dropping: `put_frame` waits for
room instead, which slows the conversion down to what the client reads.
"""

from __future__ import annotations

import asyncio
from collections import deque

import numpy as np

Outgoing = np.ndarray | str  # a 20 ms frame of converted audio, or an event's JSON


class Outbox:
    def __init__(self, max_frames: int, drop_oldest: bool) -> None:
        if max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, not {max_frames}")
        self.max_frames = max_frames
        self.drop_oldest = drop_oldest
        self.dropped_frames = 0
        self._items: deque[Outgoing | None] = deque()  # None: the end, after everything before it
        self._frames = 0
        self._changed = asyncio.Event()

    @property
    def frames(self) -> int:
        return self._frames

    def put_event(self, event: str) -> None:
        self._append(event)

    async def put_frame(self, frame: np.ndarray) -> None:
        """Queues a frame: dropping the oldest one when full (paced), or waiting for room (not paced)."""
        while self._frames >= self.max_frames and not self.drop_oldest:
            self._changed.clear()
            await self._changed.wait()
        if self._frames >= self.max_frames:
            self._drop_oldest_frame()
        self._frames += 1
        self._append(frame)

    def close(self) -> None:
        """Nothing follows: `get` answers None once everything before has gone."""
        self._append(None)

    async def get(self) -> Outgoing | None:
        while not self._items:
            self._changed.clear()
            await self._changed.wait()
        item = self._items.popleft()
        if isinstance(item, np.ndarray):
            self._frames -= 1
            self._changed.set()  # room for a waiting put_frame
        return item

    def _append(self, item: Outgoing | None) -> None:
        self._items.append(item)
        self._changed.set()

    def _drop_oldest_frame(self) -> None:
        for position, item in enumerate(self._items):
            if isinstance(item, np.ndarray):
                del self._items[position]
                self._frames -= 1
                self.dropped_frames += 1
                return
