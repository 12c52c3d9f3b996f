"""The `/v1/stream` WebSocket endpoint: protocol v1 (app/transport/protocol.py) on top of a LiveSession.

One `StreamConnection` per socket owns everything of that connection: the Opus codecs, the live session, the
reader and writer tasks, and the cleanup in `finally`. A bad message ends only its own connection, with an
`ErrorEvent` carrying a stable code; other sessions never notice. A socket that merely drops leaves its session on
the converter, so that the client can resume it on a new socket (to any ingress replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from app.audio.opus import OpusDecoder, OpusEncoder, OpusError
from app.audio.pacing import Pacer
from app.logs import note, session_logged
from app.serving.live import BlockReport, LiveSession, pump
from app.serving.wire import SessionLost, SessionTakenOver
from app.transport.limits import ConnectionLimits
from app.transport.protocol import (
    FRAME_MS,
    EndEvent,
    EndMessage,
    ErrorCode,
    ProtocolError,
    SetVoiceMessage,
    StartMessage,
    check_audio_frame,
    close_code,
    parse_client_message,
)
from app.transport.sessions import BlockEvents, StreamServices

log = logging.getLogger(__name__)


class StreamConnection:
    def __init__(self, websocket: WebSocket, services: StreamServices) -> None:
        self.websocket = websocket
        self.services = services
        self.session: LiveSession | None = None
        self.decoder = OpusDecoder()
        self.encoder = OpusEncoder(services.opus_bitrate)
        self.realtime = True
        self.dropped_ms = 0.0
        self.events = BlockEvents("")
        self.owner = ""  # the API key id of the caller, known once the start message is checked
        self.limits = ConnectionLimits(services.limits)
        self.connected_at = time.time()  # wall clock, comparable with a resumed session's start
        self.resumable = False  # the socket dropped mid-stream: leave the session for the client to resume

    @session_logged("websocket")
    async def run(self) -> None:
        await self.websocket.accept()
        try:
            await self._serve()
        except ProtocolError as error:
            await self._fail(error)
        except WebSocketDisconnect:
            self.resumable = self.session is not None and not self.session.input_ended
            log.info("stream %s: client disconnected%s", self._session_id, " (resumable)" if self.resumable else "")
        except SessionTakenOver:
            log.info("stream %s: resumed on another connection; this one stops", self._session_id)
        except Exception:
            log.exception("stream %s: internal error", self._session_id)
            await self._fail(ProtocolError(ErrorCode.internal, "internal server error; the session was closed"))
        finally:
            if self.session is not None:
                self.services.session_ended(self.session, held=self.resumable)  # its key's lease and stream time
                if not self.resumable:
                    with contextlib.suppress(Exception):
                        await self.session.close()
                self.services.stream_closed("websocket")

    @property
    def _session_id(self) -> str:
        return self.session.session_id if self.session else "-"

    async def _serve(self) -> None:
        start = await self._receive_start()
        session = await self._open(start)
        reader = asyncio.create_task(self.limits.bounded(self._read(session)))
        writer = asyncio.create_task(self._write(session))
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a disconnect or protocol error surfaces here
            await writer  # the input ended normally: let the output finish
        finally:
            for task in (reader, writer):
                task.cancel()
        await self._send(EndEvent(blocks=self.events.blocks, dropped_ms=round(self.dropped_ms)).model_dump_json())
        await self.websocket.close(code=1000)

    async def _receive_start(self) -> StartMessage:
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        if message.get("bytes") is not None:
            raise ProtocolError(ErrorCode.not_started, "the first message must be the JSON start message")
        parsed = parse_client_message(message.get("text") or "")
        if not isinstance(parsed, StartMessage):
            raise ProtocolError(ErrorCode.not_started, f"the first message must be 'start', not '{parsed.type}'")
        self.owner = self.services.check_start(parsed)
        note(key_id=self.owner)
        return parsed

    async def _open(self, start: StartMessage) -> LiveSession:
        session, ready = await self.services.start_session(start, self.owner)
        self.realtime = start.realtime
        self.session = session  # from here on, `run` closes it whatever happens
        note(session_id=session.session_id)
        self.events = self.services.block_events(session, self.owner)
        self.services.stream_opened("websocket")
        # Only the time before this connection: its own is on the limits' clock already.
        self.limits.count_earlier(self.connected_at - session.started_at)
        await self._send(ready.model_dump_json())
        how = "started" if ready.resumed_at_block is None else f"resumed at block {ready.resumed_at_block}"
        log.info("stream %s: %s on converter %s", session.session_id, how, session.replica)
        return session

    async def _read(self, session: LiveSession) -> None:
        while True:
            if not self.realtime:
                await session.wait_for_room()  # a file can wait: slow the sender down instead of dropping input
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            packet = message.get("bytes")
            if packet is not None:
                if self.realtime:  # a file's input is read only as fast as it converts (wait_for_room)
                    self.limits.audio(FRAME_MS / 1000)  # one packet is 20 ms, by the protocol
                self._take_audio(session, packet)
                continue
            self.limits.text()
            parsed = parse_client_message(message.get("text") or "")
            if isinstance(parsed, EndMessage):
                session.end_input()
                return
            if isinstance(parsed, SetVoiceMessage):
                self._switch_voice(session, parsed.voice_id)
            else:
                raise ProtocolError(ErrorCode.bad_message, "the session has already started")

    def _switch_voice(self, session: LiveSession, voice_id: str) -> None:
        """An unknown voice here is answered with an error event, but the stream goes on with its current voice."""
        try:
            self.services.check_voice(voice_id, self.owner)
        except ProtocolError as error:
            asyncio.get_running_loop().create_task(self._send(error.event().model_dump_json()))
            return
        session.request_voice(voice_id)

    def _take_audio(self, session: LiveSession, packet: bytes) -> None:
        check_audio_frame(packet)
        try:
            pcm = self.decoder.decode(packet)
        except OpusError as error:
            raise ProtocolError(ErrorCode.bad_audio, f"undecodable Opus packet: {error}") from error
        late = session.feed(pcm)
        if late is not None:
            self.dropped_ms = late.total_dropped_ms
            asyncio.get_running_loop().create_task(self._send(self.services.late_event(late)))

    async def _write(self, session: LiveSession) -> None:
        """Convert blocks as fast as they come; a separate sender paces them out.

        Pacing inside the conversion loop would hold block k+1 back until block k had played, adding a whole step
        of latency to every block: the outbox decouples the two and keeps events and audio in protocol order.
        """
        outbox: asyncio.Queue[np.ndarray | str | None] = asyncio.Queue()
        sender = asyncio.create_task(self._send_outbox(outbox))

        async def emit_frame(frame: np.ndarray) -> None:
            outbox.put_nowait(frame)

        async def emit_report(report: BlockReport) -> None:
            self.services.record_block(report)
            for event in self.events.of(report):
                outbox.put_nowait(event)

        try:
            await pump(session, emit_frame, emit_report)
            outbox.put_nowait(None)
            await sender
        except SessionLost as error:
            raise ProtocolError(ErrorCode.internal, "the converter was lost and could not be replaced") from error
        finally:
            sender.cancel()

    async def _send_outbox(self, outbox: asyncio.Queue[np.ndarray | str | None]) -> None:
        """Events go out at once; audio frames at 20 ms each against an absolute clock (when real time)."""
        pacer = Pacer(FRAME_MS / 1000)
        sent = 0
        while (item := await outbox.get()) is not None:
            if isinstance(item, str):
                await self._send(item)
                continue
            if self.realtime:
                await pacer.wait(sent)
            await self.websocket.send_bytes(self.encoder.encode(item))
            sent += 1

    async def _send(self, text: str) -> None:
        if self.websocket.application_state == WebSocketState.CONNECTED:
            await self.websocket.send_text(text)

    async def _fail(self, error: ProtocolError) -> None:
        if error.code in {ErrorCode.internal}:
            log.error("stream %s: %s", self._session_id, error.message)
        else:
            log.info("stream %s: refused (%s): %s", self._session_id, error.code, error.message)
        event = self.services.error_event(error)
        with contextlib.suppress(Exception):
            await self._send(event.model_dump_json())
            await self.websocket.close(code=close_code(error.code))
