"""Decoded reference recordings by voice id, as converters need them: read and decoded off the event loop, once.

A converter needs a voice's recording whenever a session opens with it or switches to it. Reading it from the store
(an S3 GET) and decoding it on the converter's event loop would stall every session's batch for that long, on every
open and every switch. Here a voice id is read and decoded once, on a worker pool, and kept: the recording behind an
id never changes. Concurrent requests for one voice share one read. A recording is kept only as far as the longest
prompt can reach (plus a margin, so that resampling the kept part gives the same prompt as the whole), and the cache
holds at most `max_bytes` of samples, least recently used out first. A deleted voice is dropped with `forget` (the
converter's periodic purge); until then it stays usable by the converter, as its prepared prompt already did.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from app.audio.files import Audio
from app.offload import Offload
from app.voices.store import VoiceStore

# The longest prompt a stream may ask for (StreamSettings: max_prompt <= 30 s), plus a margin far wider than any
# resampler's filter, so the prompt cropped from a kept recording equals the one cropped from the whole.
KEPT_SECONDS = 31.0


class ReferenceCache:
    def __init__(self, store: VoiceStore, offload: Offload, max_bytes: int = 128 * 1024 * 1024) -> None:
        self.store = store
        self._offload = offload
        self._max_bytes = max_bytes
        self._audio: OrderedDict[str, Audio] = OrderedDict()
        self._reading: dict[str, asyncio.Future[Audio]] = {}

    def __len__(self) -> int:
        return len(self._audio)

    @property
    def nbytes(self) -> int:
        return sum(audio.samples.nbytes for audio in self._audio.values())

    async def audio(self, voice_id: str) -> Audio:
        """The voice's recording (mono float32 at its own rate); VoiceNotFound as the store raises it."""
        cached = self._audio.get(voice_id)
        if cached is not None:
            self._audio.move_to_end(voice_id)
            return cached
        reading = self._reading.get(voice_id)
        if reading is None:
            reading = asyncio.ensure_future(self._read(voice_id))
            self._reading[voice_id] = reading
            reading.add_done_callback(lambda _: self._reading.pop(voice_id, None))
        # Shielded: one caller giving up must not cancel the read the others wait for.
        return await asyncio.shield(reading)

    async def _read(self, voice_id: str) -> Audio:
        audio = await self._offload.run(self.store.audio, voice_id)
        kept = Audio(samples=audio.samples[: int(KEPT_SECONDS * audio.rate)].copy(), rate=audio.rate)
        self._audio[voice_id] = kept
        while len(self._audio) > 1 and self.nbytes > self._max_bytes:
            self._audio.popitem(last=False)
        return kept

    def forget(self, voice_id: str) -> None:
        self._audio.pop(voice_id, None)

    def voice_ids(self) -> set[str]:
        return set(self._audio)
