"""SOLA: join consecutive blocks at the offset where the new audio best matches the previous tail, then crossfade.

Batched over streams: each row has its own previous tail and picks its own offset. The score of offset j is the
cross-correlation of the new head at j with the tail, over the new head's energy there (upstream's normalisation,
taken from RVC / DDSP-SVC). The first maximum wins, so a silent tail (all scores 0) picks offset 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def fade_in_window(length: int, device: torch.device | None = None) -> Tensor:
    """sin^2 ramp from 0 to 1 over `length` samples, float32 (the matching fade-out is 1 - this)."""
    return torch.sin(0.5 * math.pi * torch.linspace(0, 1, length, device=device)) ** 2


@dataclass(frozen=True)
class SolaResult:
    output: Tensor  # (B, block): the audio to play
    tails: Tensor  # (B, crossfade): what the next block crossfades against
    offsets: Tensor  # (B,) int64
    scores: Tensor  # (B, search + 1)


def sola_join(audio: Tensor, tails: Tensor, fade_in: Tensor, search: int, block: int) -> SolaResult:
    """audio: (B, block + crossfade + search) new vocoder samples; tails: (B, crossfade) previous tails."""
    rows, crossfade = tails.shape
    head = audio[:, : crossfade + search]  # (B, crossfade + search)
    # One grouped conv correlates every row's head with its own tail.
    numerator = F.conv1d(head[None], tails[:, None], groups=rows)[0]  # (B, search + 1)
    energy = F.conv1d(head[:, None] ** 2, torch.ones(1, 1, crossfade, device=audio.device))[:, 0]
    scores = numerator / torch.sqrt(energy + 1e-8)
    offsets = torch.argmax(scores, dim=1)  # first maximum on ties
    take = offsets[:, None] + torch.arange(block + crossfade, device=audio.device)
    shifted = torch.gather(audio, 1, take)  # (B, block + crossfade)
    joined = torch.cat([shifted[:, :crossfade] * fade_in + tails * (1 - fade_in), shifted[:, crossfade:]], dim=1)
    # Upstream takes the next tail after the crossfade was applied (they overlap when block < crossfade).
    return SolaResult(
        output=joined[:, :block], tails=joined[:, block : block + crossfade], offsets=offsets, scores=scores
    )
