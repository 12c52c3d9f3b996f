"""Deleting a voice purges what converters prepared from it (app/serving/converter.py, app/streaming/voice.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from app.model.seedvc import SeedVC
from app.serving.config import ConverterConfig
from app.serving.converter import ConverterService
from app.serving.wire import OpenRequest
from app.streaming.settings import StreamSettings
from app.voices.store import VoiceStore
from bench.parity import ParitySet


def test_a_deleted_voice_leaves_the_converters_cache(parity: ParitySet, model: SeedVC, tmp_path: Path) -> None:
    store = VoiceStore(str(tmp_path))
    recording = (parity.root / parity.bundle["files"]["reference_22k"]).read_bytes()
    kept, deleted, same_recording = (store.add(recording, owner="k").voice_id for _ in range(3))
    other = store.add((parity.root / parity.bundle["files"]["source_16k"]).read_bytes(), owner="k").voice_id
    config = ConverterConfig(
        precision="fp32", voice_store=str(tmp_path), silence_gate_dbfs=None, voice_purge_interval_s=0.05
    )
    service = ConverterService(config, model=model)
    settings = StreamSettings()

    async def scenario() -> None:
        for number, voice_id in enumerate((deleted, other, same_recording)):
            await service.open(OpenRequest(f"s{number}", voice_id, settings, seed=0))
        assert service.voices.labels() == {deleted, other, same_recording} and len(service.voices) == 3, (
            "one entry per recording and prompt length, plus the speed check's"
        )
        store.delete(deleted)
        store.delete(other)
        # The periodic purge runs every 0.05 s here: the first pass that ends may have started before the deletes,
        # the second one started after them.
        for _ in range(2):
            service.purged.clear()
            await asyncio.wait_for(service.purged.wait(), timeout=30)
        # The recording still used by `same_recording` stays prepared; `other`'s entry is gone.
        assert service.voices.labels() == {same_recording} and len(service.voices) == 2
        assert await service.purge_deleted_voices() == []
        assert kept not in service.voices.labels(), "a voice never used is never prepared"
        assert "s0" in service.engine, "a live session keeps its voice: the recording went, not the call"

    try:
        asyncio.run(scenario())
    finally:
        service.close()
