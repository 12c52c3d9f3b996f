"""Streaming resampling that reproduces torchaudio's offline resampler sample for sample.

`torchaudio.functional.resample` (default arguments, as `app.audio.files.resample` uses it) is a strided
convolution. With P = from_rate / g and Q = to_rate / g (g = gcd of the rates), input block k (samples
[kP, kP + P)) yields outputs [kQ, kQ + Q), and output m is a windowed sinc centred on input time m * P / Q whose
weights vanish beyond `width` input samples on either side (torchaudio clamps the sinc at `lowpass_filter_width`
zero crossings, so the clamped taps are below 1e-23, not exactly zero). Hence output m is final as soon as input
sample ceil(m * P / Q) + width - 1 has arrived, and the convolution of any window that starts on a block
boundary, at least `width` samples before the outputs wanted, gives those outputs exactly as the offline call does.

Each push runs torchaudio's resampler (kernel built once) on the buffered window and keeps the final outputs; the
buffer is then cut back to the last block boundary the next output still needs. The delay is the kernel half-width,
not a whole block: input sample 1000 at 22.05 kHz would otherwise wait for the rest of its 147-sample block.

Measured delays (`delay_in_samples`, in input samples, plus less than one output sample of rounding):

    48000 -> 16000: 19 (0.40 ms)     22050 -> 48000: 7 (0.32 ms)
    16000 -> 48000:  7 (0.44 ms)     48000 -> 22050: 14 (0.29 ms)

Cost: a 20 ms chunk takes 40-60 us (median, 2 shared cores), with torch limited to one intra-op thread
(`torch.set_num_threads(1)` in the process that streams). With torch's default pool of one thread per core, a
busy core stalls these tiny convolutions on the pool's barrier: 70-220 ms at p99 was measured with one core busy.
"""

from __future__ import annotations

import math

import torch
import torchaudio


class StreamingResampler:
    """Resamples a mono float32 stream pushed in chunks of any length; one instance per stream."""

    # The stream's state, set by _reset. Declared: push, above _reset, reassigns them from themselves, which mypy
    # cannot infer a type from.
    _buffer: torch.Tensor
    _received: int

    def __init__(self, from_rate: int, to_rate: int) -> None:
        if from_rate <= 0 or to_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
        gcd = math.gcd(from_rate, to_rate)
        self._period_in = from_rate // gcd
        self._period_out = to_rate // gcd
        # The float32 kernel is the one torchaudio.functional.resample builds for a float32 waveform.
        self._resampler = torchaudio.transforms.Resample(from_rate, to_rate, dtype=torch.float32)
        self._width = self._resampler.width if from_rate != to_rate else 0
        self._reset()

    @property
    def delay_in_samples(self) -> int:
        """Input samples that must arrive after an output sample's instant before that output is released."""
        return self._width

    def push(self, samples: torch.Tensor) -> torch.Tensor:
        """Adds (n,) float32 CPU input samples; returns the output samples that are now final (possibly none)."""
        if samples.dim() != 1 or samples.dtype != torch.float32:
            raise ValueError(f"expected (n,) float32 samples, got {tuple(samples.shape)} {samples.dtype}")
        if self._period_in == self._period_out:
            return samples
        self._buffer = torch.cat((self._buffer, samples))
        self._received += samples.numel()
        if self._received < self._width:
            return self._buffer[:0]
        return self._emit((self._received - self._width) * self._period_out // self._period_in + 1)

    def flush(self) -> torch.Tensor:
        """Ends the stream: returns the remaining outputs (the input treated as followed by zeros, as offline) and
        resets, so that the instance can take a new stream."""
        if self._period_in == self._period_out:
            return torch.empty(0, dtype=torch.float32)
        # Offline output length: ceil(received * Q / P).
        tail = self._emit(-(-self._received * self._period_out // self._period_in))
        self._reset()
        return tail

    def _reset(self) -> None:
        self._buffer = torch.empty(0, dtype=torch.float32)
        self._buffer_start = 0  # input index of self._buffer[0]; always a multiple of the input period
        self._received = 0
        self._emitted = 0

    def _emit(self, ready: int) -> torch.Tensor:
        """Returns outputs [self._emitted, ready) and drops the input no later output needs."""
        if ready <= self._emitted:
            return self._buffer[:0]
        resampled = self._resampler(self._buffer)
        offset = self._buffer_start // self._period_in * self._period_out  # output index of resampled[0]
        out = resampled[self._emitted - offset : ready - offset]
        self._emitted = ready
        # Output `ready` looks back `width` samples from input time ready * P / Q: keep from the block holding that.
        keep_from = (ready * self._period_in - self._width * self._period_out) // (self._period_in * self._period_out)
        keep_from *= self._period_in
        if keep_from > self._buffer_start:
            self._buffer = self._buffer[keep_from - self._buffer_start :]
            self._buffer_start = keep_from
        return out
