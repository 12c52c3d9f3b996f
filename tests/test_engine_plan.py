"""The engine's decisions as data (StepPlan), tested against a fake runner in milliseconds: static-shape buckets,
out-of-memory splitting and per-row refusal. The same paths run with the real model in tests/test_engine.py
(bucketed independence) and below (a memory fault injected into real passes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import Tensor

from app.audio.files import Audio
from app.engine.engine import BlockRequest, Engine, ModelRunner
from app.engine.plan import BatchShape, ShapeBuckets
from app.model.seedvc import SeedVC
from app.streaming.settings import StreamSettings
from app.streaming.stream import StepOutput, Stream
from app.streaming.voice import Voice, prepare_voice

SETTINGS = StreamSettings(diffusion_steps=2)


@pytest.fixture(scope="module")
def voice(model: SeedVC) -> Voice:
    rate = model.sample_rate
    t = np.arange(int(1.5 * rate), dtype=np.float32) / rate
    return prepare_voice(model, Audio((0.1 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), rate), 3.0)


@dataclass
class FakeRunner:
    """Stands in for the model: advances the streams like a real pass and returns each row's block index as audio.

    `fits` is the most rows a pass may have before it raises out-of-memory (after the streams advanced, as a real
    pass that fails in the vocoder would); `never_fits` names sessions whose block never fits.
    """

    fits: int = 1000
    never_fits: set[int] = field(default_factory=set)  # stream seeds
    passes: list[tuple[int, BatchShape | None]] = field(default_factory=list)

    def __call__(
        self,
        streams: Sequence[Stream],
        blocks_16k: Sequence[Tensor],
        steps: int,
        skip: Sequence[bool],
        shape: BatchShape | None,
    ) -> StepOutput:
        for stream, block in zip(streams, blocks_16k, strict=True):
            stream.push(block)
            stream.blocks_done += 1
        if len(streams) > self.fits or any(stream.seed in self.never_fits for stream in streams):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        self.passes.append((len(streams), shape))
        audio = torch.stack([torch.full((4,), float(stream.blocks_done)) for stream in streams])
        return StepOutput(audio=audio, batch=None, converted=())


def open_sessions(engine: Engine, voice: Voice, count: int) -> list[str]:
    ids = [f"s{number}" for number in range(count)]
    for number, session_id in enumerate(ids):
        engine.open(session_id, voice, SETTINGS, seed=number)
    return ids


def step_all(engine: Engine, ids: list[str]):
    block = torch.zeros(engine.session(ids[0]).stream.geometry.block_16k)
    return engine.step([BlockRequest(session_id, block) for session_id in ids])


def test_buckets_are_powers_of_two_up_to_the_maximum() -> None:
    assert ShapeBuckets.up_to(16).batch_sizes == (1, 2, 4, 8, 16)
    assert ShapeBuckets.up_to(12).batch_sizes == (1, 2, 4, 8, 12)
    assert ShapeBuckets.up_to(1).batch_sizes == (1,)
    buckets = ShapeBuckets((1, 2, 4), prompt_step=32)
    assert buckets.shape_for(3, 173) == BatchShape(4, 192)
    assert buckets.shape_for(5, 32) == BatchShape(5, 32)  # beyond the largest bucket: its own size
    assert buckets.prompt_buckets(258) == [32, 64, 96, 128, 160, 192, 224, 256, 288]
    with pytest.raises(ValueError):
        ShapeBuckets((4, 2))


def test_a_step_plans_its_padded_shape(model: SeedVC, voice: Voice) -> None:
    runner = FakeRunner()
    engine = Engine(model, buckets=ShapeBuckets((1, 2, 4, 8)), runner=runner)
    ids = open_sessions(engine, voice, 3)
    report = step_all(engine, ids)
    (group,) = report.plan.groups
    assert group.session_ids == tuple(ids)
    assert group.steps == SETTINGS.diffusion_steps
    assert group.shape == BatchShape(4, ShapeBuckets((1,)).prompt_frames_for(voice.prompt_frames))
    assert runner.passes == [(3, group.shape)]
    assert report.plan.memory_splits == 0 and report.plan.refused == ()


def test_out_of_memory_splits_the_pass_and_every_block_is_converted_once(model: SeedVC, voice: Voice) -> None:
    runner = FakeRunner(fits=2)
    engine = Engine(model, runner=runner)
    ids = open_sessions(engine, voice, 5)
    report = step_all(engine, ids)
    assert report.plan.memory_splits == 2  # 5 -> 2 + 3, then 3 -> 1 + 2
    assert sorted(size for size, _ in runner.passes) == [1, 2, 2]
    assert [result.session_id for result in report.results] == ids
    assert not any(result.refused for result in report.results)
    # Each stream advanced exactly once, although the failed passes had advanced it before failing.
    assert all(engine.session(session_id).stream.blocks_done == 1 for session_id in ids)
    assert all(float(result.audio[0]) == 1.0 for result in report.results)


def test_a_block_that_never_fits_is_refused_alone(model: SeedVC, voice: Voice) -> None:
    engine = Engine(model, runner=FakeRunner(never_fits={2}))
    ids = open_sessions(engine, voice, 4)
    report = step_all(engine, ids)
    assert report.plan.refused == ("s2",)
    refused = {result.session_id for result in report.results if result.refused}
    assert refused == {"s2"}
    assert engine.session("s2").stream.blocks_done == 0  # its state is as before: it can try again
    assert all(engine.session(session_id).stream.blocks_done == 1 for session_id in ids if session_id != "s2")


def test_memory_fault_in_real_passes_gives_the_unfaulted_output(model: SeedVC, voice: Voice) -> None:
    """The real model, with a fault injected after each oversized pass has advanced its streams."""
    real = ModelRunner(model)

    def faulty(streams, blocks, steps, skip, shape):
        output = real(streams, blocks, steps, skip, shape)
        if len(streams) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected after the pass)")
        return output

    expected, faulted = Engine(model), Engine(model, runner=faulty)
    ids = open_sessions(expected, voice, 4)
    open_sessions(faulted, voice, 4)
    source = torch.Generator().manual_seed(5)
    geometry = expected.session(ids[0]).stream.geometry
    for _ in range(3):
        blocks = [0.1 * torch.randn(geometry.block_16k, generator=source) for _ in ids]
        want = expected.step([BlockRequest(s, b) for s, b in zip(ids, blocks, strict=True)])
        got = faulted.step([BlockRequest(s, b) for s, b in zip(ids, blocks, strict=True)])
        assert got.plan.memory_splits == 1
        for mine, theirs in zip(got.results, want.results, strict=True):
            # Split passes are batched differently (2 + 2 rows, not 4): same numbers up to summation order.
            assert (mine.audio - theirs.audio).abs().max() <= 1e-4
