"""What one connection may hold, through real `/v1/stream` connections (uvicorn on loopback, real Opus, an identity
converter): the start message in time, codecs only after a valid start, a bounded outbox that drops the oldest audio
and says so, the idle-input timeout that frees the converter slot, and running sessions ended when their key is
revoked."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import websockets

import app.transport.websocket as websocket_transport
from app.audio.opus import OpusDecoder
from app.auth.keystore import KeyStore
from app.auth.tokens import GENERATION_CLAIM, TokenSigner
from app.auth.usage import UsageMeter
from app.model.seedvc import SeedVC
from app.serving.config import ConverterConfig, IngressConfig
from app.serving.converter import ConverterService
from app.serving.local import LocalConverterClient
from app.streaming.settings import StreamSettings
from app.transport.limits import MessageLimits
from app.transport.protocol import CLOSE_POLICY_VIOLATION
from app.transport.quotas import SessionQuotas
from app.transport.sessions import StreamServices
from app.voices.store import VoiceStore
from bench.parity import ParitySet
from client.stream_client import encode_packets, start_message
from tests.test_logs import stream_server

SECRET = b"a test secret of at least 32 bytes"
LIMITS = replace(
    MessageLimits.from_config(IngressConfig()), start_timeout_s=0.3, idle_input_s=0.6, max_output_backlog_s=0.2
)


@pytest.fixture(scope="module")
def converter(parity: ParitySet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ConverterService, str]]:
    root = str(tmp_path_factory.mktemp("voices"))
    voice = VoiceStore(root).add((parity.root / parity.bundle["files"]["reference_22k"]).read_bytes(), owner="k")
    config = ConverterConfig(voice_store=root, silence_gate_dbfs=None, identity=True, replica_tag="a")
    service = ConverterService(config, model=SeedVC.load(parity.model_dir))
    yield service, voice.voice_id
    service.close()


def services(converter: ConverterService, **changes: Any) -> StreamServices:
    return StreamServices(
        client=LocalConverterClient({"a": converter}),
        tokens=TokenSigner(SECRET),
        voices=converter.store,
        defaults=StreamSettings(),
        limits=LIMITS,
        **changes,
    )


@contextlib.asynccontextmanager
async def server(stream: StreamServices) -> AsyncIterator[str]:
    """The WebSocket URL of `/v1/stream` served with these services."""
    async with stream_server(stream) as url:
        yield url.replace("http", "ws") + "/v1/stream"


async def events_until_closed(ws: websockets.ClientConnection) -> tuple[list[dict[str, Any]], int, int | None]:
    """Every event, the number of audio frames, and the close code, until the server closes (within 10 s: a server
    that would hold the socket forever fails the test instead of hanging it)."""
    events, frames = [], 0
    async with asyncio.timeout(10):
        with contextlib.suppress(websockets.ConnectionClosed):
            async for message in ws:
                if isinstance(message, bytes):
                    frames += 1
                else:
                    events.append(json.loads(message))
    return events, frames, ws.close_code


def test_a_socket_without_a_start_message_is_closed_and_makes_no_codec(
    converter: tuple[ConverterService, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hundreds of sockets that never start (no credential needed) cost a coroutine each for start_timeout_s, and
    no Opus codec; a garbage first message is refused at once, also without one."""
    made = []

    class CountedDecoder(OpusDecoder):
        def __init__(self) -> None:
            made.append(1)
            super().__init__()

    monkeypatch.setattr(websocket_transport, "OpusDecoder", CountedDecoder)
    service, _ = converter

    async def scenario() -> None:
        async with server(services(service)) as url:
            idle = [await websockets.connect(url) for _ in range(200)]
            garbage = await websockets.connect(url)
            await garbage.send(b"\x00" * 40)
            answers = await asyncio.gather(*(events_until_closed(ws) for ws in [*idle, garbage]))
        for events, frames, code in answers:
            assert code == CLOSE_POLICY_VIOLATION and frames == 0
            assert [event["code"] for event in events] == ["not_started"]
        assert "no start message within 0.3 s" in answers[0][0][0]["message"]

    asyncio.run(scenario())
    assert made == []


def test_a_session_without_media_ends_and_frees_its_converter_slot(converter: tuple[ConverterService, str]) -> None:
    service, voice_id = converter
    stream = services(service)
    silence = encode_packets(np.zeros(48_000, dtype=np.float32))  # 1 s of silent packets: media all the same

    async def scenario() -> None:
        async with server(stream) as url, websockets.connect(url) as talking, websockets.connect(url) as quiet:
            for ws in (talking, quiet):
                await ws.send(json.dumps(start_message(stream.tokens.issue("k").token, voice_id)))
                assert json.loads(await ws.recv())["type"] == "ready"
            assert service.stats()["sessions"] == 2
            for packet in silence:  # 1 s of silence at real time, longer than the idle timeout
                await talking.send(packet)
                await asyncio.sleep(0.02)
            events, _, code = await events_until_closed(quiet)
            assert code == CLOSE_POLICY_VIOLATION and events[-1]["code"] == "idle_timeout"
            await talking.send(json.dumps({"type": "end"}))
            talking_events, _, _ = await events_until_closed(talking)
            assert talking_events[-1]["type"] == "end", "silence is not idleness"
        for _ in range(50):
            if service.stats()["sessions"] == 0:
                break
            await asyncio.sleep(0.05)
        assert service.stats()["sessions"] == 0

    asyncio.run(scenario())


def test_converted_audio_a_client_does_not_take_in_time_is_dropped_and_said(
    converter: tuple[ConverterService, str],
) -> None:
    """Input sent at 3x real time (the limit allows it) converts at 3x; the output leaves at 1x, so at most
    max_output_backlog_s waits: the oldest goes, and an output_dropped warning says how much."""
    service, voice_id = converter
    stream = services(service)
    packets = encode_packets(np.zeros(3 * 48_000, dtype=np.float32))

    async def scenario() -> tuple[list[dict[str, Any]], int]:
        async with server(stream) as url, websockets.connect(url) as ws:
            await ws.send(json.dumps(start_message(stream.tokens.issue("k").token, voice_id)))
            assert json.loads(await ws.recv())["type"] == "ready"
            for packet in packets:
                await ws.send(packet)
                await asyncio.sleep(0.02 / 3)
            await ws.send(json.dumps({"type": "end"}))
            events, frames, _ = await events_until_closed(ws)
            return events, frames

    events, frames = asyncio.run(scenario())
    warnings = [event for event in events if event["type"] == "warning"]
    assert warnings and {warning["code"] for warning in warnings} == {"output_dropped"}
    assert events[-1]["type"] == "end" and frames < 0.8 * len(packets)


def test_a_running_session_ends_when_its_key_is_revoked(
    converter: tuple[ConverterService, str], tmp_path: Path
) -> None:
    service, voice_id = converter
    keys = KeyStore(str(tmp_path), cache_ttl_s=0)
    keys.create("k")  # the owner of the fixture voice
    meter = UsageMeter(keys, flush_interval_s=0.1, cache_ttl_s=0)
    stream = services(service, quotas=SessionQuotas(meter))
    token = stream.tokens.issue("k", {GENERATION_CLAIM: "0"}).token
    silence = encode_packets(np.zeros(48_000 * 3, dtype=np.float32))

    async def scenario() -> list[dict[str, Any]]:
        async with server(stream) as url, websockets.connect(url) as ws:
            await ws.send(json.dumps(start_message(token, voice_id)))
            assert json.loads(await ws.recv())["type"] == "ready"

            async def talk() -> None:
                with contextlib.suppress(websockets.ConnectionClosed):
                    for number, packet in enumerate(silence):
                        if number == 25:
                            keys.revoke("k")  # half a second in
                        await ws.send(packet)
                        await asyncio.sleep(0.02)

            talking = asyncio.create_task(talk())
            events, _, code = await events_until_closed(ws)
            talking.cancel()
            assert code == CLOSE_POLICY_VIOLATION
            return events

    events = asyncio.run(scenario())
    assert events[-1]["type"] == "error" and events[-1]["code"] == "unauthorized"
    assert "revoked" in events[-1]["message"]
