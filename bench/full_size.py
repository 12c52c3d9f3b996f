"""The full-size Seed-VC real-time model (seed-uvit-tat-xlsr-tiny) with random weights, for timing without a download.

Every size is the real model's: the DiT preset is upstream's configs/presets/config_dit_mel_seed_uvit_xlsr_tiny.yml
(only the sections the config parser reads), the content encoder is facebook/wav2vec2-xls-r-300m's architecture cut
to the `output_layer` layers the model uses, and HiFT and CAMPPlus take their default (full-size) configs. The
outputs are meaningless, but the shapes, and so the cost of every stage, are those of the real checkpoints.

Usage (from the repo root):

    from bench.full_size import build_full_size
    model = build_full_size(seed=0).to("cuda")
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from app.model.campplus import CAMPPlus, CAMPPlusConfig
from app.model.config import ContentEncoderConfig, SeedVCConfig
from app.model.content_encoder import ContentEncoder
from app.model.dit import DiT
from app.model.hift import HiFTConfig, HiFTVocoder
from app.model.length_regulator import LengthRegulator
from app.model.seedvc import SeedVC

# The parts of config_dit_mel_seed_uvit_xlsr_tiny.yml that SeedVCConfig.from_yaml_dict reads, values unchanged.
REALTIME_PRESET: dict[str, Any] = {
    "preprocess_params": {
        "sr": 22050,
        "spect_params": {"n_fft": 1024, "win_length": 1024, "hop_length": 256, "n_mels": 80, "fmin": 0, "fmax": 8000},
    },
    "model_params": {
        "diffusion_type": "flow",
        "vocoder": {"type": "hifigan"},
        "speech_tokenizer": {"type": "xlsr", "output_layer": 12, "name": "facebook/wav2vec2-xls-r-300m"},
        "style_encoder": {"dim": 192},
        "length_regulator": {
            "channels": 384,
            "is_discrete": False,
            "in_channels": 1024,
            "sampling_ratios": [1, 1, 1, 1],
            "vector_quantize": False,
            "f0_condition": False,
        },
        "DiT": {
            "hidden_dim": 384,
            "num_heads": 6,
            "depth": 9,
            "in_channels": 80,
            "style_condition": True,
            "final_layer_type": "mlp",
            "content_dim": 384,
            "is_causal": False,
            "long_skip_connection": False,
            "zero_prompt_speech_token": False,
            "time_as_token": True,
            "style_as_token": True,
            "uvit_skip_connection": True,
        },
    },
}


def xlsr_300m_config(num_hidden_layers: int) -> Wav2Vec2Config:
    """facebook/wav2vec2-xls-r-300m's architecture (its config.json), with `num_hidden_layers` of its 24 layers."""
    return Wav2Vec2Config(
        hidden_size=1024,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=16,
        intermediate_size=4096,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        feat_extract_norm="layer",
        feat_extract_activation="gelu",
        conv_dim=(512,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_bias=True,
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
        do_stable_layer_norm=True,
    )


def random_content_encoder(config: ContentEncoderConfig) -> ContentEncoder:
    return ContentEncoder(Wav2Vec2Model(xlsr_300m_config(config.output_layer)).eval())


def build_full_size(seed: int = 0) -> SeedVC:
    """The real-time model at full size, random weights drawn from `seed`, on the CPU, in eval mode."""
    torch.manual_seed(seed)
    config = SeedVCConfig.from_yaml_dict(REALTIME_PRESET)
    content_encoder = random_content_encoder(config.content_encoder)
    assert content_encoder.hidden_size == config.length_regulator.in_channels, "XLS-R width must feed the regulator"
    model = SeedVC(
        config,
        content_encoder,
        LengthRegulator(config.length_regulator),
        DiT(config.dit),
        HiFTVocoder(HiFTConfig()),
        CAMPPlus(CAMPPlusConfig()),
    )
    return model.eval()


def parameter_counts(model: SeedVC) -> dict[str, int]:
    """Parameters per network (buffers such as RoPE tables and mel filters are not counted)."""
    networks = {
        "content_encoder": model.content_encoder,
        "length_regulator": model.length_regulator,
        "dit": model.dit,
        "vocoder": model.vocoder,
        "speaker_encoder": model.speaker_encoder,
    }
    return {name: sum(p.numel() for p in network.parameters()) for name, network in networks.items()}
