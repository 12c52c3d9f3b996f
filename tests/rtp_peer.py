"""A non-browser RTP peer for tests: a control WebSocket on /v1/rtp, and Opus in RTP over UDP both ways."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import websockets
from aiortc.rtp import RtpPacket

from app.audio.opus import FRAME_SAMPLES, SAMPLE_RATE, OpusEncoder
from app.audio.opus_concealment import ConcealingOpusDecoder
from app.audio.pacing import Pacer
from app.transport.rtp_jitter import SEQUENCE_MODULO, TIMESTAMP_MODULO, unwrap
from tests.udp_relay import Impairment, Relay, lossy_relay

EVENT_TIMEOUT_S = 30.0
TAIL_S = 0.3  # silence after the audio, so that its last packets are in before `end`
PEER_SSRC = 0x5EED0001
Address = tuple[str, int]
Event = dict[str, Any]


class Datagrams(asyncio.DatagramProtocol):
    """Every datagram a UDP socket receives, with its source."""

    def __init__(self) -> None:
        self.received: list[tuple[bytes, Address]] = []
        self.arrived = asyncio.Event()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append((data, (addr[0], addr[1])))
        self.arrived.set()


@contextlib.asynccontextmanager
async def udp_socket(host: str = "127.0.0.1") -> AsyncIterator[tuple[asyncio.DatagramTransport, Datagrams, int]]:
    transport, datagrams = await asyncio.get_running_loop().create_datagram_endpoint(Datagrams, local_addr=(host, 0))
    try:
        yield transport, datagrams, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


def rtp_packets(
    audio_48k: np.ndarray, payload_type: int = 96, ssrc: int = PEER_SSRC, bitrate: int = 32000
) -> list[bytes]:
    """The audio (padded to whole frames, then TAIL_S of silence) as RTP Opus packets, 20 ms each."""
    frames = -(-len(audio_48k) // FRAME_SAMPLES) + round(TAIL_S * SAMPLE_RATE / FRAME_SAMPLES)
    padded = np.zeros(frames * FRAME_SAMPLES, np.float32)
    padded[: len(audio_48k)] = audio_48k
    encoder = OpusEncoder(bitrate, expected_loss_percent=10)
    packets = []
    for index in range(frames):
        payload = encoder.encode(padded[index * FRAME_SAMPLES : (index + 1) * FRAME_SAMPLES])
        packet = RtpPacket(
            payload_type=payload_type,
            marker=int(index == 0),
            sequence_number=(65000 + index) % SEQUENCE_MODULO,  # wraps around early in the call
            timestamp=(TIMESTAMP_MODULO - 5 * FRAME_SAMPLES + index * FRAME_SAMPLES) % TIMESTAMP_MODULO,  # so do these
            ssrc=ssrc,
            payload=payload,
        )
        packets.append(packet.serialize())
    return packets


def decode_by_timestamps(datagrams: list[bytes]) -> np.ndarray:
    """Received RTP Opus as audio placed by its timestamps (the first packet's at 0): gaps concealed, duplicates and
    order undone, as a receiver's jitter buffer with room for everything would."""
    packets = [RtpPacket.parse(data) for data in datagrams]
    if not packets:
        return np.zeros(0, np.float32)
    first = packets[0]
    by_sequence: dict[int, RtpPacket] = {}
    newest = 0
    for packet in packets:
        extended = unwrap(packet.sequence_number - first.sequence_number, newest, SEQUENCE_MODULO)
        newest = max(newest, extended)
        by_sequence.setdefault(extended, packet)
    decoder = ConcealingOpusDecoder()
    parts, position = [], 0
    for sequence in sorted(by_sequence):
        packet = by_sequence[sequence]
        at = unwrap(packet.timestamp - first.timestamp, position, TIMESTAMP_MODULO)
        if at > position:
            parts.append(decoder.conceal(at - position, packet.payload))
            position = at
        if at == position:
            parts.append(samples := decoder.decode(packet.payload))
            position += len(samples)
    return np.concatenate(parts)


@dataclass
class RtpCallResult:
    events: list[Event] = field(default_factory=list)
    output: list[bytes] = field(default_factory=list)  # the converted voice's datagrams, as received
    sources: set[Address] = field(default_factory=set)  # where they came from
    close_code: int | None = None
    relay: Relay | None = None  # the lossy relay the call went through, with its counts

    def of_type(self, kind: str) -> list[Event]:
        return [event for event in self.events if event["type"] == kind]

    @property
    def output_48k(self) -> np.ndarray:
        return decode_by_timestamps(self.output)


async def next_event(socket: websockets.ClientConnection) -> Event:
    async with asyncio.timeout(EVENT_TIMEOUT_S):
        return json.loads(await socket.recv())


async def rtp_call(
    url: str,
    start: Event,
    packets: list[bytes],
    *,
    network: Impairment | None = None,
    alongside: Callable[[Address], Coroutine[Any, Any, None]] | None = None,
    hang_up: bool = True,
) -> RtpCallResult:
    """One call: sends the packets in real time (through a relay that impairs both ways like `network`, when
    given), hangs up with `end`, and collects events and the converted voice until the server closes. `alongside`
    runs with the sending, given the server's RTP address. Without `hang_up`, the control socket drops at the first
    block event after the packets instead, with no `end`: the session waits for a resume."""
    result = RtpCallResult()
    async with contextlib.AsyncExitStack() as stack:
        udp, received, _ = await stack.enter_async_context(udp_socket())
        socket = await stack.enter_async_context(websockets.connect(url))
        await socket.send(json.dumps(start))
        while (event := await next_event(socket))["type"] not in ("rtp", "error"):
            result.events.append(event)
        result.events.append(event)
        if event["type"] == "error":
            await socket.wait_closed()
            result.close_code = socket.close_code
            return result
        server = (event["host"], event["port"])
        destination = server
        if network is not None:
            destination, result.relay = await stack.enter_async_context(lossy_relay(server, network))
        other = asyncio.create_task(alongside(server)) if alongside is not None else None
        pacer = Pacer(FRAME_SAMPLES / SAMPLE_RATE)
        for index, packet in enumerate(packets):
            await pacer.wait(index)
            udp.sendto(packet, destination)
        if other is not None:
            await other
        if hang_up:
            await socket.send(json.dumps({"type": "end"}))
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    result.events.append(await next_event(socket))
        else:
            while (event := await next_event(socket))["type"] != "block":
                result.events.append(event)
            result.events.append(event)
            await socket.close()
        result.close_code = socket.close_code
        await asyncio.sleep(0.2)  # the last packets are on their way with the end event
        result.output = [data for data, _ in received.received]
        result.sources = {source for _, source in received.received}
    return result
