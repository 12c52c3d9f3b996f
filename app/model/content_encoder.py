"""The content encoder: XLS-R (wav2vec 2.0) through `transformers`, cut to its first `output_layer` layers.

Input is 16 kHz audio; each row is normalised on its own to zero mean and unit variance, as transformers'
Wav2Vec2FeatureExtractor does for the upstream model. Output is the last hidden state (after the stable-layer-norm
encoder's final layer norm), 50 frames per second.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from transformers import Wav2Vec2Model

from app.model.config import ContentEncoderConfig

# wav2vec 2.0's feature extractor adds this to the variance before the square root.
_NORMALISATION_EPS = 1e-7


def normalise_rows(wave: Tensor) -> Tensor:
    """(B, samples) -> each row minus its mean, over sqrt(its population variance + 1e-7)."""
    mean = wave.mean(dim=-1, keepdim=True)
    var = wave.var(dim=-1, unbiased=False, keepdim=True)
    return (wave - mean) / torch.sqrt(var + _NORMALISATION_EPS)


class ContentEncoder(nn.Module):
    def __init__(self, model: Wav2Vec2Model) -> None:
        super().__init__()
        # transformers keeps the positional conv's weight norm as a parametrization recomputed on every call:
        # fold it once (the same numbers, less work per block).
        for module in model.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        self.model = model

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @classmethod
    def from_pretrained(cls, source: str | Path, config: ContentEncoderConfig) -> ContentEncoder:
        """Load from a transformers model folder or a hub id, building only the layers that are used.

        Asking transformers for `num_hidden_layers=output_layer` skips the weights of the dropped layers instead
        of loading all 24 of XLS-R's and slicing (half the memory and load time of the full model).
        """
        # The dropped layers' weights are reported as unused: expected, so keep that warning out of the logs.
        transformers_logger = logging.getLogger("transformers.modeling_utils")
        previous = transformers_logger.level
        transformers_logger.setLevel(logging.ERROR)
        try:
            model = Wav2Vec2Model.from_pretrained(str(source), num_hidden_layers=config.output_layer)
        finally:
            transformers_logger.setLevel(previous)
        return cls(model.eval())

    def forward(self, wave_16k: Tensor) -> Tensor:
        """(B, samples) at 16 kHz -> (B, frames, hidden_size), float32 whatever the compute precision."""
        return self.model(normalise_rows(wave_16k)).last_hidden_state.float()
