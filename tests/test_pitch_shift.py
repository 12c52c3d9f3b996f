"""The `pitch_shift` control (app/audio/pitch_shift.py, applied by LiveSession): a harmonic voice of known f0 through
real converter services in this process, identity and the fixture set's tiny model, its range on the wire, and the
shifter's streaming."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from app.audio.files import resample
from app.audio.pitch_shift import PitchShifter, semitones_to_ratio
from app.convert import main as convert_main
from app.model.seedvc import SeedVC
from app.serving.config import ConverterConfig
from app.serving.converter import ConverterService
from app.serving.live import BlockReport, LiveSession
from app.serving.local import LocalConverterClient
from app.serving.wire import BlockIn, BlockOut
from app.transport.protocol import ProtocolError, SetControlsMessage, StartMessage, parse_client_message
from bench.parity import ParitySet
from bench.pitch_shift import estimate_f0, harmonic_tone
from client.stream_client import parse_args, start_message
from tests.test_live_session import make_client as two_replicas
from tests.test_live_session import run_session
from tests.test_stream_controls import SETTINGS, make_client

RATE = 48_000
SHIFTS = (-12, -5, 7, 12)
STEADY = slice(RATE, 2 * RATE)  # away from the start, the session's delay and the shifter's


class RecordingClient(LocalConverterClient):
    """The real in-process client, keeping each converted block's audio as the converter returned it."""

    def __init__(self, services: dict[str, ConverterService]) -> None:
        super().__init__(services)
        self.replies: dict[int, np.ndarray] = {}

    async def convert(self, block: BlockIn, replica: str) -> BlockOut:
        reply = await super().convert(block, replica)
        self.replies[reply.index] = reply.audio
        return reply


def identity_client(model: SeedVC, store: str) -> LocalConverterClient:
    config = ConverterConfig(voice_store=store, silence_gate_dbfs=None, identity=True, replica_tag="a")
    return LocalConverterClient({"a": ConverterService(config, model=model)})


def shifted(client: LocalConverterClient, voice: str, audio: np.ndarray, semitones: float | None) -> np.ndarray:
    session = LiveSession(client, "s", voice, SETTINGS, 7)
    if semitones is not None:
        session.set_controls(pitch_shift=semitones)
    return asyncio.run(run_session(session, audio))[0]


def test_identity_path_shifts_a_harmonic_voice_by_the_semitones(model: SeedVC, voice_ids) -> None:
    store, (voice, _) = voice_ids
    audio = harmonic_tone(150.0, 3.0, RATE, formants=(700.0, 1150.0))
    plain = shifted(identity_client(model, store), voice, audio, None)
    assert np.array_equal(plain, shifted(identity_client(model, store), voice, audio, 0))  # 0: bitwise unshifted
    f0 = estimate_f0(plain[STEADY], RATE)
    assert f0 == pytest.approx(150.0, rel=0.01)  # the identity path returns the voice as it came
    for n in SHIFTS:
        got = estimate_f0(shifted(identity_client(model, store), voice, audio, n)[STEADY], RATE)
        assert got == pytest.approx(f0 * semitones_to_ratio(n), rel=0.03), n


def test_model_path_shifts_what_the_model_says_and_zero_is_bitwise(model: SeedVC, voice_ids) -> None:
    """The fixture model has random weights: its voice is noise, with no f0 to measure (tests/fixtures/parity_a's
    README). What is checked here is that the session shifts exactly the model's output, with the shifter whose f0
    the identity test measures: the shifted stream is the unshifted one through one PitchShifter, resampled."""
    store, (voice, _) = voice_ids
    audio = harmonic_tone(150.0, 3.0, RATE, formants=(700.0, 1150.0))
    plain = shifted(make_client(model, store), voice, audio, None)
    assert np.array_equal(plain, shifted(make_client(model, store), voice, audio, 0))
    unshifted = RecordingClient(make_client(model, store).services)
    shifted(unshifted, voice, audio, None)
    model_audio = np.concatenate([unshifted.replies[index] for index in sorted(unshifted.replies)])
    for n in (-12, 7):
        output = shifted(make_client(model, store), voice, audio, n)
        expected = PitchShifter(model.sample_rate).push(model_audio, semitones_to_ratio(n))
        expected_48k = resample(torch.from_numpy(expected), model.sample_rate, RATE).numpy()
        length = min(len(output), len(expected_48k)) - 100  # the streaming resampler's last samples wait for more
        np.testing.assert_allclose(output[:length], expected_48k[:length], rtol=0, atol=1e-5)
        assert not np.allclose(output[STEADY], plain[STEADY], atol=1e-3)


def test_a_live_change_shifts_from_the_next_block_and_back_to_zero_is_on_time(model: SeedVC, voice_ids) -> None:
    store, (voice, _) = voice_ids
    audio = harmonic_tone(150.0, 4.0, RATE)
    plain = shifted(identity_client(model, store), voice, audio, None)
    session = LiveSession(identity_client(model, store), "s", voice, SETTINGS, 7)

    def up_a_fifth_for_blocks_5_to_12(report: BlockReport) -> None:
        if report.index in (4, 12):
            session.set_controls(pitch_shift=7 if report.index == 4 else 0)

    changed, reports = asyncio.run(run_session(session, audio, on_block=up_a_fifth_for_blocks_5_to_12))
    block = round(SETTINGS.block_time * RATE)
    during, after = slice(7 * block, 12 * block), slice(14 * block, len(plain))
    assert estimate_f0(changed[during], RATE) == pytest.approx(150.0 * semitones_to_ratio(7), rel=0.03)
    # Back at 0: the shifter and what it held are gone, the stream is the unshifted one again, on time.
    assert np.array_equal(changed[after], plain[after])
    assert [report.index for report in reports] == list(range(len(reports)))


def test_the_shift_survives_a_move_to_another_converter(parity: ParitySet, model: SeedVC, voice_ids) -> None:
    store, (voice, _) = voice_ids
    audio = harmonic_tone(150.0, 3.0, RATE)
    steady = shifted(two_replicas(model, store), voice, audio, -5)
    client = two_replicas(model, store)
    session = LiveSession(client, "s", voice, SETTINGS, 7)
    session.set_controls(pitch_shift=-5)

    def lose_at_block_6(report: BlockReport) -> None:
        if report.index == 5:
            client.lose(session.replica)

    moved, _ = asyncio.run(run_session(session, audio, on_block=lose_at_block_6))
    assert session.rehomes == 1
    assert moved.shape == steady.shape
    # The session's shifter stayed with it (the transport's side): the move leaves no trace in the shifted voice.
    assert np.abs(moved - steady).max() <= parity.tolerance("output_stream", "e2e")


@pytest.mark.parametrize("semitones", [-12, 12, 7.5, -0.25])
def test_pitch_shift_in_range_is_accepted(semitones: float) -> None:
    message = parse_client_message(json.dumps({"type": "set_controls", "pitch_shift": semitones}))
    assert isinstance(message, SetControlsMessage) and message.changes() == {"pitch_shift": semitones}


@pytest.mark.parametrize("semitones", [-12.5, 13, 24, "7", True])
def test_pitch_shift_out_of_range_or_not_a_number_is_refused(semitones: object) -> None:
    with pytest.raises(ProtocolError):
        parse_client_message(json.dumps({"type": "set_controls", "pitch_shift": semitones}))


def test_the_shifter_streams_whatever_the_blocks_and_lags_one_frame() -> None:
    rate = 22_050
    voice = harmonic_tone(150.0, 1.0, rate, formants=(700.0, 1150.0))
    whole = PitchShifter(rate).push(voice, semitones_to_ratio(5))
    shifter = PitchShifter(rate)
    cuts = [0, 1, 300, 2000, 2001, 9000, len(voice)]
    pieces = [shifter.push(voice[a:b], semitones_to_ratio(5)) for a, b in itertools.pairwise(cuts)]
    np.testing.assert_allclose(np.concatenate(pieces), whole, rtol=0, atol=1e-6)
    assert not whole[: shifter.latency].any() and whole[shifter.latency :].any()
    # At a ratio of 1 the vocoder gives the input back, one frame late (once a whole frame's overlap has built up).
    same, late = PitchShifter(rate).push(voice, 1.0), shifter.latency
    np.testing.assert_allclose(same[2 * late :], voice[late:-late], rtol=0, atol=1e-4)


def test_file_cli_pitch_flag(parity: ParitySet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(parity.root)
    files = parity.bundle["files"]

    def convert(name: str, *flags: str) -> int:
        args = [files["source_16k"], files["reference_22k"], str(tmp_path / name), "--model", "model/"]
        return convert_main([*args, "--steps", "2", "--quiet", *flags])

    assert convert("plain.wav") == convert("zero.wav", "--pitch", "0") == convert("up.wav", "--pitch", "7") == 0
    plain, rate = soundfile.read(tmp_path / "plain.wav", dtype="float32")
    assert np.array_equal(plain, soundfile.read(tmp_path / "zero.wav", dtype="float32")[0])
    expected = PitchShifter(rate).push(plain, semitones_to_ratio(7))  # what a stream with pitch_shift 7 hears
    np.testing.assert_allclose(soundfile.read(tmp_path / "up.wav", dtype="float32")[0], expected, rtol=0, atol=1e-5)
    assert convert("high.wav", "--pitch", "13") == 2


def test_stream_client_sends_pitch_in_the_start_controls() -> None:
    args = parse_args(["in.wav", "out.wav", "--voice", "v", "--api-key", "k", "--pitch", "-5"])
    assert args.controls == {"pitch_shift": -5.0}
    start = parse_client_message(json.dumps(start_message("t", "v", controls=args.controls)))
    assert isinstance(start, StartMessage) and start.controls is not None and start.controls.pitch_shift == -5.0
    assert "controls" not in start_message("t", "v")  # none given: the message protocol-v1 clients always sent
