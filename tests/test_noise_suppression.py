"""The `noise_suppression` control: RNNoise (pyrnnoise) on the input, its SNR gain on the fixture speech, the stream's
timeline across switching, and its place in a live session (before the converter and its silence gate)."""

from __future__ import annotations

import asyncio

import numpy as np

from app.audio.denoise import DELAY_SAMPLES, NoiseControl, NoiseSuppressor
from app.model.seedvc import SeedVC
from app.serving.live import LiveSession
from app.transport.protocol import SetControlsMessage, parse_client_message
from bench.noise_suppression import fixture_speech_48k, mix_at_snr, snr_gains, speech_band, white_noise
from tests.test_live_session import run_session
from tests.test_stream_controls import SETTINGS, make_client


def test_white_noise_at_10_db_snr_gains_snr_on_the_fixture_speech() -> None:
    clean = fixture_speech_48k()
    full_band = snr_gains(clean, mix_at_snr(clean, white_noise(len(clean)), 10.0))
    # Measured: +5.0 dB at 48 kHz (most of it above 8 kHz); below 8 kHz, where the model listens, +3.0 dB.
    assert full_band["out_48k"] - full_band["in_48k"] >= 4.0
    in_band = snr_gains(clean, mix_at_snr(clean, speech_band(white_noise(len(clean), seed=1)), 10.0))
    assert in_band["out_16k"] - in_band["in_16k"] >= 2.0


def test_the_suppressor_gives_back_as_many_samples_as_it_took() -> None:
    noisy = white_noise(48_000) * np.float32(0.1)
    suppressor = NoiseSuppressor()
    out = [suppressor.process(noisy[start : start + 700]) for start in range(0, len(noisy), 700)]
    assert sum(map(len, out)) + len(suppressor.flush()) == len(noisy)
    # Whole 20 ms packets come back whole: no buffering delay beyond RNNoise's own.
    assert len(NoiseSuppressor().process(noisy[:960])) == 960
    assert DELAY_SAMPLES == 960


def test_switching_keeps_the_timeline_and_off_is_the_input_itself() -> None:
    control = NoiseControl()
    packet = white_noise(1000, seed=2) * np.float32(0.1)
    assert control.apply(False, packet) is packet  # never on: untouched, bitwise
    lengths = [len(control.apply(enabled, packet)) for enabled in (True, True, False, True, False, False)]
    assert sum(lengths) + len(control.flush()) == 6 * len(packet)


def test_the_converter_hears_the_denoised_input(model: SeedVC, voice_ids) -> None:
    """Steady noise at -40 dBFS passes the -55 dBFS silence gate; suppressed, it falls below and the gate skips the
    model: the suppressor runs on the input, before the blocks reach the converter."""
    store, (voice, _) = voice_ids
    noise = white_noise(2 * 48_000, seed=3) * np.float32(10 ** (-40 / 20))

    def silent_blocks(**controls: bool) -> int:
        session = LiveSession(make_client(model, store), "s", voice, SETTINGS, 7)
        session.set_controls(**controls)
        _, reports = asyncio.run(run_session(session, noise))
        return sum(report.silent for report in reports)

    plain, suppressed = silent_blocks(), silent_blocks(noise_suppression=True)
    assert plain <= 2  # only the flush blocks after the input's end
    assert suppressed >= plain + 5


def test_the_control_travels_in_set_controls() -> None:
    message = parse_client_message('{"type": "set_controls", "noise_suppression": true}')
    assert isinstance(message, SetControlsMessage)
    assert message.changes() == {"noise_suppression": True}
