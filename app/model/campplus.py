"""CAM++ speaker encoder (3D-Speaker / FunASR) and its Kaldi fbank front end.

Seed-VC conditions the diffusion model on a 192-dim speaker embedding ("style") computed once per reference
voice: the 16 kHz prompt -> 80-bin Kaldi log-mel fbank with its time mean removed -> CAM++.

CAM++ has three parts:

* head: a small 2-D ResNet over (frequency, time) that halves the frequency axis three times and folds the
  remaining frequency bins into channels,
* xvector: a strided TDNN, then three densely connected TDNN blocks whose layers are gated by
  context-aware masking (CAM), each followed by a transition layer that halves the channels,
* statistics pooling (mean and unbiased std over time) and a dense layer down to the embedding.

Module and parameter names follow the released checkpoints (after moving `xvector.dense.*` to `dense.*`, see
`CAMPPLUS_LAYOUT`), so a funasr state dict loads strictly.

Shapes: B - batch, T - fbank frames, F - fbank bins, C - channels.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi
from torch import nn

from app.model.checkpoints import CheckpointLayout, RenamePrefix, load_state

SAMPLE_RATE = 16000
NUM_MEL_BINS = 80

# Architecture constants that upstream fixes in code rather than in the constructor arguments.
HEAD_CHANNELS = 32
HEAD_BLOCKS_PER_STAGE = 2
# (layers, kernel size, dilation) of the three densely connected blocks.
DENSE_BLOCKS = ((12, 3, 1), (24, 3, 2), (16, 3, 2))
CAM_SEGMENT_FRAMES = 100
CAM_REDUCTION = 2

# Tokens of `config_str` ("batchnorm-relu" = BatchNorm then ReLU). "batchnorm_" is a BatchNorm without affine
# parameters, used by the final dense layer.
_NORM_ACT_TOKENS = ("batchnorm", "batchnorm_", "relu", "prelu")


@dataclass(frozen=True)
class CAMPPlusConfig:
    feat_dim: int = 80
    embedding_size: int = 192  # upstream builds CAMPPlus(feat_dim=80, embedding_size=192)
    growth_rate: int = 32
    bn_size: int = 4
    init_channels: int = 128
    config_str: str = "batchnorm-relu"
    # Gradient checkpointing, a training-time memory saving: accepted so campplus.json loads as is, but it
    # has no effect at inference.
    memory_efficient: bool = True

    def __post_init__(self) -> None:
        if self.feat_dim % 8 != 0:
            # The head halves the frequency axis three times and folds what remains into channels.
            raise ValueError(f"CAMPPlusConfig.feat_dim must be a multiple of 8, got {self.feat_dim}")
        unknown = [token for token in self.config_str.split("-") if token not in _NORM_ACT_TOKENS]
        if unknown:
            raise ValueError(
                f"CAMPPlusConfig.config_str {self.config_str!r} has unknown parts {unknown}; "
                f"known: {list(_NORM_ACT_TOKENS)}"
            )

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> CAMPPlusConfig:
        """Build from the constructor arguments stored next to the checkpoint (campplus.json)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CAMPPlus config keys {unknown}; known: {sorted(known)}")
        return cls(**data)


def speaker_fbank(wave_16k: torch.Tensor) -> torch.Tensor:
    """(n,) 16 kHz float waveform -> (T, 80) Kaldi log-mel fbank with its per-bin time mean subtracted.

    This is the CAMPPlus input. Kaldi options other than these are torchaudio's defaults (25 ms povey
    window, 10 ms shift, pre-emphasis 0.97, snip_edges). No dither, so the result is deterministic. The
    waveform is used as given, without int16 scaling.
    """
    assert wave_16k.dim() == 1, f"speaker_fbank expects a mono (n,) waveform, got {tuple(wave_16k.shape)}"
    fbank = kaldi.fbank(wave_16k[None], num_mel_bins=NUM_MEL_BINS, dither=0.0, sample_frequency=SAMPLE_RATE)  # (T, F)
    return fbank - fbank.mean(dim=0, keepdim=True)


def _norm_act(config_str: str, channels: int) -> nn.Sequential:
    """The norm/activation stack named by `config_str`, with the child names the checkpoints use."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for token in config_str.split("-"):
        if token == "batchnorm":
            layers["batchnorm"] = nn.BatchNorm1d(channels)
        elif token == "batchnorm_":
            layers["batchnorm"] = nn.BatchNorm1d(channels, affine=False)
        elif token == "relu":
            # Not in place: without a preceding norm the input would be the dense block's shared features.
            layers["relu"] = nn.ReLU()
        elif token == "prelu":
            layers["prelu"] = nn.PReLU(channels)
        else:
            raise ValueError(f"unknown norm/activation {token!r} in {config_str!r}")
    return nn.Sequential(layers)


def _statistics_pooling(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T) -> (B, 2C): mean and unbiased standard deviation over time."""
    return torch.cat([x.mean(dim=-1), x.std(dim=-1, unbiased=True)], dim=-1)


class ResBlock2d(nn.Module):
    """Two 3x3 convolutions with a residual path; a stride only ever applies to the frequency axis."""

    def __init__(self, in_channels: int, channels: int, freq_stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, stride=(freq_stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if freq_stride != 1 or in_channels != channels:
            # Children "0" and "1", as in the checkpoints.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, kernel_size=1, stride=(freq_stride, 1), bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class FrequencyHead(nn.Module):
    """2-D front end: (B, F, T) -> (B, HEAD_CHANNELS * F/8, T). Time keeps its resolution."""

    def __init__(self, feat_dim: int) -> None:
        super().__init__()
        c = HEAD_CHANNELS
        self.conv1 = nn.Conv2d(1, c, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.layer1 = self._stage(c)
        self.layer2 = self._stage(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.out_channels = c * (feat_dim // 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x.unsqueeze(1))))  # (B, c, F, T)
        out = self.layer2(self.layer1(out))
        out = F.relu(self.bn2(self.conv2(out)))  # (B, c, F/8, T)
        return out.flatten(1, 2)  # (B, c * F/8, T)

    @staticmethod
    def _stage(channels: int) -> nn.Sequential:
        """Residual blocks of which only the first halves the frequency axis."""
        strides = [2] + [1] * (HEAD_BLOCKS_PER_STAGE - 1)
        return nn.Sequential(*(ResBlock2d(channels, channels, stride) for stride in strides))


class TDNNLayer(nn.Module):
    """Conv1d, then norm/activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, config_str: str) -> None:
        super().__init__()
        self.linear = nn.Conv1d(
            in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, bias=False
        )
        self.nonlinear = _norm_act(config_str, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x))


class CAMLayer(nn.Module):
    """Context-aware masking: a dilated conv gated by a mask from utterance and segment context."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.linear_local = nn.Conv1d(
            in_channels,
            out_channels,
            kernel_size,
            padding=(kernel_size - 1) // 2 * dilation,
            dilation=dilation,
            bias=False,
        )
        self.linear1 = nn.Conv1d(in_channels, in_channels // CAM_REDUCTION, 1)
        self.linear2 = nn.Conv1d(in_channels // CAM_REDUCTION, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.linear_local(x)  # (B, C_out, T)
        context = x.mean(dim=-1, keepdim=True) + self._segment_means(x)  # (B, C_in, T)
        mask = torch.sigmoid(self.linear2(F.relu(self.linear1(context))))
        return local * mask

    @staticmethod
    def _segment_means(x: torch.Tensor) -> torch.Tensor:
        """Mean of each CAM_SEGMENT_FRAMES-frame segment, repeated over that segment's frames: (B, C, T)."""
        # ceil_mode keeps a trailing partial segment; with no padding, torch averages it over its real frames.
        means = F.avg_pool1d(x, CAM_SEGMENT_FRAMES, CAM_SEGMENT_FRAMES, ceil_mode=True)  # (B, C, ceil(T/S))
        return means.repeat_interleave(CAM_SEGMENT_FRAMES, dim=-1)[..., : x.shape[-1]]


class CAMDenseTDNNLayer(nn.Module):
    """Bottleneck (norm/act, 1x1 conv, norm/act) followed by a CAM layer; emits `growth_rate` new channels."""

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bn_channels: int,
        kernel_size: int,
        dilation: int,
        config_str: str,
    ) -> None:
        super().__init__()
        self.nonlinear1 = _norm_act(config_str, in_channels)
        self.linear1 = nn.Conv1d(in_channels, bn_channels, 1, bias=False)
        self.nonlinear2 = _norm_act(config_str, bn_channels)
        self.cam_layer = CAMLayer(bn_channels, growth_rate, kernel_size, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class CAMDenseTDNNBlock(nn.Module):
    """Densely connected layers `tdnnd1..N`: each sees all channels so far and appends its own."""

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        bn_channels: int,
        kernel_size: int,
        dilation: int,
        config_str: str,
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = CAMDenseTDNNLayer(
                in_channels + i * growth_rate, growth_rate, bn_channels, kernel_size, dilation, config_str
            )
            self.add_module(f"tdnnd{i + 1}", layer)
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = torch.cat([x, layer(x)], dim=1)  # (B, C + growth_rate, T)
        return x


class TransitLayer(nn.Module):
    """Norm/activation, then a 1x1 conv (the reverse order of TDNNLayer)."""

    def __init__(self, in_channels: int, out_channels: int, config_str: str) -> None:
        super().__init__()
        self.nonlinear = _norm_act(config_str, in_channels)
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x))


class DenseLayer(nn.Module):
    """Final projection of the pooled statistics: (B, C_in) -> (B, C_out), a 1x1 conv then a BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_channels, out_channels, 1, bias=False)
        self.nonlinear = _norm_act("batchnorm_", out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x.unsqueeze(-1))).squeeze(-1)  # (B, C_out, 1) -> (B, C_out)


class CAMPPlus(nn.Module):
    """(B, T, feat_dim) mean-normalised fbank -> (B, embedding_size) speaker embedding."""

    def __init__(self, config: CAMPPlusConfig) -> None:
        super().__init__()
        self.config = config
        self.head = FrequencyHead(config.feat_dim)
        channels = config.init_channels
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        stages["tdnn"] = TDNNLayer(self.head.out_channels, channels, 5, stride=2, config_str=config.config_str)
        for i, (num_layers, kernel_size, dilation) in enumerate(DENSE_BLOCKS, start=1):
            block = CAMDenseTDNNBlock(
                num_layers,
                channels,
                config.growth_rate,
                config.bn_size * config.growth_rate,
                kernel_size,
                dilation,
                config.config_str,
            )
            stages[f"block{i}"] = block
            stages[f"transit{i}"] = TransitLayer(block.out_channels, block.out_channels // 2, config.config_str)
            channels = block.out_channels // 2
        stages["out_nonlinear"] = _norm_act(config.config_str, channels)
        self.xvector = nn.Sequential(stages)
        self.dense = DenseLayer(2 * channels, config.embedding_size)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        assert fbank.dim() == 3 and fbank.shape[-1] == self.config.feat_dim, (
            f"CAMPPlus expects (B, T, {self.config.feat_dim}) fbank, got {tuple(fbank.shape)}"
        )
        # The strided TDNN halves time; the unbiased std then needs at least two frames.
        assert fbank.shape[1] >= 3, f"CAMPPlus needs at least 3 fbank frames, got {fbank.shape[1]}"
        x = self.head(fbank.transpose(1, 2))  # (B, C, T)
        x = self.xvector(x)  # (B, C', ceil(T/2))
        return self.dense(_statistics_pooling(x))  # (B, embedding_size)

    @classmethod
    def from_state_dict(
        cls, config: CAMPPlusConfig, state_dict: Mapping[str, torch.Tensor], source: object = None
    ) -> CAMPPlus:
        """Build, load strictly and return in eval mode. Accepts funasr's layout and ours."""
        model = cls(config)
        load_state(model, state_dict, CAMPPLUS_LAYOUT, source)
        return model.eval()


# funasr keeps the final dense layer inside `xvector`; this module has it at the top level. funasr's statistics
# pooling (`xvector.stats`) is moved out too, but it holds no tensors, so no checkpoint has keys to rename for it.
CAMPPLUS_LAYOUT = CheckpointLayout("CAMPPlus speaker encoder", hooks=(RenamePrefix("xvector.dense.", "dense."),))
