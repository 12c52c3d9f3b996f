"""The Seed-VC model configuration (`config_dit.yml`, upstream format), parsed and checked.

Upstream trains many variants from one config schema; this server implements the real-time one
("seed-uvit-tat-xlsr-tiny": continuous XLS-R content, time and style as tokens, U-ViT skips, MLP head).
A config that asks for another variant is refused with a message instead of being half-honoured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A model config that is malformed or describes a variant this server does not implement."""


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int
    n_fft: int
    win_length: int
    hop_length: int
    n_mels: int
    fmin: float
    fmax: float | None


@dataclass(frozen=True)
class LengthRegulatorConfig:
    in_channels: int
    channels: int
    n_conv_blocks: int  # len(sampling_ratios): one Conv-GroupNorm-Mish block per entry


@dataclass(frozen=True)
class DiTConfig:
    hidden_dim: int
    num_heads: int
    depth: int
    in_channels: int  # mel bins
    content_dim: int
    style_dim: int
    # Upstream's module ignores the config's block_size and sizes its RoPE table to 16384 positions.
    rope_positions: int = 16384
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    frequency_embedding_size: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def intermediate_size(self) -> int:
        # SwiGLU width of the gpt-fast recipe: 2/3 of 4*dim, rounded up to a multiple of 256.
        n_hidden = int(2 * (4 * self.hidden_dim) / 3)
        return -(-n_hidden // 256) * 256


@dataclass(frozen=True)
class ContentEncoderConfig:
    name: str  # a transformers model folder (relative to the config) or a hub id
    output_layer: int  # number of transformer layers kept


@dataclass(frozen=True)
class SeedVCConfig:
    mel: MelConfig
    dit: DiTConfig
    length_regulator: LengthRegulatorConfig
    content_encoder: ContentEncoderConfig

    @classmethod
    def from_yaml_dict(cls, data: Mapping[str, Any]) -> SeedVCConfig:
        try:
            return _parse(data)
        except (KeyError, TypeError) as error:
            raise ConfigError(f"config_dit.yml is missing or mistypes {error}") from error


# The flags that define the real-time variant, with the values it needs.
_REQUIRED_DIT_FLAGS = {
    "time_as_token": True,
    "style_as_token": True,
    "uvit_skip_connection": True,
    "style_condition": True,
    "final_layer_type": "mlp",
    "long_skip_connection": False,
    "is_causal": False,
    "zero_prompt_speech_token": False,
}
_REQUIRED_REGULATOR_FLAGS = {"is_discrete": False, "f0_condition": False, "vector_quantize": False}


def _require(section: str, values: Mapping[str, Any], required: Mapping[str, Any]) -> None:
    for key, wanted in required.items():
        got = values.get(key, False)
        if got != wanted:
            raise ConfigError(
                f"config_dit.yml {section}.{key} is {got!r}; this server implements the Seed-VC real-time "
                f"model (seed-uvit-tat-xlsr-tiny), which needs {wanted!r}"
            )


def _parse(data: Mapping[str, Any]) -> SeedVCConfig:
    params = data["model_params"]
    spect = data["preprocess_params"]["spect_params"]
    dit = params["DiT"]
    regulator = params["length_regulator"]
    tokenizer = params["speech_tokenizer"]
    if params.get("diffusion_type", "flow") != "flow":
        raise ConfigError("config_dit.yml model_params.diffusion_type must be 'flow'")
    if tokenizer.get("type") != "xlsr":
        raise ConfigError(
            f"config_dit.yml speech_tokenizer.type is {tokenizer.get('type')!r}; the real-time model uses 'xlsr'"
        )
    if params["vocoder"]["type"] != "hifigan":
        raise ConfigError(
            f"config_dit.yml vocoder.type is {params['vocoder']['type']!r}; the real-time model uses 'hifigan'"
        )
    _require("model_params.DiT", dit, _REQUIRED_DIT_FLAGS)
    _require("model_params.length_regulator", regulator, _REQUIRED_REGULATOR_FLAGS)
    if regulator["channels"] != dit["content_dim"]:
        raise ConfigError(
            f"length_regulator.channels ({regulator['channels']}) must equal DiT.content_dim ({dit['content_dim']})"
        )
    if not regulator["sampling_ratios"]:
        raise ConfigError("length_regulator.sampling_ratios is empty; the real-time model interpolates content")
    if spect["n_mels"] != dit["in_channels"]:
        raise ConfigError(f"spect_params.n_mels ({spect['n_mels']}) must equal DiT.in_channels ({dit['in_channels']})")
    if dit["hidden_dim"] % dit["num_heads"]:
        raise ConfigError(f"DiT.hidden_dim {dit['hidden_dim']} is not divisible by num_heads {dit['num_heads']}")
    # Upstream: any fmax other than the string "None" means 8000 Hz.
    fmax = None if spect.get("fmax", "None") == "None" else 8000.0
    return SeedVCConfig(
        mel=MelConfig(
            sample_rate=int(data["preprocess_params"]["sr"]),
            n_fft=int(spect["n_fft"]),
            win_length=int(spect["win_length"]),
            hop_length=int(spect["hop_length"]),
            n_mels=int(spect["n_mels"]),
            fmin=float(spect.get("fmin", 0)),
            fmax=fmax,
        ),
        dit=DiTConfig(
            hidden_dim=int(dit["hidden_dim"]),
            num_heads=int(dit["num_heads"]),
            depth=int(dit["depth"]),
            in_channels=int(dit["in_channels"]),
            content_dim=int(dit["content_dim"]),
            style_dim=int(params["style_encoder"]["dim"]),
        ),
        length_regulator=LengthRegulatorConfig(
            in_channels=int(regulator["in_channels"]),
            channels=int(regulator["channels"]),
            n_conv_blocks=len(regulator["sampling_ratios"]),
        ),
        content_encoder=ContentEncoderConfig(name=str(tokenizer["name"]), output_layer=int(tokenizer["output_layer"])),
    )


def load_config(path: Path) -> SeedVCConfig:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read the model config {path}: {error}") from error
    if not isinstance(data, Mapping):
        raise ConfigError(f"the model config {path} is not a YAML mapping")
    return SeedVCConfig.from_yaml_dict(data)
