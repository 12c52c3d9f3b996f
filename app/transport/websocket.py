"""The `/v1/stream` WebSocket endpoint: protocol v1 (app/transport/protocol.py) on top of a LiveSession.

One `StreamConnection` per socket owns everything of that connection: the Opus codecs, the live session, the
reader and writer tasks, and the cleanup in `finally`. A bad message ends only its own connection, with an
`ErrorEvent` carrying a stable code; other sessions never notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from app.audio.opus import OpusDecoder, OpusEncoder, OpusError
from app.audio.pacing import Pacer
from app.auth.tokens import TokenError, TokenSigner
from app.serving.live import BlockReport, ConverterClient, LiveSession, pump
from app.serving.wire import CapacityExceeded, SessionLost, UnknownVoice
from app.streaming.settings import StreamSettings
from app.transport.protocol import (
    FRAME_MS,
    BlockEvent,
    EndEvent,
    EndMessage,
    ErrorCode,
    ErrorEvent,
    LateEvent,
    ProtocolError,
    ReadyEvent,
    SetVoiceMessage,
    StartMessage,
    VoiceSetEvent,
    check_audio_frame,
    close_code,
    parse_client_message,
)
from app.voices.store import VoiceNotFound, VoiceStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamServices:
    """What every connection shares."""

    client: ConverterClient
    tokens: TokenSigner
    voices: VoiceStore
    defaults: StreamSettings
    max_backlog_blocks: int = 3
    retry_after_s: float = 5.0
    opus_bitrate: int = 32000


class StreamConnection:
    def __init__(self, websocket: WebSocket, services: StreamServices) -> None:
        self.websocket = websocket
        self.services = services
        self.session: LiveSession | None = None
        self.decoder = OpusDecoder()
        self.encoder = OpusEncoder(services.opus_bitrate)
        self.realtime = True
        self.blocks = 0
        self.dropped_ms = 0.0
        self._voice_id = ""

    async def run(self) -> None:
        await self.websocket.accept()
        try:
            await self._serve()
        except ProtocolError as error:
            await self._fail(error)
        except WebSocketDisconnect:
            log.info("stream %s: client disconnected", self._session_id)
        except Exception:
            log.exception("stream %s: internal error", self._session_id)
            await self._fail(ProtocolError(ErrorCode.internal, "internal server error; the session was closed"))
        finally:
            if self.session is not None:
                with contextlib.suppress(Exception):
                    await self.session.close()

    @property
    def _session_id(self) -> str:
        return self.session.session_id if self.session else "-"

    async def _serve(self) -> None:
        start = await self._receive_start()
        session = await self._open(start)
        self.session = session
        reader = asyncio.create_task(self._read(session))
        writer = asyncio.create_task(self._write(session))
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a disconnect or protocol error surfaces here
            await writer  # the input ended normally: let the output finish
        finally:
            for task in (reader, writer):
                task.cancel()
        await self._send(EndEvent(blocks=self.blocks, dropped_ms=round(self.dropped_ms)).model_dump_json())
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
        if parsed.resume is not None:
            raise ProtocolError(ErrorCode.session_expired, "this server holds no session to resume; start a new one")
        try:
            self.services.tokens.verify(parsed.token)
        except TokenError as error:
            raise ProtocolError(ErrorCode.unauthorized, f"invalid session token: {error}") from error
        return parsed

    async def _open(self, start: StartMessage) -> LiveSession:
        settings = start.settings.apply(self.services.defaults) if start.settings else self.services.defaults
        self._check_voice(start.voice_id)
        session = LiveSession(
            self.services.client,
            session_id=uuid.uuid4().hex,
            voice_id=start.voice_id,
            settings=settings,
            seed=start.seed if start.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "big"),
            max_backlog_blocks=self.services.max_backlog_blocks,
        )
        try:
            opened = await session.open()
        except CapacityExceeded as error:
            raise ProtocolError(ErrorCode.overloaded, "every converter is full; try again shortly") from error
        except UnknownVoice as error:
            raise ProtocolError(ErrorCode.unknown_voice, f"unknown voice {start.voice_id}") from error
        self.realtime = start.realtime
        self._voice_id = start.voice_id
        block_ms = round(1000 * opened.block / opened.sample_rate)
        ready = ReadyEvent(session_id=session.session_id, resume_token="", block_ms=block_ms, settings=settings)
        await self._send(ready.model_dump_json())
        log.info("stream %s: started on converter %s", session.session_id, opened.replica)
        return session

    def _check_voice(self, voice_id: str) -> None:
        try:
            self.services.voices.get(voice_id)
        except (VoiceNotFound, ValueError) as error:
            raise ProtocolError(ErrorCode.unknown_voice, f"unknown voice {voice_id}") from error

    async def _read(self, session: LiveSession) -> None:
        while True:
            if not self.realtime:
                await session.wait_for_room()  # a file can wait: slow the sender down instead of dropping input
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            packet = message.get("bytes")
            if packet is not None:
                self._take_audio(session, packet)
                continue
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
            self._check_voice(voice_id)
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
            event = LateEvent(dropped_ms=round(late.dropped_ms), total_dropped_ms=round(late.total_dropped_ms))
            asyncio.get_running_loop().create_task(self._send(event.model_dump_json()))

    async def _write(self, session: LiveSession) -> None:
        pacer = Pacer(FRAME_MS / 1000)
        sent = 0

        async def emit_frame(frame: np.ndarray) -> None:
            nonlocal sent
            if self.realtime:
                await pacer.wait(sent)
            await self.websocket.send_bytes(self.encoder.encode(frame))
            sent += 1

        async def emit_report(report: BlockReport) -> None:
            if report.voice_id != self._voice_id:
                self._voice_id = report.voice_id
                await self._send(VoiceSetEvent(voice_id=report.voice_id, from_block=report.index).model_dump_json())
            self.blocks += 1
            event = BlockEvent(
                index=report.index,
                input_start_ms=round(report.input_start_ms),
                latency_ms=report.latency_ms,
                queue_ms=report.queue_ms,
                steps=report.steps,
                silent=report.silent,
            )
            await self._send(event.model_dump_json())

        try:
            await pump(session, emit_frame, emit_report)
        except SessionLost as error:
            raise ProtocolError(ErrorCode.internal, "the converter was lost and could not be replaced") from error

    async def _send(self, text: str) -> None:
        if self.websocket.application_state == WebSocketState.CONNECTED:
            await self.websocket.send_text(text)

    async def _fail(self, error: ProtocolError) -> None:
        if error.code in {ErrorCode.internal}:
            log.error("stream %s: %s", self._session_id, error.message)
        else:
            log.info("stream %s: refused (%s): %s", self._session_id, error.code, error.message)
        event = ErrorEvent(
            code=error.code,
            message=error.message,
            retry_after_s=self.services.retry_after_s if error.code == ErrorCode.overloaded else None,
        )
        with contextlib.suppress(Exception):
            await self._send(event.model_dump_json())
            await self.websocket.close(code=close_code(error.code))
