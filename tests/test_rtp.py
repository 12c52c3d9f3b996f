"""The RTP transport (app/transport/rtp.py) and its pieces: the jitter buffer, the concealing Opus decoder, the
outbound address filter; then whole calls against an `RtpCall` behind uvicorn on loopback, converting with a
`ConverterService` in identity mode (the output is the input, delayed)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets
import yaml
from aiortc.rtp import RtpPacket
from starlette.websockets import WebSocket

from app.audio.opus import FRAME_SAMPLES, SAMPLE_RATE, OpusDecoder, OpusEncoder
from app.audio.opus_concealment import ConcealingOpusDecoder
from app.auth.tokens import TokenSigner
from app.serving.config import IngressConfig
from app.serving.converter import ConverterService
from app.serving.local import LocalConverterClient
from app.streaming.settings import StreamSettings
from app.transport.addresses import OutboundFilter
from app.transport.protocol import ErrorCode, ProtocolError, RtpStartMessage, close_code, parse_rtp_message
from app.transport.rtp import RtpCall, RtpServices
from app.transport.rtp_jitter import CONCEAL_STEP, Gap, JitterBuffer, Packet
from app.transport.sessions import StreamServices
from bench.parity import ParitySet
from tests.fakes import websocket_server
from tests.rtp_peer import PEER_SSRC, Event, RtpCallResult, next_event, rtp_call, rtp_packets, udp_socket
from tests.test_webrtc_unit import (
    LocalServer,
    correlation_at_best_lag,
    delays_and_correlations,
    identity_converter,
    lossy_call_input,
    source_48k,
)
from tests.udp_relay import LOSSY

__all__ = ["identity_converter"]  # a fixture, used by name

LOOPBACK = "127.0.0.0/8"


# -- the outbound address filter ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "127.0.0.1",
        "169.254.169.254",  # AWS, GCP and Azure metadata
        "100.100.100.200",  # Alibaba metadata, in carrier-grade NAT space
        "fd00:ec2::254",  # AWS metadata over IPv6
        "fe80::1",
        "::1",
        "::ffff:10.0.0.1",  # an IPv4-mapped private address
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "localhost",  # names are not resolved: refused
        "not an address",
    ],
)
def test_the_outbound_filter_refuses_what_is_not_public(host: str) -> None:
    assert not OutboundFilter().allows(host)


def test_the_outbound_filter_allows_public_addresses_and_configured_networks() -> None:
    assert OutboundFilter().allows("8.8.8.8") and OutboundFilter().allows("2001:4860:4860::8888")
    allowed = OutboundFilter(["10.20.0.0/16", LOOPBACK])
    assert allowed.allows("10.20.5.6") and allowed.allows("127.0.0.1") and allowed.allows("::ffff:127.0.0.1")
    assert not allowed.allows("10.21.0.1") and not allowed.allows("169.254.169.254")


def test_outbound_networks_are_checked_by_the_config() -> None:
    with pytest.raises(ValueError, match="not-a-network"):
        IngressConfig(outbound_networks=["not-a-network"])
    with pytest.raises(ValueError, match="rtp_port_min"):
        IngressConfig(rtp_port_min=5000, rtp_port_max=4000)


# -- the jitter buffer -------------------------------------------------------------------------------------------


def drain(buffer: JitterBuffer, until: int) -> list[Packet | Gap]:
    items = []
    while (item := buffer.next(until)) is not None:
        if isinstance(item, Packet):
            buffer.played(FRAME_SAMPLES)
        items.append(item)
    return items


def test_the_jitter_buffer_orders_drops_duplicates_and_late_packets() -> None:
    buffer = JitterBuffer(max_depth_samples=10 * FRAME_SAMPLES)
    for sequence in (65534, 0, 65535, 0, 1):  # reordered, a duplicate, and the sequence number wraps
        buffer.push(sequence, (sequence - 65534) % 65536 * FRAME_SAMPLES, bytes([sequence % 256]))
    assert buffer.late == 1
    assert drain(buffer, until=1) == [Packet(bytes([254]))]  # only what is due: the first frame
    assert drain(buffer, until=4 * FRAME_SAMPLES) == [Packet(bytes([255])), Packet(b"\x00"), Packet(b"\x01")]
    assert not buffer.push(65535, FRAME_SAMPLES, b"again")  # its turn has passed
    assert buffer.position == 4 * FRAME_SAMPLES and buffer.late == 2


def test_a_lost_packet_is_a_gap_with_the_next_packet_for_fec_and_timestamps_keep_the_timeline() -> None:
    buffer = JitterBuffer(max_depth_samples=10 * FRAME_SAMPLES)
    first = 2**32 - 3 * FRAME_SAMPLES  # the timestamp wraps too
    buffer.push(10, first, b"a")
    buffer.push(12, first + 2 * FRAME_SAMPLES, b"c")  # 11 is lost
    buffer.push(13, (first + 10 * FRAME_SAMPLES) % 2**32, b"d")  # the sender paused (DTX) for 7 frames
    items = drain(buffer, until=11 * FRAME_SAMPLES)
    assert items == [
        Packet(b"a"),
        Gap(FRAME_SAMPLES, b"c"),
        Packet(b"c"),
        Gap(7 * FRAME_SAMPLES, b"d"),
        Packet(b"d"),
    ]
    assert buffer.position == 11 * FRAME_SAMPLES and buffer.concealed_samples == 8 * FRAME_SAMPLES
    assert drain(buffer, until=12 * FRAME_SAMPLES) == []  # nothing newer came: a pause until a packet says otherwise
    buffer.push(15, (first + 13 * FRAME_SAMPLES) % 2**32, b"f")  # 14 lost: known once 15 is in
    assert drain(buffer, until=14 * FRAME_SAMPLES) == [Gap(2 * FRAME_SAMPLES, b"f"), Packet(b"f")]


def test_a_sender_that_runs_ahead_is_skipped_to_the_newest_audio() -> None:
    buffer = JitterBuffer(max_depth_samples=3 * FRAME_SAMPLES)
    for sequence in range(10):
        buffer.push(sequence, sequence * FRAME_SAMPLES, bytes([sequence]))
    assert buffer.skipped_samples == 6 * FRAME_SAMPLES
    assert drain(buffer, until=10 * FRAME_SAMPLES) == [Packet(bytes([n])) for n in (6, 7, 8, 9)]


# -- concealment -------------------------------------------------------------------------------------------------


def test_fec_rebuilds_a_lost_frame_better_than_plc() -> None:
    seconds = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    tone = (0.3 * np.sin(2 * np.pi * 220 * seconds) * (1 + np.sin(2 * np.pi * 3 * seconds)) / 2).astype(np.float32)
    frames = tone.reshape(-1, FRAME_SAMPLES)
    encoder = OpusEncoder(32000, expected_loss_percent=10)
    packets = [encoder.encode(frame) for frame in frames]
    decoder = OpusDecoder()
    reference = np.concatenate([decoder.decode(packet) for packet in packets])
    lost = {20, 30}

    def received(use_fec: bool) -> np.ndarray:
        decoder = ConcealingOpusDecoder()
        parts = []
        for index, packet in enumerate(packets):
            if index in lost:
                parts.append(decoder.conceal(FRAME_SAMPLES, packets[index + 1] if use_fec else None))
            else:
                parts.append(decoder.decode(packet))
        return np.concatenate(parts)

    def error(audio: np.ndarray) -> float:
        spans = [slice(i * FRAME_SAMPLES, (i + 1) * FRAME_SAMPLES) for i in lost]
        return float(sum(np.sum((audio[s] - reference[s]) ** 2) for s in spans))

    with_fec, plc_only = received(True), received(False)
    assert len(with_fec) == len(plc_only) == len(reference)  # concealed, not skipped
    assert ConcealingOpusDecoder().has_fec(packets[21])
    assert error(with_fec) < 0.1 * error(plc_only), (error(with_fec), error(plc_only))


# -- the control messages ----------------------------------------------------------------------------------------


def test_rtp_start_messages_parse_with_their_options() -> None:
    start = {"type": "start", "version": 1, "token": "t", "voice_id": "v"}
    plain = parse_rtp_message(json.dumps(start))
    assert isinstance(plain, RtpStartMessage) and plain.rtp.payload_type == 96 and plain.rtp.address is None
    options = {"payload_type": 111, "ssrc": 7, "address": {"host": "203.0.113.7", "port": 5004}}
    full = parse_rtp_message(json.dumps({**start, "rtp": options}))
    assert isinstance(full, RtpStartMessage) and full.rtp.address is not None and full.rtp.address.port == 5004
    for bad in ({"payload_type": 8}, {"address": {"host": "gateway.example", "port": 5004}}, {"ssrc": -1}):
        with pytest.raises(ProtocolError) as refused:
            parse_rtp_message(json.dumps({**start, "rtp": bad}))
        assert refused.value.code == ErrorCode.bad_message, bad
    assert close_code(ErrorCode.address_refused) == 1008


# -- whole calls in this process ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def local_server(
    converter: ConverterService, voice_id: str, networks: tuple[str, ...] = (LOOPBACK,), connect_timeout_s: float = 10
) -> AsyncIterator[LocalServer]:
    """`RtpCall` behind uvicorn on a free loopback port, its UDP on loopback too."""
    tokens = TokenSigner(b"a test secret of at least 32 bytes")
    stream = StreamServices(
        client=LocalConverterClient({"a": converter}), tokens=tokens, voices=converter.store, defaults=StreamSettings()
    )
    services = RtpServices(
        stream,
        host="127.0.0.1",
        bind_address="127.0.0.1",
        ports=range(42000, 43000),
        outbound=OutboundFilter(networks),
        connect_timeout_s=connect_timeout_s,
    )

    async def endpoint(websocket: WebSocket) -> None:
        await RtpCall(websocket, services).run()

    async with websocket_server("/v1/rtp", endpoint) as port:
        yield LocalServer(f"ws://127.0.0.1:{port}/v1/rtp", tokens.issue("k").token, voice_id, converter)


def identity_rtp_call(
    identity_converter: tuple[ConverterService, str], audio: np.ndarray, start: Event | None = None, **options: Any
) -> RtpCallResult:
    """One call of `audio` (with these fields added to its start message) to the identity converter; `options` are
    rtp_call's."""
    converter, voice_id = identity_converter

    async def run() -> RtpCallResult:
        async with local_server(converter, voice_id) as server:
            return await rtp_call(server.url, server.start(**(start or {})), rtp_packets(audio), **options)

    return asyncio.run(run())


@pytest.mark.slow
def test_identity_call_returns_the_input_over_rtp(
    identity_converter: tuple[ConverterService, str], parity: ParitySet
) -> None:
    audio = source_48k(parity, 3.0)
    result = identity_rtp_call(identity_converter, audio, start={"rtp": {"ssrc": PEER_SSRC}})
    assert result.close_code == 1000
    ready, rtp = result.events[:2]
    assert (ready["type"], rtp["type"], rtp["host"], rtp["payload_type"]) == ("ready", "rtp", "127.0.0.1", 96)
    blocks = result.of_type("block")
    assert [b["index"] for b in blocks] == list(range(len(blocks))) and result.events[-1]["blocks"] == len(blocks)
    assert result.sources == {("127.0.0.1", rtp["port"])}  # from the port the peer sends to
    assert {RtpPacket.parse(data).ssrc for data in result.output} == {rtp["ssrc"]}
    output = result.output_48k
    correlation, delay = correlation_at_best_lag(audio, output)
    assert correlation >= 0.9, correlation
    block = ready["block_ms"] * SAMPLE_RATE // 1000
    sent = len(rtp_packets(audio)) * FRAME_SAMPLES
    assert abs(len(output) - sent) <= block, (len(output), sent)  # the input's length, within one block
    assert 0 < delay < SAMPLE_RATE
    assert len(identity_converter[0].engine) == 0  # the session was closed


@pytest.mark.slow
def test_packets_from_another_source_or_ssrc_are_dropped(
    identity_converter: tuple[ConverterService, str], parity: ParitySet
) -> None:
    audio = source_48k(parity, 2.0)
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, len(audio)).astype(np.float32)

    async def intrude(server_address: tuple[str, int]) -> None:
        """Noise with the peer's SSRC from another address, and with another SSRC, interleaved with the call."""
        async with udp_socket() as (intruder, _, _):
            for same, foreign in zip(rtp_packets(noise), rtp_packets(noise, ssrc=PEER_SSRC + 1), strict=True):
                intruder.sendto(same, server_address)
                intruder.sendto(foreign, server_address)
                await asyncio.sleep(FRAME_SAMPLES / SAMPLE_RATE)

    result = identity_rtp_call(identity_converter, audio, alongside=intrude)
    correlation, _ = correlation_at_best_lag(audio, result.output_48k)
    assert result.close_code == 1000 and correlation >= 0.9, correlation


@pytest.mark.slow
def test_a_declared_address_is_where_the_voice_goes_and_must_pass_the_filter(
    identity_converter: tuple[ConverterService, str], parity: ParitySet
) -> None:
    converter, voice_id = identity_converter
    audio = source_48k(parity, 1.0)

    async def run() -> tuple[Any, Any, list[bytes]]:
        async with udp_socket() as (_, listener, port):
            address = {"host": "127.0.0.1", "port": port}
            async with local_server(converter, voice_id, networks=()) as server:
                refused = await rtp_call(server.url, server.start(rtp={"address": address}), rtp_packets(audio))
            async with local_server(converter, voice_id) as server:
                declared = await rtp_call(server.url, server.start(rtp={"address": address}), rtp_packets(audio))
            return refused, declared, [data for data, _ in listener.received]

    refused, declared, at_declared = asyncio.run(run())
    error = refused.events[-1]
    assert error["type"] == "error" and error["code"] == "address_refused" and refused.close_code == 1008
    assert declared.close_code == 1000 and declared.output == [] and len(at_declared) > 0
    assert len(at_declared) >= len(declared.of_type("block"))


@pytest.mark.slow
def test_a_resumed_call_gets_a_new_port_and_a_peer_that_follows_it_continues(
    identity_converter: tuple[ConverterService, str], parity: ParitySet
) -> None:
    converter, voice_id = identity_converter
    audio = source_48k(parity, 3.0)
    packets = rtp_packets(audio)
    half = len(packets) // 2

    async def run() -> tuple[RtpCallResult, RtpCallResult]:
        async with local_server(converter, voice_id) as server:
            # The first connection: half the input, then the control socket drops (no `end`).
            first = await rtp_call(server.url, server.start(), packets[:half], hang_up=False)
            resume = {"session_id": first.events[0]["session_id"], "resume_token": first.events[0]["resume_token"]}
            return first, await rtp_call(server.url, server.start(resume=resume), packets[half:])

    first, second = asyncio.run(run())
    ready, rtp = second.events[:2]
    assert (ready["type"], rtp["type"], second.close_code) == ("ready", "rtp", 1000)
    assert ready["session_id"] == first.events[0]["session_id"] and ready["resumed_at_block"] >= 1
    assert rtp["port"] != first.events[1]["port"]  # a new connection, a new port
    blocks = [event["index"] for event in second.of_type("block")]
    assert blocks and blocks[0] == ready["resumed_at_block"] and blocks == list(range(blocks[0], blocks[-1] + 1))
    assert second.events[-1]["type"] == "end" and second.events[-1]["blocks"] > blocks[-1]  # over both connections
    # The converted voice after the resume comes from the new port, and is the second half of the input.
    assert second.sources == {(rtp["host"], rtp["port"])}
    correlation, _ = correlation_at_best_lag(audio[half * FRAME_SAMPLES :][:SAMPLE_RATE], second.output_48k)
    assert correlation >= 0.9, correlation


@pytest.mark.slow
def test_a_peer_that_sends_nothing_ends_the_call(identity_converter: tuple[ConverterService, str]) -> None:
    converter, voice_id = identity_converter

    async def run() -> tuple[dict[str, Any], int | None]:
        async with (
            local_server(converter, voice_id, connect_timeout_s=1.0) as server,
            websockets.connect(server.url) as socket,
        ):
            await socket.send(json.dumps(server.start()))
            while (event := await next_event(socket))["type"] != "error":
                pass
            await socket.wait_closed()
            return event, socket.close_code

    event, code = asyncio.run(run())
    assert event["code"] == "connection_failed" and code == 1011
    assert len(converter.engine) == 0  # a call whose media never came frees its session


def test_the_cluster_opens_the_rtp_ports_to_a_private_network_only() -> None:
    cluster = yaml.safe_load((Path(__file__).parent.parent / "cluster.yaml").read_text())
    config = IngressConfig()
    rtp_rules = [
        rule
        for rule in cluster["provider"]["security_group"]["IpPermissions"]
        if rule["IpProtocol"] == "udp" and rule["FromPort"] <= config.rtp_port_min <= rule["ToPort"]
    ]
    [rule] = rtp_rules
    assert (rule["FromPort"], rule["ToPort"]) == (config.rtp_port_min, config.rtp_port_max)
    for source in rule["IpRanges"]:
        assert ipaddress.ip_network(source["CidrIp"]).is_private, source


# -- a lossy network ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_lossy_network_keeps_the_timeline_concealed_not_shortened(
    identity_converter: tuple[ConverterService, str], parity: ParitySet
) -> None:
    audio = lossy_call_input(parity)
    result = identity_rtp_call(identity_converter, audio, network=LOSSY)
    assert result.close_code == 1000 and result.relay is not None
    assert result.relay.counts.dropped >= 10 and result.relay.counts.duplicated > 0  # the network did its worst
    sent = len(rtp_packets(audio)) * FRAME_SAMPLES
    output = result.output_48k
    block = result.events[0]["block_ms"] * SAMPLE_RATE // 1000
    assert abs(len(output) - sent) <= block, (len(output), sent, block)
    late = result.of_type("late")
    assert len(late) <= 2 * -(-sent // (10 * SAMPLE_RATE)), late  # at most 2 a 10 s
    # Continuous: the input comes back at one delay from start to end, none of it lost to a skipped packet. (A
    # stretch with a concealed loss in it may correlate best a pitch period off, and at 5 % loss about a third of
    # the 0.2 s stretches hold one: most, not all, are exact. A skipped packet would move every later stretch.)
    found = delays_and_correlations(audio, output)
    delays = np.array([delay for delay, _ in found])
    quarter = len(delays) // 4
    assert abs(np.median(delays[:quarter]) - np.median(delays[-quarter:])) <= CONCEAL_STEP, found
    assert np.mean(np.abs(delays - np.median(delays)) <= CONCEAL_STEP) >= 0.75, found
    assert np.median([correlation for _, correlation in found]) > 0.9, found
