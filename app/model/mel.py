"""The mel front end of the prompt: HiFi-GAN style log-mel spectrogram at the model rate.

Reflect-pad (n_fft - hop) / 2 on both sides, STFT without centring, magnitude with a 1e-9 floor inside the
square root, Slaney mel filterbank (librosa's default, built here by torchaudio), natural log clamped at 1e-5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from app.model.config import MelConfig


class MelSpectrogram(nn.Module):
    # Buffers (register_buffer below), declared so that they type as tensors rather than Module.__getattr__'s union.
    mel_basis: Tensor
    window: Tensor

    def __init__(self, config: MelConfig) -> None:
        super().__init__()
        self.config = config
        n_freqs = config.n_fft // 2 + 1
        fmax = config.fmax if config.fmax is not None else config.sample_rate / 2
        basis = torchaudio.functional.melscale_fbanks(
            n_freqs, config.fmin, fmax, config.n_mels, config.sample_rate, norm="slaney", mel_scale="slaney"
        ).T  # (n_mels, n_freqs)
        self.register_buffer("mel_basis", basis.contiguous(), persistent=False)
        self.register_buffer("window", torch.hann_window(config.win_length), persistent=False)

    def frames(self, samples: int) -> int:
        """Mel frames of a signal of `samples` samples (what `forward` returns for it)."""
        config = self.config
        pad = (config.n_fft - config.hop_length) // 2
        return (samples + 2 * pad - config.n_fft) // config.hop_length + 1

    def forward(self, wave: Tensor) -> Tensor:
        """(B, samples) -> (B, n_mels, frames) natural-log mel."""
        config = self.config
        pad = (config.n_fft - config.hop_length) // 2
        padded = F.pad(wave[:, None], (pad, pad), mode="reflect")[:, 0]
        spec = torch.stft(
            padded,
            config.n_fft,
            hop_length=config.hop_length,
            win_length=config.win_length,
            window=self.window,
            center=False,
            return_complex=True,
        )
        magnitude = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-9)  # (B, n_freqs, frames)
        return torch.log(torch.clamp(self.mel_basis @ magnitude, min=1e-5))
