"""Decoded references by voice id (app/voices/references.py): read once, off the loop, cropped without changing the
prompt, bounded, forgotten on delete."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from app.audio.files import Audio
from app.model.seedvc import SeedVC
from app.offload import Offload
from app.serving.config import ConverterConfig
from app.serving.converter import ConverterService
from app.serving.wire import OpenRequest
from app.streaming.settings import StreamSettings
from app.streaming.voice import prompt_audio
from app.voices.references import KEPT_SECONDS, ReferenceCache
from app.voices.store import VoiceNotFound, VoiceStore
from bench.parity import ParitySet


def wav(seconds: float, rate: int = 22_050, seed: int = 0) -> bytes:
    samples = (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


class CountingStore(VoiceStore):
    """A real store whose reads can be held back, counting them."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.reads = 0
        self.gate = threading.Event()
        self.gate.set()

    def audio(self, voice_id: str) -> Audio:
        self.reads += 1
        self.gate.wait(10)
        return super().audio(voice_id)


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(str(tmp_path))


def test_a_slow_read_does_not_stall_the_loop_and_is_shared(store: CountingStore) -> None:
    voice_id = store.add(wav(2.0), owner="k").voice_id
    cache = ReferenceCache(store, Offload("references", workers=1, max_waiting=4))
    store.gate.clear()

    async def scenario() -> None:
        readers = [asyncio.create_task(cache.audio(voice_id)) for _ in range(3)]
        ticks = 0
        for _ in range(20):  # the loop goes on while the read waits on its worker thread
            await asyncio.sleep(0.005)
            ticks += 1
        assert ticks == 20 and not any(reader.done() for reader in readers)
        store.gate.set()
        first, *others = await asyncio.gather(*readers)
        assert all(other is first for other in others)
        assert await cache.audio(voice_id) is first

    asyncio.run(scenario())
    assert store.reads == 1


def test_the_kept_part_gives_the_same_longest_prompt(store: CountingStore) -> None:
    voice_id = store.add(wav(45.0), owner="k").voice_id
    cache = ReferenceCache(store, Offload("references", workers=1, max_waiting=0))
    kept = asyncio.run(cache.audio(voice_id))
    whole = store.audio(voice_id)
    assert len(kept.samples) == int(KEPT_SECONDS * whole.rate) < len(whole.samples)
    for rate in (22_050, 44_100):  # the model rate: both resampled and as is
        from_kept, from_whole = prompt_audio(kept, rate, 30.0), prompt_audio(whole, rate, 30.0)
        assert torch.equal(from_kept.at_model_rate, from_whole.at_model_rate)
        assert torch.equal(from_kept.at_16k, from_whole.at_16k)


def test_the_cache_is_bounded_in_bytes_and_forgets_deleted_voices(store: CountingStore) -> None:
    ids = [store.add(wav(2.0, seed=seed), owner="k").voice_id for seed in range(3)]
    one = 2 * 22_050 * 4  # bytes of one decoded 2 s recording
    cache = ReferenceCache(store, Offload("references", workers=1, max_waiting=0), max_bytes=2 * one)

    async def scenario() -> None:
        for voice_id in ids:
            await cache.audio(voice_id)
        assert cache.voice_ids() == set(ids[1:]) and cache.nbytes == 2 * one
        store.delete(ids[1])
        cache.forget(ids[1])
        with pytest.raises(VoiceNotFound):
            await cache.audio(ids[1])

    asyncio.run(scenario())


def test_the_converter_reads_a_voice_once_and_off_its_loop(
    parity: ParitySet, model: SeedVC, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opens and switches of one voice read its recording once; while that read waits, the loop goes on."""
    store = VoiceStore(str(tmp_path))
    voice_id = store.add((parity.root / parity.bundle["files"]["reference_22k"]).read_bytes(), owner="k").voice_id
    config = ConverterConfig(precision="fp32", voice_store=str(tmp_path), silence_gate_dbfs=None)
    service = ConverterService(config, model=model)
    reads, gate = [], threading.Event()
    audio = VoiceStore.audio

    def held_back(self: VoiceStore, voice_id: str) -> Audio:
        reads.append(voice_id)
        gate.wait(10)
        return audio(self, voice_id)

    monkeypatch.setattr(VoiceStore, "audio", held_back)

    async def scenario() -> None:
        opening = asyncio.create_task(service.open(OpenRequest("s0", voice_id, StreamSettings(), seed=0)))
        ticks = 0
        while not reads:
            await asyncio.sleep(0.005)
        for _ in range(10):
            await asyncio.sleep(0.005)
            ticks += 1
        assert ticks == 10 and not opening.done()
        gate.set()
        await opening
        await service.open(OpenRequest("s1", voice_id, StreamSettings(), seed=1))
        await service.set_voice("s0", voice_id)

    try:
        asyncio.run(scenario())
    finally:
        service.close()
    assert reads == [voice_id]
