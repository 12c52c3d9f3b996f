"""One live session on the transport side: 48 kHz PCM in, 48 kHz converted PCM out, through a pinned converter.

Transport-agnostic (the WebSocket and WebRTC endpoints both drive it) and Ray-agnostic (it talks to a
`ConverterClient`). Per session:

    48 kHz frames -> stream-resample to 16 kHz -> cut blocks -> bounded queue -> ONE block in flight to the converter
    -> reply (model rate) -> pitch shift, monitor, loudness (the stream's controls) -> stream-resample to 48 kHz
    -> 20 ms frames out, plus a block event

Nothing is lost when a converter disappears: the session mirrors its converter's input window and keeps the
resumable state of the last reply, so on `SessionLost` it re-opens elsewhere with that state and re-sends the block
in flight: the audio continues exactly, only later. A session that falls behind by more than `max_backlog_blocks`
drops its OLDEST pending input (answered with silence, reported as `late`) instead of accumulating delay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch

from app.audio.denoise import NoiseControl
from app.audio.files import resample
from app.audio.framing import Chunker
from app.audio.opus import FRAME_SAMPLES, SAMPLE_RATE
from app.audio.pitch_shift import PitchControl
from app.audio.stream_resample import StreamingResampler
from app.serving.controls import Loudness, StreamControls, apply_input_gain
from app.serving.wire import AttachReply, BlockIn, BlockOut, OpenReply, OpenRequest, ResumeState, SessionLost
from app.streaming.settings import CONTENT_RATE, StreamSettings
from app.transport.protocol import SettingsOverrides

log = logging.getLogger(__name__)

# How often a session may re-home in a row without converting a block before it gives up.
MAX_REOPENS_PER_BLOCK = 3


class ConverterClient(Protocol):
    """How a transport reaches converters; `replica` pins a call to the replica that holds the session."""

    async def open(self, request: OpenRequest) -> OpenReply: ...

    async def attach(self, session_id: str, replica: str) -> AttachReply: ...

    async def convert(self, block: BlockIn, replica: str) -> BlockOut: ...

    async def set_voice(self, session_id: str, voice_id: str, replica: str) -> None: ...

    async def close(self, session_id: str, replica: str, lease: int) -> None: ...


@dataclass(frozen=True)
class BlockReport:
    """What the transport tells its client about one output block."""

    index: int
    input_start_ms: float  # the input position this block answers
    latency_ms: float  # last input sample of the block received -> output block ready
    queue_ms: float  # waiting at the converter
    steps: int
    silent: bool
    batch_size: int
    rehomed: bool  # the session moved to another converter for this block
    voice_id: str  # the voice this block was converted with


@dataclass(frozen=True)
class LateReport:
    dropped_ms: float
    total_dropped_ms: float


@dataclass
class _PendingBlock:
    index: int
    samples_16k: np.ndarray
    complete_at: float  # monotonic time its last input sample arrived
    dropped: bool = False


class LiveSession:
    def __init__(
        self,
        client: ConverterClient,
        session_id: str,
        voice_id: str,
        settings: StreamSettings | SettingsOverrides,
        seed: int,
        max_backlog_blocks: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`settings`: exact ones, or what the client asked for, which the converter applies over its defaults."""
        self.client = client
        self.session_id = session_id
        self.voice_id = voice_id
        self._requested_settings = settings
        self.seed = seed
        self.max_backlog_blocks = max_backlog_blocks
        self.clock = clock
        # Real-time input has deadlines (the converter spends fewer diffusion steps on a late block); a file's
        # input has none: its transport sets this False.
        self.realtime = True
        self.opened: OpenReply | None = None
        self.started_at = time.time()  # wall clock, as it travels in resume tokens; a resume sets the original
        self.rehomes = 0
        self.total_dropped_blocks = 0  # over the session's life (a resume carries them over)
        self.blocks_answered = 0  # input blocks answered (converted or dropped) over the session's life
        self._input = StreamingResampler(SAMPLE_RATE, CONTENT_RATE)
        self._blocks: Chunker | None = None
        self._output: StreamingResampler | None = None
        self._frames = Chunker(FRAME_SAMPLES)
        self._queue: deque[_PendingBlock] = deque()
        self._ready = asyncio.Event()
        self._room = asyncio.Event()
        self._next_index = 0
        self._window: np.ndarray | None = None  # mirror of the converter's window after the last reply
        self._state: ResumeState | None = None  # resumable state after the last reply
        self._ended = False
        self._input_samples = 0  # at 48 kHz
        self._output_frames = 0
        self._frame_budget: int | None = None  # known at the end of input: input + delay, in whole frames
        self._voice_request: str | None = None
        self.controls = StreamControls()  # changed live by the client (set_controls)
        self._loudness = Loudness()
        # On this side of the re-homing: a session that moves to another converter keeps its denoiser's state.
        self._noise = NoiseControl()
        self._pitch: PitchControl | None = None  # at the converter's rate, known once open

    @property
    def replica(self) -> str:
        assert self.opened is not None, "the session is not open"
        return self.opened.replica

    @property
    def settings(self) -> StreamSettings:
        """The session's settings in full, as the converter that opened it resolved them."""
        assert self.opened is not None, "the session is not open"
        return self.opened.settings

    @property
    def pending_blocks(self) -> int:
        """Input blocks cut and waiting for the converter (dropped ones included until they are answered)."""
        return len(self._queue)

    async def open(self) -> OpenReply:
        opened = await self.client.open(self._open_request(resume=None))
        self._take(opened, np.zeros(opened.window_16k, dtype=np.float32))
        return opened

    @classmethod
    async def resume(
        cls, client: ConverterClient, session_id: str, replica: str, max_backlog_blocks: int = 3
    ) -> LiveSession:
        """Take over a session a converter still holds (its client's connection dropped): blocks continue from
        where the converter stands. Raises SessionLost when no converter holds it any more."""
        attached = await client.attach(session_id, replica)
        session = cls(
            client,
            session_id,
            attached.voice_id,
            attached.settings,
            attached.seed,
            max_backlog_blocks=max_backlog_blocks,
        )
        assert attached.state.window is not None, "an attach reply carries the window"
        session._take(attached.opened, attached.state.window.copy())
        session._state = attached.state
        session._next_index = session.blocks_answered = attached.state.next_index
        # Its totals span its connections: the blocks it has answered, and those it dropped (numbered, never sent).
        session.total_dropped_blocks = attached.state.next_index - attached.state.blocks_done
        return session

    def _take(self, opened: OpenReply, window: np.ndarray) -> None:
        self.opened = opened
        self._blocks = Chunker(opened.block_16k)
        self._output = StreamingResampler(opened.sample_rate, SAMPLE_RATE)
        self._pitch = PitchControl(opened.sample_rate)
        self._window = window

    def _open_request(self, resume: ResumeState | None) -> OpenRequest:
        # Once open, the settings are exact: a re-open on another converter keeps them, whatever its defaults.
        settings = self.opened.settings if self.opened is not None else self._requested_settings
        return OpenRequest(self.session_id, self.voice_id, settings, self.seed, resume)

    # -- input side ----------------------------------------------------------------------------------------------

    def feed(self, pcm_48k: np.ndarray) -> LateReport | None:
        """Queue 48 kHz input; returns a report when the backlog bound made it drop old input."""
        assert self._blocks is not None, "open the session first"
        now = self.clock()
        self._input_samples += len(pcm_48k)
        pcm_48k = self._noise.apply(self.controls.noise_suppression, apply_input_gain(self.controls, pcm_48k))
        for block in self._blocks.push(self._input.push(torch.from_numpy(pcm_48k)).numpy()):
            self._enqueue(block, now)
        return self._drop_excess()

    async def wait_for_room(self) -> None:
        """Backpressure for input that is not real time (files, tests): wait instead of dropping old input."""
        while sum(not block.dropped for block in self._queue) >= self.max_backlog_blocks:
            self._room.clear()
            await self._room.wait()

    def end_input(self) -> None:
        """No more input: pad the last block and add the blocks that flush the lookahead."""
        assert self._blocks is not None and self.opened is not None, "open the session first"
        now = self.clock()
        held = self._noise.flush()  # the denoiser's partial frame, when it is on
        for block in self._blocks.push(self._input.push(torch.from_numpy(held)).numpy()):
            self._enqueue(block, now)
        for block in self._blocks.push(self._input.flush().numpy()):
            self._enqueue(block, now)
        last = self._blocks.flush_padded()
        if last is not None:
            self._enqueue(last, now)
        for _ in range(self.opened.flush_blocks):
            self._enqueue(np.zeros(self.opened.block_16k, dtype=np.float32), now)
        # The output ends where the input's last sample comes out: whole blocks would overshoot by up to two.
        assert self._pitch is not None
        delay_48k = (self.opened.delay + self._pitch.latency) * SAMPLE_RATE / self.opened.sample_rate
        self._frame_budget = -(-int(self._input_samples + delay_48k) // FRAME_SAMPLES)
        self._ended = True
        self._ready.set()

    def _enqueue(self, samples: np.ndarray, now: float) -> None:
        self._queue.append(_PendingBlock(self._next_index, np.ascontiguousarray(samples, np.float32), now))
        self._next_index += 1
        self._ready.set()

    def _drop_excess(self) -> LateReport | None:
        live = [block for block in self._queue if not block.dropped]
        excess = len(live) - self.max_backlog_blocks
        if excess <= 0:
            return None
        for block in live[:excess]:
            block.dropped = True
        self.total_dropped_blocks += excess
        return LateReport(dropped_ms=excess * 1000 * self.settings.block_time, total_dropped_ms=self.total_dropped_ms)

    # -- output side ---------------------------------------------------------------------------------------------

    async def next_output(self) -> tuple[list[np.ndarray], BlockReport] | None:
        """Convert the next queued block; returns its 20 ms output frames and report, or None when all is done."""
        while not self._queue:
            if self._ended:
                return None
            self._ready.clear()
            await self._ready.wait()
        pending = self._queue.popleft()
        self.blocks_answered = pending.index + 1
        self._room.set()
        if pending.dropped:
            # Dropped input is answered with silence, so output block k still answers input block k.
            assert self.opened is not None
            audio = self._pitched(np.zeros(self.opened.block, dtype=np.float32))  # keeps the shifter in step
            report = BlockReport(
                pending.index, self._input_start_ms(pending.index), 0.0, 0.0, 0, True, 0, False, self.voice_id
            )
            # The converter never sees a dropped block, so its window does not move: nor does the mirror.
            return self._frames_of(audio), report
        if self._voice_request is not None:
            self.voice_id, self._voice_request = self._voice_request, None  # a later re-open uses it too
            try:
                await self.client.set_voice(self.session_id, self.voice_id, self.replica)
            except SessionLost:
                await self._reopen(pending.index)
        reply, rehomed = await self._convert(pending)
        self._advance_window(pending.samples_16k)
        self._state = reply.state
        report = BlockReport(
            index=pending.index,
            input_start_ms=self._input_start_ms(pending.index),
            latency_ms=1000 * (self.clock() - pending.complete_at),
            queue_ms=1000 * reply.queue_seconds,
            steps=reply.steps,
            silent=reply.silent,
            batch_size=reply.batch_size,
            rehomed=rehomed,
            voice_id=self.voice_id,
        )
        # Shifted while monitored too, so that monitor off resumes the shifted voice where it would be.
        converted = self._pitched(reply.audio)
        audio = self._monitored(pending.samples_16k) if self.controls.monitor else converted
        return self._frames_of(self._loudness.apply(self.controls, audio, pending.samples_16k)), report

    def _pitched(self, audio: np.ndarray) -> np.ndarray:
        assert self._pitch is not None
        return self._pitch.apply(self.controls.pitch_shift, audio)

    def _monitored(self, block_16k: np.ndarray) -> np.ndarray:
        """The input block itself at the output's rate and length, in place of its conversion (monitor)."""
        assert self.opened is not None
        audio = resample(torch.from_numpy(block_16k), CONTENT_RATE, self.opened.sample_rate).numpy()
        return np.pad(audio, (0, max(0, self.opened.block - len(audio))))[: self.opened.block]

    def final_frames(self) -> list[np.ndarray]:
        """What the output resampler still holds once the last block is out, in 20 ms frames (last one padded)."""
        assert self._output is not None
        frames = self._frames.push(self._output.flush().numpy())
        last = self._frames.flush_padded()
        return self._within_budget(frames + ([last] if last is not None else []))

    def _input_start_ms(self, index: int) -> float:
        return 1000 * index * self.settings.block_time

    def _frames_of(self, audio: np.ndarray) -> list[np.ndarray]:
        assert self._output is not None
        return self._within_budget(self._frames.push(self._output.push(torch.from_numpy(audio)).numpy()))

    def _within_budget(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        if self._frame_budget is not None:
            frames = frames[: max(0, self._frame_budget - self._output_frames)]
        self._output_frames += len(frames)
        return frames

    def _advance_window(self, block: np.ndarray) -> None:
        assert self._window is not None
        self._window = np.concatenate([self._window[len(block) :], block])

    async def _convert(self, pending: _PendingBlock) -> tuple[BlockOut, bool]:
        rehomed = False
        for _ in range(MAX_REOPENS_PER_BLOCK + 1):
            assert self.opened is not None
            # Built on every try: a re-open gives the session a new lease, which the block must carry, and the block's
            # lateness grows while it waits.
            block = BlockIn(
                self.session_id,
                pending.index,
                pending.samples_16k,
                lease=self.opened.lease,
                silence_threshold_dbfs=self.controls.silence_threshold_dbfs,
                silence_hangover_s=self.controls.silence_hangover_s,
                late_s=self.clock() - pending.complete_at if self.realtime else None,
                backlog=sum(not waiting.dropped for waiting in self._queue),
            )
            try:
                return await self.client.convert(block, self.replica), rehomed
            except SessionLost:
                log.warning("session %s lost its converter at block %d; re-opening", self.session_id, pending.index)
                await self._reopen(pending.index)
                rehomed = True
        raise SessionLost(f"session {self.session_id} could not be re-opened after {MAX_REOPENS_PER_BLOCK} tries")

    async def _reopen(self, next_index: int) -> None:
        """Opens the session on another converter, numbering on from `next_index`, the block being converted now.

        The blocks before it were answered, dropped ones with silence that the lost converter never saw (its state
        says where it stood before them): the new one must not hand them out again to a client that resumes."""
        state = self.resume_state
        if state is not None:
            state = replace(state, next_index=max(state.next_index, next_index))
        self.opened = await self.client.open(self._open_request(state))
        self.rehomes += 1

    # -- control -------------------------------------------------------------------------------------------------

    def request_voice(self, voice_id: str) -> None:
        """Switch voice before the next block is converted (between blocks: never two calls in flight)."""
        self._voice_request = voice_id

    def set_controls(self, **changes: Any) -> StreamControls:
        """Change some controls; they apply from the next block converted (input gain: from the next input)."""
        self.controls = replace(self.controls, **changes)
        return self.controls

    @property
    def resume_state(self) -> ResumeState | None:
        """What re-opens this session elsewhere: the converter's state after the last reply, with the mirrored
        window (None before the first reply)."""
        return None if self._state is None else replace(self._state, window=self._window)

    @property
    def input_ended(self) -> bool:
        return self._ended

    @property
    def input_seconds(self) -> float:
        """The audio this session received on this connection so far: what its key's usage is metered in."""
        return self._input_samples / SAMPLE_RATE

    @property
    def total_dropped_ms(self) -> float:
        return 1000 * self.settings.block_time * self.total_dropped_blocks

    @property
    def next_index(self) -> int:
        """The number the next input block will get."""
        return self._next_index

    async def close(self) -> None:
        """Free the session on its converter (unless a resumed connection has taken it over meanwhile).

        A connection that merely dropped does not call this: the converter keeps the session for a while, so that
        its client can resume it."""
        if self.opened is not None:
            await self.client.close(self.session_id, self.replica, self.opened.lease)


async def pump(
    session: LiveSession,
    emit_frame: Callable[[np.ndarray], Awaitable[None]],
    emit_report: Callable[[BlockReport], Awaitable[None]],
) -> None:
    """Drive a session's output until its input has ended and every block is out."""
    while (output := await session.next_output()) is not None:
        frames, report = output
        await emit_report(report)
        for frame in frames:
            await emit_frame(frame)
    for frame in session.final_frames():
        await emit_frame(frame)
