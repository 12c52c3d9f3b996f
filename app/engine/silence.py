"""The silence gate: skip the model for blocks whose output region holds no sound.

The gate looks at the part of the 16 kHz window that becomes this block's output (crossfade + search + block +
lookahead), not just the newest input block, so the tail of a word that is still being played is never cut.

Hangover: a word's end decays below any threshold that keeps breath and room noise out, and gating that tail chops
the word audibly. With `hangover_s`, a block is silent only if every 20 ms frame of the `hangover_s` of input before
its output region was below the threshold too, so conversion goes on that long after the last sound. The window
already holds that input (it is at least `ce_context`, 0.5 s or more), so the gate keeps no state of its own: a
session that moves to another converter gates exactly as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from app.streaming.settings import CONTENT_RATE, SAMPLES_PER_CONTENT_FRAME_16K


@dataclass(frozen=True)
class SilenceGate:
    threshold_dbfs: float = -55.0  # RMS below this is silence (speech is typically -40..-10 dBFS)
    hangover_s: float = 0.0  # keep converting this long after the last frame above the threshold

    def is_silent(self, window_16k: Tensor, output_region_16k: int) -> bool:
        if not self._below(window_16k[-output_region_16k:]):
            return False
        hangover = round(self.hangover_s * CONTENT_RATE)
        if hangover == 0:
            return True
        before = window_16k[max(0, len(window_16k) - output_region_16k - hangover) : -output_region_16k]
        return all(self._below(frame) for frame in torch.split(before, SAMPLES_PER_CONTENT_FRAME_16K))

    def _below(self, samples: Tensor) -> bool:
        rms = torch.sqrt(torch.mean(samples.double() ** 2)).item()
        return rms == 0.0 or 20 * math.log10(rms) < self.threshold_dbfs
