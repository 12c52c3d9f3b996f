"""Pitch shift (the `pitch_shift` control): what each candidate method costs per block and how right its pitch is.

Usage (from the repo root; on a shared machine inside `flock /tmp/cpu-bench.lock`):

    .venv/bin/python -m bench.pitch_shift                       # 22.05 kHz (the model's rate), 0.18 s blocks
    .venv/bin/python -m bench.pitch_shift --rate 48000 --json /tmp/pitch.json

Candidates, each fed 0.18 s blocks (the README's real-time block) in order:

- `formant_vocoder`: app/audio/pitch_shift.py, the method the service uses (phase vocoder, cepstral envelope kept).
- `torchaudio`: torchaudio.functional.pitch_shift (phase vocoder + resampling, already a dependency), run on each
  block alone: it has no streaming state, and it moves the formants with the pitch. Measured on -12, -5, 0 and +12
  only: its resampler's kernel for other ratios makes a block cost longer than it lasts (see SHIFTS_MEASURED).

Figures: the median and p95 time per block (ms) per candidate; per input and shift n, the output's f0 against
2^(n/12) times the unshifted output's (in %; `estimate_f0` below), and how far the output's harmonics are from the
input's formant envelope (`envelope_error_db`: near 0 dB, the formants stayed; several dB, they moved with the pitch).
Inputs: harmonic "vowels" of known f0 (110, 150, 220 Hz: a low, a middle and a high voice) with formants at 700 and
1150 Hz. Candidates that were looked at and not measured, with why, are in README (Pitch shift).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchaudio

from app.audio.pitch_shift import PitchShifter, semitones_to_ratio
from bench.common import percentile, write_json

BLOCK_S = 0.18
SHIFTS = (-24, -12, -5, 0, 7, 12, 24)
VOICES_HZ = (110, 150, 220)  # a low, a middle and a high voice
FORMANTS_HZ = (700.0, 1150.0)


def harmonic_tone(f0: float, seconds: float, rate: int, formants: tuple[float, ...] = ()) -> np.ndarray:
    """Every harmonic of f0 below Nyquist at 1/k amplitude (a sawtooth-like voice), shaped by resonances at
    `formants` (none: flat), peak-normalised to 0.3 (-10 dBFS)."""
    t = np.arange(int(seconds * rate)) / rate
    signal = np.zeros_like(t)
    for k in range(1, int(rate / 2 / f0) + 1):
        gain = resonance_gain(k * f0, formants) / k
        signal += gain * np.sin(2 * np.pi * k * f0 * t + k)  # phases spread: no single sharp peak per period
    return (0.3 * signal / np.abs(signal).max()).astype(np.float32)


def estimate_f0(samples: np.ndarray, rate: int, low_hz: float = 40.0, high_hz: float = 1000.0) -> float:
    """The median f0 (Hz) over voiced frames, by YIN's cumulative mean normalised difference; NaN with none voiced.

    Frames are two periods of `low_hz` long, half overlapping. A frame is voiced when its normalised difference dips
    below 0.15 at some lag; the lag is the first such dip's minimum, refined by a parabola through its neighbours."""
    x = samples.astype(np.float64)
    shortest, longest = int(rate / high_hz), math.ceil(rate / low_hz)
    frame = 2 * longest
    estimates = []
    for start in range(0, len(x) - frame - longest, frame // 2):
        head = x[start : start + frame]
        difference = np.array(
            [np.sum((head - x[start + lag : start + lag + frame]) ** 2) for lag in range(longest + 2)]
        )
        normalised = np.ones_like(difference)
        normalised[1:] = difference[1:] * np.arange(1, len(difference)) / np.maximum(np.cumsum(difference[1:]), 1e-12)
        dips = np.flatnonzero(normalised[shortest:longest] < 0.15)
        if not len(dips):
            continue
        lag = dips[0] + shortest
        while lag + 1 < longest and normalised[lag + 1] < normalised[lag]:
            lag += 1
        before, at, after = normalised[lag - 1], normalised[lag], normalised[lag + 1]
        curvature = before - 2 * at + after
        estimates.append(rate / (lag + (0.5 * (before - after) / curvature if curvature > 0 else 0.0)))
    return float(np.median(estimates)) if estimates else math.nan


def resonance_gain(hz: float, formants: tuple[float, ...] = FORMANTS_HZ) -> float:
    """The synthetic vowel's envelope at `hz`: resonances of bandwidth 100 Hz at `formants`."""
    gain = 1.0
    for formant in formants:
        gain /= math.sqrt((1 - (hz / formant) ** 2) ** 2 + (hz * 100 / formant**2) ** 2)
    return gain


def envelope_error_db(samples: np.ndarray, rate: int, f0: float) -> float:
    """How far the harmonics' levels (up to 4 kHz) are from the vowel's formant envelope at their frequencies: the
    RMS of the dB differences after removing their mean. Small: the formants stayed; large: they moved."""
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(len(samples))))
    bin_hz = rate / len(samples)
    harmonics = np.arange(1, int(4000 / f0) + 1) * f0
    measured = [20 * np.log10(spectrum[round(hz / bin_hz)] + 1e-12) for hz in harmonics]
    # The source's own 1/k tilt is kept by every method: what is compared is the resonance part.
    wanted = [20 * np.log10(resonance_gain(hz)) - 20 * np.log10(k) for k, hz in enumerate(harmonics, 1)]
    difference = np.array(measured) - np.array(wanted)
    return float(np.sqrt(np.mean((difference - difference.mean()) ** 2)))


def formant_vocoder(rate: int) -> Callable[[np.ndarray, float], np.ndarray]:
    shifter = PitchShifter(rate)
    return lambda block, semitones: shifter.push(block, semitones_to_ratio(semitones))


def torchaudio_per_block(rate: int) -> Callable[[np.ndarray, float], np.ndarray]:
    def shift(block: np.ndarray, semitones: float) -> np.ndarray:
        # torchaudio takes whole semitones (n_steps: int) over bins_per_octave; 24 per octave takes half ones.
        shifted = torchaudio.functional.pitch_shift(torch.from_numpy(block), rate, round(2 * semitones), 24)
        return shifted.numpy()

    return shift


CANDIDATES = {"formant_vocoder": formant_vocoder, "torchaudio": torchaudio_per_block}
# torchaudio resamples by the rational 2^(n/24) reduced by its gcd: an octave is cheap, -5 semitones took 259 ms per
# 0.18 s block (slower than real time) and +7 minutes, so it is measured on these shifts only.
SHIFTS_MEASURED = {"formant_vocoder": SHIFTS, "torchaudio": (-12, -5, 0, 12)}


def run(
    make: Callable[[int], Callable[[np.ndarray, float], np.ndarray]], audio: np.ndarray, rate: int, n: float
) -> tuple[np.ndarray, list[float]]:
    """The audio through a fresh candidate block by block: (output, seconds per block)."""
    shift = make(rate)
    block = round(BLOCK_S * rate)
    outputs, seconds = [], []
    for start in range(0, len(audio) - block + 1, block):
        began = time.perf_counter()
        outputs.append(shift(audio[start : start + block], n))
        seconds.append(time.perf_counter() - began)
    return np.concatenate(outputs), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=22_050, help="sample rate of the audio shifted (%(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the ingress streams (app/audio/stream_resample.py)
    report: dict[str, dict] = {}
    for name, make in CANDIDATES.items():
        costs: list[float] = []
        rows = {}
        for f0_in in VOICES_HZ:
            audio = harmonic_tone(f0_in, 2.0, args.rate, FORMANTS_HZ)
            plain, _ = run(make, audio, args.rate, 0.0)
            steady = slice(len(plain) // 4, 3 * len(plain) // 4)  # away from the start and the shifter's latency
            f0 = estimate_f0(plain[steady], args.rate)
            for n in SHIFTS_MEASURED[name]:
                shifted, seconds = run(make, audio, args.rate, n)
                costs += seconds
                got = estimate_f0(shifted[steady], args.rate)
                error = 100 * (got / (f0 * semitones_to_ratio(n)) - 1)
                envelope = envelope_error_db(shifted[steady], args.rate, f0_in * semitones_to_ratio(n))
                rows[f"{f0_in} Hz, n {n:+d}"] = {"f0_error_percent": error, "envelope_error_db": envelope}
                print(f"{name:16} {f0_in} Hz n {n:+3d}: f0 {error:+7.2f} %, formant envelope off by {envelope:5.1f} dB")
        report[name] = {
            "ms_per_block_p50": 1000 * percentile(costs, 50),
            "ms_per_block_p95": 1000 * percentile(costs, 95),
        }
        report[name]["rows"] = rows
        print(
            f"{name}: {report[name]['ms_per_block_p50']:.2f} ms per {BLOCK_S} s block at {args.rate} Hz (median; "
            f"p95 {report[name]['ms_per_block_p95']:.2f} ms)\n"
        )
    if args.json:
        write_json(args.json, {"rate": args.rate, "block_s": BLOCK_S, "candidates": report})


if __name__ == "__main__":
    main()
