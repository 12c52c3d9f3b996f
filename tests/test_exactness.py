"""The exactness contract, per compute precision: how far a session's output moves when it is resumed, moved to another
replica, or batched with other sessions. README 'Guarantees under load' states these figures; this is where they are
measured and held.

Real converter services (app/serving/converter.py) with the tiny fixture model, in this process, one torch thread.
Every block carries a real-time deadline (the deadline control is on, as shipped), with settings whose steps fit it
easily: a test FAILS, it does not skip, if the control reduced any block's steps during it (reduced steps change the
output on purpose, and the contract holds only while none were).

Measured here (parity_a, CPU, one thread; max |difference| of output samples, full scale 1.0):
- fp32: resume on the same replica 0 (bitwise); re-home to another replica 0 (bitwise); batched with two other
  sessions vs alone 2.9e-4 (the matrix kernels round differently at another batch size; the fixture's random f0
  predictor turns that into small phase shifts): bound 1e-3, against the 5e-3 parity tolerance.
- bf16: resume 0 and re-home 0 (bitwise); batch mates 0.93: bf16's coarser rounding differs with the batch size, and
  the fixture's f0 predictor turns a mel difference into whole-cycle phase shifts (tests/test_precision.py shows the
  same between bf16 and fp32), so no bound on the samples holds; a bf16 session's waveform depends on its batch mates.
A GPU pads rows to warmed batch shapes: its bounds are not measured yet (no GPU run).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import pytest

from app.model.precision import Precision
from app.model.seedvc import SeedVC
from app.serving.config import ConverterConfig
from app.serving.converter import ConverterService
from app.serving.live import BlockReport, LiveSession
from app.serving.local import LocalConverterClient
from app.serving.wire import BlockIn, BlockOut, ConverterError, OpenRequest, ResumeState
from app.streaming.settings import StreamSettings
from bench.parity import ParitySet
from tests.settings_from_bundle import one_torch_thread
from tests.test_live_session import input_48k


@dataclass(frozen=True)
class Exactness:
    """Largest |difference| of output samples allowed (0.0: bitwise), while no block's steps were reduced."""

    resume_same_replica: float
    rehome: float
    batch_mates: float | None  # None: no bound on the samples holds (see the module docstring)


CONTRACT = {
    Precision.FP32: Exactness(resume_same_replica=0.0, rehome=0.0, batch_mates=1e-3),
    Precision.BF16: Exactness(resume_same_replica=0.0, rehome=0.0, batch_mates=None),
}

# Steps above the shipped floor (serve_config.yaml: deadline_min_steps 4), so the control could lower them, and blocks
# long enough that three rows of the tiny model fit a block's deadline many times over.
SETTINGS = StreamSettings(diffusion_steps=6, block_time=1.0, ce_context=1.0, cfg_rate=0.0)
SHIPPED_MIN_STEPS = 4
BLOCKS = 8
CUT = 3  # the interruption comes after this many blocks


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module", params=list(CONTRACT), ids=str)
def precision(request: pytest.FixtureRequest) -> Precision:
    return request.param


@pytest.fixture(scope="module")
def model_in(parity: ParitySet, precision: Precision) -> SeedVC:
    return SeedVC.load(parity.model_dir, precision=precision)


def replica(model: SeedVC, store: str, name: str) -> ConverterService:
    config = ConverterConfig(
        precision=model.precision,
        voice_store=store,
        silence_gate_dbfs=None,
        deadline_min_steps=SHIPPED_MIN_STEPS,
        replica_tag=name,
    )
    return ConverterService(config, model=model)


@pytest.fixture
def replicas(model_in: SeedVC, voice_ids) -> Iterator[tuple[ConverterService, ConverterService]]:
    store, _ = voice_ids
    pair = replica(model_in, store, "a"), replica(model_in, store, "b")
    yield pair
    for service in pair:
        service.close()


class Session:
    """One session's blocks sent straight to a converter service, each with a real-time deadline just begun."""

    def __init__(self, service: ConverterService, session_id: str, voice: str, seed: int) -> None:
        self.service, self.session_id, self.voice, self.seed = service, session_id, voice, seed
        self.lease = 0
        self.window: np.ndarray | None = None  # the transport's mirror of the converter's window
        self.state: ResumeState | None = None

    async def open(self, resume: ResumeState | None = None) -> int:
        opened = await self.service.open(OpenRequest(self.session_id, self.voice, SETTINGS, self.seed, resume))
        self.lease = opened.lease
        if self.window is None:
            self.window = np.zeros(opened.window_16k, dtype=np.float32)
        return opened.block_16k

    def block(self, index: int, samples: np.ndarray) -> BlockIn:
        return BlockIn(self.session_id, index, samples, self.lease, late_s=0.0, backlog=0)

    def took(self, reply: BlockOut | ConverterError, samples: np.ndarray) -> BlockOut:
        assert isinstance(reply, BlockOut), reply
        assert self.window is not None
        self.window = np.concatenate([self.window[len(samples) :], samples])
        self.state = reply.state
        return reply


def source_blocks(parity: ParitySet, size: int) -> list[np.ndarray]:
    source = np.tile(parity.wav("source_16k").astype(np.float32), 3)
    assert len(source) >= BLOCKS * size
    return [np.ascontiguousarray(source[n * size : (n + 1) * size]) for n in range(BLOCKS)]


def steps_never_reduced(outputs: list[BlockOut]) -> list[np.ndarray]:
    steps = {reply.steps for reply in outputs}
    assert steps == {SETTINGS.diffusion_steps}, f"the deadline control reduced steps ({steps}): the contract is void"
    return [reply.audio for reply in outputs]


def largest_difference(left: list[np.ndarray], right: list[np.ndarray]) -> float:
    return float(np.abs(np.concatenate(left) - np.concatenate(right)).max())


async def converted(
    session: Session, parity: ParitySet, interrupt: Callable[[Session], Awaitable[None]] | None = None
) -> list[BlockOut]:
    """The session's blocks one at a time; `interrupt` happens before block CUT."""
    blocks = source_blocks(parity, await session.open())
    outputs = []
    for n, samples in enumerate(blocks):
        if n == CUT and interrupt is not None:
            await interrupt(session)
        [reply] = await session.service.convert_blocks([session.block(n, samples)])
        outputs.append(session.took(reply, samples))
    return outputs


async def uninterrupted(service: ConverterService, voice: str, parity: ParitySet) -> list[BlockOut]:
    return await converted(Session(service, "steady", voice, seed=5), parity)


def test_a_resume_on_the_same_replica(replicas, voice_ids, parity: ParitySet, precision: Precision) -> None:
    (a, _), (_, (voice, _)) = replicas, voice_ids

    async def dropped_connection(session: Session) -> None:
        session.lease = (await a.attach(session.session_id)).opened.lease  # a new connection takes the session over

    async def scenario() -> tuple[list[BlockOut], list[BlockOut]]:
        steady = await uninterrupted(a, voice, parity)
        return steady, await converted(Session(a, "resumed", voice, seed=5), parity, dropped_connection)

    steady, resumed = asyncio.run(scenario())
    difference = largest_difference(steps_never_reduced(steady), steps_never_reduced(resumed))
    print(f"\n{precision}: resume on the same replica, max |difference| {difference:.3g}")
    assert difference <= CONTRACT[precision].resume_same_replica


def test_a_rehome_to_another_replica(replicas, voice_ids, parity: ParitySet, precision: Precision) -> None:
    (a, b), (_, (voice, _)) = replicas, voice_ids

    async def lost_replica(session: Session) -> None:
        a.forget_all()  # replica a is gone: the session re-opens on b with its state and the mirrored window
        assert session.state is not None
        session.service = b
        await session.open(replace(session.state, window=session.window))

    async def scenario() -> tuple[list[BlockOut], list[BlockOut]]:
        steady = await uninterrupted(a, voice, parity)
        return steady, await converted(Session(a, "moving", voice, seed=5), parity, lost_replica)

    steady, moved = asyncio.run(scenario())
    difference = largest_difference(steps_never_reduced(steady), steps_never_reduced(moved))
    print(f"\n{precision}: re-home to another replica, max |difference| {difference:.3g}")
    assert difference <= CONTRACT[precision].rehome


def test_batch_mates(replicas, voice_ids, parity: ParitySet, precision: Precision) -> None:
    (a, _), (_, voices) = replicas, voice_ids

    async def scenario() -> tuple[list[BlockOut], list[BlockOut]]:
        steady = await uninterrupted(a, voices[0], parity)
        sessions = [Session(a, f"mate{n}", voices[n % 2], seed=5 + n) for n in range(3)]
        sizes = [await session.open() for session in sessions]
        blocks = source_blocks(parity, sizes[0])
        watched = []
        for n, samples in enumerate(blocks):
            # Mates get other input (the blocks in another order), other voices and seeds.
            mate_input = [samples, blocks[-1 - n], blocks[(n + 3) % BLOCKS]]
            replies = await a.convert_blocks(
                [session.block(n, x) for session, x in zip(sessions, mate_input, strict=True)]
            )
            assert all(isinstance(reply, BlockOut) and reply.batch_size == 3 for reply in replies), replies
            watched.append(sessions[0].took(replies[0], samples))
        return steady, watched

    steady, batched = asyncio.run(scenario())
    difference = largest_difference(steps_never_reduced(steady), steps_never_reduced(batched))
    print(f"\n{precision}: with two batch mates vs alone, max |difference| {difference:.3g}")
    bound = CONTRACT[precision].batch_mates
    assert bound is None or difference <= bound


async def with_drops(
    client: LocalConverterClient, voice: str, audio: np.ndarray, lose_after: int | None
) -> tuple[np.ndarray, list[BlockReport]]:
    """A live session that falls behind twice (input of three blocks at once, one kept: two dropped each time), and,
    with `lose_after`, loses its converter once that many blocks are out: it re-homes with its mirrored window."""
    session = LiveSession(client, "behind", voice, SETTINGS, seed=9, max_backlog_blocks=1)
    await session.open()
    block_48k = int(48000 * SETTINGS.block_time)
    frames: list[np.ndarray] = []
    reports: list[BlockReport] = []
    for burst, start in enumerate(range(0, len(audio) - 3 * block_48k, 3 * block_48k)):
        blocks_at_once = 3 if burst in (1, 3) else 1
        for offset in range(0, blocks_at_once * block_48k, 960):
            session.feed(audio[start + offset : start + offset + 960])
        while session.pending_blocks:
            output = await session.next_output()
            assert output is not None
            frames += output[0]
            reports.append(output[1])
            if lose_after is not None and len(reports) == lose_after:
                client.lose(session.replica)
    await session.close()
    return np.concatenate(frames), reports


def test_a_rehome_after_dropped_input_continues_exactly(model: SeedVC, voice_ids, parity: ParitySet) -> None:
    """The transport's mirror of the converter's window must leave out what it dropped (the converter never saw it):
    a session that dropped input, then re-homed, converts exactly as one that dropped the same input and stayed."""
    store, (voice, _) = voice_ids
    audio = np.tile(input_48k(parity), 4)
    stayed, moved = (LocalConverterClient({name: replica(model, store, name) for name in "ab"}) for _ in range(2))
    try:
        steady_audio, steady = asyncio.run(with_drops(stayed, voice, audio, lose_after=None))
        lose_after = len(steady) // 2 + 1
        moved_audio, rehomed = asyncio.run(with_drops(moved, voice, audio, lose_after=lose_after))
    finally:
        for local in (stayed, moved):
            for service in local.services.values():
                service.close()
    dropped = [r.index for r in steady if r.batch_size == 0]
    assert len(dropped) >= 4 and min(dropped) < lose_after, "it dropped input before it re-homed"
    assert any(r.rehomed for r in rehomed) and len(set(moved.served["behind"])) == 2, "it re-homed"
    assert [r.index for r in rehomed] == [r.index for r in steady]
    converted = [r for r in steady + rehomed if r.batch_size]
    assert {r.steps for r in converted} == {SETTINGS.diffusion_steps}, "no steps reduced: the contract applies"
    assert np.array_equal(moved_audio, steady_audio)
