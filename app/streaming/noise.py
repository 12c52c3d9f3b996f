"""The random numbers of one block of one stream, drawn from that stream's own generator.

Parity contract (tests/fixtures/parity_a/README.md, section 7): one CPU `torch.Generator` per stream, seeded when the
stream opens, and per block exactly four float32 draws in this order, each ONE call of exactly this many elements:

    1. CFM initial noise        randn (1, n_mels, P + N)
    2. NSF initial phases       rand  (1, nb_harmonics + 1, 1)
    3. NSF additive noise       randn (1, nb_harmonics + 1, L)
    4. NSF noise branch         randn (1, L, 1)   -- discarded by the vocoder, drawn only to stay in step

A batch never shares a generator, so a stream's numbers do not depend on who it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BlockNoise:
    cfm: Tensor  # (n_mels, P + N)
    phase_u: Tensor  # (nb_harmonics + 1, 1)
    sine_noise: Tensor  # (nb_harmonics + 1, L)


def draw_block_noise(
    generator: torch.Generator, n_mels: int, cfm_frames: int, harmonic_channels: int, vocoder_samples: int
) -> BlockNoise:
    cfm = torch.randn((1, n_mels, cfm_frames), generator=generator)
    phase_u = torch.rand((1, harmonic_channels, 1), generator=generator)
    sine_noise = torch.randn((1, harmonic_channels, vocoder_samples), generator=generator)
    torch.randn((1, vocoder_samples, 1), generator=generator)
    return BlockNoise(cfm=cfm[0], phase_u=phase_u[0], sine_noise=sine_noise[0])
