"""Per-stream controls (app/serving/controls.py): the silence gate's threshold and hangover, gains and loudness
matching, through real converter services in this process (the fixture set's tiny model), and `set_controls` through
the real session driver on a loopback WebSocket."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import numpy as np
import pytest
import torch
import websockets

from app.engine.silence import SilenceGate
from app.model.seedvc import SeedVC
from app.serving.config import ConverterConfig
from app.serving.controls import Loudness, StreamControls
from app.serving.converter import ConverterService
from app.serving.live import BlockReport, LiveSession
from app.serving.local import LocalConverterClient
from app.streaming.settings import StreamSettings
from app.transport.protocol import ProtocolError, parse_client_message
from tests.test_live_session import run_session
from tests.test_logs import services, stream_server  # noqa: F401 (services is the module's fixture)

SETTINGS = StreamSettings(diffusion_steps=2, ce_context=1.0, dit_context=1.0)
RATE = 48_000
DOUBLE_DB = 20 * math.log10(2)


def make_client(model: SeedVC, store: str, gate_dbfs: float | None = -55.0) -> LocalConverterClient:
    config = ConverterConfig(precision="fp32", voice_store=store, silence_gate_dbfs=gate_dbfs, replica_tag="a")
    return LocalConverterClient({"a": ConverterService(config, model=model)})


def tone(seconds: float, dbfs: float, hz: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (10 ** (dbfs / 20) * math.sqrt(2) * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def word_with_decaying_tail() -> np.ndarray:
    """0.5 s of silence, a 0.6 s 'word' at -20 dBFS whose end decays 60 dB a second (a room's reverberation),
    then silence: the tail crosses -40 dBFS 0.33 s after the word."""
    word = tone(0.6, -20.0)
    tail = tone(1.0, -20.0) * (10 ** (-60 * np.arange(RATE) / RATE / 20)).astype(np.float32)
    return np.concatenate([np.zeros(RATE // 2, np.float32), word, tail, np.zeros(RATE, np.float32)])


def converted(model: SeedVC, store: str, voice: str, audio: np.ndarray, **controls: Any) -> tuple:
    session = LiveSession(make_client(model, store), "s", voice, SETTINGS, 7)
    session.set_controls(**controls)
    return asyncio.run(run_session(session, audio))


def first_silent_after_sound(reports: list[BlockReport]) -> int:
    sounding = [report.index for report in reports if not report.silent]
    return next(r.index for r in reports if r.silent and r.index > sounding[0])


def test_hangover_keeps_converting_a_decaying_word_end(model: SeedVC, voice_ids) -> None:
    store, (voice, _) = voice_ids
    audio = word_with_decaying_tail()
    _, plain = converted(model, store, voice, audio, silence_threshold_dbfs=-40.0)
    _, held = converted(model, store, voice, audio, silence_threshold_dbfs=-40.0, silence_hangover_s=0.4)
    cut, kept = first_silent_after_sound(plain), first_silent_after_sound(held)
    # 0.4 s of hangover is two whole 0.18 s blocks more, at least, before the gate closes; and it closes again.
    assert kept - cut >= int(0.4 / SETTINGS.block_time)
    assert any(report.silent for report in held[kept:])
    # Without a threshold of its own the stream has the configured gate: -55 dBFS keeps the tail longer than -40.
    _, configured = converted(model, store, voice, audio)
    assert first_silent_after_sound(configured) > cut


def test_the_gate_with_hangover_looks_back_frame_by_frame() -> None:
    window = np.zeros(16_000, np.float32)
    window[6_000:6_320] = 0.1  # one loud 20 ms frame, 0.6 s before the end
    region = 3_000  # the output region: the last 0.19 s
    assert SilenceGate(-40.0).is_silent(torch.from_numpy(window), region)
    assert not SilenceGate(-40.0, hangover_s=0.5).is_silent(torch.from_numpy(window), region)
    assert SilenceGate(-40.0, hangover_s=0.3).is_silent(torch.from_numpy(window), region)  # it lies further back


def test_neutral_controls_leave_the_audio_bitwise_and_gain_doubles_it(model: SeedVC, voice_ids) -> None:
    store, (voice, _) = voice_ids
    audio = np.concatenate([tone(0.8, -25.0), tone(0.8, -12.0, hz=330.0)])
    plain, _ = converted(model, store, voice, audio)
    neutral, _ = converted(model, store, voice, audio, input_gain_db=0.0, output_gain_db=0.0, rms_mix_rate=1.0)
    louder, _ = converted(model, store, voice, audio, output_gain_db=DOUBLE_DB)
    assert np.array_equal(plain, neutral)
    assert np.abs(plain).max() > 1e-3  # there is something to double
    np.testing.assert_allclose(louder, 2 * plain, rtol=0, atol=1e-5 * np.abs(plain).max())
    block = np.ones(100, np.float32)
    assert Loudness().apply(StreamControls(), block, block) is block  # neutral: the converter's very array


def test_rms_mix_rate_zero_gives_the_output_the_inputs_loudness(model: SeedVC, voice_ids) -> None:
    store, (voice, _) = voice_ids
    quiet, loud = tone(1.2, -30.0), tone(1.2, -10.0, hz=330.0)
    audio = np.concatenate([quiet, loud])
    model_level, _ = converted(model, store, voice, audio)
    matched, _ = converted(model, store, voice, audio, rms_mix_rate=0.0)

    def level(samples: np.ndarray) -> float:
        return 20 * math.log10(float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))))

    # The middle of each segment (the output lags the input by well under 0.3 s), away from the ramps.
    quiet_part, loud_part = slice(int(0.5 * RATE), int(1.0 * RATE)), slice(int(1.7 * RATE), int(2.2 * RATE))
    for part, dbfs in ((quiet_part, -30.0), (loud_part, -10.0)):
        assert abs(level(matched[part]) - dbfs) < 1.5, (level(matched[part]), dbfs, level(model_level[part]))
    # And the match is the controls' doing: the model's own output misses at least one level by more.
    assert max(abs(level(model_level[quiet_part]) + 30), abs(level(model_level[loud_part]) + 10)) > 3.0


def test_set_controls_is_confirmed_live_by_the_driver(services) -> None:  # noqa: F811
    stream, voice_id = services
    token = stream.tokens.issue("k").token
    start = {"type": "start", "version": 1, "token": token, "voice_id": voice_id, "controls": {"input_gain_db": -6}}

    async def run() -> list[dict[str, Any]]:
        async with stream_server(stream) as url, websockets.connect(url.replace("http", "ws") + "/v1/stream") as ws:
            await ws.send(json.dumps(start))
            events = [json.loads(await ws.recv())]
            changes = {"silence_threshold_dbfs": -45, "rms_mix_rate": 0.25, "pitch_shift": -5}
            await ws.send(json.dumps({"type": "set_controls", **changes}))
            events.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "set_controls", "output_gain_db": 99}))  # out of range
            events.append(json.loads(await ws.recv()))
            return events

    ready, confirmed, refused = asyncio.run(run())
    assert ready["type"] == "ready"
    assert confirmed == {
        "type": "controls_set",
        "controls": {
            "silence_threshold_dbfs": -45.0,
            "silence_hangover_s": 0.0,
            "input_gain_db": -6.0,  # from the start message, kept
            "output_gain_db": 0.0,
            "rms_mix_rate": 0.25,
            "monitor": False,
            "pitch_shift": -5.0,
            "noise_suppression": False,
        },
    }
    assert refused["type"] == "error" and "output_gain_db" in refused["message"]


def test_monitor_sends_the_input_back_and_off_again_resumes_the_conversion_exactly(model: SeedVC, voice_ids) -> None:
    store, (voice, _) = voice_ids
    audio = np.concatenate([tone(1.0, -20.0), tone(1.0, -14.0, hz=330.0)])
    plain, _ = converted(model, store, voice, audio)
    session = LiveSession(make_client(model, store), "s", voice, SETTINGS, 7)

    def monitor_blocks_3_to_5(report: BlockReport) -> None:
        # Set after block k is out: blocks k + 1 .. go back unconverted, on the same session.
        if report.index in (2, 5):
            session.set_controls(monitor=report.index == 2)

    monitored, reports = asyncio.run(run_session(session, audio, on_block=monitor_blocks_3_to_5))
    block = round(SETTINGS.block_time * RATE)
    # After monitor: only the output resampler's few samples of memory of the monitored block differ.
    passed, after = slice(3 * block, 6 * block), slice(6 * block + 960, len(plain))
    resampled_input = audio[passed]  # 48 kHz in, 48 kHz out: the monitored blocks are the input itself
    assert not np.allclose(plain[passed], monitored[passed], atol=1e-3)
    assert (
        np.corrcoef(monitored[passed][block // 2 : -block // 2], resampled_input[block // 2 : -block // 2])[0, 1] > 0.99
    )
    assert np.array_equal(plain[after], monitored[after])  # the converter converted every block all along
    assert [report.index for report in reports] == list(range(len(reports)))  # one session, no block lost


@pytest.mark.parametrize("field", ["rms_mix_rate", "silence_hangover_s"])
def test_controls_out_of_range_are_refused(field: str) -> None:
    with pytest.raises(ProtocolError):
        parse_client_message(json.dumps({"type": "set_controls", field: 2.5}))
