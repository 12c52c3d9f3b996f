"""What the transport (ingress) and the converter send each other: plain picklable dataclasses and typed errors.

Errors are exceptions, so that the ingress can tell a lost session (re-open elsewhere) from a full replica (try
another or refuse). A converter deployment RETURNS them rather than raising them (the ingress raises them on its side):
Serve logs every exception a replica method raises at ERROR with a traceback, and these are routine answers.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from app.streaming.settings import SettingsError, StreamSettings
from app.streaming.stream import Stream, StreamState
from app.transport.protocol import SettingsOverrides

T = TypeVar("T")


class ConverterError(Exception):
    """Base of the errors a converter answers with."""


class SessionLost(ConverterError):
    """The replica does not hold this session (it restarted, was replaced, or never had it): re-open it."""


class CapacityExceeded(ConverterError):
    """The replica already holds its maximum number of sessions; `replica` names it (an open then tries another)."""

    def __init__(self, message: str, replica: str | None = None) -> None:
        super().__init__(message)
        self.replica = replica

    def __reduce__(self) -> tuple[type[CapacityExceeded], tuple[str, str | None]]:
        return type(self), (str(self), self.replica)


class UnknownVoice(ConverterError):
    """No voice with this id in the voice store."""


class SessionTakenOver(ConverterError):
    """Another connection attached to this session (a client that resumed): this one must stop, not re-open."""


# What a converter answers instead of a result: its own errors, and settings its model cannot stream.
Refusal = ConverterError | SettingsError


async def answer_of(call: Awaitable[T]) -> T | Refusal:
    """The converter side: a refusal is returned, not raised (see the module docstring)."""
    try:
        return await call
    except (ConverterError, SettingsError) as refusal:
        return refusal


def result_of(answer: T | Refusal) -> T:
    """The ingress side: the result, or the converter's refusal raised here."""
    if isinstance(answer, ConverterError | SettingsError):
        raise answer
    return answer


@dataclass(frozen=True)
class ResumeState:
    """A stream's resumable state in wire form (numpy and bytes, no torch objects)."""

    tail: np.ndarray  # (crossfade,) float32
    generator_state: bytes
    blocks_done: int  # blocks the stream converted
    next_index: int  # the session's next block number (ahead of blocks_done when the transport dropped input)
    window: np.ndarray | None = None  # (window_16k,) float32; the transport keeps its own and fills it in
    # Diffusion steps of the session's last converted block (None: none yet): a session that moves to another
    # replica starts from them, not from a cost history it never had there.
    steps: int | None = None

    @classmethod
    def of(cls, stream: Stream, next_index: int, steps: int | None) -> ResumeState:
        """A stream's state after its last block, without the window (the transport mirrors that itself)."""
        return cls(
            tail=stream.tail.cpu().numpy().copy(),
            generator_state=stream.generator.get_state().numpy().tobytes(),
            blocks_done=stream.blocks_done,
            next_index=next_index,
            steps=steps,
        )

    def to_stream_state(self) -> StreamState:
        if self.window is None:
            raise ValueError("a resume needs the input window")
        return StreamState(
            window=torch.from_numpy(self.window.copy()),
            tail=torch.from_numpy(self.tail.copy()),
            generator_state=torch.frombuffer(bytearray(self.generator_state), dtype=torch.uint8),
            blocks_done=self.blocks_done,
        )


@dataclass(frozen=True)
class OpenRequest:
    session_id: str
    voice_id: str
    # Exact settings (a session that already has them: a re-open, a resume), or what a client asked for, which the
    # converter applies over its own default settings (on a CPU, the CPU real-time profile; see ConverterConfig).
    settings: StreamSettings | SettingsOverrides
    seed: int
    resume: ResumeState | None = None


@dataclass(frozen=True)
class OpenReply:
    session_id: str
    replica: str  # which replica holds the session (routing pins later calls to it)
    sample_rate: int  # of the audio the converter returns
    block_16k: int  # input samples per block
    block: int  # output samples per block
    window_16k: int  # the rolling window the transport mirrors for resumes
    flush_blocks: int  # silent blocks that flush the lookahead at the end
    delay: int  # samples (at `sample_rate`) by which the output lags the input
    lease: int  # names this attachment: calls with an older lease are refused with SessionTakenOver
    settings: StreamSettings  # the session's settings, in full


@dataclass(frozen=True)
class AttachReply:
    """A session a client resumes: how to talk to it and everything the transport needs to continue it."""

    opened: OpenReply
    state: ResumeState  # with the window, so the new transport's mirror starts equal to the converter's
    voice_id: str
    settings: StreamSettings
    seed: int


@dataclass(frozen=True)
class BlockIn:
    session_id: str
    index: int  # the session's block number
    samples_16k: np.ndarray  # (block_16k,) float32
    lease: int = 0  # of the attachment sending it (OpenReply.lease)
    received_at: float = 0.0  # set by the converter when the request arrives (its own clock)
    # The session's silence gate (app/serving/controls.py): its client's threshold (None: the converter's configured
    # one) and hangover. Sent with every block, so a live change and a move to another converter need no extra call.
    silence_threshold_dbfs: float | None = None
    silence_hangover_s: float = 0.0
    # Real-time deadline (None: the input is a file, no deadline): how long ago the block's last input sample arrived
    # when it was sent, and how many input blocks of the session wait behind it.
    late_s: float | None = None
    backlog: int = 0


@dataclass(frozen=True)
class BlockOut:
    session_id: str
    index: int
    audio: np.ndarray  # (block,) float32 at `sample_rate`
    steps: int  # diffusion steps used (0 when the silence gate skipped the block)
    silent: bool
    batch_size: int  # blocks converted in the same engine step
    queue_seconds: float  # from arrival at the converter to the start of its engine step
    compute_seconds: float  # the engine step
    state: ResumeState  # after this block (without the window)
