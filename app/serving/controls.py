"""Per-stream controls a client changes while it streams (`set_controls`), unlike settings, which shape the blocks.

The silence threshold and hangover travel with every block to the converter, which gates the model with them
(app/engine/silence.py); gains and loudness matching are applied here, on the transport's side, to the input before it
is split into blocks and to each converted block, so they cost the converter nothing. Every default is neutral: a
stream that never sends controls gets exactly the audio it got before they existed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_RMS = 1e-3  # the converted block's RMS is taken as at least this (-60 dBFS) when matching loudness (as RVC does)


@dataclass(frozen=True)
class StreamControls:
    # None: the converter's configured gate, ConverterConfig.silence_gate_dbfs (-55 dBFS, or off where it is null).
    silence_threshold_dbfs: float | None = None
    silence_hangover_s: float = 0.0  # keep converting this long after the input last rose above the threshold
    input_gain_db: float = 0.0  # on the input, before the converter (and its silence gate) hears it
    output_gain_db: float = 0.0  # on the converted voice, last
    # RVC's convention: 1 keeps the model's loudness, 0 gives each block the input's loudness, between mixes the two
    # (output scaled by (input RMS / output RMS) ** (1 - rms_mix_rate)).
    rms_mix_rate: float = 1.0
    # Hear yourself: each block's input is sent back in place of its conversion, through the same blocks, converter
    # call and pacing (so with the same latency, less the model's own delay); the converter still converts it, so
    # that turning monitor off resumes the converted voice exactly where an unmonitored stream would be.
    monitor: bool = False
    # Semitones up (+) or down (-): the converted voice's pitch, its formants kept (app/audio/pitch_shift.py), applied
    # on the transport's side to each converted block (LiveSession); 0 leaves the audio bitwise as it was.
    pitch_shift: float = 0.0
    # RNNoise on the input (app/audio/denoise.py), after the input gain and before blocks are cut: it costs the
    # ingress about 1 ms per 20 ms of audio and delays the input by 20 ms while on. Off leaves the input untouched.
    noise_suppression: bool = False


def db_to_gain(db: float) -> float:
    return float(10 ** (db / 20))


def apply_input_gain(controls: StreamControls, pcm: np.ndarray) -> np.ndarray:
    if controls.input_gain_db == 0.0:
        return pcm
    return (pcm * np.float32(db_to_gain(controls.input_gain_db))).astype(np.float32)


class Loudness:
    """The output side: loudness matching and output gain, one session's blocks in order.

    The gain moves linearly across each block from the previous block's gain to this one's, so that neither a change
    of the controls nor a block louder than the last steps the level audibly at the block's seam. The first block has
    no previous one: it starts at its own gain.
    """

    def __init__(self) -> None:
        self._previous_gain: float | None = None

    def apply(self, controls: StreamControls, output: np.ndarray, input_16k: np.ndarray) -> np.ndarray:
        gain = db_to_gain(controls.output_gain_db)
        if controls.rms_mix_rate < 1.0:
            ratio = _rms(input_16k) / max(_rms(output), MIN_RMS)
            gain *= ratio ** (1.0 - controls.rms_mix_rate)
        previous = gain if self._previous_gain is None else self._previous_gain
        self._previous_gain = gain
        if gain == 1.0 and previous == 1.0:
            return output  # neutral: bitwise the converter's audio
        ramp = np.linspace(previous, gain, len(output), endpoint=False, dtype=np.float64) if previous != gain else gain
        return (output * ramp).astype(np.float32)


def _rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0
