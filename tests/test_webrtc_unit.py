"""The WebRTC transport (app/transport/webrtc.py): its pieces one by one, then whole calls in this process.

The calls are real: an aiortc peer (`rtc_call`, also used by tests/serve/test_webrtc.py) plays an array in real time
to an `RtcCall` behind uvicorn on loopback, which converts through a `ConverterService` in identity mode (the input
comes back), so the received audio can be compared with what was sent. ICE offers 127.0.0.1 only, on both sides.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fractions
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aioice.ice
import av
import numpy as np
import pytest
import torch
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcicetransport import RTCIceGatherer
from aiortc.rtp import RtpPacket
from av import AudioFrame
from pydantic import TypeAdapter, ValidationError
from starlette.websockets import WebSocket, WebSocketState
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from app.audio.files import resample
from app.audio.opus import FRAME_SAMPLES, SAMPLE_RATE
from app.audio.opus_concealment import ConcealingOpusDecoder
from app.audio.pacing import Pacer
from app.auth.tokens import TokenSigner
from app.auth.turn import TurnCredentials
from app.model.seedvc import SeedVC
from app.serving.config import ConverterConfig, IceServer, IngressConfig
from app.serving.converter import ConverterService
from app.serving.local import LocalConverterClient
from app.streaming.settings import StreamSettings
from app.transport.addresses import OutboundFilter
from app.transport.protocol import (
    MAX_RTC_TEXT_BYTES,
    AnswerEvent,
    ErrorCode,
    OfferMessage,
    ProtocolError,
    RtcServerEvent,
    StartMessage,
    close_code,
    parse_client_message,
    parse_rtc_message,
)
from app.transport.rtc_opus import (
    REORDER_PACKETS,
    ConcealingDecoder,
    OpusPackets,
    OrderingJitterBuffer,
    conceal_lost_audio,
    with_opus_fec,
)
from app.transport.sessions import StreamServices
from app.transport.webrtc import (
    ConvertedAudioTrack,
    RtcCall,
    RtcServices,
    downmix,
    reachable_candidates,
    restrict_ice_host_addresses,
)
from app.voices.store import VoiceStore
from bench.parity import ParitySet
from tests.fakes import websocket_server
from tests.udp_relay import LOSSY, Address, Impairment, Relay, lossy_relay

TAIL_S = 0.3  # silence sent after the audio, so that its last packets arrive before `end`
EVENT_TIMEOUT_S = 30.0
Event = dict[str, Any]


# -- a caller for tests ------------------------------------------------------------------------------------------


def loopback_only_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """ICE in this process offers 127.0.0.1 only; undone after the test."""
    monkeypatch.setattr(aioice.ice, "get_host_addresses", aioice.ice.get_host_addresses)  # records the original
    restrict_ice_host_addresses(["127.0.0.1"])


def stereo_frame(mono: np.ndarray, index: int) -> AudioFrame:
    """Frame `index` of a caller's microphone: 960 mono float samples as 16-bit stereo, timestamped in samples."""
    pcm = np.clip(np.round(mono * 32768), -32768, 32767).astype(np.int16)
    frame = AudioFrame.from_ndarray(np.repeat(pcm, 2)[np.newaxis, :], format="s16", layout="stereo")
    frame.sample_rate = SAMPLE_RATE
    frame.pts = index * FRAME_SAMPLES
    frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
    return frame


class ArrayTrack(MediaStreamTrack):
    """Plays mono 48 kHz samples as 20 ms stereo frames in real time, then silence; `finished` is set once the
    last frame of the array has gone out."""

    kind = "audio"

    def __init__(self, audio_48k: np.ndarray) -> None:
        super().__init__()
        padded = np.zeros(-(-len(audio_48k) // FRAME_SAMPLES) * FRAME_SAMPLES, dtype=np.float32)
        padded[: len(audio_48k)] = audio_48k
        self.frames = padded.reshape(-1, FRAME_SAMPLES)
        self.finished = asyncio.Event()
        self._pacer = Pacer(FRAME_SAMPLES / SAMPLE_RATE)
        self._index = 0

    async def recv(self) -> AudioFrame:
        await self._pacer.wait(self._index)
        if self._index < len(self.frames):
            samples = self.frames[self._index]
        else:
            samples = np.zeros(FRAME_SAMPLES, dtype=np.float32)
            self.finished.set()
        frame = stereo_frame(samples, self._index)
        self._index += 1
        return frame


@dataclass
class Call:
    """One call seen from the caller: every event, and the audio that came back (mono, from the first frame)."""

    socket: ClientConnection
    peer: RTCPeerConnection
    source: ArrayTrack
    events: list[Event] = field(default_factory=list)
    received: list[np.ndarray] = field(default_factory=list)
    relay: Relay | None = None  # the lossy network the media goes through, when there is one
    _recorder: asyncio.Task[None] | None = None

    @property
    def output_48k(self) -> np.ndarray:
        return np.concatenate(self.received) if self.received else np.zeros(0, dtype=np.float32)

    def of_type(self, kind: str) -> list[Event]:
        return [event for event in self.events if event["type"] == kind]

    async def event(self, kind: str, timeout: float = EVENT_TIMEOUT_S) -> Event:
        """Reads events until one of this type; an unexpected error event fails the test."""
        async with asyncio.timeout(timeout):
            while True:
                event = json.loads(await self.socket.recv())
                self.events.append(event)
                if event["type"] == kind:
                    return event
                assert event["type"] != "error", event

    async def connect(self) -> None:
        """Waits for `ready` and `answer`, applies the answer, and records the audio that comes back."""
        await self.event("ready")
        answer = await self.event("answer")
        sdp = answer["sdp"]
        if self.relay is not None:  # the server's media port is known now: the relay forwards to it
            self.relay.upstream = candidate_address(sdp)
            sdp = with_candidates_at(sdp, self.relay.address)
        await self.peer.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        [transceiver] = self.peer.getTransceivers()
        self._recorder = asyncio.create_task(self._record(transceiver.receiver.track))

    async def _record(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                assert isinstance(frame, AudioFrame)
                self.received.append(downmix(frame))

    async def hang_up(self) -> Event:
        """Sends `end` once the audio and a short tail have gone out; returns the end event."""
        async with asyncio.timeout(len(self.source.frames) * FRAME_SAMPLES / SAMPLE_RATE + EVENT_TIMEOUT_S):
            await self.source.finished.wait()
        await asyncio.sleep(TAIL_S)
        await self.socket.send(json.dumps({"type": "end"}))
        return await self.event("end")

    async def closed_code(self, timeout: float = EVENT_TIMEOUT_S) -> int | None:
        """The close code, once the server has closed the socket (events on the way are kept)."""
        async with asyncio.timeout(timeout):
            with contextlib.suppress(ConnectionClosed):
                while True:
                    self.events.append(json.loads(await self.socket.recv()))
        return self.socket.close_code

    async def recorded(self) -> None:
        """Waits for the recording to end (the peer connection has closed)."""
        if self._recorder is not None:
            await asyncio.wait({self._recorder}, timeout=5)


def candidate_address(sdp: str) -> Address:
    """The address and port of the SDP's first ICE candidate (a loopback-only peer has one)."""
    # candidate:<foundation> <component> <transport> <priority> <address> <port> typ <type> ...
    fields = next(line for line in sdp.splitlines() if line.startswith("a=candidate:")).split()
    return fields[4], int(fields[5])


def with_candidates_at(sdp: str, address: Address) -> str:
    """The SDP with every ICE candidate moved to `address`: what a peer behind a NAT would announce."""
    lines = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            fields = line.split()
            fields[4:6] = [address[0], str(address[1])]
            line = " ".join(fields)
        lines.append(line)
    return "\r\n".join(lines) + "\r\n"


@contextlib.asynccontextmanager
async def rtc_call(
    ws_url: str, start: Event, audio_48k: np.ndarray, offer: str | None = None, network: Impairment | None = None
) -> AsyncIterator[Call]:
    """Opens the signalling socket, sends the start message and the complete offer (or the `offer` SDP given).

    With a `network`, all media goes through a lossy relay (tests/udp_relay.py) that impairs both ways: each side
    is told that the other's only candidate is the relay, which then forwards between the two real ports."""
    conceal_lost_audio()  # the caller conceals what it loses, as a browser does (made before its receiver)
    peer = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # an explicit empty list: no public STUN server
    source = ArrayTrack(audio_48k)
    peer.addTransceiver(source, direction="sendrecv")
    try:
        async with contextlib.AsyncExitStack() as stack:
            socket = await stack.enter_async_context(websockets.connect(ws_url))
            call = Call(socket, peer, source)
            await socket.send(json.dumps(start))
            await peer.setLocalDescription(await peer.createOffer())  # gathers every candidate: no trickle
            sdp = offer or peer.localDescription.sdp
            if network is not None:
                own = candidate_address(sdp)
                relay_address, call.relay = await stack.enter_async_context(lossy_relay(None, network, client=own))
                sdp = with_candidates_at(sdp, relay_address)
            await socket.send(json.dumps({"type": "offer", "sdp": sdp}))
            yield call
            await peer.close()
            await call.recorded()
    finally:
        await peer.close()  # again when the call failed; a no-op otherwise


def correlation_at_best_lag(sent: np.ndarray, received: np.ndarray) -> tuple[float, int]:
    """The normalised correlation of `sent` with `received` at the lag (in samples) where it peaks."""
    size = 2 * len(received)
    spectrum = np.fft.rfft(received, size) * np.conj(np.fft.rfft(sent, size))
    lags = np.fft.irfft(spectrum, size)[: len(received) - len(sent) + 1]
    lag = int(np.argmax(lags))
    window = received[lag : lag + len(sent)]
    return float(lags[lag] / (np.linalg.norm(sent) * np.linalg.norm(window) + 1e-12)), lag


def delays_and_correlations(sent: np.ndarray, received: np.ndarray, segment_s: float = 0.2) -> list[tuple[int, float]]:
    """For each audible segment of `sent`: where it comes back (delay in samples) and how closely.

    Segment by segment, because a live track does not keep one delay: when a block arrives after the previous one
    has finished playing, the track plays a frame of silence and everything after it comes 20 ms later.
    """
    size = int(SAMPLE_RATE * segment_s)
    found = []
    for start in range(0, len(sent) - size + 1, size):
        segment = sent[start : start + size]
        if np.sqrt(np.mean(segment**2)) > 1e-3:
            correlation, lag = correlation_at_best_lag(segment, received)
            found.append((lag - start, correlation))
    return found


# -- audio frames ------------------------------------------------------------------------------------------------


def test_downmix_averages_the_channels_of_packed_and_planar_frames() -> None:
    left = np.array([1000, -2000, 32767], dtype=np.int16)
    right = np.array([3000, 2000, 32767], dtype=np.int16)
    packed = AudioFrame.from_ndarray(np.stack([left, right], axis=1).reshape(1, -1), format="s16", layout="stereo")
    planar = AudioFrame.from_ndarray(np.stack([left, right]), format="s16p", layout="stereo")
    mono = AudioFrame.from_ndarray(left[np.newaxis, :], format="s16", layout="mono")
    for frame in (packed, planar, mono):
        frame.sample_rate = SAMPLE_RATE
    expected = np.array([2000, 0, 32767], dtype=np.float32) / 32768
    np.testing.assert_array_equal(downmix(packed), expected)
    np.testing.assert_array_equal(downmix(planar), expected)
    np.testing.assert_array_equal(downmix(mono), left / np.float32(32768))
    assert downmix(packed).dtype == np.float32


def test_downmix_refuses_other_rates_and_formats() -> None:
    frame = AudioFrame.from_ndarray(np.zeros((1, 160), dtype=np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    with pytest.raises(ValueError, match="expected 48000 Hz audio, got 8000 Hz"):
        downmix(frame)
    floats = AudioFrame.from_ndarray(np.zeros((1, 960), dtype=np.float32), format="flt", layout="mono")
    floats.sample_rate = SAMPLE_RATE
    with pytest.raises(ValueError, match="expected 16-bit audio, got flt"):
        downmix(floats)


def tone(level: float) -> np.ndarray:
    return (level * np.sin(2 * np.pi * 440 * np.arange(FRAME_SAMPLES) / SAMPLE_RATE)).astype(np.float32)


def encoded(frames: list[np.ndarray], bitrate: int = 32000) -> list[bytes]:
    """What the output track should send for these frames: libopus is deterministic, so the same bytes."""
    packets = OpusPackets(bitrate)
    sent = [packets.packet(frame, index) for index, frame in enumerate(frames)]
    return [bytes(packet) for packet in sent if packet is not None]  # None: DTX sent nothing for a frame


def test_output_track_paces_in_real_time_and_fills_gaps_with_silence() -> None:
    async def run() -> tuple[list[av.Packet], float]:
        track = ConvertedAudioTrack(max_buffered_frames=4, bitrate=24000)
        for level in (0.1, 0.2):
            track.push(tone(level))
        started = time.monotonic()
        packets = [await track.recv() for _ in range(5)]
        return packets, time.monotonic() - started

    packets, elapsed = asyncio.run(run())
    assert [packet.pts for packet in packets] == [0, 960, 1920, 2880, 3840]
    assert {packet.time_base for packet in packets} == {fractions.Fraction(1, SAMPLE_RATE)}
    silence = np.zeros(FRAME_SAMPLES, np.float32)
    assert [bytes(p) for p in packets] == encoded([tone(0.1), tone(0.2), silence, silence, silence], bitrate=24000)
    assert 0.075 <= elapsed < 0.2, elapsed  # frame 4 is due 80 ms after frame 0


def test_output_track_keeps_the_newest_frames_and_reports_played_out() -> None:
    async def run() -> tuple[list[bytes], int, bool, bool]:
        track = ConvertedAudioTrack(max_buffered_frames=2)
        for level in (0.1, 0.2, 0.3):
            track.push(tone(level))
        waiting = asyncio.create_task(track.played_out())
        sent = [bytes(await track.recv())]
        first_done = waiting.done()
        sent.append(bytes(await track.recv()))
        await asyncio.wait_for(waiting, 1)
        track.stop()
        with pytest.raises(MediaStreamError):
            await track.recv()
        return sent, track.trimmed_frames, first_done, waiting.done()

    sent, trimmed, first_done, done = asyncio.run(run())
    assert sent == encoded([tone(0.2), tone(0.3)])
    assert trimmed == 1 and not first_done and done


def test_the_output_is_mono_opus_at_the_configured_bitrate_with_fec() -> None:
    frames = [tone(0.3) for _ in range(100)]
    for bitrate in (16000, 48000):
        packets = encoded(frames, bitrate)
        kbits = 8 * sum(len(packet) for packet in packets) / (len(packets) * FRAME_SAMPLES / SAMPLE_RATE) / 1000
        assert 0.7 * bitrate / 1000 < kbits < 1.3 * bitrate / 1000, (bitrate, kbits)
        assert all(packet[0] & 0x04 == 0 for packet in packets)  # the TOC's stereo flag (RFC 6716, 3.1): mono
    # FEC rides in Opus' SILK layer: a third of these packets at the default bitrate (more on speech).
    assert sum(ConcealingOpusDecoder().has_fec(packet) for packet in encoded(frames)) > 20


def test_the_answer_asks_for_in_band_fec() -> None:
    answer = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 opus/48000/2\r\na=mid:0\r\n"
    assert "a=rtpmap:96 opus/48000/2\r\na=fmtp:96 useinbandfec=1\r\n" in with_opus_fec(answer)
    with_fmtp = answer.replace("opus/48000/2\r\n", "opus/48000/2\r\na=fmtp:96 minptime=10\r\n")
    assert "a=fmtp:96 minptime=10;useinbandfec=1\r\n" in with_opus_fec(with_fmtp)
    assert with_opus_fec(with_opus_fec(answer)) == with_opus_fec(answer)


def test_lost_microphone_packets_are_concealed_from_their_timestamps() -> None:
    frames = [tone(0.3) for _ in range(10)]
    payloads = encoded(frames)
    decoder = ConcealingDecoder()
    received = []
    first = 2**32 - 3 * FRAME_SAMPLES  # the timestamps wrap
    for index, payload in enumerate(payloads):
        if index in (4, 7, 8):  # what aiortc's jitter buffer skipped
            continue
        received += decoder.decode(JitterFrame(payload, (first + index * FRAME_SAMPLES) % 2**32))
    assert all(isinstance(frame, AudioFrame) for frame in received)
    samples = np.concatenate([downmix(frame) for frame in received if isinstance(frame, AudioFrame)])
    assert len(samples) == len(frames) * FRAME_SAMPLES  # concealed, not shortened
    assert decoder.concealed_samples == 3 * FRAME_SAMPLES
    assert decoder.decode(JitterFrame(payloads[5], (first + 5 * FRAME_SAMPLES) % 2**32)) == []  # too late now


def test_the_receive_buffer_orders_packets_and_skips_only_the_lost() -> None:
    def packet(index: int) -> RtpPacket:
        # Sequence numbers and timestamps both wrap during the call.
        sequence, timestamp = (65534 + index) % 2**16, (2**32 - 2 * FRAME_SAMPLES + index * FRAME_SAMPLES) % 2**32
        return RtpPacket(payload_type=96, sequence_number=sequence, timestamp=timestamp, payload=bytes([index]))

    # 3 and 9 are lost; 1 and 2 swap, 6 comes twice, 5 comes again after its turn.
    arrivals = [0, 2, 1, 4, 5, 6, 6, 7, 8, 5, 10, 11, 12, 13]
    buffer = OrderingJitterBuffer()
    played = []
    for index in arrivals:
        key_frame, frame = buffer.add(packet(index))
        assert not key_frame
        if frame is not None:
            played.append(frame)
    # Every packet that came plays once, in order (each with its timestamp, so the decoder conceals the gaps); the
    # lost are given up once REORDER_PACKETS later ones are in. One out per packet in: the last are still held.
    assert [frame.data[0] for frame in played] == [0, 1, 2, 4, 5, 6, 7, 8, 10, 11]
    assert [frame.timestamp for frame in played] == [packet(frame.data[0]).timestamp for frame in played]
    assert REORDER_PACKETS == 3  # what the expected order above assumes
    # A sender that starts its sequence over, far back, is followed from there, not ignored as late.
    for sequence, payload in ((65000, b"r"), (65001, b"s")):
        _, frame = buffer.add(RtpPacket(payload_type=96, sequence_number=sequence, timestamp=0, payload=payload))
        assert frame is not None and frame.data == payload


# -- ICE configuration -------------------------------------------------------------------------------------------


def test_turn_credentials_follow_the_turn_rest_convention() -> None:
    turn = TurnCredentials(secret=b"north-secret", urls=("turn:turn.example:3478",), ttl_s=3600)
    server = turn.for_key("key-1", now=1_700_000_000.7)
    assert server.username == "1700002800:key-1"  # the end of the next 1800 s window
    # Computed independently: printf '1700002800:key-1' | openssl dgst -sha1 -hmac north-secret -binary | base64
    assert server.credential == "0JVkfvRtcjNwIFSBhZjdncbqlzk="
    assert len(base64.b64decode(server.credential)) == 20 and server.urls == ["turn:turn.example:3478"]


def test_browser_ice_servers_omit_nulls_and_add_fresh_turn_credentials() -> None:
    config = IngressConfig(
        ice_servers=[IceServer(urls=["stun:stun.example:3478"])],
        turn_secret="north-secret",
        turn_urls=["turn:turn.example:3478?transport=udp", "turns:turn.example:5349"],
        turn_ttl_s=600,
    )
    services = RtcServices.from_config(stream=None, config=config)  # type: ignore[arg-type]  # no stream services: not used here
    stun, turn = services.browser_ice_servers("key-1", now=1000.0)
    assert stun == {"urls": ["stun:stun.example:3478"]}
    assert turn["username"] == "1500:key-1" and turn["urls"] == config.turn_urls and turn["credential"]
    assert "north-secret" not in repr(config) and "north-secret" not in json.dumps([stun, turn])


OFFER_CANDIDATES = [
    "a=candidate:1 1 udp 2122260223 93.184.216.34 50000 typ host",
    "a=candidate:2 1 udp 2122260223 10.0.0.5 50001 typ host",
    "a=candidate:3 1 udp 2122260223 169.254.169.254 80 typ host",
    "a=candidate:4 1 udp 2122260223 fd00:ec2::254 53 typ host",
    "a=candidate:5 1 udp 2122260223 4f1e2d3c-1111-2222-3333-444455556666.local 50002 typ host",
    "a=candidate:6 1 udp 1686052607 151.101.1.69 40000 typ srflx raddr 10.0.0.5 rport 50001",
    "a=candidate:7 1 udp 2122260223 127.0.0.1 50003 typ host",
    "a=candidate:8 1 udp 2122260223 ::ffff:10.0.0.5 50004 typ host",
    "a=candidate:bad",
]


def offer_with(candidates: list[str]) -> str:
    head = ["v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0", "m=audio 9 UDP/TLS/RTP/SAVPF 111", "c=IN IP4 0.0.0.0"]
    return "\r\n".join([*head, *candidates, "a=rtpmap:111 opus/48000/2"]) + "\r\n"


def test_offers_keep_only_candidates_the_service_may_send_to() -> None:
    """Public addresses stay; private, link-local (metadata), unique-local, names (mDNS), IPv4-mapped private and
    malformed ones go, unless an operator allows a network (loopback here, as the tests do). Documentation ranges
    (203.0.113.0/24) are not public either, so the public ones here are real."""
    kept = reachable_candidates(offer_with(OFFER_CANDIDATES), OutboundFilter(), max_candidates=20)
    assert [line for line in kept.split("\r\n") if line.startswith("a=candidate")] == [
        OFFER_CANDIDATES[0],
        OFFER_CANDIDATES[5],
    ]
    assert "a=rtpmap:111 opus/48000/2" in kept and kept.endswith("\r\n")
    loopback = reachable_candidates(offer_with(OFFER_CANDIDATES), OutboundFilter(["127.0.0.0/8"]), 20)
    assert OFFER_CANDIDATES[6] in loopback


def test_an_offer_with_too_many_candidates_is_refused() -> None:
    many = [f"a=candidate:{n} 1 udp 2122260223 93.184.216.{n} 5000 typ host" for n in range(21)]
    with pytest.raises(ProtocolError) as refused:
        reachable_candidates(offer_with(many), OutboundFilter(), max_candidates=20)
    assert refused.value.code == ErrorCode.bad_offer and "21 ICE candidates" in refused.value.message
    assert reachable_candidates(offer_with(many[:20]), OutboundFilter(), max_candidates=20).count("a=candidate") == 20


def test_no_ice_servers_means_no_stun_server_at_all() -> None:
    configuration = RtcServices(stream=None).peer_configuration()  # type: ignore[arg-type]  # no stream services: not used here
    assert configuration.iceServers == []
    # The surprise this guards against: aiortc replaces a missing list (None) with Google's public STUN server.
    assert RTCIceGatherer(iceServers=None)._connection.stun_server == ("stun.l.google.com", 19302)
    assert RTCIceGatherer(iceServers=configuration.iceServers)._connection.stun_server is None


def test_configured_ice_servers_reach_the_peer_connection() -> None:
    turn = IceServer(urls=["turn:turn.example:3478"], username="u", credential="p")
    configuration = RtcServices(stream=None, ice_servers=(turn,)).peer_configuration()  # type: ignore[arg-type]  # no stream services: not used here
    assert configuration.iceServers is not None
    [server] = configuration.iceServers
    assert (server.urls, server.username, server.credential) == (["turn:turn.example:3478"], "u", "p")


def test_restricted_host_addresses_offer_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    loopback_only_ice(monkeypatch)
    restrict_ice_host_addresses(["127.0.0.1", "::1"])
    assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.1"]
    assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.1", "::1"]

    candidates = [line for line in asyncio.run(aiortc_offer()).splitlines() if line.startswith("a=candidate:")]
    assert candidates and all(" 127.0.0.1 " in line or " ::1 " in line for line in candidates), candidates


def test_ingress_config_checks_the_webrtc_fields() -> None:
    with pytest.raises(ValidationError, match="turn_secret is set but turn_urls is empty"):
        IngressConfig(turn_secret="s")
    with pytest.raises(ValidationError, match="does not appear to be an IPv4 or IPv6 address"):
        IngressConfig(ice_host_addresses=["localhost"])
    with pytest.raises(ValidationError, match="is not an ICE server URL"):
        IngressConfig(ice_servers=[{"urls": ["https://stun.example"]}])
    with pytest.raises(ValidationError, match="turn_urls must be turn: or turns: URLs"):
        IngressConfig(turn_secret="s", turn_urls=["stun:stun.example"])
    assert IngressConfig().ice_servers == [] and IngressConfig().ice_host_addresses is None


# -- signalling messages -----------------------------------------------------------------------------------------


def test_rtc_messages_parse_with_a_limit_that_fits_an_offer() -> None:
    sdp = "v=0\r\n" + "a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host\r\n" * 600  # ~ 33 KiB
    text = json.dumps({"type": "offer", "sdp": sdp})
    assert parse_rtc_message(text) == OfferMessage(type="offer", sdp=sdp)
    with pytest.raises(ProtocolError) as refused:
        parse_client_message(text)  # /v1/stream knows no offer, and its limit is far smaller
    assert refused.value.code == ErrorCode.frame_too_large
    start = parse_rtc_message(json.dumps({"type": "start", "version": 1, "token": "t", "voice_id": "v"}))
    assert isinstance(start, StartMessage)


@pytest.mark.parametrize(
    ("text", "code", "message"),
    [
        (json.dumps({"type": "offer", "sdp": "v" * (MAX_RTC_TEXT_BYTES + 1)}), "frame_too_large", "limit is"),
        (json.dumps({"type": "offer", "sdp": "v" * (64 * 1024 + 1)}), "bad_message", "offer.sdp"),
        (json.dumps({"type": "offer", "sdp": ""}), "bad_message", "offer.sdp"),
        (json.dumps({"type": "offer", "sdp": "v=0", "trickle": True}), "bad_message", "offer.trickle"),
        (json.dumps({"type": "answer", "sdp": "v=0"}), "bad_message", "does not match any of the expected tags"),
    ],
)
def test_bad_rtc_messages_get_their_code(text: str, code: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message) as refused:
        parse_rtc_message(text)
    assert refused.value.code == code


def test_answer_event_round_trips_and_new_codes_close_the_socket() -> None:
    answer = AnswerEvent(sdp="v=0\r\n")
    assert TypeAdapter(RtcServerEvent).validate_json(answer.model_dump_json()) == answer
    assert close_code(ErrorCode.bad_offer) == 1008 and close_code(ErrorCode.connection_failed) == 1011


class SignallingSocket:
    """What `RtcCall._answer` uses of its WebSocket: it sends the answer event."""

    application_state = WebSocketState.CONNECTED

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send_text(self, text: str) -> None:
        self.sent.append(text)


# Applying an offer takes milliseconds; an mDNS candidate adds aioice's 1 s resolution timeout. Far beyond both is a
# hang, as is a peer connection that does not close.
ANSWER_TIMEOUT_S = 10.0


async def aiortc_offer(kind: str = "audio") -> str:
    """A complete offer of one sendrecv section of this kind, as aiortc makes it, with its host candidates."""
    peer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    peer.addTransceiver(kind, direction="sendrecv")
    await peer.setLocalDescription(await peer.createOffer())
    await peer.close()
    return peer.localDescription.sdp


async def answer_event(sdp: str) -> str:
    """The answer event `RtcCall._answer` sends for this offer; raises the ProtocolError it raises."""
    # `_answer` neither converts nor checks tokens or voices: services that would fail if it tried.
    services = StreamServices(client=None, tokens=None, voices=None, defaults=StreamSettings())  # type: ignore[arg-type]  # None, on purpose
    socket = SignallingSocket()
    call = RtcCall(socket, RtcServices(services))  # type: ignore[arg-type]  # what _answer uses of a WebSocket
    peer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            await call._answer(peer, OfferMessage(type="offer", sdp=sdp), ConvertedAudioTrack(4))
    finally:
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            await peer.close()
    [event] = socket.sent
    return event


def malformed_offer(offer: str, case: str) -> str:
    lines = offer.split("\r\n")
    if case == "media_line_without_fields":
        return "v=0\r\nm=audio\r\n"
    if case == "no_dtls_attributes":
        lines = [line for line in lines if not line.startswith(("a=fingerprint:", "a=setup:"))]
    elif case == "fmtp_for_an_unlisted_codec":
        lines.insert(lines.index("a=rtpmap:96 opus/48000/2") + 1, "a=fmtp:111 minptime=10")
    elif case == "mid_without_an_id":
        lines[lines.index("a=mid:0")] = "a=mid"
    return "\r\n".join(lines)


@pytest.mark.parametrize(
    "case", ["media_line_without_fields", "no_dtls_attributes", "fmtp_for_an_unlisted_codec", "mid_without_an_id"]
)
def test_offers_aiortc_trips_over_are_bad_offer(case: str, loopback: None) -> None:
    # Found by tests/test_fuzz_sdp.py. aiortc failed on these with an AssertionError, an AttributeError, a
    # StopIteration turned RuntimeError and (in setLocalDescription) a ValueError: all reported as `internal` before.
    async def run() -> ProtocolError:
        with pytest.raises(ProtocolError) as refused:
            await answer_event(malformed_offer(await aiortc_offer(), case))
        return refused.value

    error = asyncio.run(run())
    assert error.code == ErrorCode.bad_offer and error.message.startswith("unusable SDP offer: "), error.message


def test_the_answer_negotiates_no_rtp_header_extensions(loopback: None) -> None:
    # An offer with the extensions a browser offers for audio (aiortc offers the first two of them): the answer
    # takes none, so that neither side adds them to its packets.
    extensions = [
        "a=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid",
        "a=extmap:2 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
        "a=extmap:3 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
        "a=extmap:4 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
    ]

    async def run() -> tuple[str, str]:
        offer = await aiortc_offer()
        assert all(line in offer.splitlines() for line in extensions[:2]), offer  # what aiortc would answer
        browser_like = offer.replace(extensions[0] + "\r\n", "".join(line + "\r\n" for line in extensions))
        return browser_like, json.loads(await answer_event(browser_like))["sdp"]

    offer, answer = asyncio.run(run())
    assert all(line in offer for line in extensions)
    assert "a=extmap" not in answer and "a=rtpmap:96 opus/48000/2" in answer and "a=mid:0" in answer, answer


# -- whole calls in this process ---------------------------------------------------------------------------------


@dataclass
class LocalServer:
    url: str
    token: str
    voice_id: str
    converter: ConverterService

    def start(self, **overrides: Any) -> Event:
        return {"type": "start", "version": 1, "token": self.token, "voice_id": self.voice_id, **overrides}


@pytest.fixture(scope="module")
def identity_converter(parity: ParitySet, tmp_path_factory: pytest.TempPathFactory) -> tuple[ConverterService, str]:
    root = str(tmp_path_factory.mktemp("voices"))
    voice = VoiceStore(root).add((parity.root / parity.bundle["files"]["reference_22k"]).read_bytes(), owner="k")
    config = ConverterConfig(voice_store=root, silence_gate_dbfs=None, identity=True, replica_tag="a")
    return ConverterService(config, model=SeedVC.load(parity.model_dir)), voice.voice_id


@contextlib.asynccontextmanager
async def local_server(
    converter: ConverterService, voice_id: str, connect_timeout_s: float = 10.0
) -> AsyncIterator[LocalServer]:
    """`RtcCall` behind uvicorn on a free loopback port, converting with the given service."""
    tokens = TokenSigner(b"a test secret of at least 32 bytes")
    stream = StreamServices(
        client=LocalConverterClient({"a": converter}),
        tokens=tokens,
        voices=converter.store,
        defaults=StreamSettings(),
    )
    services = RtcServices(stream, connect_timeout_s=connect_timeout_s, outbound=OutboundFilter(["127.0.0.0/8"]))

    async def endpoint(websocket: WebSocket) -> None:
        await RtcCall(websocket, services).run()

    async with websocket_server("/v1/rtc", endpoint) as port:
        yield LocalServer(f"ws://127.0.0.1:{port}/v1/rtc", tokens.issue("k").token, voice_id, converter)


@pytest.fixture
def loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    loopback_only_ice(monkeypatch)
    yield


def source_48k(parity: ParitySet, seconds: float) -> np.ndarray:
    audio = resample(torch.from_numpy(parity.wav("source_16k")), 16000, 48000).numpy()
    return audio[: int(SAMPLE_RATE * seconds)]


FOUND_CORRELATION = 0.5  # a stretch of the input counts as found in the output from this normalised correlation on


def lossy_call_input(parity: ParitySet) -> np.ndarray:
    """8 s of speech for the lossy-network tests: enough losses to count; reversed in its second half, so that no
    stretch repeats (a stretch found at another delay would be a skip)."""
    source = source_48k(parity, 4.0)
    return np.concatenate([source, source[::-1]])


def identity_rtc_call(
    identity_converter: tuple[ConverterService, str], audio: np.ndarray, network: Impairment | None = None
) -> tuple[Call, Event, int | None]:
    """One whole call of `audio` to the identity converter: (the call, its end event, the socket's close code)."""
    converter, voice_id = identity_converter

    async def run() -> tuple[Call, Event, int | None]:
        async with (
            local_server(converter, voice_id) as server,
            rtc_call(server.url, server.start(), audio, network=network) as call,
        ):
            await call.connect()
            end = await call.hang_up()
            return call, end, await call.closed_code()

    return asyncio.run(run())


@pytest.mark.slow
def test_identity_call_returns_the_input_on_the_track(
    identity_converter: tuple[ConverterService, str], parity: ParitySet, loopback: None
) -> None:
    audio = source_48k(parity, 2.0)
    call, end, code = identity_rtc_call(identity_converter, audio)
    assert code == 1000
    assert [e["type"] for e in call.events[:2]] == ["ready", "answer"]
    indexes = [event["index"] for event in call.of_type("block")]
    assert indexes == list(range(len(indexes))) and end["blocks"] == len(indexes) > 0
    found = delays_and_correlations(audio, call.output_48k)
    delays = [delay for delay, _ in found]
    # Two passes of aiortc's Opus (96 kbit/s, "voip") alone give 0.58-0.99 per segment of this source, median 0.92,
    # offline; the call measured the same figures: the transport adds nothing but the codec.
    assert np.median([correlation for _, correlation in found]) > 0.85, found
    # The round trip: a block of input, then the conversion, Opus and both jitter buffers; it grows only by the
    # silent frames played when a block came late, which the output buffer bounds.
    block_samples = call.events[0]["block_ms"] * SAMPLE_RATE // 1000
    assert 0 < delays[0] < SAMPLE_RATE and max(delays) - min(delays) <= 2 * block_samples, delays
    window = call.output_48k[delays[0] : delays[0] + len(audio)]
    level = np.sqrt(np.mean(window**2) / np.mean(audio[: len(window)] ** 2))
    assert 0.8 < level < 1.25, level  # mono Opus down, decoded at full level on both channels: no 3 dB lost
    assert len(identity_converter[0].engine) == 0  # the session was closed


@pytest.mark.slow
@pytest.mark.parametrize("offer", ["garbage", "no_audio"])
def test_unusable_offer_gets_bad_offer(
    identity_converter: tuple[ConverterService, str], parity: ParitySet, loopback: None, offer: str
) -> None:
    converter, voice_id = identity_converter

    async def run() -> tuple[Call, int | None]:
        sdp = "not an SDP at all" if offer == "garbage" else await aiortc_offer("video")
        async with (
            local_server(converter, voice_id) as server,
            rtc_call(server.url, server.start(), source_48k(parity, 0.1), offer=sdp) as call,
        ):
            return call, await call.closed_code()

    call, code = asyncio.run(run())
    assert [e["type"] for e in call.events] == ["ready", "error"]
    assert call.events[-1]["code"] == "bad_offer" and code == 1008
    assert len(converter.engine) == 0


@pytest.mark.slow
def test_a_peer_that_never_connects_ends_the_call(
    identity_converter: tuple[ConverterService, str], parity: ParitySet, loopback: None
) -> None:
    converter, voice_id = identity_converter

    async def run() -> tuple[Call, int | None, float]:
        async with local_server(converter, voice_id, connect_timeout_s=1.0) as server:
            # No candidates: ICE has nothing to try, and the server gives up after its connect timeout.
            sdp = "".join(line + "\r\n" for line in (await aiortc_offer()).splitlines() if "candidate" not in line)
            started = time.monotonic()
            async with rtc_call(server.url, server.start(), source_48k(parity, 0.1), offer=sdp) as call:
                return call, await call.closed_code(), time.monotonic() - started

    call, code, elapsed = asyncio.run(run())
    assert [e["type"] for e in call.events] == ["ready", "answer", "error"]
    assert call.events[-1]["code"] == "connection_failed" and code == 1011
    assert elapsed < 5 and len(converter.engine) == 0


@pytest.mark.slow
def test_no_offer_in_time_ends_the_call(identity_converter: tuple[ConverterService, str], loopback: None) -> None:
    converter, voice_id = identity_converter

    async def run() -> tuple[list[Event], int | None]:
        async with (
            local_server(converter, voice_id, connect_timeout_s=0.5) as server,
            websockets.connect(server.url) as socket,
        ):
            await socket.send(json.dumps(server.start()))
            events = []
            with contextlib.suppress(ConnectionClosed):
                while True:
                    events.append(json.loads(await socket.recv()))
            return events, socket.close_code

    events, code = asyncio.run(run())
    assert [e["type"] for e in events] == ["ready", "error"] and events[1]["code"] == "connection_failed"
    assert code == 1011 and len(converter.engine) == 0


@pytest.mark.slow
def test_set_voice_is_confirmed_and_an_unknown_voice_leaves_the_call_running(
    identity_converter: tuple[ConverterService, str], parity: ParitySet, loopback: None
) -> None:
    converter, voice_id = identity_converter
    other = converter.store.add((parity.root / parity.bundle["files"]["source_16k"]).read_bytes(), owner="k")

    async def run() -> tuple[Event, Event, Event]:
        async with (
            local_server(converter, voice_id) as server,
            rtc_call(server.url, server.start(), source_48k(parity, 1.5)) as call,
        ):
            await call.connect()
            await call.event("block")
            await call.socket.send(json.dumps({"type": "set_voice", "voice_id": other.voice_id}))
            switched = await call.event("voice_set")
            await call.socket.send(json.dumps({"type": "set_voice", "voice_id": "AAAAAAAAAAAAAAAA"}))
            refused = await call.event("error")
            return switched, refused, await call.hang_up()

    switched, refused, end = asyncio.run(run())
    assert switched["voice_id"] == other.voice_id and switched["from_block"] >= 1
    assert refused["code"] == "unknown_voice" and end["blocks"] > switched["from_block"]


@pytest.mark.slow
def test_the_callers_peer_connection_closing_ends_the_call(
    identity_converter: tuple[ConverterService, str], parity: ParitySet, loopback: None
) -> None:
    converter, voice_id = identity_converter

    async def run() -> tuple[Call, int | None]:
        async with (
            local_server(converter, voice_id) as server,
            rtc_call(server.url, server.start(), source_48k(parity, 2.0)) as call,
        ):
            await call.connect()
            await call.event("block")
            await call.peer.close()  # the media goes, the signalling socket stays
            return call, await call.closed_code()

    call, code = asyncio.run(run())
    assert call.events[-1]["type"] == "error" and call.events[-1]["code"] == "connection_failed", call.events[-1]
    # The media worked and then died: the network's fault, so the converter holds the session for a resume.
    assert code == 1011 and len(converter.engine) == 1
    converter.forget_all()


# -- a lossy network ---------------------------------------------------------------------------------------------


def correlations_at(
    sent: np.ndarray, received: np.ndarray, delay: int, slack: int, segment_s: float = 0.2
) -> np.ndarray:
    """For each audible segment of `sent`: how closely it comes back at `delay` samples later, give or take `slack`."""
    size = int(SAMPLE_RATE * segment_s)
    found = []
    for start in range(0, len(sent) - size + 1, size):
        segment = sent[start : start + size]
        window = received[max(0, start + delay - slack) : start + delay + slack + size]
        if np.sqrt(np.mean(segment**2)) > 1e-3 and len(window) >= size:
            found.append(correlation_at_best_lag(segment, window)[0])
    return np.array(found)


@pytest.mark.slow
def test_a_lossy_network_keeps_the_call_concealed_not_shortened(
    identity_converter: tuple[ConverterService, str], parity: ParitySet, loopback: None
) -> None:
    audio = lossy_call_input(parity)
    call, end, code = identity_rtc_call(identity_converter, audio, network=LOSSY)
    assert call.relay is not None and end["blocks"] > 0 and code == 1000
    # Both ways: ICE, DTLS and the media of each direction all went through the relay.
    assert call.relay.counts.dropped >= 20 and call.relay.counts.duplicated > 0, call.relay.counts
    assert len(call.of_type("late")) <= 2 * -(-len(audio) // (10 * SAMPLE_RATE)), call.of_type("late")  # 2 a 10 s
    # The output lasts as long as the input, within a block: where a stretch of the input comes back moves by no
    # more than that from the first quarter of the call to the last. (A lost packet skipped instead of concealed
    # takes its 20 ms out of the timeline: the call's ~40 losses would move the end ~0.8 s earlier.) It may move
    # later: each direction's buffer holds up to REORDER_PACKETS once packets go missing, and the output track
    # plays silence while the converted audio is late.
    # Only stretches found clearly say where they came back: a faint one whose best match is poor (seen at -5.5 s to
    # +5.6 s in a call whose other stretches sat at 0.27-0.29 s) says nothing about the timeline. That every stretch
    # is there is the continuity check's claim, below.
    found = delays_and_correlations(audio, call.output_48k)
    delays = np.array([delay for delay, correlation in found if correlation > FOUND_CORRELATION])
    quarter = len(delays) // 4
    first, last = np.median(delays[:quarter]), np.median(delays[-quarter:])
    block = call.events[0]["block_ms"] * SAMPLE_RATE // 1000
    assert abs(last - first) <= block, delays
    # Continuous: every stretch is there, at that delay give or take the buffers' depth, holding its concealed
    # losses (at 5 % a packet each way, most 0.2 s stretches hold one).
    correlations = correlations_at(
        audio, call.output_48k, round(np.median(delays)), 2 * REORDER_PACKETS * FRAME_SAMPLES
    )
    assert np.median(correlations) > 0.8 and np.mean(correlations > FOUND_CORRELATION) >= 0.8, correlations
