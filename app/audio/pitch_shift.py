"""Streaming pitch shift in semitones that keeps the voice's formants: a phase vocoder over a cepstral envelope.

Each STFT frame (periodic Hann, 75 % overlap) is split into a spectral envelope (the log magnitude's cepstrum cut
below `ENVELOPE_QUEFRENCY_S`, shorter than any voice's pitch period) and the fine structure (magnitude / envelope),
which holds the harmonics. Only the fine structure moves: the magnitude at bin j becomes the fine structure at bin
j / ratio times the envelope at j itself, so the harmonics move and the formants (the envelope) stay where they
were: the voice sounds higher or lower, not smaller or larger. Each bin's instantaneous frequency (phase advance
between frames) is read at j / ratio too and scaled by the ratio; the output phases accumulate it frame by frame,
so a partial keeps a coherent phase across frames and across blocks.

Streaming: blocks of any length go in, as many come out, `latency` samples later (one frame: the last frame that
covers a sample must have been analysed before the sample is final). The output does not depend on how the input
was cut into blocks. The frame is about 46 ms at any rate (1024 samples at 22.05 kHz), which resolves the harmonics
of a 100 Hz voice; bench/pitch_shift.py measured that and the cost per block.
"""

from __future__ import annotations

import math

import numpy as np

FRAME_S = 0.046  # rounded up to a power of two samples
OVERLAP = 4  # frames per frame length: a hop of a quarter frame
# Pitch periods of speech are above 1.5 ms (f0 below about 650 Hz); the envelope's detail stays shorter than that.
ENVELOPE_QUEFRENCY_S = 0.001
# The Hann window squared, summed over 4 overlapping frames, is 1.5 everywhere: analysis x synthesis window gain.
_HANN_SQUARED_OLA = 1.5
_TINY = 1e-10  # below this magnitude a bin holds no signal: no envelope to divide by


def semitones_to_ratio(semitones: float) -> float:
    return float(2 ** (semitones / 12))


class PitchControl:
    """A stream's pitch shift over its output blocks, as its control changes: bypassed at 0 semitones.

    At 0 a block comes back as the very array given (bitwise the unshifted stream), and nothing is delayed. The first
    shifted block starts a shifter primed with the last frame of output, so the shifted voice continues from the
    audio just heard, `latency` later (that frame is heard again, shifted), instead of after a frame of silence.
    Back at 0 the shifter is dropped with the frame it held: the stream is back on time at once.
    """

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._shifter: PitchShifter | None = None
        self._recent = np.zeros(0, np.float32)  # the last frame of output while bypassed, to prime a shifter with

    @property
    def latency(self) -> int:
        """Samples the output lags the unshifted stream by, now."""
        return 0 if self._shifter is None else self._shifter.latency

    def apply(self, semitones: float, block: np.ndarray) -> np.ndarray:
        if semitones == 0:
            if self._shifter is not None:
                self._shifter, self._recent = None, np.zeros(0, np.float32)
            self._recent = np.concatenate([self._recent, block])[-PitchShifter.frame_for(self.sample_rate) :]
            return block
        ratio = semitones_to_ratio(semitones)
        if self._shifter is None:
            self._shifter = PitchShifter(self.sample_rate)
            self._shifter.push(self._recent, ratio)
        return self._shifter.push(block, ratio)


class PitchShifter:
    """One stream's pitch shift: push blocks in order; the ratio may change from one block to the next."""

    def __init__(self, sample_rate: int) -> None:
        self.frame = self.frame_for(sample_rate)
        self.hop = self.frame // OVERLAP
        self.latency = self.frame  # samples from input to output
        self._window = np.hanning(self.frame + 1)[:-1].astype(np.float64)  # periodic
        self._lifter = _low_quefrency_mask(self.frame, round(ENVELOPE_QUEFRENCY_S * sample_rate))
        bins = self.frame // 2 + 1
        self._bin_advance = 2 * np.pi * self.hop * np.arange(bins) / self.frame  # a bin's own phase advance per hop
        self._input = np.zeros(0)  # samples not yet covered by a whole frame, from the next frame's start
        self._overlap = np.zeros(self.frame)  # overlap-add of frames analysed so far, from the next frame's start
        self._pending = np.zeros(self.latency)  # final output not yet returned
        self._analysis_phase: np.ndarray | None = None  # the last frame's phases (None before the first frame)
        self._synthesis_phase = np.zeros(bins)

    @staticmethod
    def frame_for(sample_rate: int) -> int:
        return 1 << math.ceil(math.log2(FRAME_S * sample_rate))

    def push(self, block: np.ndarray, ratio: float) -> np.ndarray:
        """The next len(block) output samples (float32) for these input samples, shifted by `ratio` (2 ** (n/12))."""
        self._input = np.concatenate([self._input, block.astype(np.float64)])
        count = max(0, (len(self._input) - self.frame) // self.hop + 1)
        if count:
            starts = np.arange(count)[:, None] * self.hop + np.arange(self.frame)
            frames = np.fft.irfft(self._shifted(np.fft.rfft(self._input[starts] * self._window), ratio), self.frame)
            self._input = self._input[count * self.hop :]
            self._pending = np.concatenate([self._pending, self._overlap_add(frames * self._window)])
        out, self._pending = self._pending[: len(block)], self._pending[len(block) :]
        return out.astype(np.float32)

    def _overlap_add(self, frames: np.ndarray) -> np.ndarray:
        """Add the frames (hop apart) to the running overlap; returns the samples no later frame reaches."""
        count = len(frames)
        total = np.concatenate([self._overlap, np.zeros(count * self.hop)])
        for index, frame in enumerate(frames):  # a handful per block: `count` is block / hop
            total[index * self.hop : index * self.hop + self.frame] += frame
        done = count * self.hop
        self._overlap = total[done:]
        return total[:done] / _HANN_SQUARED_OLA

    def _shifted(self, spectra: np.ndarray, ratio: float) -> np.ndarray:
        """(frames, bins) analysis spectra -> the shifted spectra, with phases continued from the previous block."""
        magnitude, phase = np.abs(spectra), np.angle(spectra)
        previous = np.vstack([phase[:1] if self._analysis_phase is None else self._analysis_phase, phase[:-1]])
        if self._analysis_phase is None:
            self._synthesis_phase = phase[0]  # the first frame keeps its phases: its advance is 0 (mod 2 pi)
        self._analysis_phase = phase[-1]
        # Phase advance per hop beyond the bin's own, wrapped: the partial's offset from the bin centre.
        deviation = np.angle(np.exp(1j * (phase - previous - self._bin_advance)))
        advance = self._bin_advance + deviation  # radians per hop, the partial's true frequency
        envelope = self._envelope(magnitude)
        fine = np.where(envelope > _TINY, magnitude / np.maximum(envelope, _TINY), 0.0)
        source = np.arange(magnitude.shape[1]) / ratio  # bin j takes what was at bin j / ratio
        fine_at, advance_at = _at(fine, source), ratio * _at(advance, source)
        synthesis = self._synthesis_phase + np.cumsum(advance_at, axis=0)
        self._synthesis_phase = np.mod(synthesis[-1], 2 * np.pi)
        return fine_at * envelope * np.exp(1j * synthesis)

    def _envelope(self, magnitude: np.ndarray) -> np.ndarray:
        cepstrum = np.fft.irfft(np.log(np.maximum(magnitude, _TINY)), self.frame)
        return np.exp(np.fft.rfft(cepstrum * self._lifter, self.frame).real)


def _low_quefrency_mask(frame: int, cutoff: int) -> np.ndarray:
    """Keeps quefrencies below `cutoff` samples (a real cepstrum is symmetric: both ends)."""
    mask = np.zeros(frame)
    mask[:cutoff] = 1.0
    mask[frame - cutoff + 1 :] = 1.0
    return mask


def _at(values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Each row of `values` linearly interpolated at fractional bin `positions`; zero beyond the last bin."""
    bins = values.shape[1]
    low = np.minimum(np.floor(positions).astype(np.int64), bins - 1)
    high = np.minimum(low + 1, bins - 1)
    weight = positions - low
    inside = positions <= bins - 1
    return np.where(inside, values[:, low] * (1 - weight) + values[:, high] * weight, 0.0)
