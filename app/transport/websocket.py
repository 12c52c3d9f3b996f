"""The `/v1/stream` WebSocket endpoint: protocol v1 (app/transport/protocol.py) on top of a LiveSession.

The audio travels on the control socket itself: one binary message per 20 ms Opus packet, both ways. Everything
else a connection does with its session (start, events, errors, teardown) is the driver's (app/transport/driver.py).
A bad message ends only its own connection, with an `ErrorEvent` carrying a stable code; other sessions never
notice. A socket that merely drops leaves its session on the converter, so that the client can resume it on a new
socket (to any ingress replica).
"""

from __future__ import annotations

import numpy as np
from starlette.websockets import WebSocket

from app.audio.opus import OpusDecoder, OpusEncoder, OpusError
from app.serving.live import LiveSession
from app.transport.driver import SessionDriver
from app.transport.protocol import (
    EndMessage,
    ErrorCode,
    ProtocolError,
    SetControlsMessage,
    SetVoiceMessage,
    StartMessage,
    check_audio_frame,
    parse_client_message,
)
from app.transport.sessions import StreamServices


class StreamConnection(SessionDriver):
    transport = "websocket"
    allows_offline = True

    def __init__(self, websocket: WebSocket, services: StreamServices) -> None:
        super().__init__(websocket, services)
        self.decoder: OpusDecoder | None = None  # made in `connect`, once a valid start has opened a session
        self.encoder: OpusEncoder | None = None

    def parse(self, text: str) -> StartMessage | SetVoiceMessage | SetControlsMessage | EndMessage:
        return parse_client_message(text)

    async def connect(self, start: StartMessage, session: LiveSession) -> None:
        self.decoder = OpusDecoder()
        self.encoder = OpusEncoder(self.stream.opus_bitrate)

    async def take_packet(self, session: LiveSession, packet: bytes) -> None:
        assert self.decoder is not None, "connect() made the codecs"
        self.limits.input_arrived()  # any packet, silence and DTX included
        check_audio_frame(packet)
        try:
            pcm = self.decoder.decode(packet)
        except OpusError as error:
            raise ProtocolError(ErrorCode.bad_audio, f"undecodable Opus packet: {error}") from error
        await self.feed(session, pcm)

    async def send_frame(self, frame: np.ndarray) -> None:
        assert self.encoder is not None, "connect() made the codecs"
        await self.websocket.send_bytes(self.encoder.encode(frame))
