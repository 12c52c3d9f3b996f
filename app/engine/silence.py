"""The silence gate: skip the model for blocks whose output region holds no sound.

The gate looks at the part of the 16 kHz window that becomes this block's output (crossfade + search + block +
lookahead), not just the newest input block, so the tail of a word that is still being played is never cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SilenceGate:
    threshold_dbfs: float = -55.0  # RMS below this is silence (speech is typically -40..-10 dBFS)

    def is_silent(self, window_16k: Tensor, output_region_16k: int) -> bool:
        region = window_16k[-output_region_16k:]
        rms = torch.sqrt(torch.mean(region.double() ** 2)).item()
        return rms == 0.0 or 20 * math.log10(rms) < self.threshold_dbfs
