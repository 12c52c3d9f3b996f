"""The length regulator: maps content features (50 frames/s) onto a given number of mel frames.

Continuous content is projected to the regulator width, stretched to the target length by nearest-neighbour
interpolation, then smoothed by Conv-GroupNorm-Mish blocks. GroupNorm normalises over a whole row, so rows in one
batch must share their lengths: the caller groups rows by (content frames, target frames), and padding never
meets a real frame.

Parameter names follow the upstream checkpoint (`net.length_regulator`). Its discrete-codebook weights
(`embedding`, `mask_token`, `extra_codebooks*`) belong to a variant the real-time model does not use.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from app.model.config import LengthRegulatorConfig


class LengthRegulator(nn.Module):
    def __init__(self, config: LengthRegulatorConfig) -> None:
        super().__init__()
        channels = config.channels
        self.content_in_proj = nn.Linear(config.in_channels, channels)
        layers: list[nn.Module] = []
        for _ in range(config.n_conv_blocks):
            layers += [nn.Conv1d(channels, channels, 3, padding=1), nn.GroupNorm(1, channels), nn.Mish()]
        layers.append(nn.Conv1d(channels, channels, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, content: Tensor, target_frames: int) -> Tensor:
        """(B, F, in_channels) content -> (B, target_frames, channels) condition."""
        x = self.content_in_proj(content).transpose(1, 2)  # (B, C, F)
        x = F.interpolate(x, size=target_frames, mode="nearest")  # (B, C, target_frames)
        return self.model(x).transpose(1, 2)
