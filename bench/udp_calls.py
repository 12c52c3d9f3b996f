"""The load tool's RTP and WebRTC calls (bench/load.py --transport rtp|webrtc): the same input as a WebSocket stream,
sent in real time over `/v1/rtp` or `/v1/rtc`, with every byte each way counted in the stream's `Traffic`.

Both hold a control WebSocket (start, events, end: counted with its frames, as for /v1/stream); the audio goes
in UDP datagrams, counted with their UDP and IPv4 headers (28 bytes each; IPv6 would add 20 more):
- RTP: each datagram as sent and received (12-byte RTP header + Opus), SSRC and sequence of this peer's own.
- WebRTC: an aiortc peer whose track hands aiortc the same Opus packets (so the uplink is what a browser's 32 kbit/s
  mono Opus is, not aiortc's 96 kbit/s stereo encoder). Its DTLS transport counts every datagram it sends and
  receives (SRTP: the 12-byte RTP header and, aiortc to aiortc, AEAD_AES_256_GCM's 16-byte tag; SRTCP; the DTLS
  handshake; no header extensions, the server's answer negotiates none); only the ICE consent
  checks (a STUN exchange every ~5 s) are left out. The Opus payload up is what the sender sent; down, the server's
  own count from its RTCP sender reports, scaled to the packets received. ICE: host candidates only.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import random
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import av
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import RtpPacket
from websockets.exceptions import ConnectionClosed

from app.audio.opus import FRAME_SAMPLES, SAMPLE_RATE
from app.audio.pacing import Pacer
from client.stream_client import StreamError, paced_packets

UDP_IPV4_HEADER_BYTES = 28  # UDP 8 + IPv4 20 (no options)
TAIL_S = 0.3  # after the last packet: the server's jitter buffer and the network deliver it before `end`
EVENT_TIMEOUT_S = 30.0
Event = dict[str, Any]


class CallTraffic(Protocol):
    """What a call reports to (bench/load.py's Traffic)."""

    def sent(self, message: bytes | str) -> None: ...
    def received(self, message: bytes | str) -> None: ...
    def datagrams(self, up: bool, count: int, udp_payload_bytes: int) -> None: ...
    def audio(self, up: bool, packets: int, opus_bytes: int) -> None: ...


class CallProbe(Protocol):
    @property
    def traffic(self) -> CallTraffic: ...

    def on_event(self, event: Event) -> None: ...


def control_url(base_url: str, path: str) -> str:
    parts = urllib.parse.urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


class Control:
    """A call's control WebSocket: every message counted, every event to the probe; waits for events by type."""

    def __init__(self, socket: websockets.ClientConnection, probe: CallProbe) -> None:
        self.socket = socket
        self.probe = probe
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def send(self, message: Event) -> None:
        text = json.dumps(message)
        self.probe.traffic.sent(text)
        await self.socket.send(text)

    async def until(self, kind: str) -> Event | None:
        """The next event of this type; None when an error event (the probe has it) or the socket's close came first."""
        async with asyncio.timeout(EVENT_TIMEOUT_S):
            while (event := await self._events.get()) is not None:
                if event["type"] == kind:
                    return event
                if event["type"] == "error":
                    return None
        return None

    async def closed(self) -> None:
        async with asyncio.timeout(EVENT_TIMEOUT_S):
            await self.reader

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for text in self.socket:
                self.probe.traffic.received(text)
                event = json.loads(text)
                self.probe.on_event(event)
                self._events.put_nowait(event)
        self._events.put_nowait(None)


@contextlib.asynccontextmanager
async def control(base_url: str, path: str, start: Event, probe: CallProbe) -> AsyncIterator[Control]:
    try:
        async with websockets.connect(control_url(base_url, path)) as socket:
            call = Control(socket, probe)
            try:
                await call.send(start)
                yield call
            finally:
                call.reader.cancel()
    except ConnectionClosed as error:  # the load tool counts a broken call, and goes on
        raise StreamError(f"the control socket closed: {error}") from error


# ---- RTP ----------------------------------------------------------------------------------------------------------


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, traffic: CallTraffic) -> None:
        self.traffic = traffic

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.traffic.datagrams(up=False, count=1, udp_payload_bytes=len(data))
        with contextlib.suppress(ValueError):
            self.traffic.audio(up=False, packets=1, opus_bytes=len(RtpPacket.parse(data).payload))


async def rtp_call(base_url: str, start: Event, packets: Sequence[bytes], probe: CallProbe) -> None:
    """One call over /v1/rtp: the converted voice comes back to the address the packets come from."""
    async with control(base_url, "/v1/rtp", start, probe) as call:
        rtp = await call.until("rtp")
        if rtp is None:
            return
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Datagrams(probe.traffic), remote_addr=(rtp["host"], rtp["port"])
        )
        try:
            ssrc, first_sequence = random.getrandbits(32), random.getrandbits(16)
            index = 0
            async for payload in paced_packets(packets, realtime=True):
                assert isinstance(payload, bytes)
                datagram = RtpPacket(
                    payload_type=rtp["payload_type"],
                    marker=int(index == 0),
                    sequence_number=(first_sequence + index) % (1 << 16),
                    timestamp=(index * FRAME_SAMPLES) % (1 << 32),
                    ssrc=ssrc,
                    payload=payload,
                ).serialize()
                transport.sendto(datagram)
                probe.traffic.datagrams(up=True, count=1, udp_payload_bytes=len(datagram))
                probe.traffic.audio(up=True, packets=1, opus_bytes=len(payload))
                index += 1
            await asyncio.sleep(TAIL_S)
            await call.send({"type": "end"})
            await call.closed()
            await asyncio.sleep(0.2)  # the last datagrams are on their way with the end event
        finally:
            transport.close()


# ---- WebRTC -------------------------------------------------------------------------------------------------------


class PacketTrack(MediaStreamTrack):
    """Opus packets as aiortc sends a track's `av.Packet`s, one every 20 ms; then nothing more."""

    kind = "audio"

    def __init__(self, packets: Sequence[bytes]) -> None:
        super().__init__()
        self.packets = packets
        self.finished = asyncio.Event()
        self._pacer = Pacer(FRAME_SAMPLES / SAMPLE_RATE)
        self._index = 0

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        if self._index >= len(self.packets):
            self.finished.set()
            await asyncio.Future()  # until the sender stops with the call
        await self._pacer.wait(self._index)
        packet = av.Packet(self.packets[self._index])
        packet.pts = self._index * FRAME_SAMPLES
        packet.time_base = fractions.Fraction(1, SAMPLE_RATE)
        self._index += 1
        return packet


async def _discard(track: MediaStreamTrack) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()


async def webrtc_call(base_url: str, start: Event, packets: Sequence[bytes], probe: CallProbe) -> None:
    """One call over /v1/rtc; its traffic is read from the peer connection's statistics once it has ended."""
    peer = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # an explicit empty list: no public STUN server
    track = PacketTrack(packets)
    transceiver = peer.addTransceiver(track, direction="sendrecv")
    listener: asyncio.Task[None] | None = None
    try:
        async with control(base_url, "/v1/rtc", start, probe) as call:
            await peer.setLocalDescription(await peer.createOffer())  # gathers every candidate: no trickle
            await call.send({"type": "offer", "sdp": peer.localDescription.sdp})
            answer = await call.until("answer")
            if answer is None:
                return
            await peer.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
            listener = asyncio.create_task(_discard(transceiver.receiver.track))
            async with asyncio.timeout(len(packets) * FRAME_SAMPLES / SAMPLE_RATE + EVENT_TIMEOUT_S):
                await track.finished.wait()
            await asyncio.sleep(TAIL_S)
            await call.send({"type": "end"})
            await call.closed()
            count_rtc_traffic(await peer.getStats(), probe.traffic)
    finally:
        await peer.close()
        if listener is not None:
            await asyncio.gather(listener, return_exceptions=True)


def count_rtc_traffic(stats: dict[str, Any], traffic: CallTraffic) -> None:
    by_type: dict[str, list[Any]] = {}
    for entry in stats.values():
        by_type.setdefault(entry.type, []).append(entry)
    for transport in by_type.get("transport", []):
        traffic.datagrams(up=True, count=transport.packetsSent, udp_payload_bytes=transport.bytesSent)
        traffic.datagrams(up=False, count=transport.packetsReceived, udp_payload_bytes=transport.bytesReceived)
    for sent in by_type.get("outbound-rtp", []):
        traffic.audio(up=True, packets=sent.packetsSent, opus_bytes=sent.bytesSent)
    received = sum(entry.packetsReceived for entry in by_type.get("inbound-rtp", []))
    reports = by_type.get("remote-outbound-rtp", [])
    reported_packets = sum(entry.packetsSent for entry in reports)
    reported_bytes = sum(entry.bytesSent for entry in reports)
    per_packet = reported_bytes / reported_packets if reported_packets else 0.0
    traffic.audio(up=False, packets=received, opus_bytes=round(per_packet * received))
