"""One stream's state, and the step that advances a group of streams by one block in one batched pass.

A stream owns: its voice and settings, the 16 kHz rolling window, the SOLA tail, and its random generator. The
state is bounded: the window and the tail have fixed sizes, whatever the stream's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from app.engine.plan import BatchShape
from app.model.seedvc import SeedVC
from app.streaming.blocks import BlockBatch, BlockRow, ModelStages, convert_block
from app.streaming.noise import draw_block_noise
from app.streaming.settings import StreamGeometry, StreamSettings
from app.streaming.sola import fade_in_window
from app.streaming.voice import Voice


@dataclass(frozen=True)
class StreamState:
    """What it takes to continue a stream elsewhere, exactly: its window, SOLA tail, generator and block count.

    Small by design (the window is the largest part, and a transport that keeps its own input history can rebuild
    it), so a converter can hand it back with every block and a lost stream re-opens on another replica.
    """

    window: Tensor  # (window_16k,) float32
    tail: Tensor  # (crossfade,) float32
    generator_state: Tensor  # torch.Generator.get_state(), uint8
    blocks_done: int


class Stream:
    def __init__(self, model: SeedVC, voice: Voice, settings: StreamSettings, seed: int) -> None:
        self.voice = voice
        self.settings = settings
        self.geometry = StreamGeometry.from_settings(settings, model.sample_rate, model.config.mel.hop_length)
        self.geometry.check_vocoder(model.vocoder.config.samples_per_frame)
        self.window = torch.zeros(self.geometry.window_16k)
        self.tail = torch.zeros(self.geometry.sola_buffer, device=model.device)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.blocks_done = 0

    def restore(self, state: StreamState) -> None:
        geometry = self.geometry
        if state.window.shape != (geometry.window_16k,) or state.tail.shape != (geometry.sola_buffer,):
            raise ValueError("the saved stream state does not fit this stream's block settings")
        self.window = state.window.to(torch.float32).clone()
        self.tail = state.tail.to(device=self.tail.device, dtype=torch.float32).clone()
        self.generator.set_state(state.generator_state)
        self.blocks_done = state.blocks_done

    def snapshot(self) -> StreamState:
        """The state as it is now (copies), to `restore` if a step that already advanced it has to be undone."""
        return StreamState(self.window.clone(), self.tail.clone(), self.generator.get_state(), self.blocks_done)

    def window_with(self, block_16k: Tensor) -> Tensor:
        """The rolling window shifted left by one block, with the new input block appended."""
        size = self.geometry.block_16k
        if block_16k.shape != (size,):
            raise ValueError(f"a block is {size} samples at 16 kHz, got shape {tuple(block_16k.shape)}")
        return torch.cat([self.window[size:], block_16k.to(self.window.dtype)])

    def push(self, block_16k: Tensor) -> None:
        self.window = self.window_with(block_16k)

    def next_row(self, model: SeedVC) -> BlockRow:
        """Draw this block's random numbers (always all four, in order) for the stream's next block."""
        geometry = self.geometry
        noise = draw_block_noise(
            self.generator,
            n_mels=model.config.mel.n_mels,
            cfm_frames=self.voice.prompt_frames + geometry.mel_frames,
            harmonic_channels=model.vocoder.config.nb_harmonics + 1,
            vocoder_samples=geometry.vocoder_samples,
        )
        return BlockRow(voice=self.voice, noise=noise, cfg_rate=self.settings.cfg_rate)


@dataclass(frozen=True)
class StepOutput:
    audio: Tensor  # (B, block) at the model rate, on the CPU; silence for skipped rows
    batch: BlockBatch | None  # the converted rows' intermediate results (None when every row was skipped)
    converted: tuple[int, ...]  # which rows went through the model, in batch order


def step_streams(
    model: SeedVC,
    streams: Sequence[Stream],
    blocks_16k: Sequence[Tensor],
    steps: int | None = None,
    skip: Sequence[bool] | None = None,
    shape: BatchShape | None = None,
    stages: ModelStages | None = None,
) -> StepOutput:
    """Feed each stream its next input block and compute all their output blocks in one batched pass.

    `steps` overrides the streams' diffusion steps for this block (deadline control). A `skip` row does not run the
    model and outputs silence, yet its window still advances and its generator still draws the block's numbers, so
    the stream stays in step; the crossfade tail it leaves is silence.
    `shape` and `stages` are convert_block's: a static padded shape, and how the heavy stages run.
    """
    geometry = streams[0].geometry
    default_steps = streams[0].settings.diffusion_steps
    for stream in streams:
        assert stream.geometry == geometry and stream.settings.diffusion_steps == default_steps, (
            "streams batched together must share block geometry and diffusion steps"
        )
    for stream, block in zip(streams, blocks_16k, strict=True):
        stream.push(block)
    rows = [stream.next_row(model) for stream in streams]
    converted = tuple(index for index in range(len(streams)) if not (skip and skip[index]))
    audio = torch.zeros(len(streams), geometry.block)
    for stream in streams:
        stream.blocks_done += 1
    if not converted:
        for stream in streams:
            stream.tail = torch.zeros_like(stream.tail)
        return StepOutput(audio=audio, batch=None, converted=())
    device = model.device
    active = [streams[index] for index in converted]
    batch = convert_block(
        model,
        geometry,
        torch.stack([stream.window for stream in active]).to(device),
        torch.stack([stream.tail for stream in active]),
        [rows[index] for index in converted],
        default_steps if steps is None else steps,
        fade_in_window(geometry.sola_buffer, device),
        shape,
        stages,
    )
    audio[list(converted)] = batch.sola.output.cpu()
    silent = set(range(len(streams))) - set(converted)
    for index in silent:
        streams[index].tail = torch.zeros_like(streams[index].tail)
    for position, stream in enumerate(active):
        stream.tail = batch.sola.tails[position].clone()  # not a view: it would pin the whole batch tensor
    return StepOutput(audio=audio, batch=batch, converted=converted)
