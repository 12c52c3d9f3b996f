"""The `/v1/rtc` endpoint: a WebRTC call whose audio goes through a LiveSession, signalled over a WebSocket.

The signalling WebSocket stays open for the whole call. Serve never sees the peer connection (its media is UDP
straight to this process, past the HTTP proxy); the open socket is what makes the call an ongoing request, so that
autoscaling counts it and a draining replica keeps it; losing the socket ends the call's media, but the session
stays on its converter for a resume.

Protocol: the messages and events of protocol v1 (app/transport/protocol.py) plus an SDP offer and answer.

0. Optional, before a call: `GET /v1/ice` with `Authorization: Bearer <session token>` answers
   `{"iceServers": [...]}`, the STUN/TURN servers for the browser's `RTCPeerConnection`, including TURN credentials
   that expire (TURN REST API, app/auth/turn.py) when the server has a TURN secret. An empty list means host
   candidates only.
1. Open a WebSocket on `/v1/rtc` and send the `StartMessage` of `/v1/stream` (its step 2). `realtime` is ignored
   (a call is always real time). With `resume` (step 7 of `/v1/stream`) it continues a call whose socket or media
   connection dropped: after the `ReadyEvent`, the client sends a new offer from a new peer connection.
2. The server checks the token and the voice, opens the session, and answers a `ReadyEvent` (step 3), or an
   `ErrorEvent` and closes the socket (step 8).
3. The client sends `OfferMessage` `{"type": "offer", "sdp": "..."}`: a complete offer with its gathered ICE
   candidates (no trickle: wait for `iceGatheringState == "complete"`), holding exactly one audio section, which
   sends the microphone (sendrecv, to hear the converted voice). It may follow the start message at once; the
   server waits `rtc_connect_timeout_s` for it after `ready`.
4. The server answers `AnswerEvent` `{"type": "answer", "sdp": "..."}`, complete with its candidates, Opus being
   the only codec and no RTP header extension (none is needed, and each costs bytes on every packet); or
   `bad_offer`. ICE and DTLS must then connect within `rtc_connect_timeout_s`. The server sends ICE checks only
   to candidates that pass the outbound address filter (app/transport/addresses.py: public addresses, plus
   `ingress.outbound_networks`); others are dropped from the offer, and an offer with more than
   `max_ice_candidates` candidates is a `bad_offer`. (A peer-reflexive candidate, the source of a check that
   reached the server, is answered as ICE requires.)
5. The microphone goes up the call's audio track (any channel count; downmixed to mono). The converted voice comes
   back on the same transceiver in real time: Opus, mono, at `ingress.opus_bitrate`, with in-band FEC; silence
   while none is due. The answer offers in-band FEC for the microphone too (`useinbandfec=1`), and lost packets of
   the microphone are concealed from their RTP timestamps (app/transport/rtc_opus.py). The socket carries the
   events of step 5: `block` per converted block, `late`, `warning`.
6. At any time the client may send `set_voice`, confirmed by `voice_set` (step 6).
7. To hang up, the client sends `EndMessage`. The server converts the input that has arrived, plays it out on the
   track, sends an `EndEvent`, closes the socket with 1000 and then the peer connection. Audio still on its way when
   `end` arrives is not converted: send `end` a few tens of milliseconds after the last audio that matters.
   Closing the socket without `end` ends the call's media at once, with no end event; the session waits for a
   resume (`detached_session_ttl_s`).
8. Errors as in step 8, plus `bad_offer` and `connection_failed`: no offer or no media connection in time, or the
   peer connection failed or closed during the call (then, when the media had worked, the call can be resumed).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aioice.ice
import av
import numpy as np
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.exceptions import InternalError, InvalidAccessError, InvalidStateError, OperationError
from aiortc.mediastreams import MediaStreamError
from av import AudioFrame
from starlette.websockets import WebSocket

from app.audio.opus import FRAME_SAMPLES, SAMPLE_RATE
from app.audio.pacing import Pacer
from app.auth.turn import TurnCredentials
from app.serving.config import IceServer, IngressConfig
from app.serving.live import LiveSession
from app.transport.addresses import OutboundFilter
from app.transport.driver import SessionDriver
from app.transport.protocol import (
    FRAME_MS,
    AnswerEvent,
    EndMessage,
    ErrorCode,
    OfferMessage,
    ProtocolError,
    SetControlsMessage,
    SetVoiceMessage,
    StartMessage,
    parse_rtc_message,
)
from app.transport.rtc_opus import OpusPackets, conceal_lost_audio, with_opus_fec
from app.transport.sessions import StreamServices

log = logging.getLogger(__name__)

RtcMessage = StartMessage | OfferMessage | SetVoiceMessage | SetControlsMessage | EndMessage

S16_SCALE = 32768
SILENCE = np.zeros(FRAME_SAMPLES, dtype=np.float32)
OPUS_MIME_TYPE = "audio/opus"
# Converted audio waiting for the track: the block being played plus one arriving. More only adds delay.
OUTPUT_BUFFER_BLOCKS = 2
PLAY_OUT_SLACK_S = 1.0  # beyond the buffered audio's own duration, when hanging up


# -- audio frames ------------------------------------------------------------------------------------------------


def downmix(frame: AudioFrame) -> np.ndarray:
    """A received 16-bit frame as mono float32 in [-1, 1): the mean of its channels."""
    # Opus, the only codec negotiated, always decodes to 48 kHz; anything else is a bug, not input to resample.
    if frame.sample_rate != SAMPLE_RATE:
        raise ValueError(f"expected {SAMPLE_RATE} Hz audio, got {frame.sample_rate} Hz")
    if frame.format.name not in ("s16", "s16p"):
        raise ValueError(f"expected 16-bit audio, got {frame.format.name}")
    samples = frame.to_ndarray()
    channels = len(frame.layout.channels)
    # Packed audio interleaves the channels in one plane, (1, n * channels); planar audio is (channels, n).
    by_channel = samples.reshape(-1, channels).T if frame.format.is_packed else samples
    return by_channel.mean(axis=0, dtype=np.float32) / S16_SCALE


class ConvertedAudioTrack(MediaStreamTrack):
    """The converted voice on its way to the caller: 20 ms Opus packets in real time, silence when none is due.

    aiortc's sender asks for the next frame as soon as it has sent one, so the track paces itself: frame i is due
    at start + i * 20 ms (an absolute clock, so no delay accumulates). Converted audio arrives a block at a time.
    When a block comes after the previous one has finished playing, the gap is filled with silence and the rest of
    the call plays that much later, which then absorbs as much jitter, as a jitter buffer would. The buffer's bound
    caps that growth: beyond it, the oldest frames are dropped (`trimmed_frames`).
    """

    kind = "audio"

    def __init__(self, max_buffered_frames: int, bitrate: int = 32000) -> None:
        super().__init__()
        self._packets = OpusPackets(bitrate)
        self._buffer: deque[np.ndarray] = deque(maxlen=max_buffered_frames)
        self._pacer = Pacer(FRAME_MS / 1000)
        self._sent = 0
        self._empty = asyncio.Event()
        self._empty.set()
        self.trimmed_frames = 0

    @property
    def buffered_frames(self) -> int:
        return len(self._buffer)

    def push(self, frame_48k: np.ndarray) -> None:
        """Queues one 960-sample frame of converted audio."""
        if len(self._buffer) == self._buffer.maxlen:
            self.trimmed_frames += 1
        self._buffer.append(frame_48k)
        self._empty.clear()

    async def recv(self) -> av.Packet:
        while True:  # every 20 ms, until a frame needs a packet: DTX sends none for silence
            if self.readyState != "live":
                raise MediaStreamError
            await self._pacer.wait(self._sent)
            samples = self._buffer.popleft() if self._buffer else SILENCE
            if not self._buffer:
                self._empty.set()
            packet = self._packets.packet(samples, self._sent)
            self._sent += 1
            if packet is not None:
                return packet

    async def played_out(self) -> None:
        """Returns once every queued frame has gone to the sender."""
        await self._empty.wait()


# -- ICE configuration -------------------------------------------------------------------------------------------


def restrict_ice_host_addresses(addresses: Sequence[str]) -> None:
    """Makes ICE in this process offer exactly these host addresses (those of the IP versions it gathers).

    aioice offers every interface's address except loopback, and neither it nor aiortc takes a list of addresses:
    replacing its module function is the only way to offer 127.0.0.1 (loopback-only tests) or to keep media on the
    addresses meant for it. The change is process-wide, so it belongs in the process that owns the peer connections
    (under Serve, the ingress replica), once, and only when configured.
    """
    chosen = [ipaddress.ip_address(address) for address in addresses]

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        wanted = {4} if use_ipv4 else set()
        wanted |= {6} if use_ipv6 else set()
        return [str(address) for address in chosen if address.version in wanted]

    aioice.ice.get_host_addresses = host_addresses


def reachable_candidates(sdp: str, outbound: OutboundFilter, max_candidates: int) -> str:
    """The offer without the ICE candidates the service may not send to (private, link-local, metadata, names...).

    The candidates are the client's word: without this, one offer could make the service send ICE checks to the
    cloud's metadata address or to anything on the cluster's private network. More than `max_candidates` is refused
    outright (a browser offers a handful), so that no offer makes the server check hundreds of addresses.
    """
    lines = sdp.splitlines()
    candidates = [line for line in lines if line.startswith("a=candidate:")]
    if len(candidates) > max_candidates:
        raise ProtocolError(
            ErrorCode.bad_offer, f"the offer holds {len(candidates)} ICE candidates; at most {max_candidates} are taken"
        )
    # candidate:<foundation> <component> <transport> <priority> <address> <port> typ <type> ...
    refused = {line for line in candidates if len(line.split()) < 5 or not outbound.allows(line.split()[4])}
    if refused:
        log.info("dropped %d of %d ICE candidates of an offer: not addresses the service sends to", len(refused),
                 len(candidates))  # fmt: skip
    return "\r\n".join(line for line in lines if line not in refused) + "\r\n"


def without_header_extensions(sdp: str) -> str:
    """The offer without its RTP header extensions (`a=extmap:`), so that the answer negotiates none.

    aiortc answers those it knows, `sdes:mid` and `ssrc-audio-level`, and then both sides send them on every packet:
    8 bytes each way (the extension header, padded to 4 bytes), 3.2 kbit/s at 50 packets a second, a tenth of what
    the 64 kbit/s goal leaves beside the Opus payload. The call uses neither: with one audio section there is nothing
    for `mid` to tell apart (aiortc and browsers route the packets by SSRC or payload type), and the audio level is
    for a mixer choosing whom to forward, which the service is not.
    """
    return "".join(line + "\r\n" for line in sdp.splitlines() if not line.startswith("a=extmap:"))


# -- the call ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RtcServices:
    """What every call shares."""

    stream: StreamServices
    ice_servers: tuple[IceServer, ...] = ()
    turn: TurnCredentials | None = None
    connect_timeout_s: float = 15.0
    outbound: OutboundFilter = field(default_factory=OutboundFilter)  # where ICE checks may go
    max_candidates: int = 20

    @classmethod
    def from_config(cls, stream: StreamServices, config: IngressConfig) -> RtcServices:
        turn = None
        if config.turn_secret is not None:
            secret = config.turn_secret.get_secret_value().encode()
            turn = TurnCredentials(secret=secret, urls=tuple(config.turn_urls), ttl_s=config.turn_ttl_s)
        return cls(
            stream,
            tuple(config.ice_servers),
            turn,
            config.rtc_connect_timeout_s,
            OutboundFilter(config.outbound_networks),
            config.max_ice_candidates,
        )

    def peer_configuration(self) -> RTCConfiguration:
        # Always an explicit list, even an empty one: given none, aiortc adds Google's public STUN server.
        servers = [RTCIceServer(urls=s.urls, username=s.username, credential=s.credential) for s in self.ice_servers]
        return RTCConfiguration(iceServers=servers)

    def browser_ice_servers(self, user: str, now: float) -> list[dict[str, Any]]:
        """The `iceServers` of a browser's RTCPeerConnection; TURN credentials name `user` and expire."""
        servers = list(self.ice_servers)
        if self.turn is not None:
            servers.append(self.turn.for_key(user, now))
        # Absent rather than null: a browser would turn a null username into the string "null".
        return [server.model_dump(exclude_none=True) for server in servers]


class RtcCall(SessionDriver):
    """One call: the driver's session on a peer connection, whose output track and microphone are released in
    `release` however the call ends."""

    transport = "webrtc"
    noun = "call"

    def __init__(self, websocket: WebSocket, services: RtcServices) -> None:
        super().__init__(websocket, services.stream)
        self.services = services
        self.peer: RTCPeerConnection | None = None
        self.output: ConvertedAudioTrack | None = None
        self.microphone: MediaStreamTrack | None = None
        self._media_connected = False
        self._connection_changed = asyncio.Event()

    def parse(self, text: str) -> RtcMessage:
        return parse_rtc_message(text)

    def resumable_after(self, error: ProtocolError) -> bool:
        # A media path that worked and then died is the network's fault: the caller may re-negotiate and resume.
        # One that never connected would most likely fail again the same way: that session is freed.
        return error.code == ErrorCode.connection_failed and self._media_connected

    @property
    def paces_output(self) -> bool:
        return False  # the output track keeps time: aiortc's sender asks for each frame when it is due

    async def connect(self, start: StartMessage, session: LiveSession) -> None:
        offer = await self._receive_offer()
        frames = OUTPUT_BUFFER_BLOCKS * self._frames_per_block(session)
        self.output = output = ConvertedAudioTrack(frames, self.stream.opus_bitrate)
        conceal_lost_audio()
        self.peer = peer = RTCPeerConnection(self.services.peer_configuration())
        peer.on("connectionstatechange", self._connection_changed.set)
        self.microphone = await self._answer(peer, offer, output)

    async def release(self) -> None:
        if self.peer is not None:
            await self.peer.close()
        if self.output is not None:
            self.output.stop()
            if self.output.trimmed_frames:
                log.info("call %s: trimmed %d late output frames", self.session_id, self.output.trimmed_frames)

    async def _receive_offer(self) -> OfferMessage:
        timeout = self.services.connect_timeout_s
        try:
            async with asyncio.timeout(timeout):
                offer = await self.receive()
        except TimeoutError:
            raise ProtocolError(ErrorCode.connection_failed, f"no offer within {timeout:g} s of 'ready'") from None
        if not isinstance(offer, OfferMessage):
            what = "binary" if isinstance(offer, bytes) else offer.type
            raise ProtocolError(ErrorCode.bad_message, f"expected 'offer' after 'ready', not '{what}'")
        return offer

    @staticmethod
    def _frames_per_block(session: LiveSession) -> int:
        assert session.opened is not None
        return -(-session.opened.block * SAMPLE_RATE // (session.opened.sample_rate * FRAME_SAMPLES))

    # -- media ---------------------------------------------------------------------------------------------------

    async def _answer(
        self, peer: RTCPeerConnection, offer: OfferMessage, output: ConvertedAudioTrack
    ) -> MediaStreamTrack:
        """Applies the offer, sends the answer, and returns the caller's microphone track."""
        # The transceiver exists before the offer is applied, so that the offer's audio section takes it, with our
        # track to send and Opus as its only codec: whatever the browser offers, every frame then arrives at 48 kHz.
        transceiver = peer.addTransceiver(output, direction="sendrecv")
        capabilities = RTCRtpSender.getCapabilities("audio").codecs
        transceiver.setCodecPreferences([c for c in capabilities if c.mimeType.lower() == OPUS_MIME_TYPE])
        sdp = without_header_extensions(
            reachable_candidates(offer.sdp, self.services.outbound, self.services.max_candidates)
        )
        try:
            await peer.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except (ValueError, LookupError, InternalError, InvalidAccessError, InvalidStateError, OperationError) as error:
            raise ProtocolError(ErrorCode.bad_offer, f"unusable SDP offer: {error}") from error
        except Exception as error:
            # aiortc's SDP parser trusts its input: on some malformed offers it fails with whatever it trips over (an
            # assert, None for a missing attribute, a StopIteration turned RuntimeError). The offer is the only input.
            # Its type only: the message may quote the offer, whose ICE password is a credential.
            log.info("call %s: aiortc failed on the offer: %s", self.session_id, type(error).__name__)
            raise ProtocolError(ErrorCode.bad_offer, "unusable SDP offer: malformed or incomplete") from error
        microphone = transceiver.receiver.track
        if microphone is None or peer.getTransceivers() != [transceiver]:
            raise ProtocolError(ErrorCode.bad_offer, "the offer must hold exactly one audio section, which sends")
        try:
            await peer.setLocalDescription(await peer.createAnswer())  # aiortc gathers every candidate here
        except ValueError as error:  # an offer aiortc accepted can still yield an answer it refuses (a=mid with no id)
            raise ProtocolError(ErrorCode.bad_offer, f"unusable SDP offer: {error}") from error
        await self.send_text(AnswerEvent(sdp=with_opus_fec(peer.localDescription.sdp)).model_dump_json())
        return microphone

    async def watch(self) -> None:
        """Raises `connection_failed` when the peer connection does not connect in time, or fails or closes."""
        peer = self.peer
        assert peer is not None, "connect() made the peer connection"
        timeout = self.services.connect_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await self._connection_in(peer, {"connected", "failed", "closed"})
        except TimeoutError:
            raise ProtocolError(ErrorCode.connection_failed, f"no media connection within {timeout:g} s") from None
        if peer.connectionState == "connected":
            self._media_connected = True
            log.info("call %s: media connected", self.session_id)
            await self._connection_in(peer, {"failed", "closed"})
        raise ProtocolError(ErrorCode.connection_failed, f"the media connection {peer.connectionState}")

    async def _connection_in(self, peer: RTCPeerConnection, states: set[str]) -> None:
        while peer.connectionState not in states:
            self._connection_changed.clear()
            await self._connection_changed.wait()

    async def receive_media(self, session: LiveSession) -> None:
        assert self.microphone is not None, "connect() took the microphone"
        while True:
            try:
                frame = await self.microphone.recv()
            except MediaStreamError:
                raise ProtocolError(ErrorCode.connection_failed, "the caller's audio track ended") from None
            assert isinstance(frame, AudioFrame), "an audio track yields audio frames"
            self.limits.input_arrived()  # aiortc yields a frame per packet received: silence and DTX included
            await self.feed(session, downmix(frame))

    async def send_frame(self, frame: np.ndarray) -> None:
        assert self.output is not None
        self.output.push(frame)

    async def play_out(self) -> None:
        """Waits until the track has sent what is queued; a stalled sender does not hold up the hang-up."""
        output = self.output
        assert output is not None
        if not self._media_connected:
            # A call hung up before its media connected (a browser giving up on WebRTC to fall back to WebSocket):
            # nobody can hear the lookahead's flush, and waiting for it would keep the converter slot a second longer.
            return
        bound = output.buffered_frames * FRAME_MS / 1000 + PLAY_OUT_SLACK_S
        try:
            async with asyncio.timeout(bound):
                await output.played_out()
        except TimeoutError:
            log.warning("call %s: %d output frames not played out", self.session_id, output.buffered_frames)
