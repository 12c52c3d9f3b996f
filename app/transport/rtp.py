"""The `/v1/rtp` endpoint: a call whose audio is plain RTP over UDP, for peers that are not browsers (GStreamer
pipelines, media servers, SIP gateways), controlled over a WebSocket held for the whole call.

Protocol: the messages and events of protocol v1 (app/transport/protocol.py) on the control socket, plus:

1. Open a WebSocket on `/v1/rtp` and send `RtpStartMessage`: the start message of `/v1/stream` plus
   `"rtp": {"payload_type": 96, "ssrc": null, "address": null}` (all optional). `payload_type` is the dynamic
   payload type of the Opus packets both ways; `ssrc` the SSRC the peer will send with (null: the first packet's is
   taken); `address` (`{"host": "203.0.113.7", "port": 5004}`) where the converted voice goes (null: back to the
   source address and port of the peer's packets). `realtime` is ignored (a call is always real time).
2. The server answers `ready`, then `RtpEvent` `{"type": "rtp", "host", "port", "payload_type", "ssrc"}`: the UDP
   address to send to (the node holding the call; behind Serve's proxy the peer cannot know which node that is) and
   the SSRC of the converted voice. A declared address the service may not send to is refused with
   `address_refused` (app/transport/addresses.py: public addresses, plus configured networks).
3. The peer sends its voice as RTP (RFC 3550) carrying Opus (RFC 7587): 48 kHz clock, any packet duration, mono or
   stereo (downmixed). The first packet of the right payload type (and SSRC, when declared) fixes the peer's
   source address and SSRC; packets from any other source are dropped. Nothing within `rtc_connect_timeout_s`
   ends the call with `connection_failed`.
4. A jitter buffer (app/transport/rtp_jitter.py) waits `rtp_jitter_ms` for late and reordered packets and plays
   them out on their timestamps; a lost packet is concealed (the next packet's in-band FEC, else libopus PLC), so the
   converted voice keeps the input's length.
5. The converted voice comes back as RTP Opus, mono, `opus_bitrate`, with in-band FEC, 20 ms a packet, in real
   time, to the declared address or else to the peer's source address. Silence is sent with DTX
   (app/audio/opus.py): one TOC-only packet, then one packet every 400 ms; the timestamps go on counting, and the
   packet that ends a pause has the marker bit (RFC 3551, 4.1). Events as on `/v1/stream`.
6. `set_voice` and `end` as on `/v1/stream`: after `end`, the rest of the input is converted and sent, then the
   `end` event, and the socket closes.
7. Resume: as `/v1/stream`; the new connection answers with a new `RtpEvent`, a new port. A peer that cannot
   follow (a fixed gst-launch pipeline) ends with the old connection.

Plain RTP is neither encrypted nor authenticated: anyone on the path hears the call, and only the source address
and SSRC tie packets to it. Open the port range to private networks only (a gateway's VPC), never to the internet.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from aiortc.rtp import RtpPacket, is_rtcp
from starlette.websockets import WebSocket

from app.audio.opus import FRAME_SAMPLES, SAMPLE_RATE, OpusEncoder, OpusError
from app.audio.opus_concealment import EXPECTED_LOSS_PERCENT, ConcealingOpusDecoder
from app.audio.pacing import Pacer
from app.environment import ServiceEnvironment
from app.serving.config import IngressConfig
from app.serving.live import LiveSession
from app.transport.addresses import OutboundFilter
from app.transport.driver import SessionDriver
from app.transport.protocol import (
    FRAME_MS,
    EndMessage,
    ErrorCode,
    ProtocolError,
    RtpEvent,
    RtpStartMessage,
    SetControlsMessage,
    SetVoiceMessage,
    StartMessage,
    parse_rtp_message,
)
from app.transport.rtp_jitter import Gap, JitterBuffer, Packet
from app.transport.sessions import StreamServices

log = logging.getLogger(__name__)

MAX_DATAGRAM_BYTES = 1500  # an Ethernet MTU: no RTP audio packet is larger
# Held input beyond the jitter delay: a burst after a stall plays out this late at most, the rest is skipped.
MAX_EXTRA_DEPTH_S = 0.5
PORT_TRIES = 50
Address = tuple[str, int]


@dataclass(frozen=True)
class RtpServices:
    """What every RTP call shares."""

    stream: StreamServices
    host: str  # the address peers send to
    bind_address: str = "0.0.0.0"
    ports: range = range(40000, 41000)
    outbound: OutboundFilter = field(default_factory=OutboundFilter)
    jitter_s: float = 0.06
    connect_timeout_s: float = 15.0

    @classmethod
    def from_config(cls, stream: StreamServices, config: IngressConfig, node_host: str) -> RtpServices | None:
        """None while RTP is off; `node_host`: this node's address, unless the config names one."""
        if not config.rtp_enabled:
            return None
        # SEEDVC_RTP_HOST is set per node, the config per cluster: the node's own setting wins.
        host = ServiceEnvironment.read().rtp_host or config.rtp_host or node_host
        return cls(
            stream,
            host,
            config.rtp_bind_address,
            range(config.rtp_port_min, config.rtp_port_max + 1),
            OutboundFilter(config.outbound_networks),
            config.rtp_jitter_ms / 1000,
            config.rtc_connect_timeout_s,
        )

    async def bind(self, on_datagram: Callable[[bytes, Address], None]) -> tuple[asyncio.DatagramTransport, int]:
        """A UDP socket on a free port of the range, whose datagrams go to `on_datagram`."""
        loop = asyncio.get_running_loop()
        # Random ports: a peer that knows one call's port learns nothing about the next call's.
        for port in random.sample(self.ports, min(PORT_TRIES, len(self.ports))):
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Datagrams(on_datagram), local_addr=(self.bind_address, port)
                )
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    continue
                raise
            return transport, port
        raise ProtocolError(ErrorCode.connection_failed, "no free RTP port on this node; try again shortly")


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Address], None]) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_datagram(data, (addr[0], addr[1]))


class RtpCall(SessionDriver):
    """One call: the driver's session on a UDP port of its own, released in `release` however the call ends."""

    transport = "rtp"
    noun = "call"

    def __init__(self, websocket: WebSocket, services: RtpServices) -> None:
        super().__init__(websocket, services.stream)
        self.services = services
        self.udp: asyncio.DatagramTransport | None = None
        self.payload_type = 0
        self.peer_ssrc: int | None = None  # declared, or taken from the first packet
        self.source: Address | None = None  # the peer's packets come from here; others are dropped
        self.destination: Address | None = None  # the converted voice goes here
        self.buffer = JitterBuffer(round((services.jitter_s + MAX_EXTRA_DEPTH_S) * SAMPLE_RATE))
        self.decoder = ConcealingOpusDecoder()
        self.encoder = OpusEncoder(services.stream.opus_bitrate, EXPECTED_LOSS_PERCENT, dtx=True)
        self.output_ssrc = secrets.randbits(32)
        self._output_sequence = secrets.randbits(16)  # random starts (RFC 3550, 5.1)
        self._output_timestamp = secrets.randbits(32)
        self._talkspurt = True  # the next packet starts one: the first, or the first after DTX sent nothing
        self._first_packet = asyncio.Event()
        self._first_arrival = 0.0  # loop time of the first packet: the playout clock starts there
        self.dropped_packets = 0  # not RTP, not the call's payload type, SSRC or source, or not decodable

    def parse(self, text: str) -> RtpStartMessage | SetVoiceMessage | SetControlsMessage | EndMessage:
        return parse_rtp_message(text)

    async def connect(self, start: StartMessage, session: LiveSession) -> None:
        assert isinstance(start, RtpStartMessage), "parse_rtp_message makes every start message"
        options = start.rtp
        self.payload_type = options.payload_type
        self.peer_ssrc = options.ssrc
        if options.address is not None:
            if not self.services.outbound.allows(options.address.host):
                raise ProtocolError(ErrorCode.address_refused, f"this service sends no RTP to {options.address.host}")
            self.destination = (options.address.host, options.address.port)
        self.udp, port = await self.services.bind(self._on_datagram)
        event = RtpEvent(host=self.services.host, port=port, payload_type=self.payload_type, ssrc=self.output_ssrc)
        await self.send_text(event.model_dump_json())
        log.info("call %s: RTP on port %d", self.session_id, port)

    async def release(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.dropped_packets or self.buffer.late or self.buffer.concealed_samples:
            log.info(
                "call %s: RTP packets dropped %d, late %d; concealed %.2f s, skipped %.2f s",
                self.session_id,
                self.dropped_packets,
                self.buffer.late,
                self.buffer.concealed_samples / SAMPLE_RATE,
                self.buffer.skipped_samples / SAMPLE_RATE,
            )

    # -- input ---------------------------------------------------------------------------------------------------

    def _on_datagram(self, data: bytes, source: Address) -> None:
        if len(data) > MAX_DATAGRAM_BYTES or is_rtcp(data):
            return  # RTCP is not needed: loss shows in the sequence numbers
        try:
            packet = RtpPacket.parse(data)
        except ValueError:
            self.dropped_packets += 1
            return
        if not self._from_peer(packet, source):
            self.dropped_packets += 1
            return
        self.limits.input_arrived()  # a packet of the call: the session is not idle (the jitter buffer's gaps are)
        if not self._first_packet.is_set():
            self._first_arrival = asyncio.get_running_loop().time()
            self._first_packet.set()
        self.buffer.push(packet.sequence_number, packet.timestamp, packet.payload)

    def _from_peer(self, packet: RtpPacket, source: Address) -> bool:
        """Whether the packet belongs to this call; the first one that may fixes the peer's source and SSRC."""
        if packet.payload_type != self.payload_type or not packet.payload:
            return False
        if self.source is not None:
            return source == self.source and packet.ssrc == self.peer_ssrc
        if self.peer_ssrc is not None and packet.ssrc != self.peer_ssrc:
            return False
        if self.destination is None and not self.services.outbound.allows(source[0]):
            return False  # the voice would go back there: a source the service may not send to is no peer
        self.source, self.peer_ssrc = source, packet.ssrc
        if self.destination is None:
            self.destination = source
        log.info("call %s: RTP from %s:%d, SSRC %d", self.session_id, source[0], source[1], packet.ssrc)
        return True

    async def watch(self) -> None:
        timeout = self.services.connect_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await self._first_packet.wait()
        except TimeoutError:
            raise ProtocolError(ErrorCode.connection_failed, f"no RTP from the peer within {timeout:g} s") from None
        await asyncio.Event().wait()

    async def receive_media(self, session: LiveSession) -> None:
        """Plays the jitter buffer out every 20 ms, on the clock of the first packet's arrival."""
        await self._first_packet.wait()
        loop = asyncio.get_running_loop()
        delay = round(self.services.jitter_s * SAMPLE_RATE)
        pacer = Pacer(FRAME_MS / 1000)
        tick = 0
        while True:
            await pacer.wait(tick)
            tick += 1
            await self._play_until(session, round((loop.time() - self._first_arrival) * SAMPLE_RATE) - delay)

    async def drain_media(self, session: LiveSession) -> None:
        """The packets that arrived before `end` and still wait in the jitter buffer are input too."""
        await self._play_until(session, self.buffer.position + self.buffer.max_depth_samples)

    async def _play_until(self, session: LiveSession, until: int) -> None:
        while (item := self.buffer.next(until)) is not None:
            await self.feed(session, self._decode(item))

    def _decode(self, item: Packet | Gap) -> np.ndarray:
        if isinstance(item, Gap):
            return self.decoder.conceal(item.samples, item.next_payload)
        try:
            samples = self.decoder.decode(item.payload)
        except OpusError:
            # UDP checksums make a corrupt packet unlikely: this is not Opus. Treat it as lost, not as fatal.
            self.dropped_packets += 1
            samples = self.decoder.conceal(FRAME_SAMPLES)
        self.buffer.played(len(samples))
        return samples

    # -- output --------------------------------------------------------------------------------------------------

    async def send_frame(self, frame: np.ndarray) -> None:
        if self.udp is None or self.destination is None:
            return  # no packet from the peer yet, so nowhere to send: the voice of silence is not missed
        payload = self.encoder.encode(frame)
        if payload:
            packet = RtpPacket(
                payload_type=self.payload_type,
                marker=int(self._talkspurt),  # the start of a talkspurt (RFC 3551, 4.1)
                sequence_number=self._output_sequence,
                timestamp=self._output_timestamp,
                ssrc=self.output_ssrc,
                payload=payload,
            )
            self.udp.sendto(packet.serialize(), self.destination)
            self._output_sequence = (self._output_sequence + 1) % (1 << 16)  # counts packets sent: no loss shown
        self._talkspurt = not payload
        self._output_timestamp = (self._output_timestamp + FRAME_SAMPLES) % (1 << 32)  # counts time, sent or not
