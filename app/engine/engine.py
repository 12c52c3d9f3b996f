"""The multi-session engine: many streams, one batched forward per block shape.

Sessions open with a voice, settings and a seed; each step takes the next input block of any set of sessions and
returns their output blocks. Sessions whose block settings agree (same geometry and diffusion steps) run in ONE
batched pass; other settings form their own groups. A session's output never depends on who shares its batch: every
row keeps its own generator, window, tail and prompt length (rows are padded and masked, never mixed).

Not thread-safe: its owner serialises calls (the Serve replica runs every engine call on one worker thread).
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from app.engine.deadline import DeadlinePolicy, StepCostModel
from app.engine.silence import SilenceGate
from app.model.seedvc import SeedVC
from app.streaming.settings import StreamSettings
from app.streaming.stream import Stream, StreamState, step_streams
from app.streaming.voice import Voice


class SessionError(KeyError):
    """A request names a session this engine does not hold (closed, never opened, or opened elsewhere)."""


@dataclass
class Session:
    stream: Stream
    gate: SilenceGate | None
    blocks_silent: int = 0

    @property
    def shape(self) -> Hashable:
        """What must agree for sessions to share a batched pass."""
        return (self.stream.geometry, self.stream.settings.diffusion_steps)


@dataclass(frozen=True)
class BlockRequest:
    session_id: str
    block_16k: Tensor  # (block_16k,) the next input block


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


@dataclass(frozen=True)
class StepReport:
    results: list[BlockResult]
    seconds: float  # wall time of the whole step
    stage_seconds: dict[str, float]  # summed over the step's groups
    group_sizes: list[int]  # rows per batched pass
    budget_seconds: float | None


@dataclass
class Engine:
    model: SeedVC
    deadline: DeadlinePolicy = field(default_factory=DeadlinePolicy)
    _sessions: dict[str, Session] = field(default_factory=dict)
    _costs: StepCostModel = field(init=False)

    def __post_init__(self) -> None:
        self._costs = StepCostModel(self.deadline)

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
        if session_id in self._sessions:
            raise ValueError(f"session {session_id} is already open")
        session = Session(stream=Stream(self.model, voice, settings, seed), gate=gate)
        if resume is not None:
            session.stream.restore(resume)
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

    def step(self, requests: Sequence[BlockRequest], budget_seconds: float | None = None) -> StepReport:
        """Advance each requested session by one block (at most one request per session)."""
        started = time.perf_counter()
        ids = [request.session_id for request in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("a step takes at most one block per session")
        groups: dict[Hashable, list[tuple[Session, BlockRequest]]] = {}
        for request in requests:
            session = self.session(request.session_id)
            groups.setdefault(session.shape, []).append((session, request))
        plan = [(shape, len(members), shape[1]) for shape, members in groups.items()]
        chosen_steps = self._costs.choose_steps(plan, budget_seconds)
        results: list[BlockResult] = []
        stage_seconds: dict[str, float] = {}
        for (shape, members), steps in zip(groups.items(), chosen_steps, strict=True):
            results += self._step_group(shape, members, steps, stage_seconds)
        order = {session_id: position for position, session_id in enumerate(ids)}
        results.sort(key=lambda result: order[result.session_id])
        return StepReport(
            results=results,
            seconds=time.perf_counter() - started,
            stage_seconds=stage_seconds,
            group_sizes=[len(members) for members in groups.values()],
            budget_seconds=budget_seconds,
        )

    def _step_group(
        self,
        shape: Hashable,
        members: list[tuple[Session, BlockRequest]],
        steps: int,
        stage_seconds: dict[str, float],
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
        output = step_streams(self.model, streams, [request.block_16k for _, request in members], steps, skip)
        if output.batch is not None:
            self._costs.observe(shape, len(output.converted), steps, output.batch.stage_seconds)
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
