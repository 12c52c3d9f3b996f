"""The full-size Seed-VC real-time model (seed-uvit-tat-xlsr-tiny) with random weights, for timing without a download.

Every size is the real model's: the DiT preset is upstream's configs/presets/config_dit_mel_seed_uvit_xlsr_tiny.yml
(only the sections the config parser reads), the content encoder is facebook/wav2vec2-xls-r-300m's architecture cut
to the `output_layer` layers the model uses, and HiFT and CAMPPlus take their default (full-size) configs. The
outputs are meaningless, but the shapes, and so the cost of every stage, are those of the real checkpoints.

Usage (from the repo root):

    from bench.full_size import build_full_size, write_full_size_bundle
    model = build_full_size(seed=0).to("cuda")
    write_full_size_bundle(Path(tmp) / "model", seed=0)  # the same networks as a model bundle (~0.7 GB): for the
                                                          # service (bench.load --model full-size); never commit one
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

from app.bundle import write_bundle
from app.model.campplus import CAMPPLUS_LAYOUT, CAMPPlus, CAMPPlusConfig
from app.model.config import ContentEncoderConfig, SeedVCConfig
from app.model.content_encoder import ContentEncoder
from app.model.dit import DIT_LAYOUT, REGULATOR_LAYOUT, DiT
from app.model.hift import HIFT_LAYOUT, HiFTConfig, HiFTVocoder
from app.model.length_regulator import LengthRegulator
from app.model.precision import Precision
from app.model.seedvc import SeedVC
from app.model.sources import ModelFiles

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


# ---- as a model bundle --------------------------------------------------------------------------------------------


def write_full_size_bundle(directory: Path, seed: int = 0) -> Path:
    """`build_full_size(seed)` written as a model bundle in `directory` (created; must be empty or absent).

    About 0.7 GB of random weights: write it to a temporary directory at run time, never into the repository.
    """
    with tempfile.TemporaryDirectory(prefix="full-size-files-") as staging:
        write_bundle(save_model_files(build_full_size(seed), REALTIME_PRESET, Path(staging)), directory)
    return directory


def save_model_files(model: SeedVC, dit_config: Mapping[str, Any], directory: Path) -> ModelFiles:
    """A float32 model's networks as the files upstream ships, in the layouts `SeedVC.from_files` reads.

    DiT and length regulator: one checkpoint `{'net': {'cfm': {'estimator.*'}, 'length_regulator': ...}}`; XLS-R: a
    transformers folder (with the positional convolution's weight norm, as transformers builds it); HiFT: CosyVoice's
    weight-norm layout (weight_v, weight_g); CAMPPlus: funasr's (`xvector.dense.*`); each written through its model's
    CheckpointLayout. `dit_config` is config_dit.yml's content.
    """
    assert model.precision is Precision.FP32, "save the float32 model: reduced precisions convert weights for good"
    directory.mkdir(parents=True, exist_ok=True)
    files = ModelFiles(
        dit_config=directory / "config_dit.yml",
        dit_checkpoint=directory / "dit.pth",
        content_encoder=directory / "content_encoder",
        vocoder_checkpoint=directory / "hift.pt",
        speaker_encoder_checkpoint=directory / "campplus.bin",
        vocoder_config=directory / "hift.yml",
        speaker_encoder_config=directory / "campplus.json",
    )
    files.dit_config.write_text(yaml.safe_dump(dict(dit_config), sort_keys=False))
    net = {
        "cfm": DIT_LAYOUT.to_file(model.dit, _cpu_state(model.dit)),
        "length_regulator": REGULATOR_LAYOUT.to_file(model.length_regulator, _cpu_state(model.length_regulator)),
    }
    torch.save({"net": net}, files.dit_checkpoint)
    _with_positional_weight_norm(model.content_encoder.model).save_pretrained(files.content_encoder)
    torch.save(HIFT_LAYOUT.to_file(model.vocoder, _cpu_state(model.vocoder)), files.vocoder_checkpoint)
    assert files.vocoder_config is not None and files.speaker_encoder_config is not None
    files.vocoder_config.write_text(yaml.safe_dump(model.vocoder.config.to_yaml_dict(), sort_keys=False))
    speaker_state = CAMPPLUS_LAYOUT.to_file(model.speaker_encoder, _cpu_state(model.speaker_encoder))
    torch.save(speaker_state, files.speaker_encoder_checkpoint)
    files.speaker_encoder_config.write_text(json.dumps(dataclasses.asdict(model.speaker_encoder.config), indent=1))
    return files


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}


def _with_positional_weight_norm(model: Wav2Vec2Model) -> Wav2Vec2Model:
    """A copy of XLS-R with the weight norm ContentEncoder folded put back, so that from_pretrained finds the keys
    it expects (parametrizations.weight.original0/1); the norm is over every dim but 2, as transformers builds it."""
    model = copy.deepcopy(model).cpu()
    nn.utils.parametrizations.weight_norm(model.encoder.pos_conv_embed.conv, name="weight", dim=2)
    return model
