"""Voice uploads as the HTTP API receives them: a few at a time, each bounded in size and time while its body
streams in, then decoded and stored on a worker pool (app/offload.py), never on the event loop.

Without the bound on concurrent uploads, N clients sending the largest allowed body at once hold N times
`max_bytes` in memory, and their decoding competes with the streams for the cores. A slot is taken before the body
is read, so a waiting upload holds nothing but its connection; a slot that cannot be had within `timeout_s` is
refused (`Busy`), and a body that takes longer than `timeout_s` to arrive is refused (`too_slow`), so that slow
senders cannot hold every slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from app.offload import Busy, Offload
from app.voices.store import VoiceError, VoiceRecord, VoiceStore


class Uploads:
    def __init__(self, store: VoiceStore, offload: Offload, max_bytes: int, concurrent: int, timeout_s: float) -> None:
        self._store = store
        self._offload = offload
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s
        self._slots = asyncio.Semaphore(concurrent)

    async def add(
        self, body: AsyncIterator[bytes], declared_length: str | None, owner: str, name: str | None
    ) -> VoiceRecord:
        """Reads the body (refused as soon as it is known to be too large), then validates and stores the voice."""
        if declared_length is not None and declared_length.isdigit() and int(declared_length) > self._max_bytes:
            raise VoiceError("too_large", f"the recording is {declared_length} bytes; the limit is {self._max_bytes}")
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise Busy(f"uploads: no slot within {self._timeout_s:g} s") from None
        try:
            try:
                async with asyncio.timeout(self._timeout_s):
                    data = await self._read(body)
            except TimeoutError:
                raise VoiceError("too_slow", f"the recording did not arrive within {self._timeout_s:g} s") from None
            return await self._offload.run(self._store.add, data, owner, name)
        finally:
            self._slots.release()

    async def _read(self, body: AsyncIterator[bytes]) -> bytes:
        chunks, size = [], 0
        async for chunk in body:
            size += len(chunk)
            if size > self._max_bytes:
                raise VoiceError("too_large", f"the recording is over {self._max_bytes} bytes, the limit")
            chunks.append(chunk)
        return b"".join(chunks)
