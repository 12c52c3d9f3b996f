"""One stream's state, and the step that advances a group of streams by one block in one batched pass.

A stream owns: its voice and settings, the 16 kHz rolling window, the SOLA tail, and its random generator. The
state is bounded: the window and the tail have fixed sizes, whatever the stream's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from app.model.seedvc import SeedVC
from app.streaming.blocks import BlockBatch, BlockRow, convert_block
from app.streaming.noise import draw_block_noise
from app.streaming.settings import StreamGeometry, StreamSettings
from app.streaming.sola import fade_in_window
from app.streaming.voice import Voice


class Stream:
    def __init__(self, model: SeedVC, voice: Voice, settings: StreamSettings, seed: int) -> None:
        self.voice = voice
        self.settings = settings
        self.geometry = StreamGeometry.from_settings(settings, model.sample_rate, model.config.mel.hop_length)
        self.geometry.check_vocoder(model.vocoder.config.samples_per_frame)
        self.window = torch.zeros(self.geometry.window_16k)
        self.tail = torch.zeros(self.geometry.sola_buffer, device=model.device)
        self.generator = torch.Generator().manual_seed(seed)
        self.blocks_done = 0

    def push(self, block_16k: Tensor) -> None:
        """Shift the rolling window left by one block and append the new input block."""
        size = self.geometry.block_16k
        assert block_16k.shape == (size,), f"a block is {size} samples at 16 kHz, got {tuple(block_16k.shape)}"
        self.window = torch.cat([self.window[size:], block_16k.to(self.window.dtype)])

    def next_row(self, model: SeedVC) -> BlockRow:
        """Draw this block's random numbers (always all four, in order) for the stream's next block."""
        geometry = self.geometry
        noise = draw_block_noise(
            self.generator,
            n_mels=model.config.mel.n_mels,
            cfm_frames=self.voice.prompt_frames + geometry.mel_frames,
            harmonics=model.vocoder.config.nb_harmonics + 1,
            vocoder_samples=geometry.vocoder_samples,
        )
        return BlockRow(voice=self.voice, noise=noise, cfg_rate=self.settings.cfg_rate)


@dataclass(frozen=True)
class StepOutput:
    audio: Tensor  # (B, block) at the model rate, on the CPU
    batch: BlockBatch  # the intermediate results (debugging, parity tests, metrics)


def step_streams(model: SeedVC, streams: Sequence[Stream], blocks_16k: Sequence[Tensor]) -> StepOutput:
    """Feed each stream its next input block and compute all their output blocks in one batched pass."""
    geometry = streams[0].geometry
    steps = streams[0].settings.diffusion_steps
    for stream in streams:
        assert stream.geometry == geometry and stream.settings.diffusion_steps == steps, (
            "streams batched together must share block geometry and diffusion steps"
        )
    for stream, block in zip(streams, blocks_16k, strict=True):
        stream.push(block)
    rows = [stream.next_row(model) for stream in streams]
    device = model.device
    windows = torch.stack([stream.window for stream in streams]).to(device)
    tails = torch.stack([stream.tail for stream in streams])
    batch = convert_block(model, geometry, windows, tails, rows, steps, fade_in_window(geometry.sola_buffer, device))
    for index, stream in enumerate(streams):
        stream.tail = batch.sola.tails[index]
        stream.blocks_done += 1
    return StepOutput(audio=batch.sola.output.cpu(), batch=batch)
