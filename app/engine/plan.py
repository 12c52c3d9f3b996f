"""What a step decided, as data: its groups, the static shape each ran at, steps, budget, memory splits.

Static shapes: on a GPU, every batched pass is padded to one of a few warmed shapes, so that CUDA graphs captured
at warm-up replay it (app/engine/graphs.py). Rows are padded up to the next batch bucket (padding rows are inert:
zero windows, their outputs are dropped) and prompts up to the next multiple of `prompt_step` frames (right padding
the DiT already masks). A group larger than the largest bucket runs at its own size, eagerly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchShape:
    """The shape a batched pass runs at: rows and prompt frames after padding."""

    rows: int
    prompt_frames: int


@dataclass(frozen=True)
class ShapeBuckets:
    batch_sizes: tuple[int, ...]  # ascending
    prompt_step: int = 32  # ~0.37 s of prompt at 22.05 kHz / hop 256

    def __post_init__(self) -> None:
        if not self.batch_sizes or list(self.batch_sizes) != sorted(set(self.batch_sizes)) or self.batch_sizes[0] < 1:
            raise ValueError(f"batch buckets must be distinct positive sizes in ascending order: {self.batch_sizes}")
        if self.prompt_step < 1:
            raise ValueError("prompt_step must be at least 1 frame")

    @classmethod
    def up_to(cls, max_batch: int, prompt_step: int = 32) -> ShapeBuckets:
        """Powers of two below `max_batch`, and `max_batch` itself."""
        sizes = [2**i for i in range(max(1, math.ceil(math.log2(max_batch)))) if 2**i < max_batch]
        return cls(tuple([*sizes, max_batch]), prompt_step)

    def shape_for(self, rows: int, prompt_frames: int) -> BatchShape:
        padded_rows = next((size for size in self.batch_sizes if size >= rows), rows)
        return BatchShape(padded_rows, self.prompt_frames_for(prompt_frames))

    def prompt_frames_for(self, frames: int) -> int:
        return -(-frames // self.prompt_step) * self.prompt_step

    def prompt_buckets(self, max_prompt_frames: int) -> list[int]:
        """Every padded prompt length a prompt of at most `max_prompt_frames` frames can have."""
        return list(range(self.prompt_step, self.prompt_frames_for(max_prompt_frames) + 1, self.prompt_step))


@dataclass(frozen=True)
class GroupPlan:
    """One batched pass of a step."""

    session_ids: tuple[str, ...]  # the rows that went through the model (silent rows included)
    steps: int  # diffusion steps spent
    shape: BatchShape | None  # the padded shape; None: unpadded (CPU)
    warmed: bool  # every stage replayed a warmed (captured) shape; False: some ran eagerly


@dataclass(frozen=True)
class StepPlan:
    groups: tuple[GroupPlan, ...]
    budget_seconds: float | None
    memory_splits: int  # times a pass ran out of device memory and was split in two
    refused: tuple[str, ...]  # sessions whose block could not fit in device memory even alone
