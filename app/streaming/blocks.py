"""The batched block computation: the 16 kHz windows of B streams -> B blocks of converted audio.

All rows share the block geometry (equal window and block lengths); only the prompt length differs per voice. Per
block and row: content encoder over the whole window -> drop the frames left of the DiT context -> length regulator
to N mel frames -> CFM over [prompt | block] (rows right-padded, keys masked) -> keep the N new frames -> HiFT
vocoder -> the samples before the lookahead tail -> SOLA against the row's previous tail.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from app.engine.plan import BatchShape
from app.model.cfm import EstimatorInputs, FlowBatch, euler_step, sample
from app.model.hift import HiFTNoise
from app.model.seedvc import SeedVC
from app.streaming.noise import BlockNoise
from app.streaming.settings import StreamGeometry
from app.streaming.sola import SolaResult, sola_join
from app.streaming.voice import Voice


@dataclass
class StageClock:
    """Wall time per stage; on CUDA it synchronises first so that a stage is charged its own kernels."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)
    _last: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now


@dataclass(frozen=True)
class BlockRow:
    """One stream's share of a batched block."""

    voice: Voice
    noise: BlockNoise
    cfg_rate: float


@dataclass(frozen=True)
class BlockBatch:
    mel: Tensor  # (B, n_mels, N): CFM output without the prompt
    wave: Tensor  # (B, L): vocoder output
    sola: SolaResult
    stage_seconds: dict[str, float]


class ModelStages(Protocol):
    """How the heavy stages run: eagerly (`EagerStages`), or replaying captured CUDA graphs (app/engine/graphs.py)."""

    def content(self, windows: Tensor) -> Tensor: ...  # (B, W16) -> (B, F, C) float32

    def euler_step(self, inputs: EstimatorInputs, x: Tensor, t: Tensor, dt: Tensor) -> Tensor: ...

    def spectrum(self, mel: Tensor, noise: HiFTNoise) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class EagerStages:
    model: SeedVC

    def content(self, windows: Tensor) -> Tensor:
        with self.model.compute():
            return self.model.content_encoder(windows)

    def euler_step(self, inputs: EstimatorInputs, x: Tensor, t: Tensor, dt: Tensor) -> Tensor:
        with self.model.compute():
            return euler_step(self.model.dit, inputs, x, t, dt)

    def spectrum(self, mel: Tensor, noise: HiFTNoise) -> tuple[Tensor, Tensor]:
        with self.model.compute():
            return self.model.vocoder.spectrum(mel, noise)


def flow_batch(
    condition: Tensor, rows: Sequence[BlockRow], device: torch.device, prompt_frames_to: int = 0
) -> FlowBatch:
    """Right-pad [prompt | block] rows to the longest prompt (or `prompt_frames_to`); rows keep their own lengths."""
    count, block_frames, channels = condition.shape
    n_mels = rows[0].voice.prompt_mel.shape[0]
    prompts = [row.voice.prompt_frames for row in rows]
    frames = max(*prompts, prompt_frames_to) + block_frames
    padded_condition = condition.new_zeros(count, frames, channels)
    prompt_mel = condition.new_zeros(count, n_mels, frames)
    noise = condition.new_zeros(count, n_mels, frames)
    for index, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        padded_condition[index, :prompt] = row.voice.prompt_condition
        padded_condition[index, prompt : prompt + block_frames] = condition[index]
        prompt_mel[index, :, :prompt] = row.voice.prompt_mel
        noise[index, :, : prompt + block_frames] = row.noise.cfm.to(device)
    prompt_frames = torch.tensor(prompts, device=device)
    return FlowBatch(
        condition=padded_condition,
        prompt_mel=prompt_mel,
        prompt_frames=prompt_frames,
        valid_frames=prompt_frames + block_frames,
        style=torch.stack([row.voice.style for row in rows]),
        noise=noise,
        cfg_rates=tuple(row.cfg_rate for row in rows),
    )


def stack_noise(rows: Sequence[BlockRow], device: torch.device) -> HiFTNoise:
    """The rows' vocoder draws as one batch on `device`."""
    return HiFTNoise(
        phase_u=torch.stack([row.noise.phase_u for row in rows]).to(device),
        sine_noise=torch.stack([row.noise.sine_noise for row in rows]).to(device),
    )


def _pad_rows(windows: Tensor, rows: Sequence[BlockRow], count: int) -> tuple[Tensor, list[BlockRow]]:
    """Inert padding rows up to `count`: silent windows with the first row's voice and noise (finite, discarded)."""
    extra = count - len(rows)
    if extra <= 0:
        return windows, list(rows)
    return torch.cat([windows, windows.new_zeros(extra, windows.shape[1])]), [*rows, *[rows[0]] * extra]


@torch.inference_mode()
def convert_block(
    model: SeedVC,
    geometry: StreamGeometry,
    windows: Tensor,
    tails: Tensor,
    rows: Sequence[BlockRow],
    steps: int,
    fade_in: Tensor,
    shape: BatchShape | None = None,
    stages: ModelStages | None = None,
) -> BlockBatch:
    """windows: (B, window_16k) on the model's device; tails: (B, crossfade) previous SOLA tails.

    `shape` pads the model's batch to static rows and prompt frames (GPU graphs); outputs keep the B real rows.
    """
    device = model.device
    stages = stages or EagerStages(model)
    real = len(rows)
    windows, rows = _pad_rows(windows, rows, shape.rows if shape else real)
    clock = StageClock(device)
    content = stages.content(windows)  # (R, F, C) float32
    clock.lap("content_encoder")
    condition = model.length_regulator(content[:, geometry.dit_cut :], geometry.mel_frames)  # (R, N, D)
    clock.lap("length_regulator")
    flow = flow_batch(condition, rows, device, shape.prompt_frames if shape else 0)
    generated = sample(model.dit, flow, steps, stages.euler_step)  # (R, n_mels, T)
    take = flow.prompt_frames[:, None] + torch.arange(geometry.mel_frames, device=device)  # (R, N)
    mel = torch.gather(generated, 2, take[:, None].expand(-1, generated.shape[1], -1))  # (R, n_mels, N)
    clock.lap("cfm")
    noise = stack_noise(rows, device)
    wave = model.vocoder.waveform(*stages.spectrum(mel, noise))[:real]  # (B, L) float32
    mel = mel[:real]
    clock.lap("vocoder")
    infer = wave[:, -(geometry.infer_length + geometry.tail) : wave.shape[1] - geometry.tail]
    sola = sola_join(infer, tails, fade_in, geometry.sola_search, geometry.block)
    clock.lap("sola")
    return BlockBatch(mel=mel, wave=wave, sola=sola, stage_seconds=clock.seconds)
