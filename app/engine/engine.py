"""The multi-session engine: many streams, one batched forward per block shape.

Sessions open with a voice, settings and a seed; each step takes the next input block of any set of sessions and
returns their output blocks. Sessions whose block settings agree (same geometry and diffusion steps) run in ONE
batched pass; other settings form their own groups. A session's output never depends on who shares its batch: every
row keeps its own generator, window, tail and prompt length (rows are padded and masked, never mixed).

Not thread-safe: its owner serialises calls (the Serve replica runs every engine call on one worker thread).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch
from torch import Tensor

from app.engine.deadline import DeadlinePolicy, GroupCost, StepCostModel
from app.engine.graphs import ModelGraphs
from app.engine.plan import BatchShape, GroupPlan, ShapeBuckets, StepPlan
from app.engine.silence import SilenceGate
from app.model.seedvc import SeedVC
from app.streaming.blocks import ModelStages, flow_batch, stack_noise
from app.streaming.settings import StreamGeometry, StreamSettings
from app.streaming.stream import StepOutput, Stream, StreamState, step_streams
from app.streaming.voice import Voice

log = logging.getLogger(__name__)


class GroupRunner(Protocol):
    """Runs one batched pass for a group of streams (app/streaming/stream.py: step_streams is the real one).

    The engine's scheduling, bucketing and memory splitting talk to the model only through this, so tests can
    exercise them against a fake runner in milliseconds.
    """

    def __call__(
        self,
        streams: Sequence[Stream],
        blocks_16k: Sequence[Tensor],
        steps: int,
        skip: Sequence[bool],
        shape: BatchShape | None,
    ) -> StepOutput: ...


@dataclass(frozen=True)
class ModelRunner:
    model: SeedVC
    stages: ModelStages | None = None

    def __call__(
        self,
        streams: Sequence[Stream],
        blocks_16k: Sequence[Tensor],
        steps: int,
        skip: Sequence[bool],
        shape: BatchShape | None,
    ) -> StepOutput:
        return step_streams(self.model, streams, blocks_16k, steps, skip, shape, self.stages)


class SessionError(KeyError):
    """A request names a session this engine does not hold (closed, never opened, or opened elsewhere)."""


@dataclass
class Session:
    stream: Stream
    gate: SilenceGate | None
    blocks_silent: int = 0

    @property
    def shape(self) -> tuple[StreamGeometry, int]:
        """What must agree for sessions to share a batched pass: the block geometry and the diffusion steps."""
        return (self.stream.geometry, self.stream.settings.diffusion_steps)


S = TypeVar("S", bound=Session)


@dataclass(frozen=True)
class BlockRequest:
    session_id: str
    block_16k: Tensor  # (block_16k,) the next input block
    max_steps: int | None = None  # at most this many diffusion steps (a session that moved here starts at its own)


@dataclass(frozen=True)
class RowDetail:
    """Intermediate results of a converted block (views of tensors the step computed anyway)."""

    mel: Tensor  # (n_mels, N) CFM output
    wave: Tensor  # (L,) vocoder output
    sola_scores: Tensor  # (search + 1,)
    sola_offset: int


@dataclass(frozen=True)
class BlockResult:
    session_id: str
    audio: Tensor  # (block,) at the model rate, CPU
    block_index: int  # 0 for the session's first block
    steps_used: int  # diffusion steps spent (0 for a skipped silent block)
    silent: bool  # the gate skipped the model
    detail: RowDetail | None  # None for a skipped block
    refused: bool = False  # the block did not fit in device memory even alone: not converted, state unchanged


@dataclass(frozen=True)
class StepReport:
    results: list[BlockResult]
    seconds: float  # wall time of the whole step
    stage_seconds: dict[str, float]  # summed over the step's groups
    group_sizes: list[int]  # rows per batched pass
    budget_seconds: float | None
    plan: StepPlan


@dataclass(frozen=True)
class WarmUpReport:
    seconds: float
    shapes: tuple[BatchShape, ...]  # warmed shapes (captured as CUDA graphs on a GPU)
    graphs: int  # graphs captured
    failures: tuple[str, ...]  # captures that failed: those stages run eagerly at that shape


@dataclass
class Engine:
    """`buckets` pads every batched pass to static shapes (GPU); `warm_up` captures them as CUDA graphs on CUDA.

    `runner` is the batched pass itself (default: the model's); tests give a fake one. `costs` is the deadline's cost
    model (default: its own), which engines of one model on one device may share.
    """

    model: SeedVC
    deadline: DeadlinePolicy = field(default_factory=DeadlinePolicy)
    buckets: ShapeBuckets | None = None
    runner: GroupRunner | None = None
    costs: StepCostModel | None = None
    _sessions: dict[str, Session] = field(default_factory=dict)
    _graphs: ModelGraphs | None = field(default=None, init=False)
    # Passes that ran a shape with no captured graph (or no bucket at all) on a GPU engine: should stay 0.
    eager_passes: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.costs is None:
            self.costs = StepCostModel(self.deadline)
        if self.runner is None:
            self.runner = ModelRunner(self.model)

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def open(
        self,
        session_id: str,
        voice: Voice,
        settings: StreamSettings,
        seed: int,
        gate: SilenceGate | None = None,
        resume: StreamState | None = None,
    ) -> Session:
        """Open a session; with `resume` it continues exactly where a stream elsewhere left off."""
        return self.add(session_id, Session(stream=self.new_stream(voice, settings, seed, resume), gate=gate))

    def new_stream(
        self, voice: Voice, settings: StreamSettings, seed: int, resume: StreamState | None = None
    ) -> Stream:
        """A stream of this engine's model, not yet a session; with `resume` it continues a stream from elsewhere."""
        stream = Stream(self.model, voice, settings, seed)
        if resume is not None:
            stream.restore(resume)
        return stream

    def add(self, session_id: str, session: S) -> S:
        """Register a session built by the caller (a converter's sessions carry its own bookkeeping too)."""
        if session_id in self._sessions:
            raise ValueError(f"session {session_id} is already open")
        self._sessions[session_id] = session
        return session

    def close(self, session_id: str) -> None:
        """Frees the session's state; closing an unknown session is a no-op (closes may race with losses)."""
        self._sessions.pop(session_id, None)

    def session(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise SessionError(session_id) from None

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def items(self) -> list[tuple[str, Session]]:
        """The open sessions (a copy: closing while iterating is safe)."""
        return list(self._sessions.items())

    # -- warm-up -----------------------------------------------------------------------------------------------

    def warm_up(
        self,
        voice: Voice,
        settings: StreamSettings,
        capture: bool | None = None,
        batch_sizes: Sequence[int] | None = None,
        prompt_frames: Sequence[int] | None = None,
    ) -> WarmUpReport:
        """Run every bucketed shape of `settings` once, before traffic: one step per batch bucket and prompt bucket
        (prompts up to `settings.max_prompt`), capturing CUDA graphs when `capture` (default: on CUDA).
        `batch_sizes` / `prompt_frames` narrow it to the buckets of these sizes (benchmarks warm one shape).

        Each shape's first run also seeds the deadline's cost model, so the first real step of a shape is predicted.
        """
        started = time.perf_counter()
        capture = self.model.device.type == "cuda" if capture is None else capture
        if self.buckets is None:
            raise ValueError("warm_up needs shape buckets: without them every batch has its own shape")
        if capture and self._graphs is None:
            self._graphs = ModelGraphs(self.model)
            self.runner = ModelRunner(self.model, self._graphs)
        max_prompt = self.model.mel.frames(int(self.model.sample_rate * settings.max_prompt))
        shapes: list[BatchShape] = []
        failures: list[str] = []
        buckets = self.buckets
        all_rows = sorted({buckets.shape_for(size, 1).rows for size in batch_sizes or buckets.batch_sizes})
        all_prompts = sorted({buckets.prompt_frames_for(frames) for frames in prompt_frames or []})
        for rows in all_rows:
            for prompt in all_prompts or buckets.prompt_buckets(max_prompt):
                shape = BatchShape(rows, prompt)
                if self._graphs is not None:
                    failures += self._capture(shape, voice, settings)
                self._time_shape(shape, voice, settings)
                shapes.append(shape)
        graphs = sum(len(cache) for cache in self._graphs.caches) if self._graphs is not None else 0
        self.eager_passes = 0
        return WarmUpReport(time.perf_counter() - started, tuple(shapes), graphs, tuple(failures))

    def _capture(self, shape: BatchShape, voice: Voice, settings: StreamSettings) -> list[str]:
        assert self._graphs is not None
        stream = Stream(self.model, voice, settings, seed=0)
        geometry, device = stream.geometry, self.model.device
        rows = [stream.next_row(self.model)] * shape.rows
        windows = torch.zeros(shape.rows, geometry.window_16k, device=device)
        with torch.inference_mode():
            condition = torch.zeros(shape.rows, geometry.mel_frames, self.model.config.dit.content_dim, device=device)
            flow = flow_batch(condition, rows, device, shape.prompt_frames)
            mel = torch.zeros(shape.rows, self.model.config.mel.n_mels, geometry.mel_frames, device=device)
            noise = stack_noise(rows, device)
            return self._graphs.capture(windows, flow, mel, noise)

    def _time_shape(self, shape: BatchShape, voice: Voice, settings: StreamSettings) -> None:
        """One pass at `shape` with throw-away streams, observed by the cost model."""
        streams = [Stream(self.model, voice, settings, seed=row) for row in range(shape.rows)]
        geometry = streams[0].geometry
        blocks = [torch.zeros(geometry.block_16k)] * shape.rows
        assert self.runner is not None
        output = self.runner(streams, blocks, settings.diffusion_steps, [False] * shape.rows, shape)
        if output.batch is not None:
            assert self.costs is not None
            stages = output.batch.stage_seconds
            self.costs.observe(geometry, shape.rows, settings.diffusion_steps, stages, work=geometry.mel_frames)

    # -- steps -------------------------------------------------------------------------------------------------

    def step(self, requests: Sequence[BlockRequest], budget_seconds: float | None = None) -> StepReport:
        """Advance each requested session by one block (at most one request per session)."""
        started = time.perf_counter()
        ids = [request.session_id for request in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("a step takes at most one block per session")
        groups: dict[tuple[StreamGeometry, int], list[tuple[Session, BlockRequest]]] = {}
        for request in requests:
            session = self.session(request.session_id)
            groups.setdefault(session.shape, []).append((session, request))
        plan = [
            GroupCost(geometry, len(members), steps, work=geometry.mel_frames)
            for (geometry, steps), members in groups.items()
        ]
        assert self.costs is not None
        chosen_steps = self.costs.choose_steps(plan, budget_seconds)
        results: list[BlockResult] = []
        stage_seconds: dict[str, float] = {}
        passes: list[GroupPlan] = []
        splits = [0]
        for (shape, members), chosen in zip(groups.items(), chosen_steps, strict=True):
            for steps, capped in _by_steps(members, chosen).items():
                results += self._run_fitting(shape, capped, steps, stage_seconds, passes, splits)
        order = {session_id: position for position, session_id in enumerate(ids)}
        results.sort(key=lambda result: order[result.session_id])
        return StepReport(
            results=results,
            seconds=time.perf_counter() - started,
            stage_seconds=stage_seconds,
            group_sizes=[len(members) for members in groups.values()],
            budget_seconds=budget_seconds,
            plan=StepPlan(
                groups=tuple(passes),
                budget_seconds=budget_seconds,
                memory_splits=splits[0],
                refused=tuple(result.session_id for result in results if result.refused),
            ),
        )

    def _run_fitting(
        self,
        shape: Hashable,
        members: list[tuple[Session, BlockRequest]],
        steps: int,
        stage_seconds: dict[str, float],
        passes: list[GroupPlan],
        splits: list[int],
    ) -> list[BlockResult]:
        """Run a group; if the device runs out of memory, undo, split it in two and run the halves. A single
        block that cannot fit is refused alone: the batch it came in is never failed for it."""
        saved = [session.stream.snapshot() for session, _ in members]
        try:
            return self._step_group(shape, members, steps, stage_seconds, passes)
        except torch.OutOfMemoryError:
            for (session, _), state in zip(members, saved, strict=True):
                session.stream.restore(state)
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(members) == 1:
                log.warning("session %s: a block does not fit in device memory even alone", members[0][1].session_id)
                return [_refused(members[0][1], members[0][0].stream.blocks_done)]
            splits[0] += 1
            half = len(members) // 2
            log.warning("out of device memory at %d rows: split into %d + %d", len(members), half, len(members) - half)
            return self._run_fitting(shape, members[:half], steps, stage_seconds, passes, splits) + self._run_fitting(
                shape, members[half:], steps, stage_seconds, passes, splits
            )

    def _batch_shape(self, streams: Sequence[Stream]) -> BatchShape | None:
        if self.buckets is None:
            return None
        return self.buckets.shape_for(len(streams), max(stream.voice.prompt_frames for stream in streams))

    def _step_group(
        self,
        shape: Hashable,
        members: list[tuple[Session, BlockRequest]],
        steps: int,
        stage_seconds: dict[str, float],
        passes: list[GroupPlan],
    ) -> list[BlockResult]:
        streams = [session.stream for session, _ in members]
        block_indices = [stream.blocks_done for stream in streams]
        output_region = streams[0].geometry.output_region_16k
        # Gate on the window as it will be once this block has arrived.
        skip = [
            session.gate is not None
            and session.gate.is_silent(session.stream.window_with(request.block_16k), output_region)
            for session, request in members
        ]
        converted_count = len(members) - sum(skip)
        batch_shape = self._batch_shape([s for s, silent in zip(streams, skip, strict=True) if not silent] or streams)
        if batch_shape is not None:
            batch_shape = BatchShape(max(batch_shape.rows, converted_count), batch_shape.prompt_frames)
        eager_before = self._graphs.eager_calls if self._graphs is not None else 0
        assert self.runner is not None
        output = self.runner(streams, [request.block_16k for _, request in members], steps, skip, batch_shape)
        eager = self._graphs is None or self._graphs.eager_calls > eager_before
        if self.model.device.type == "cuda" and eager and output.batch is not None:
            self.eager_passes += 1
        passes.append(
            GroupPlan(tuple(request.session_id for _, request in members), steps, batch_shape, warmed=not eager)
        )
        if output.batch is not None:
            assert self.costs is not None
            geometry = streams[0].geometry
            rows = len(output.converted)
            self.costs.observe(geometry, rows, steps, output.batch.stage_seconds, work=geometry.mel_frames)
            for stage, seconds in output.batch.stage_seconds.items():
                stage_seconds[stage] = stage_seconds.get(stage, 0.0) + seconds
        details: dict[int, RowDetail] = {}
        if output.batch is not None:
            batch = output.batch
            for row, position in enumerate(output.converted):
                details[position] = RowDetail(
                    mel=batch.mel[row],
                    wave=batch.wave[row],
                    sola_scores=batch.sola.scores[row],
                    sola_offset=int(batch.sola.offsets[row]),
                )
        results = []
        for position, ((session, request), index) in enumerate(zip(members, block_indices, strict=True)):
            silent = skip[position]
            session.blocks_silent += silent
            results.append(
                BlockResult(
                    session_id=request.session_id,
                    audio=output.audio[position],
                    block_index=index,
                    steps_used=0 if silent else steps,
                    silent=silent,
                    detail=details.get(position),
                )
            )
        return results


def _by_steps(members: list[tuple[Session, BlockRequest]], steps: int) -> dict[int, list[tuple[Session, BlockRequest]]]:
    """A group's rows by the steps each may spend (`steps`, or less for a capped request): one pass per count."""
    parts: dict[int, list[tuple[Session, BlockRequest]]] = {}
    for session, request in members:
        capped = steps if request.max_steps is None else max(1, min(steps, request.max_steps))
        parts.setdefault(capped, []).append((session, request))
    return parts


def _refused(request: BlockRequest, next_index: int) -> BlockResult:
    return BlockResult(
        session_id=request.session_id,
        audio=torch.zeros(0),
        block_index=next_index,
        steps_used=0,
        silent=False,
        detail=None,
        refused=True,
    )
