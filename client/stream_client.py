"""Streaming voice conversion client: a file (or the microphone) in, the converted voice out, with latency figures.

Usage:
    # One file, sent in real time, with a voice already on the server:
    python -m client.stream_client INPUT.wav OUTPUT.wav --url http://127.0.0.1:8000 --api-key KEY --voice VOICE_ID
    # Upload a reference recording first, then send the file as fast as the server takes it:
    SEEDVC_API_KEY=KEY python -m client.stream_client INPUT.wav OUTPUT.wav --reference REF.wav --fast
    # Eight streams of the same input at once (writes OUTPUT-0.wav ... OUTPUT-7.wav), reproducible, fewer steps:
    python -m client.stream_client INPUT.wav OUTPUT.wav --voice VOICE_ID --concurrency 8 --seed 0 \\
        --setting diffusion_steps=6 --setting block_time=0.24
    # The converted voice five semitones higher (its formants kept; -12..12):
    python -m client.stream_client INPUT.wav OUTPUT.wav --voice VOICE_ID --pitch 5
    # Louder, quieter gate with a longer hold for word ends, noise suppression on the input:
    python -m client.stream_client INPUT.wav OUTPUT.wav --voice VOICE_ID --output-gain 6 --silence-threshold -50 \
        --hangover 0.3 --noise-suppression
    # The default microphone until Ctrl+C (needs the optional package: pip install sounddevice):
    python -m client.stream_client --mic OUTPUT.wav --voice VOICE_ID
    # A chosen microphone and speaker (by index or part of the name), the converted voice played live as well:
    python -m client.stream_client --list-devices
    python -m client.stream_client --mic OUTPUT.wav --voice VOICE_ID --input-device USB --output-device 3 --play

As a library (inside a coroutine):
    token = client.api.get_token("http://127.0.0.1:8000", api_key)
    result = await stream_audio("http://127.0.0.1:8000", token, voice_id, samples_48k)
    result.output_48k, result.stats.p95_ms, result.error

Protocol v1 (app/transport/protocol.py): the client sends the start message and waits for `ready`, then sends one
20 ms Opus packet per binary message, then `end`; meanwhile it decodes the audio the server sends back and keeps
every event. An error event ends the stream without an exception (`StreamResult.error`), except the one the
protocol lets the stream survive: `unknown_voice` in answer to `set_voice`. Input files of any rate are resampled to
48 kHz; the output is 48 kHz float32, starting at the first packet the server sent (no delay compensation).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
import urllib.parse
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from app.audio.files import AudioError, read_audio, resample, write_audio
from app.audio.opus import FRAME_SAMPLES, OpusDecoder, OpusEncoder, OpusError
from app.audio.pacing import Pacer
from app.cli_controls import ControlError, add_control_flags, given_controls
from app.environment import CLIENT_API_KEY, client_api_key
from app.transport.limits import TokenBucket
from app.transport.protocol import (
    FRAME_MS,
    PROTOCOL_VERSION,
    SAMPLE_RATE,
    START_RETRIES,
    START_RETRY_DEFAULT_S,
    START_RETRY_MAX_S,
    ErrorCode,
    SettingsOverrides,
)
from client.api import ClientError, get_token, upload_voice
from client.audio_devices import (
    PLAY_PREBUFFER_S,
    AudioDeviceError,
    Microphone,
    Player,
    choose_device,
    describe_devices,
    sound_library,
)

STREAM_PATH = "/v1/stream"
FRAME_SECONDS = FRAME_MS / 1000
# Opening a session may wait for a converter replica and embed the voice; a server silent for this long is stuck.
READY_TIMEOUT_S = 30.0
# A dropped connection is resumed at once, then after 0.5 s, 1 s, ... while the server cannot be reached: 10.5 s in
# all, well within the converter's detached_session_ttl_s (30 s by default), for which it holds the session.
RESUME_ATTEMPTS = 6
RESUME_BACKOFF_S = 0.5
# A start the server refused for capacity (`overloaded`, `rate_limited`) is tried again after its `retry_after_s`
# (the time a new converter takes to serve, when the service is scaling), longer each time, up to START_RETRIES
# times: the protocol's policy (app/transport/protocol.py), which the page follows too.
RETRYABLE_REFUSALS = frozenset({ErrorCode.overloaded, ErrorCode.rate_limited})
PLAY_BUFFER_RANGE_MS = (20.0, 5000.0)  # a packet at least; beyond 5 s the voice is no longer live
RESEND_HISTORY_PACKETS = 1500  # 30 s of sent input kept to send again after a resume (the server holds 30 s too)
# A real-time stream's input goes out at most this many times real time beyond a burst of this many seconds: after a
# drop, what is sent again and what was recorded meanwhile go out at once, and a new session that replaced a lost one
# has only the server's limits for new connections (app/transport/limits.py: 3x and 5 s by default) to take it in.
CATCH_UP_SPEED = 2.0
CATCH_UP_BURST_S = 2.0

Event = dict[str, Any]
EventHandler = Callable[[Event], None]
# Sees every message the server sends, as it arrives and before it is handled: an Opus packet (bytes) or a JSON text.
MessageHandler = Callable[[bytes | str], None]
# Sees the converted voice as it arrives: each packet decoded, (960,) float32 at 48 kHz, the output's next samples.
AudioHandler = Callable[[np.ndarray], None]
# What the sender puts on the socket: an Opus packet (binary message) or a control message (JSON text).
Outgoing = bytes | dict[str, Any]


class StreamError(Exception):
    """The connection broke or the server broke the protocol; error events are results, not StreamErrors."""


@dataclass(frozen=True)
class LatencyStats:
    """Latency figures over the block events of one or more streams."""

    streams: int
    blocks: int
    p50_ms: float | None  # of the block events' latency_ms; None without a block event
    p95_ms: float | None
    max_ms: float | None
    late_events: int
    dropped_ms: int  # input the server dropped because it fell behind
    first_audio_ms: float | None  # first packet sent -> first audio received; the slowest stream's when pooled

    @classmethod
    def from_results(cls, results: Sequence[StreamResult]) -> LatencyStats:
        """Pools the block latencies of all results, so percentiles are over every block of every stream."""
        latencies = [event["latency_ms"] for result in results for event in result.events if event["type"] == "block"]
        first_audio = [result.first_audio_ms for result in results if result.first_audio_ms is not None]
        percentiles = np.percentile(latencies, [50, 95]).tolist() if latencies else [None, None]
        return cls(
            streams=len(results),
            blocks=len(latencies),
            p50_ms=percentiles[0],
            p95_ms=percentiles[1],
            max_ms=max(latencies) if latencies else None,
            late_events=sum(1 for result in results for event in result.events if event["type"] == "late"),
            dropped_ms=sum(result.dropped_ms for result in results),
            first_audio_ms=max(first_audio) if first_audio else None,
        )

    def describe(self) -> str:
        """One line for people."""

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.0f} ms"

        return (
            f"latency p50 {ms(self.p50_ms)}, p95 {ms(self.p95_ms)}, max {ms(self.max_ms)} over {self.blocks} blocks; "
            f"first audio after {ms(self.first_audio_ms)}; "
            f"late events: {self.late_events}, input dropped: {self.dropped_ms} ms"
        )


@dataclass
class StreamResult:
    """Everything one stream produced; `error` is set when the server sent an error event."""

    output_48k: np.ndarray  # (n,) float32: every audio packet received, decoded, in order
    events: list[Event]  # every JSON event, in order of arrival
    ready: Event | None  # None when the server refused the stream before it started
    end: Event | None  # None when the stream did not end normally
    error: Event | None  # the first error event
    first_audio_ms: float | None  # client clock, from the first packet sent to the first packet received
    resumes: int = 0  # connections that dropped, after which the session was resumed
    restarts: int = 0  # connections that dropped when the server no longer held the session: a new one took over

    @property
    def dropped_ms(self) -> int:
        """Input the server dropped: its end event's total, or the last late event's running total."""
        if self.end is not None:
            return int(self.end["dropped_ms"])
        late = [event for event in self.events if event["type"] == "late"]
        return int(late[-1]["total_dropped_ms"]) if late else 0

    @property
    def stats(self) -> LatencyStats:
        """This stream's latency figures."""
        return LatencyStats.from_results([self])


def stream_url(url: str) -> str:
    """The WebSocket URL of the stream endpoint, from the server's base URL (http, https, ws or wss)."""
    parts = urllib.parse.urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"expected a URL such as http://127.0.0.1:8000, got {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith(STREAM_PATH):
        path += STREAM_PATH
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def start_message(
    token: str,
    voice_id: str,
    *,
    realtime: bool = True,
    seed: int | None = None,
    settings: dict[str, Any] | None = None,
    controls: dict[str, Any] | None = None,
) -> Event:
    """The protocol's start message; settings and controls go unchecked, so that the server's answer is the one."""
    message: Event = {
        "type": "start",
        "version": PROTOCOL_VERSION,
        "token": token,
        "voice_id": voice_id,
        "realtime": realtime,
    }
    if settings:
        message["settings"] = settings
    if controls:
        message["controls"] = controls
    if seed is not None:
        message["seed"] = seed
    return message


def encode_packets(audio_48k: np.ndarray) -> list[bytes]:
    """(n,) samples at 48 kHz -> 20 ms Opus packets. The input is padded with zeros by the encoder's lookahead (and
    then to a whole frame), so that its last samples come out of the encoder instead of staying inside it."""
    samples = np.asarray(audio_48k, dtype=np.float32)
    if samples.ndim != 1 or samples.size == 0:
        raise ValueError(f"expected (n,) mono samples with n > 0, got shape {samples.shape}")
    frames = -(-(samples.size + OpusEncoder.delay_samples) // FRAME_SAMPLES)
    padded = np.zeros(frames * FRAME_SAMPLES, dtype=np.float32)
    padded[: samples.size] = samples
    encoder = OpusEncoder()
    return [encoder.encode(frame) for frame in padded.reshape(frames, FRAME_SAMPLES)]


async def paced_packets(
    packets: Sequence[bytes], *, realtime: bool = True, set_voice_at: tuple[float, str] | None = None
) -> AsyncGenerator[Outgoing, None]:
    """Yields the packets, each at its due time when `realtime` (an absolute clock, so no drift), else at once.

    With `set_voice_at=(seconds, voice_id)`, a set_voice message follows the packet that completes that much input
    (at least the first packet, at most all of them).
    """
    switch_after = None
    if set_voice_at is not None:
        switch_after = min(max(1, round(set_voice_at[0] / FRAME_SECONDS)), len(packets))
    pacer = Pacer(FRAME_SECONDS)
    for index, packet in enumerate(packets):
        if realtime:
            await pacer.wait(index)
        yield packet
        if set_voice_at is not None and index + 1 == switch_after:
            yield {"type": "set_voice", "voice_id": set_voice_at[1]}


class ConnectionDropped(StreamError):
    """The connection closed mid-stream without an end or error event: the session may be resumed."""


@dataclass
class _Resume:
    """What resumes the session on a new connection: the latest resume token the server sent."""

    session_id: str
    resume_token: str


class _Stream:
    """One stream over one or more connections: a sender task for the input and a receive loop that keeps events
    and decodes the output, on each connection in turn; a connection that drops is followed by one that resumes."""

    def __init__(
        self,
        on_event: EventHandler | None,
        on_message: MessageHandler | None = None,
        on_audio: AudioHandler | None = None,
    ) -> None:
        self._on_event = on_event
        self._on_message = on_message
        self._on_audio = on_audio
        self._decoder = OpusDecoder()
        self._ready = asyncio.Event()
        self._ready_event: Event | None = None  # this connection's
        self.output: list[np.ndarray] = []
        self.events: list[Event] = []
        self.ready: Event | None = None
        self.end: Event | None = None
        self.error: Event | None = None
        self.resume: _Resume | None = None
        self.resumes = 0
        self.restarts = 0
        self.voice_id: str | None = None  # the latest set_voice sent: a resume must not switch back
        self._sent: deque[bytes] = deque(maxlen=RESEND_HISTORY_PACKETS)
        self._packets_sent = 0
        self._session_first_packet = 0  # the session's block 0 starts here (later than 0 after a restart)
        self._answered_packets = 0  # input packets whose converted block arrived
        self._first_sent_at: float | None = None
        self.first_audio_ms: float | None = None

    async def run(self, websocket: ClientConnection, start: Event, outgoing: asyncio.Queue[Outgoing | None]) -> None:
        self._ready.clear()
        self._ready_event = None
        self._decoder = OpusDecoder()  # the server's encoder of a new connection starts afresh
        await websocket.send(json.dumps(start))
        sender = asyncio.create_task(self._send(websocket, outgoing, realtime=start.get("realtime", True)))
        receiver = asyncio.create_task(self._receive(websocket))
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if not receiver.done():
                sender.result()  # the input is all sent (or its source failed): now wait for the server's end
            await receiver
        finally:
            # When the receiver stops first (an error event), the sender must not go on sending.
            for task in (sender, receiver):
                task.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)

    def start_for(self, start: Event) -> Event:
        """The start message of the next connection: the first one's with the voice last switched to, plus `resume`
        once there is a session."""
        message = {**start, "voice_id": self.voice_id or start["voice_id"]}
        if self.resume is not None:
            message["resume"] = {"session_id": self.resume.session_id, "resume_token": self.resume.resume_token}
        return message

    def take_expired_resume(self) -> bool:
        """Whether the connection just ended because a resume found the session gone (both its ingress and its
        converter were replaced at once); then the next connection starts a new session, and the input goes on."""
        if self.error is None or self.error.get("code") != ErrorCode.session_expired or self.resume is None:
            return False
        self.error, self.resume = None, None
        self.restarts += 1
        return True

    def result(self) -> StreamResult:
        return StreamResult(
            output_48k=np.concatenate(self.output) if self.output else np.zeros(0, dtype=np.float32),
            events=self.events,
            ready=self.ready,
            end=self.end,
            error=self.error,
            first_audio_ms=self.first_audio_ms,
            resumes=self.resumes,
            restarts=self.restarts,
        )

    async def _send(
        self, websocket: ClientConnection, outgoing: asyncio.Queue[Outgoing | None], *, realtime: bool
    ) -> None:
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await self._ready.wait()
        except TimeoutError:
            raise StreamError(f"the server sent no ready event within {READY_TIMEOUT_S:.0f} s") from None
        # A file's input is read by the server only as fast as it converts: nothing to hold back.
        allowance = TokenBucket(CATCH_UP_SPEED, CATCH_UP_BURST_S) if realtime else None
        try:
            for packet in self._unconverted():
                await _allowed(allowance)
                await websocket.send(packet)
            while (message := await outgoing.get()) is not None:
                if isinstance(message, bytes):
                    if self._first_sent_at is None:
                        self._first_sent_at = time.monotonic()
                    self._sent.append(message)
                    self._packets_sent += 1
                    await _allowed(allowance)
                    await websocket.send(message)  # returns once the write buffer drains: no unbounded backlog
                else:
                    if message.get("type") == "set_voice":
                        self.voice_id = message["voice_id"]
                    await websocket.send(json.dumps(message))
            outgoing.put_nowait(None)  # a connection that drops now resumes straight into `end`
            await websocket.send(json.dumps({"type": "end"}))
        except ConnectionClosed:
            return  # the receiver saw the same close and reports why; the message in hand is lost with it

    def _unconverted(self) -> list[bytes]:
        """After a drop: the packets to send again, which were in flight or waiting at the old ingress when the
        connection dropped, so that no input is lost. A resumed session says where its converter stands; a new
        session that replaced a lost one gets everything whose output never arrived."""
        assert self._ready_event is not None
        resumed_at = self._ready_event.get("resumed_at_block")
        if resumed_at is not None:
            first = self._session_first_packet + resumed_at * self._ready_event["block_ms"] // FRAME_MS
        elif self.restarts:
            first = self._session_first_packet = self._answered_packets
        else:
            return []
        kept_from = self._packets_sent - len(self._sent)
        return list(self._sent)[max(0, first - kept_from) :]

    async def _receive(self, websocket: ClientConnection) -> None:
        while True:
            try:
                message = await websocket.recv()
            except ConnectionClosed as closed:
                if self.error is not None:
                    return  # the server closes the socket after an error event
                kind = ConnectionDropped if self._ready.is_set() else StreamError
                raise kind(f"the server closed the stream before its end event ({_why(closed)})") from None
            if self._on_message is not None:
                self._on_message(message)
            if isinstance(message, bytes):
                self._take_audio(message)
                continue
            event = self._take_event(message)
            if event["type"] == "end" or (event["type"] == "error" and self._fatal(event)):
                return

    def _take_audio(self, packet: bytes) -> None:
        if self.ready is None:
            raise StreamError("the server sent audio before its ready event")
        if self.first_audio_ms is None and self._first_sent_at is not None:
            self.first_audio_ms = 1000 * (time.monotonic() - self._first_sent_at)
        try:
            audio = self._decoder.decode(packet)
        except OpusError as error:
            raise StreamError(f"the server sent audio that is not a 20 ms Opus packet: {error}") from None
        self.output.append(audio)
        if self._on_audio is not None:
            self._on_audio(audio)

    def _take_event(self, text: str) -> Event:
        try:
            event = json.loads(text)
        except json.JSONDecodeError:
            raise StreamError(f"the server sent a text message that is not JSON: {text[:80]!r}") from None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise StreamError(f"the server sent a message without a type: {text[:80]!r}")
        self.events.append(event)
        if event["type"] == "ready":
            self.ready = self.ready or event  # the first: a resumed session keeps its id, settings and format
            self._ready_event = event
            self.resumes += event.get("resumed_at_block") is not None
            self.resume = _Resume(event["session_id"], event["resume_token"])
            self._ready.set()
        elif event["type"] == "block" and self._ready_event is not None:
            block_packets = self._ready_event["block_ms"] // FRAME_MS
            self._answered_packets = self._session_first_packet + (event["index"] + 1) * block_packets
        elif event["type"] == "resume_token" and self.resume is not None:
            self.resume.resume_token = event["resume_token"]
        elif event["type"] == "end":
            self.end = event
        elif event["type"] == "error" and self.error is None:
            self.error = event
        if self._on_event is not None:
            self._on_event(event)
        return event

    def _fatal(self, error: Event) -> bool:
        # Protocol step 8: once started, unknown_voice can only answer set_voice, and the stream goes on.
        return not (self.ready is not None and error.get("code") == ErrorCode.unknown_voice)


async def _allowed(allowance: TokenBucket | None) -> None:
    """Waits until `allowance` holds one packet's time, and takes it (no wait without one)."""
    if allowance is None:
        return
    while (wait_s := allowance.time_until(FRAME_SECONDS)) > 0:
        await asyncio.sleep(wait_s)
    allowance.take(FRAME_SECONDS)


def _why(closed: ConnectionClosed) -> str:
    received = closed.rcvd
    if received is None:
        return "no close frame: the connection dropped"
    return f"close code {received.code}" + (f", {received.reason}" if received.reason else "")


async def _feed(messages: AsyncGenerator[Outgoing, None], outgoing: asyncio.Queue[Outgoing | None]) -> None:
    """Moves the input into the queue the current connection sends from, so that a dropped connection does not
    end the input: the next connection goes on where the last one stopped. A queue of one keeps the backpressure."""
    async for message in messages:
        await outgoing.put(message)
    await outgoing.put(None)


async def run_stream(
    url: str,
    start: Event,
    messages: AsyncGenerator[Outgoing, None],
    *,
    on_event: EventHandler | None = None,
    on_message: MessageHandler | None = None,
    on_audio: AudioHandler | None = None,
    resume_attempts: int = RESUME_ATTEMPTS,
) -> StreamResult:
    """Runs one stream: `start` (see `start_message`), then `messages` once the server is ready, then end.

    `on_event` sees each JSON event once parsed; `on_message` sees each raw message first (byte counts, arrival
    times of the audio: what a load test measures); `on_audio` sees the output's samples as they are decoded (what
    live playback plays). A connection that drops mid-stream is replaced by one that
    resumes the session (up to `resume_attempts` times in a row, `RESUME_BACKOFF_S` apart); the input produced
    meanwhile is sent when it is back, and the server drops what it cannot catch up on (`late` events).

    Raises OSError or websockets' InvalidURI / InvalidHandshake when no connection opens, and StreamError when it
    breaks for good; an error event is returned in the result instead.
    """
    stream = _Stream(on_event, on_message, on_audio)
    outgoing: asyncio.Queue[Outgoing | None] = asyncio.Queue(maxsize=1)
    # aclosing: however the stream ends, its source is closed (and with it the microphone).
    async with contextlib.aclosing(messages):
        feeder = asyncio.create_task(_feed(messages, outgoing))
        try:
            await _connect_and_resume(url, start, stream, outgoing, feeder, resume_attempts)
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
    return stream.result()


def retry_wait_s(result: StreamResult, retries_so_far: int) -> float | None:
    """How long to wait before trying a refused start again; None unless the server refused the start for capacity. The
    server's `retry_after_s`, doubled for each retry already made (a wave of callers must not come back at once),
    at most START_RETRY_MAX_S."""
    error = result.error
    if error is None or error.get("code") not in RETRYABLE_REFUSALS or result.ready is not None:
        return None
    return float(min(START_RETRY_MAX_S, float(error.get("retry_after_s") or START_RETRY_DEFAULT_S) * 2**retries_so_far))


async def run_stream_retrying(
    url: str,
    start: Event,
    messages: Callable[[], AsyncGenerator[Outgoing, None]],
    *,
    on_wait: Callable[[float, Event], None],
    retries: int = START_RETRIES,
    **options: Any,
) -> StreamResult:
    """`run_stream`, trying a start that the server refused for capacity again (`retry_wait_s`); `messages` makes
    a fresh input source for each try, and `on_wait(seconds, error)` tells the person before each wait."""
    for retries_so_far in range(retries + 1):
        result = await run_stream(url, start, messages(), **options)
        wait_s = retry_wait_s(result, retries_so_far)
        if wait_s is None or retries_so_far == retries:
            return result
        assert result.error is not None  # retry_wait_s answers only for a refusal
        on_wait(wait_s, result.error)
        await asyncio.sleep(wait_s)
    raise AssertionError("unreachable: the last try returns")


async def _connect_and_resume(
    url: str,
    start: Event,
    stream: _Stream,
    outgoing: asyncio.Queue[Outgoing | None],
    feeder: asyncio.Task[None],
    resume_attempts: int,
) -> None:
    failures = 0
    while True:
        try:
            # No permessage-deflate: Opus packets do not compress, and each stream would pay for a deflate context.
            async with connect(stream_url(url), compression=None) as websocket:
                await _watched(stream.run(websocket, stream.start_for(start), outgoing), feeder)
            if not stream.take_expired_resume():
                return
        except (ConnectionDropped, OSError, InvalidHandshake) as error:
            if stream.resume is None or failures >= resume_attempts:
                raise
            # A connection that worked until it dropped starts the count afresh; one that could not even open counts.
            failures = 0 if isinstance(error, ConnectionDropped) else failures + 1
            await asyncio.sleep(RESUME_BACKOFF_S * failures)


async def _watched(connection: Awaitable[None], feeder: asyncio.Task[None]) -> None:
    """Runs one connection, ending it early if the input source fails (its error is the stream's error)."""
    running = asyncio.ensure_future(connection)
    await asyncio.wait({running, feeder}, return_when=asyncio.FIRST_COMPLETED)
    if feeder.done() and not feeder.cancelled() and feeder.exception() is not None:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        feeder.result()
    await running


async def stream_audio(
    url: str,
    token: str,
    voice_id: str,
    audio_48k: np.ndarray,
    *,
    realtime: bool = True,
    seed: int | None = None,
    settings: dict[str, Any] | None = None,
    set_voice_at: tuple[float, str] | None = None,
    on_event: EventHandler | None = None,
) -> StreamResult:
    """Converts (n,) samples at 48 kHz through the server at `url` (its base URL, or the ws(s) stream URL).

    `realtime` paces the input at 20 ms per packet and asks the server to pace its output; otherwise both go as fast
    as the socket takes them. `set_voice_at=(seconds, voice_id)` switches voice after that much input. `on_event`
    sees each JSON event as it arrives. Raises as `run_stream` does.
    """
    packets = encode_packets(audio_48k)
    start = start_message(token, voice_id, realtime=realtime, seed=seed, settings=settings)
    messages = paced_packets(packets, realtime=realtime, set_voice_at=set_voice_at)
    return await run_stream(url, start, messages, on_event=on_event)


# Command line


def parse_setting(text: str) -> tuple[str, Any]:
    """key=value, with the value read as JSON (so 6 is an int and 0.24 a float) and the key checked against the
    protocol, so that a typo fails here and not as the server's bad_settings."""
    key, equals, value = text.partition("=")
    if not equals or key not in SettingsOverrides.model_fields:
        raise argparse.ArgumentTypeError(
            f"expected key=value with key one of {', '.join(SettingsOverrides.model_fields)}, got {text!r}"
        )
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"{key}: {value!r} is not a number") from None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m client.stream_client",
        usage="%(prog)s (INPUT | --mic) OUTPUT (--voice ID | --reference REF) [options] | %(prog)s --list-devices",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="*", type=Path, metavar="FILE", help="INPUT OUTPUT, or OUTPUT alone with --mic")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL (%(default)s)")
    parser.add_argument("--api-key", default=client_api_key(), help=f"API key (default: ${CLIENT_API_KEY})")
    voice = parser.add_mutually_exclusive_group()
    voice.add_argument("--voice", help="id of a voice already on the server")
    voice.add_argument("--reference", type=Path, help="upload this recording as a new voice, then use it")
    parser.add_argument("--fast", action="store_true", help="send the input as fast as possible, not in real time")
    parser.add_argument("--seed", type=int, help="diffusion noise seed, for reproducible output")
    parser.add_argument("--concurrency", type=int, default=1, help="streams of the same input at once (%(default)s)")
    parser.add_argument("--mic", action="store_true", help="stream the microphone until Ctrl+C")
    parser.add_argument("--play", action="store_true", help="play the converted voice live, too (real time only)")
    parser.add_argument(
        "--play-buffer",
        type=float,
        default=1000 * PLAY_PREBUFFER_S,
        metavar="MS",
        help="--play: audio buffered before playing (and after an underrun); more absorbs more jitter (%(default)g)",
    )
    parser.add_argument("--list-devices", action="store_true", help="list the audio devices, then exit")
    parser.add_argument("--input-device", metavar="DEVICE", help="--mic's device: index or part of its name")
    parser.add_argument("--output-device", metavar="DEVICE", help="--play's device: index or part of its name")
    parser.add_argument(
        "--setting",
        type=parse_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a stream setting",
    )
    add_control_flags(parser)
    args = parser.parse_args(argv)
    if args.list_devices:
        return args  # needs nothing else
    if len(args.files) != (1 if args.mic else 2):
        parser.error("give INPUT OUTPUT, or --mic OUTPUT")
    if args.voice is None and args.reference is None:
        parser.error("give --voice ID or --reference REF")
    if args.api_key is None:
        parser.error(f"give --api-key or set {CLIENT_API_KEY}")
    url = urllib.parse.urlsplit(args.url)
    if url.scheme not in {"http", "https"} or not url.netloc:
        parser.error(f"--url must be an http:// or https:// base URL, got {args.url!r}")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    for flag, given in (("--mic", args.mic), ("--play", args.play)):
        if given and (args.concurrency > 1 or args.fast):
            parser.error(f"{flag} is one real-time stream: it takes neither --concurrency nor --fast")
    if args.input_device is not None and not args.mic:
        parser.error("--input-device chooses --mic's device: give --mic")
    if args.output_device is not None and not args.play:
        parser.error("--output-device chooses --play's device: give --play")
    low, high = PLAY_BUFFER_RANGE_MS
    if not low <= args.play_buffer <= high:
        parser.error(f"--play-buffer must be from {low:g} to {high:g} ms")
    if args.seed is not None and args.seed < 0:
        parser.error("--seed must not be negative")
    try:
        args.controls = given_controls(args)
    except ControlError as error:
        parser.error(str(error))
    return args


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(count)]


def _printer(label: str) -> EventHandler:
    """Shows the events a person should see while a stream runs: the server falling behind, and warnings."""

    def show(event: Event) -> None:
        if event["type"] == "late":
            print(f"{label}: server fell behind, dropped {event['dropped_ms']} ms of input", file=sys.stderr)
        elif event["type"] == "warning":
            print(f"{label}: warning {event['code']}: {event['message']}", file=sys.stderr)

    return show


def _waiting(label: str) -> Callable[[float, Event], None]:
    def say(wait_s: float, error: Event) -> None:
        print(f"{label}: the server is full ({error['code']}: {error['message']}); trying again in {wait_s:.0f} s")

    return say


def _read_48k(path: Path) -> np.ndarray:
    audio = read_audio(path)
    return resample(torch.from_numpy(audio.samples), audio.rate, SAMPLE_RATE).numpy()


# Failures a user can meet and fix (server down, wrong key or voice, bad file); anything else is a bug.
EXPECTED_ERRORS = (ClientError, AudioError, StreamError, AudioDeviceError, OSError, InvalidURI, InvalidHandshake)


async def _run(args: argparse.Namespace) -> int:
    """Everything after argument parsing; expected failures raise, and `main` turns them into messages."""
    # The input and the speaker first: a missing package, device or file fails before any network call.
    microphone = None
    if args.mic:
        library = sound_library("--mic")
        microphone = Microphone(library, choose_device(library, args.input_device, "input"))
    packets = [] if microphone is not None else encode_packets(_read_48k(args.files[0]))
    if args.play:
        library = sound_library("--play")
        device = choose_device(library, args.output_device, "output")
        with Player(library, device, prebuffer_s=args.play_buffer / 1000) as player:
            result = await _stream(args, microphone, packets, on_audio=player.push)
            await player.finish()
        print(f"  {player.stats.describe()}")
        return result
    return await _stream(args, microphone, packets)


async def _stream(
    args: argparse.Namespace, microphone: Microphone | None, packets: list[bytes], on_audio: AudioHandler | None = None
) -> int:
    """The streams themselves, from the token on; `on_audio` sees the converted voice as it arrives."""
    # urllib blocks: off the event loop, as every network call of a coroutine should be.
    token = await asyncio.to_thread(get_token, args.url, args.api_key)
    voice_id = args.voice
    if args.reference is not None:
        uploaded = await asyncio.to_thread(upload_voice, args.url, token, args.reference, args.reference.stem)
        voice_id = uploaded["voice_id"]
        print(f"uploaded {args.reference} as voice {voice_id} ({uploaded['seconds']:.1f} s)")
    # Only the controls given: absent ones keep the server's neutral defaults.
    start = start_message(
        token, voice_id, realtime=not args.fast, seed=args.seed, settings=dict(args.setting), controls=args.controls
    )
    outputs = _output_paths(args.files[-1], args.concurrency)
    if microphone is not None:
        # Ctrl+C ends the input; the server still converts and returns what was said before it.
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, microphone.stop)
        print("streaming the microphone; press Ctrl+C to stop", file=sys.stderr)
    labels = [f"stream {index}" for index in range(len(outputs))]
    if microphone is not None:
        attempts: list[StreamResult | BaseException] = list(
            await asyncio.gather(
                run_stream(args.url, start, microphone.packets(), on_event=_printer(labels[0]), on_audio=on_audio),
                return_exceptions=True,
            )
        )
    else:
        # A file can be sent again from its start: a start refused while the service scales up is retried.
        attempts = list(
            await asyncio.gather(
                *(
                    run_stream_retrying(
                        args.url,
                        start,
                        lambda: paced_packets(packets, realtime=not args.fast),
                        on_wait=_waiting(label),
                        on_event=_printer(label),
                        on_audio=on_audio,
                    )
                    for label in labels
                ),
                return_exceptions=True,
            )
        )
    return _report(labels, outputs, attempts, args.url)


def _report(labels: list[str], outputs: list[Path], attempts: list[StreamResult | BaseException], url: str) -> int:
    """Writes each stream's output, prints its figures or its failure; the exit status (1 if any stream failed)."""
    failed = False
    results: list[StreamResult] = []
    for label, output, attempt in zip(labels, outputs, attempts, strict=True):
        if isinstance(attempt, BaseException):
            if not isinstance(attempt, EXPECTED_ERRORS):
                raise attempt  # a bug: let its traceback show
            print(f"error: {label}: {_explain(attempt, url)}", file=sys.stderr)
            failed = True
        elif attempt.error is not None:
            error = attempt.error
            print(f"error: {label}: server error {error['code']}: {error['message']}", file=sys.stderr)
            failed = True
        else:
            write_audio(output, attempt.output_48k, SAMPLE_RATE)
            print(f"{label}: wrote {output} ({len(attempt.output_48k) / SAMPLE_RATE:.2f} s)")
            print(f"  {attempt.stats.describe()}")
            if attempt.resumes or attempt.restarts:
                # Said out loud: a restart means the model's context started afresh mid-stream.
                print(f"  the connection dropped; resumed {attempt.resumes}x, new session {attempt.restarts}x")
            results.append(attempt)
    if len(outputs) > 1 and results:
        pooled = LatencyStats.from_results(results)
        print(f"all {pooled.streams} streams that ended: {pooled.describe()}")
    return 1 if failed else 0


def _explain(error: BaseException, url: str) -> str:
    if isinstance(error, ClientError) and error.status == 401:
        return f"the server refused the API key (HTTP 401): {error.detail}"
    if isinstance(error, TimeoutError):  # before OSError, of which it is a subclass
        return f"no answer from {stream_url(url)} in time"
    if isinstance(error, OSError | InvalidHandshake | InvalidURI):
        return f"cannot open {stream_url(url)}: {error}"
    return str(error)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.list_devices:
            print(describe_devices(sound_library("--list-devices")))
            return 0
        return asyncio.run(_run(args))
    except EXPECTED_ERRORS as error:
        print(f"error: {_explain(error, args.url)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl+C while streaming a file: stop without a traceback, and write nothing
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
