"""The converter service: one model, many live sessions, one batched engine step for the blocks that are waiting.

A plain class (no Ray): `deployments/converter.py` wraps it in a Serve deployment and feeds `convert_blocks` through
`@serve.batch`. Every engine call runs on ONE worker thread, so the event loop stays free for health checks and
routing-stats polls while a step computes, and the engine is never entered twice at once.

Each block's reply carries the session's small resumable state (generator state, crossfade tail, block count).
The transport keeps its own copy of the input window, so if this replica disappears the session re-opens on another
one with `resume` and continues exactly.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

import numpy as np
import torch

from app.audio.files import Audio, resample
from app.engine.deadline import DeadlinePolicy
from app.engine.engine import BlockRequest, Engine, WarmUpReport
from app.engine.plan import ShapeBuckets, StepPlan
from app.engine.silence import SilenceGate
from app.model.seedvc import SeedVC
from app.offload import Offload
from app.serving.config import ConverterConfig
from app.serving.metrics import Metrics, NoMetrics
from app.serving.registry import ServedSession, SessionRegistry
from app.serving.wire import (
    AttachReply,
    BlockIn,
    BlockOut,
    CapacityExceeded,
    ConverterError,
    OpenReply,
    OpenRequest,
    ResumeState,
    SessionLost,
    SessionTakenOver,
    UnknownVoice,
)
from app.streaming.settings import CONTENT_RATE, StreamSettings
from app.streaming.voice import Voice, VoiceCache
from app.voices.references import ReferenceCache
from app.voices.store import VoiceNotFound, VoiceStore

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class SpeedCheck:
    """How long this replica takes for one block of one stream at the default settings, measured at start-up."""

    block_seconds: float
    step_seconds: float

    @property
    def real_time_factor(self) -> float:
        return self.step_seconds / self.block_seconds

    @property
    def real_time(self) -> bool:
        return self.real_time_factor < 1.0


def engine_thread(threads: int | None) -> ThreadPoolExecutor:
    """The one worker thread every engine call runs on, computing with `threads` torch threads (None: torch's default).

    Setting them on the calling thread is not enough: OpenMP starts each new thread with the count of the
    OMP_NUM_THREADS environment variable, which Ray sets to a replica's num_cpus (1 in serve_config.yaml), so the
    engine thread computed on one core whatever `torch_threads` said (CPU steps 1.6x slower on 2 cores).
    """
    if threads:
        torch.set_num_threads(threads)
    return ThreadPoolExecutor(
        max_workers=1,
        thread_name_prefix="engine",
        initializer=torch.set_num_threads,
        initargs=(torch.get_num_threads(),),
    )


class ConverterService:
    """`clock` (monotonic seconds) times idle sessions: tests move it instead of waiting. `close()` when done."""

    def __init__(
        self,
        config: ConverterConfig,
        model: SeedVC | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.metrics = metrics or NoMetrics()
        self.clock = clock
        self._executor = engine_thread(config.torch_threads)
        loading = time.perf_counter()
        self.model = (
            model if model is not None else SeedVC.load(config.model, config.resolved_device(), config.precision)
        )
        self.metrics.record("seedvc_model_load_seconds", time.perf_counter() - loading)
        # On a GPU every pass runs at a warmed static shape (CUDA graphs); on a CPU padding would only cost.
        on_gpu = self.model.device.type == "cuda"
        buckets = ShapeBuckets.up_to(config.max_sessions) if on_gpu else None
        self.engine = Engine(self.model, DeadlinePolicy(min_steps=config.deadline_min_steps), buckets=buckets)
        self.voices = VoiceCache(self.model, capacity=config.voice_cache_size)
        self.store = VoiceStore(config.voice_store)
        # Recordings by voice id, read and decoded once off the event loop (a read here would stall the batch).
        self.references = ReferenceCache(self.store, Offload("references", workers=2, max_waiting=config.max_sessions))
        self._gate = SilenceGate(config.silence_gate_dbfs) if config.silence_gate_dbfs is not None else None
        self.sessions = SessionRegistry(self.engine, capacity=config.max_sessions)
        self._leases = itertools.count(1)
        self._purger: asyncio.Task[None] | None = None
        # Set after each periodic purge of deleted voices (what a test waits on instead of wall time).
        self.purged = asyncio.Event()
        self.batch_sizes: Counter[int] = Counter()
        self.blocks_converted = 0
        self.failed_steps_in_a_row = 0  # device or model errors since the last good step (health)
        self.warm_up = self._warm_up() if buckets is not None else None
        self.default_settings = config.default_settings(self.model.device)
        self._announce_default_settings()
        self.speed = self._check_speed()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def _announce_default_settings(self) -> None:
        if self.default_settings == StreamSettings():
            return
        changed = ", ".join(
            f"{name} {value} (README {getattr(StreamSettings(), name)})"
            for name, value in asdict(self.default_settings).items()
            if value != getattr(StreamSettings(), name)
        )
        log.warning(
            "no GPU: serving the CPU real-time profile to clients that send no settings: %s; settings a client sends "
            "are kept. For the README settings on this %s too, set converter.cpu_settings: null (serve_config.yaml)",
            changed, self.model.device,
        )  # fmt: skip

    def _speed_check_voice(self, max_prompt: float = StreamSettings().max_prompt) -> Voice:
        """A synthetic 2 s voice: the speed check and the warm-up need one before any real voice exists."""
        rate = self.model.sample_rate
        t = np.arange(int(2.0 * rate), dtype=np.float32) / rate
        reference = Audio(samples=(0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate=rate)
        return self.voices.get(reference, max_prompt)

    def _warm_up(self) -> WarmUpReport:
        """Run (and on CUDA capture) every static shape of the default settings before serving any session."""
        report = self.engine.warm_up(self._speed_check_voice(), StreamSettings())
        self.metrics.record("seedvc_warm_up_seconds", report.seconds)
        log.info(
            "warm-up: %d shapes (batch buckets %s) in %.1f s, %d CUDA graphs captured",
            len(report.shapes), self.engine.buckets.batch_sizes if self.engine.buckets else (), report.seconds,
            report.graphs,
        )  # fmt: skip
        for failure in report.failures:
            log.warning("warm-up: runs eagerly: %s", failure)
        return report

    @property
    def healthy(self) -> bool:
        """False once steps keep failing on the device: Serve's health check then replaces the replica."""
        return self.failed_steps_in_a_row < self.config.unhealthy_after_failed_steps

    def _check_speed(self) -> SpeedCheck:
        """Convert a few blocks of a synthetic stream at the default settings and say plainly when this machine is
        too slow for real time."""
        settings = self.default_settings
        # Its cost model is the serving engine's: the first served step of any settings is then projected from this.
        engine = Engine(self.model, buckets=self.engine.buckets, runner=self.engine.runner, costs=self.engine.costs)
        engine.open("speed-check", self._speed_check_voice(settings.max_prompt), settings, seed=0)
        block = torch.zeros(engine.session("speed-check").stream.geometry.block_16k)
        engine.step([BlockRequest("speed-check", block)])  # warm-up: first calls allocate and pick kernels
        report = engine.step([BlockRequest("speed-check", block)])
        check = SpeedCheck(block_seconds=settings.block_time, step_seconds=report.seconds)
        if check.real_time:
            log.info("speed check: one %.2f s block takes %.3f s here (real-time factor %.2f)",
                     check.block_seconds, check.step_seconds, check.real_time_factor)  # fmt: skip
        else:
            log.warning(
                "TOO SLOW FOR REAL TIME: one %.2f s block takes %.2f s on %s (real-time factor %.1f). Live streams "
                "will fall behind and drop audio; run converters on a GPU (see README, 'Running on GPUs').",
                check.block_seconds, check.step_seconds, self.model.device, check.real_time_factor,
            )  # fmt: skip
        return check

    async def _on_engine_thread(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self) -> None:
        """Stop the voice purger and the engine thread (after the call it is running, if any)."""
        if self._purger is not None:
            self._purger.cancel()
            self._purger = None
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- sessions ----------------------------------------------------------------------------------------------

    async def open(self, request: OpenRequest) -> OpenReply:
        self._keep_purging_deleted_voices()
        settings = self._settings_of(request)
        try:
            reference = await self.references.audio(request.voice_id)
        except VoiceNotFound as error:
            raise UnknownVoice(f"unknown voice {request.voice_id}") from error
        return await self._on_engine_thread(lambda: self._open(request, reference, settings))

    def _settings_of(self, request: OpenRequest) -> StreamSettings:
        """Exact settings as they are; a client's request over this replica's defaults (SettingsError: contradicts)."""
        if isinstance(request.settings, StreamSettings):
            return request.settings
        return replace(self.default_settings, **request.settings.model_dump(exclude_none=True))

    def _open(self, request: OpenRequest, reference: Audio, settings: StreamSettings) -> OpenReply:
        """Admission happens here, on the engine thread, so that concurrent opens cannot pass the capacity."""
        self._close_idle()
        if not self.sessions.has_room_for(request.session_id):
            self.metrics.record("seedvc_admission_refusals")
            raise CapacityExceeded(
                f"this replica holds its maximum of {self.config.max_sessions} sessions", self.config.replica_tag
            )
        voice = self.voices.get(reference, settings.max_prompt, label=request.voice_id)
        resume = request.resume.to_stream_state() if request.resume is not None else None
        session = ServedSession(
            stream=self.engine.new_stream(voice, settings, request.seed, resume),
            gate=self._gate,
            voice_id=request.voice_id,
            seed=request.seed,
            lease=next(self._leases),
            next_index=request.resume.next_index if request.resume is not None else 0,
            last_call=self.clock(),
            steps=request.resume.steps if request.resume is not None else None,
        )
        self.sessions.admit(request.session_id, session)  # a re-open after a lost reply replaces the stale copy
        self.metrics.record("seedvc_sessions", len(self.sessions))
        return self._reply(request.session_id, session)

    def _reply(self, session_id: str, session: ServedSession) -> OpenReply:
        geometry = session.stream.geometry
        return OpenReply(
            session_id=session_id,
            replica=self.config.replica_tag,
            sample_rate=self.model.sample_rate,
            block_16k=geometry.block_16k,
            block=geometry.block,
            window_16k=geometry.window_16k,
            flush_blocks=geometry.flush_blocks,
            delay=geometry.delay,
            lease=session.lease,
            settings=session.settings,
        )

    async def attach(self, session_id: str) -> AttachReply:
        """Hand a held session to a client that resumes it; from now on only the new lease may send blocks."""
        return await self._on_engine_thread(lambda: self._attach(session_id))

    def _attach(self, session_id: str) -> AttachReply:
        self._close_idle()
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionLost(session_id)
        session.lease, session.last_call = next(self._leases), self.clock()
        stream = session.stream
        state = ResumeState.of(stream, session.next_index, session.steps)
        state = replace(state, window=stream.window.cpu().numpy().copy())
        return AttachReply(self._reply(session_id, session), state, session.voice_id, session.settings, session.seed)

    def _close_idle(self) -> None:
        """Close sessions nobody called for `detached_session_ttl_s`: their client left and did not resume.

        Runs on the engine thread before every open, attach and step, so an abandoned session holds its slot at
        most that long once traffic comes.
        """
        for session_id in self.sessions.idle_since(self.clock() - self.config.detached_session_ttl_s):
            log.info("session %s: closed after %.0f s without a call", session_id, self.config.detached_session_ttl_s)
            self._close(session_id)

    def _keep_purging_deleted_voices(self) -> None:
        """Started with the first session, on the replica's event loop (there is none at construction)."""
        if self._purger is None and self.config.voice_purge_interval_s is not None:
            self._purger = asyncio.get_running_loop().create_task(self._purge_periodically())

    async def _purge_periodically(self) -> None:
        assert self.config.voice_purge_interval_s is not None
        while True:
            await asyncio.sleep(self.config.voice_purge_interval_s)
            try:
                await self.purge_deleted_voices()
            except Exception:  # a store that is briefly unreachable must not end the purging for good
                log.exception("could not check cached voices against the voice store")
            self.purged.set()

    async def purge_deleted_voices(self) -> list[str]:
        """Forget the prepared voices (prompt mel, content, speaker style) of voices deleted from the store.

        Sessions using such a voice keep it until they end or switch: the owner deleted the recording, not the call.
        """
        cached = await self._on_engine_thread(self.voices.labels) | self.references.voice_ids()
        deleted = await asyncio.to_thread(lambda: [voice_id for voice_id in cached if not self.store.exists(voice_id)])
        if deleted:

            def forget_prepared() -> None:
                for voice_id in deleted:
                    self.voices.forget(voice_id)

            await self._on_engine_thread(forget_prepared)
            for voice_id in deleted:
                self.references.forget(voice_id)
            log.info("forgot %d deleted voice(s): %s", len(deleted), ", ".join(sorted(deleted)))
        return deleted

    async def set_voice(self, session_id: str, voice_id: str) -> None:
        try:
            reference = await self.references.audio(voice_id)
        except VoiceNotFound as error:
            raise UnknownVoice(f"unknown voice {voice_id}") from error

        def switch() -> None:
            session = self.sessions.get(session_id)
            if session is None:
                raise SessionLost(session_id)
            session.stream.voice = self.voices.get(reference, session.settings.max_prompt, label=voice_id)
            session.voice_id = voice_id

        await self._on_engine_thread(switch)

    async def close_session(self, session_id: str, lease: int | None = None) -> None:
        """Close a session; with `lease`, only if that attachment still holds it (a resumed client must not lose
        its session to the old connection's cleanup)."""

        def close_if_held() -> None:
            session = self.sessions.get(session_id)
            if session is not None and lease in (None, session.lease):
                self._close(session_id)

        await self._on_engine_thread(close_if_held)

    def _close(self, session_id: str) -> None:
        self.sessions.remove(session_id)
        self.metrics.record("seedvc_sessions", len(self.sessions))

    def forget_all(self) -> None:
        """Drop every session at once, as a replica that crashed or was replaced loses them."""
        for session_id, _ in self.sessions.items():
            self._close(session_id)

    # -- blocks ------------------------------------------------------------------------------------------------

    async def convert_blocks(self, blocks: Sequence[BlockIn]) -> list[BlockOut | ConverterError]:
        """One engine step for every waiting block; a block of an unknown session gets a SessionLost back."""
        return await self._on_engine_thread(lambda: self._convert(blocks))

    def _convert(self, blocks: Sequence[BlockIn]) -> list[BlockOut | ConverterError]:
        """Replies in the order of `blocks`. An engine step takes at most one block of a session, so two blocks of one
        session in a batch (a client that resumed while its old connection's block still waited) go through in
        successive steps, in their order: neither fails the other sessions' blocks."""
        self._close_idle()
        replies: list[BlockOut | ConverterError | None] = [None] * len(blocks)
        waiting = list(range(len(blocks)))
        while waiting:
            step: dict[str, int] = {}  # session id -> position of its first waiting block
            for position in waiting:
                step.setdefault(blocks[position].session_id, position)
            self._convert_step([(position, blocks[position]) for position in step.values()], replies)
            waiting = [position for position in waiting if position not in step.values()]
        assert all(reply is not None for reply in replies)
        return [reply for reply in replies if reply is not None]

    def _convert_step(
        self, positioned: Sequence[tuple[int, BlockIn]], replies: list[BlockOut | ConverterError | None]
    ) -> None:
        """One engine step for blocks of distinct sessions; each reply goes to its block's position."""
        started = time.time()
        known: list[tuple[int, BlockIn]] = []
        for position, block in positioned:
            refusal = self._refusal(block)
            if refusal is None:
                known.append((position, block))
            replies[position] = refusal
        if not known:
            return
        converting = [block for _, block in known]
        for block in converting:
            session = self._served(block.session_id)
            session.next_index, session.last_call = block.index + 1, self.clock()
            session.gate = self._gate_for(block)
        budget = self._budget(converting, started)
        rows = self._identity_rows(converting) if self.config.identity else self._engine_rows(converting, budget)
        computed = time.time() - started
        self.batch_sizes[len(known)] += 1
        self.blocks_converted += len(known)
        self._record_step(converting, rows, computed, budget)
        for (position, block), (audio, steps, silent) in zip(known, rows, strict=True):
            if audio is None:
                replies[position] = CapacityExceeded(
                    "this block did not fit in the converter's GPU memory; retry on another replica",
                    self.config.replica_tag,
                )
                continue
            session = self._served(block.session_id)
            session.blocks_converted += 1
            if not silent:
                session.steps = steps
            replies[position] = BlockOut(
                session_id=block.session_id,
                index=block.index,
                audio=audio,
                steps=steps,
                silent=silent,
                batch_size=len(known),
                queue_seconds=max(0.0, started - block.received_at) if block.received_at else 0.0,
                compute_seconds=computed,
                state=ResumeState.of(session.stream, block.index + 1, session.steps),
            )

    def _gate_for(self, block: BlockIn) -> SilenceGate | None:
        """The block's silence gate: its client's threshold and hangover; the configured threshold by default."""
        threshold = block.silence_threshold_dbfs
        if threshold is None:
            if block.silence_hangover_s == 0.0:
                return self._gate  # no controls sent: exactly the configured gate
            threshold = self.config.silence_gate_dbfs
        return None if threshold is None else SilenceGate(threshold, block.silence_hangover_s)

    def _served(self, session_id: str) -> ServedSession:
        session = self.sessions.get(session_id)
        assert session is not None, "a block of an unknown session is refused before it gets this far"
        return session

    def _refusal(self, block: BlockIn) -> ConverterError | None:
        session = self.sessions.get(block.session_id)
        if session is None:
            return SessionLost(block.session_id)
        if block.lease != session.lease:
            return SessionTakenOver(f"session {block.session_id} was resumed by another connection")
        return None

    def _record_step(
        self,
        blocks: Sequence[BlockIn],
        rows: Sequence[tuple[np.ndarray | None, int, bool]],
        seconds: float,
        budget: float | None,
    ) -> None:
        self.metrics.record("seedvc_step_seconds", seconds)
        self.metrics.record("seedvc_batch_size", len(blocks))
        if budget is not None and seconds > budget:
            self.metrics.record("seedvc_deadline_misses")
        for block, (_, steps, silent) in zip(blocks, rows, strict=True):
            self.metrics.record("seedvc_diffusion_steps", steps)
            if block.received_at:
                self.metrics.record("seedvc_queue_seconds", max(0.0, time.time() - seconds - block.received_at))
            if silent:
                self.metrics.record("seedvc_silent_blocks")

    def _budget(self, blocks: Sequence[BlockIn], started: float) -> float | None:
        """The time this step may take: what its blocks' real-time deadlines leave (None: no block has one).

        Each block of a session is due one block period (times `deadline_fraction`, the margin the transport needs)
        after its input completed. A block that was sent `late_s` after that, waited here until `started`, and has
        `backlog` blocks of its session behind it, shares what is left of their deadlines with them: the step may
        take ((backlog + 1) * period - late_s - waited) / (backlog + 1). The tightest block sets the budget.
        """
        budgets = []
        for block in blocks:
            if block.late_s is None:
                continue
            period = self.config.deadline_fraction * self._served(block.session_id).settings.block_time
            waited = max(0.0, started - block.received_at) if block.received_at else 0.0
            due = block.backlog + 1
            budgets.append((due * period - block.late_s - waited) / due)
        return min(budgets) if budgets else None

    def _engine_rows(
        self, blocks: Sequence[BlockIn], budget: float | None
    ) -> list[tuple[np.ndarray | None, int, bool]]:
        """The engine's step; a refused row (it did not fit in GPU memory) comes back with no audio. A session's first
        block here spends at most the steps it came with (a re-home carries them in its resume state)."""
        requests = []
        for block in blocks:
            session = self._served(block.session_id)
            first_here = session.blocks_converted == 0
            max_steps = session.steps if first_here else None
            requests.append(BlockRequest(block.session_id, torch.from_numpy(block.samples_16k), max_steps))
        eager_before = self.engine.eager_passes
        try:
            report = self.engine.step(requests, budget_seconds=budget)
        except Exception:
            self.failed_steps_in_a_row += 1
            self.metrics.record("seedvc_failed_steps")
            raise
        self.failed_steps_in_a_row = 0
        self._record_device(report.plan, self.engine.eager_passes - eager_before)
        return [(None if r.refused else r.audio.numpy(), r.steps_used, r.silent) for r in report.results]

    def _record_device(self, plan: StepPlan, eager_passes: int) -> None:
        if plan.memory_splits:
            self.metrics.record("seedvc_memory_splits", plan.memory_splits)
        if plan.refused:
            self.metrics.record("seedvc_memory_refusals", len(plan.refused))
        if eager_passes:
            self.metrics.record("seedvc_eager_passes", eager_passes)
        device = self.model.device
        if device.type == "cuda":
            self.metrics.record("seedvc_gpu_memory_bytes", torch.cuda.memory_allocated(device), kind="allocated")
            self.metrics.record("seedvc_gpu_memory_bytes", torch.cuda.memory_reserved(device), kind="reserved")
            self.metrics.record("seedvc_gpu_memory_bytes", torch.cuda.max_memory_allocated(device), kind="peak")

    def _identity_rows(self, blocks: Sequence[BlockIn]) -> list[tuple[np.ndarray, int, bool]]:
        """Debug mode: each block comes back unconverted (resampled to the model rate), to measure the serving path.

        The streams' windows and counters still advance, so a session's state stays consistent.
        """
        rows = []
        for block in blocks:
            stream = self._served(block.session_id).stream
            samples = torch.from_numpy(block.samples_16k)
            stream.push(samples)
            stream.blocks_done += 1
            audio = resample(samples, CONTENT_RATE, self.model.sample_rate)[: stream.geometry.block]
            rows.append((audio.numpy(), 0, False))
        return rows

    def stats(self) -> dict[str, Any]:
        return {
            "sessions": len(self.sessions),
            "capacity": self.config.max_sessions,
            "batch_sizes": dict(self.batch_sizes),
            "blocks_converted": self.blocks_converted,
            "blocks_by_session": self.sessions.blocks_by_session(),
            "real_time_factor": self.speed.real_time_factor,
        }
