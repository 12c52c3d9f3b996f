"""The transport-side session (app/serving/live.py) against real converter services in this process.

Two ConverterService objects stand for two replicas (LocalConverterClient); losing one mid-stream must re-home the
session with no audible trace: the output equals an undisturbed run of the same input and seed.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from app.audio.files import resample
from app.model.seedvc import SeedVC
from app.serving.config import ConverterConfig
from app.serving.converter import ConverterService
from app.serving.live import BlockReport, LiveSession
from app.serving.local import LocalConverterClient
from app.serving.metrics import RecordedMetrics
from app.serving.wire import CapacityExceeded
from app.streaming.settings import StreamSettings
from bench.parity import ParitySet

SETTINGS = StreamSettings(diffusion_steps=3)


def make_client(model: SeedVC, store: str, replicas: int = 2, max_sessions: int = 8) -> LocalConverterClient:
    config = ConverterConfig(precision="fp32", voice_store=store, silence_gate_dbfs=None, max_sessions=max_sessions)
    return LocalConverterClient(
        {
            name: ConverterService(config.model_copy(update={"replica_tag": name}), model=model)
            for name in "ab"[:replicas]
        }
    )


def input_48k(parity: ParitySet) -> np.ndarray:
    return resample(torch.from_numpy(parity.wav("source_16k")), 16000, 48000).numpy()


async def run_session(session: LiveSession, audio: np.ndarray, on_block=None) -> tuple[np.ndarray, list[BlockReport]]:
    await session.open()
    frames: list[np.ndarray] = []
    reports: list[BlockReport] = []
    for start in range(0, len(audio), 960):
        await session.wait_for_room()
        session.feed(audio[start : start + 960])
        while (output := await _ready_output(session)) is not None:
            frames += output[0]
            reports.append(output[1])
            if on_block:
                on_block(output[1])
    session.end_input()
    while (output := await session.next_output()) is not None:
        frames += output[0]
        reports.append(output[1])
    frames += session.final_frames()
    await session.close()
    return np.concatenate(frames), reports


async def _ready_output(session: LiveSession) -> tuple[list[np.ndarray], BlockReport] | None:
    if not session.pending_blocks:
        return None
    return await session.next_output()


def test_losing_the_converter_mid_stream_changes_nothing(parity: ParitySet, model: SeedVC, voice_ids) -> None:
    store, (voice, _) = voice_ids
    audio = input_48k(parity)
    steady_client = make_client(model, store)
    steady, steady_reports = asyncio.run(run_session(LiveSession(steady_client, "s", voice, SETTINGS, 7), audio))
    moving_client = make_client(model, store)
    session = LiveSession(moving_client, "s", voice, SETTINGS, 7)

    def lose_at_block_6(report: BlockReport) -> None:
        if report.index == 5:
            moving_client.lose(session.replica)

    moved, moved_reports = asyncio.run(run_session(session, audio, on_block=lose_at_block_6))
    assert session.rehomes == 1
    served = moving_client.served["s"]
    assert served[0] != served[-1] and served[:6] == [served[0]] * 6 and set(served[6:]) == {served[-1]}
    assert [r.rehomed for r in moved_reports].count(True) == 1
    assert [r.index for r in moved_reports] == [r.index for r in steady_reports] == list(range(len(moved_reports)))
    assert moved.shape == steady.shape
    assert np.abs(moved - steady).max() <= parity.tolerance("output_stream", "e2e")


def test_falling_behind_drops_the_oldest_input_as_silence(parity: ParitySet, model: SeedVC, voice_ids) -> None:
    store, (voice, _) = voice_ids
    client = make_client(model, store, replicas=1)
    session = LiveSession(client, "late", voice, SETTINGS, 1, max_backlog_blocks=2)

    async def scenario() -> tuple[list, list[BlockReport]]:
        await session.open()
        audio = input_48k(parity)
        lates = [late for start in range(0, len(audio), 960) if (late := session.feed(audio[start : start + 960]))]
        session.end_input()
        reports = []
        while (output := await session.next_output()) is not None:
            reports.append(output[1])
        return lates, reports

    lates, reports = asyncio.run(scenario())
    assert lates and lates[-1].total_dropped_ms == pytest.approx(
        1000 * SETTINGS.block_time * session.total_dropped_blocks
    )
    assert [r.index for r in reports] == list(range(len(reports))), "output block k must still answer input block k"
    dropped = [r for r in reports if r.steps == 0 and r.batch_size == 0]
    assert len(dropped) == session.total_dropped_blocks > 0
    assert all(r.index < reports[-1].index for r in dropped), "the oldest input goes first"


def test_voice_switch_applies_from_the_next_block(parity: ParitySet, model: SeedVC, voice_ids) -> None:
    store, (voice, other) = voice_ids
    client = make_client(model, store, replicas=1)
    session = LiveSession(client, "switch", voice, SETTINGS, 1)

    def switch(report: BlockReport) -> None:
        if report.index == 2:
            session.request_voice(other)

    _, reports = asyncio.run(run_session(session, input_48k(parity)[: 48000 * 2], on_block=switch))
    assert [r.voice_id for r in reports[:3]] == [voice] * 3
    assert {r.voice_id for r in reports[3:]} == {other}


def test_full_converters_refuse_new_sessions(model: SeedVC, voice_ids) -> None:
    store, (voice, _) = voice_ids
    client = make_client(model, store, replicas=1, max_sessions=1)
    asyncio.run(LiveSession(client, "first", voice, SETTINGS, 1).open())
    with pytest.raises(CapacityExceeded):
        asyncio.run(LiveSession(client, "second", voice, SETTINGS, 1).open())


def test_the_converter_records_its_metrics(parity: ParitySet, model: SeedVC, voice_ids) -> None:
    store, (voice, _) = voice_ids
    recorded = RecordedMetrics()
    config = ConverterConfig(
        precision="fp32", voice_store=store, silence_gate_dbfs=None, max_sessions=1, replica_tag="a"
    )
    client = LocalConverterClient({"a": ConverterService(config, model=model, metrics=recorded)})
    asyncio.run(run_session(LiveSession(client, "m", voice, SETTINGS, 1), input_48k(parity)[:48000]))
    asyncio.run(LiveSession(client, "x", voice, SETTINGS, 1).open())
    with pytest.raises(CapacityExceeded):
        asyncio.run(LiveSession(client, "y", voice, SETTINGS, 1).open())
    blocks = len(recorded.values("seedvc_diffusion_steps"))
    assert blocks > 0 and set(recorded.values("seedvc_diffusion_steps")) == {SETTINGS.diffusion_steps}
    assert len(recorded.values("seedvc_step_seconds")) == len(recorded.values("seedvc_batch_size")) == blocks
    assert recorded.values("seedvc_sessions")[:2] == [1, 0]  # opened, then closed at the end of the stream
    assert recorded.values("seedvc_admission_refusals") == [1]
    assert len(recorded.values("seedvc_model_load_seconds")) == 1
