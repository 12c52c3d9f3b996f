"""What a live connection does with its session, written once for every transport.

A connection has a control WebSocket (JSON messages and events of protocol v1, app/transport/protocol.py) and a
media path: binary messages on the same socket (`/v1/stream`), a WebRTC track (`/v1/rtc`), or RTP over UDP
(`/v1/rtp`). `SessionDriver` runs the part they share:

    accept -> start message (token checked) -> open or resume the session -> `ready`
    -> the transport connects its media (`connect`)
    -> input: control messages (`set_voice`, `end`) and media, until `end`; output: blocks through ONE outbox, so
       that every block's events go out before its audio, paced at 20 ms a frame unless the media sink paces itself
       (app/transport/outbox.py: bounded, the oldest audio dropped and a `warning` sent when a client falls behind)
    -> `end` event, close 1000
    -> any failure: an `error` event with its code and the matching close code
    -> `finally`: the transport's resources, then the session (closed, or held on its converter for a resume)

A transport subclass only reads and writes its media and says how its control messages parse: the hooks below. It
creates what the media needs (codecs, peer connections, ports) in `connect`, after a valid start: a socket that
sends nothing, or garbage, costs a coroutine and is closed after `start_timeout_s`. It calls
`self.limits.input_arrived()` for every media packet, so that a session whose client went quiet ends after
`idle_input_s` (app/transport/limits.py), and the session's key is watched while the session runs (revocation,
rotation, daily quota: app/transport/quotas.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from typing import Any, ClassVar, TypeVar

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from app.audio.opus import SAMPLE_RATE
from app.audio.pacing import Pacer
from app.logs import note, session_log
from app.serving.live import BlockReport, LiveSession, pump
from app.serving.wire import CapacityExceeded, SessionLost, SessionTakenOver
from app.transport.limits import ConnectionLimits
from app.transport.outbox import Outbox
from app.transport.protocol import (
    CLOSE_NORMAL,
    FRAME_MS,
    ControlsSetEvent,
    EndEvent,
    EndMessage,
    ErrorCode,
    ProtocolError,
    SetControlsMessage,
    SetVoiceMessage,
    StartMessage,
    WarningEvent,
    close_code,
)
from app.transport.sessions import BlockEvents, StreamServices

log = logging.getLogger(__name__)

T = TypeVar("T")
OUTPUT_DROPPED = "output_dropped"  # the warning code: converted audio the client did not take in time was dropped
DROP_REPORT_INTERVAL_S = 1.0  # at most one output_dropped warning a second


class SessionDriver(ABC):
    """One connection and its session; subclasses supply the media path through the hooks."""

    transport: ClassVar[str]  # the log field and metrics label: "websocket", "webrtc", "rtp"
    noun: ClassVar[str] = "stream"  # how the logs name one connection: "stream", "call"
    allows_offline: ClassVar[bool] = False  # honours `realtime: false` (input read as fast as it converts)

    def __init__(self, websocket: WebSocket, stream: StreamServices) -> None:
        self.websocket = websocket
        self.stream = stream
        self.session: LiveSession | None = None
        self.owner = ""  # the API key id of the caller, known once the start message is checked
        self.generation = 0  # of the key's secret its token was issued for
        self.realtime = True
        self.events = BlockEvents("")
        self.limits = ConnectionLimits(stream.limits)
        self.connected_at = time.time()  # wall clock, comparable with a resumed session's start
        self.resumable = False  # the connection dropped mid-stream: leave the session for the client to resume
        self.session_freed = False  # its converter slot and key lease were let go (before `end`, or in teardown)

    # -- the hooks of a transport ----------------------------------------------------------------------------------

    @abstractmethod
    def parse(self, text: str) -> Any:
        """One control message, parsed and checked (protocol.parse_client_message or a superset of it)."""

    async def connect(self, start: StartMessage, session: LiveSession) -> None:
        """Sets up the media path once `ready` is sent (WebRTC: offer and answer; RTP: a UDP port)."""
        return  # nothing to do, unless a transport says otherwise

    async def take_packet(self, session: LiveSession, packet: bytes) -> None:
        """A binary message on the control socket, once the session runs."""
        raise ProtocolError(ErrorCode.bad_message, "this socket carries JSON text only; the audio has its own path")

    async def receive_media(self, session: LiveSession) -> None:
        """Reads media from a path of its own into `feed` until cancelled (the control socket's end ends it)."""
        await asyncio.Event().wait()

    async def drain_media(self, session: LiveSession) -> None:
        """After `end`: feeds what the media path still holds (RTP: its jitter buffer), before the input ends."""
        return  # nothing held, unless a transport says otherwise

    @abstractmethod
    async def send_frame(self, frame: np.ndarray) -> None:
        """Sends one 20 ms frame of converted audio (48 kHz mono float32)."""

    @property
    def paces_output(self) -> bool:
        """Whether the driver paces frames at 20 ms; False when the media sink keeps time itself."""
        return self.realtime

    async def watch(self) -> None:
        """Raises when the media path fails on its own; never returns (default: waits forever)."""
        await asyncio.Event().wait()

    async def play_out(self) -> None:
        """Waits until the last frame handed to `send_frame` has left (default: it has)."""
        return  # nothing to do, unless a transport says otherwise

    async def release(self) -> None:
        """Frees the transport's resources; runs however the connection ends."""
        return  # nothing to do, unless a transport says otherwise

    def resumable_after(self, error: ProtocolError) -> bool:
        """Whether the session outlives this error mid-stream, for the client to resume (default: no)."""
        return False

    # -- the connection ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        with session_log(self.transport):
            await self.websocket.accept()
            try:
                await self._serve()
            except ProtocolError as error:
                self.resumable = self.mid_stream and self.resumable_after(error)
                await self._fail(error)
            except WebSocketDisconnect:
                self.resumable = self.mid_stream
                resumable = " (resumable)" if self.resumable else ""
                log.info("%s %s: client disconnected%s", self.noun, self.session_id, resumable)
            except SessionTakenOver:
                log.info("%s %s: resumed on another connection; this one stops", self.noun, self.session_id)
            except Exception:
                log.exception("%s %s: internal error", self.noun, self.session_id)
                await self._fail(
                    ProtocolError(ErrorCode.internal, f"internal server error; the {self.noun} was closed")
                )
            finally:
                await self._release()

    @property
    def session_id(self) -> str:
        return self.session.session_id if self.session else "-"

    @property
    def mid_stream(self) -> bool:
        return self.session is not None and not self.session.input_ended

    async def _serve(self) -> None:
        start = await self._receive_start()
        session = await self._open(start)
        await self.connect(start, session)
        reader = asyncio.create_task(self.limits.bounded(self._read_input(session)))
        writer = asyncio.create_task(self._write(session))
        watch = asyncio.create_task(self.watch())
        key = asyncio.create_task(self.stream.quotas.watch(session))  # revoked, rotated away, out of daily time
        tasks = (reader, writer, watch, key)
        try:
            await guarded(reader, writer, watch, key)  # until the client sends `end`
            session.end_input()
            await guarded(writer, watch, key)
            await guarded(self.play_out(), watch, key)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # none left running, no error left unretrieved
        # Free the converter slot and the key's lease before the client hears `end`: a client that starts its next
        # session at once must not be refused for the one that just ended.
        await self._free_session()
        # The session's totals, over every connection it had (a resumed session counts what came before).
        end = EndEvent(blocks=session.blocks_answered, dropped_ms=round(session.total_dropped_ms))
        await self.send_text(end.model_dump_json())
        await self.websocket.close(code=CLOSE_NORMAL)
        log.info("%s %s: ended after %d blocks", self.noun, session.session_id, session.blocks_answered)

    async def _release(self) -> None:
        try:
            await self.release()
        finally:
            if self.session is not None:
                await self._free_session()
                self.stream.stream_closed(self.transport)

    async def _free_session(self) -> None:
        """Once: the session's key lease and stream time, and its converter slot (unless held for a resume)."""
        if self.session is None or self.session_freed:
            return
        self.session_freed = True
        self.stream.session_ended(self.session, held=self.resumable)
        if not self.resumable:
            with contextlib.suppress(Exception):  # a lost converter took the session with it
                await self.session.close()

    # -- control messages ----------------------------------------------------------------------------------------

    async def receive(self) -> bytes | Any:
        """The next message on the control socket: a binary one's bytes, or a parsed text message."""
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        packet = message.get("bytes")
        if packet is not None:
            return packet
        self.limits.text()
        return self.parse(message.get("text") or "")

    async def _receive_start(self) -> StartMessage:
        start = await self.limits.first(self.receive())
        if isinstance(start, bytes):
            raise ProtocolError(ErrorCode.not_started, "the first message must be the JSON start message")
        if not isinstance(start, StartMessage):
            raise ProtocolError(ErrorCode.not_started, f"the first message must be 'start', not '{start.type}'")
        claims = self.stream.check_start(start)
        self.owner, self.generation = claims.key_id, claims.generation
        note(key_id=self.owner)
        return start

    async def _open(self, start: StartMessage) -> LiveSession:
        session, ready = await self.stream.start_session(start, self.owner, self.generation)
        self.realtime = start.realtime or not self.allows_offline
        session.realtime = self.realtime  # a file's blocks have no deadline
        self.session = session  # from here on, `run` closes it whatever happens
        if start.controls is not None:
            session.set_controls(**start.controls.changes())
        note(session_id=session.session_id)
        self.events = self.stream.block_events(session, self.owner)
        self.stream.stream_opened(self.transport)
        # Only the time before this connection: its own is on the limits' clock already.
        earlier_s = self.connected_at - session.started_at
        self.limits.count_earlier(earlier_s)
        if ready.resumed_at_block is not None:
            # The client sends again all it recorded since the block the converter stands at: at most the
            # session's age less the input converted, which the limits must not mistake for a flood.
            self.limits.allow_resend(earlier_s - ready.resumed_at_block * ready.block_ms / 1000)
        await self.send_text(ready.model_dump_json())
        how = "started" if ready.resumed_at_block is None else f"resumed at block {ready.resumed_at_block}"
        log.info("%s %s: %s on converter %s", self.noun, session.session_id, how, session.replica)
        return session

    async def _read_input(self, session: LiveSession) -> None:
        """Control messages and media until the client sends `end`; no input follows once this returns."""
        media = asyncio.create_task(self.receive_media(session))
        idle = asyncio.create_task(self.limits.idle_watch())
        try:
            await guarded(self._read_control(session), media, idle)
        finally:
            for task in (media, idle):
                task.cancel()
            await asyncio.gather(media, idle, return_exceptions=True)
        await self.drain_media(session)

    async def _read_control(self, session: LiveSession) -> None:
        while True:
            if not self.realtime:
                with self.limits.holding_input():  # the server holds the input back: not the client's silence
                    await session.wait_for_room()  # a file can wait: slow the sender down instead of dropping input
            message = await self.receive()
            if isinstance(message, bytes):
                await self.take_packet(session, message)
            elif isinstance(message, EndMessage):
                return
            elif isinstance(message, SetVoiceMessage):
                await self._switch_voice(session, message.voice_id)
            elif isinstance(message, SetControlsMessage):
                controls = session.set_controls(**message.changes())
                await self.send_text(ControlsSetEvent(controls=controls).model_dump_json())
            else:
                raise ProtocolError(ErrorCode.bad_message, f"'{message.type}' cannot be sent once the session runs")

    async def _switch_voice(self, session: LiveSession, voice_id: str) -> None:
        """An unknown voice is answered with an error event, and the session goes on with its current voice."""
        try:
            await self.stream.check_voice(voice_id, self.owner)
        except ProtocolError as error:
            await self.send_text(error.event().model_dump_json())
            return
        session.request_voice(voice_id)

    async def send_text(self, text: str) -> None:
        if self.websocket.application_state == WebSocketState.CONNECTED:
            await self.websocket.send_text(text)

    async def _fail(self, error: ProtocolError) -> None:
        if error.code == ErrorCode.internal:
            log.error("%s %s: %s", self.noun, self.session_id, error.message)
        else:
            # A bad offer's message may quote the offer (and its ICE password): the code says enough in a log.
            message = "" if error.code == ErrorCode.bad_offer else error.message
            what = "ended" if self.session is not None else "refused"
            log.info("%s %s: %s (%s): %s", self.noun, self.session_id, what, error.code, message)
        event = self.stream.error_event(error)
        with contextlib.suppress(Exception):  # the socket may be gone already; the connection ends either way
            await self.send_text(event.model_dump_json())
            await self.websocket.close(code=close_code(error.code))

    # -- media ---------------------------------------------------------------------------------------------------

    async def feed(self, session: LiveSession, pcm_48k: np.ndarray) -> None:
        """Received input, 48 kHz mono: counted against the real-time limit, then to the session (`late` if it
        had to drop old input)."""
        if self.realtime:  # a file's input is read only as fast as it converts (wait_for_room)
            self.limits.audio(len(pcm_48k) / SAMPLE_RATE)
        late = session.feed(pcm_48k)
        if late is not None:
            await self.send_text(self.stream.late_event(late))

    async def _write(self, session: LiveSession) -> None:
        """Convert blocks as fast as they come; a separate sender sends them out, in real time when paced.

        Pacing inside the conversion loop would hold block k+1 back until block k had played, adding a whole step
        of latency to every block: the outbox decouples the two and keeps events and audio in protocol order.
        """
        max_frames = max(1, round(self.stream.limits.max_output_backlog_s * 1000 / FRAME_MS))
        # Paced output drops its oldest audio when the client falls behind; unpaced output (a file, or a sink that
        # keeps time itself and bounds its own buffer) holds the conversion back instead.
        outbox = Outbox(max_frames, drop_oldest=self.paces_output)
        sender = asyncio.create_task(self._send_outbox(outbox))

        async def emit_report(report: BlockReport) -> None:
            self.stream.record_block(report)
            for event in self.events.of(report):
                outbox.put_event(event)

        try:
            await pump(session, outbox.put_frame, emit_report)
            outbox.close()
            await sender
        except SessionLost as error:
            raise ProtocolError(ErrorCode.internal, "the converter was lost and could not be replaced") from error
        except CapacityExceeded as error:  # its converter was lost, and every other one is full
            raise await self.stream.every_converter_full() from error
        finally:
            sender.cancel()

    async def _send_outbox(self, outbox: Outbox) -> None:
        """Events go out at once; audio frames at 20 ms each against an absolute clock (when paced). Frames the
        outbox dropped are said in an `output_dropped` warning (at most one a second, with the total so far)."""
        pacer = Pacer(FRAME_MS / 1000)
        sent = reported = 0
        reported_at = -DROP_REPORT_INTERVAL_S
        loop = asyncio.get_running_loop()
        while (item := await outbox.get()) is not None:
            if outbox.dropped_frames > reported and loop.time() - reported_at >= DROP_REPORT_INTERVAL_S:
                reported, reported_at = outbox.dropped_frames, loop.time()
                message = f"{reported * FRAME_MS} ms of converted audio dropped so far: it was not read in time"
                await self.send_text(WarningEvent(code=OUTPUT_DROPPED, message=message).model_dump_json())
            if isinstance(item, str):
                await self.send_text(item)
                continue
            if self.paces_output:
                await pacer.wait(sent)
            await self.send_frame(item)
            sent += 1


async def guarded(main: Awaitable[T], *guards: asyncio.Task[Any]) -> T:
    """The result of `main`, unless a guard ends first with an error, which is raised."""
    task = asyncio.ensure_future(main)
    try:
        done, _ = await asyncio.wait({task, *guards}, return_when=asyncio.FIRST_COMPLETED)
        for guard in done - {task}:
            guard.result()
        return await task
    finally:
        task.cancel()  # when a guard failed first; a no-op once `main` is done
