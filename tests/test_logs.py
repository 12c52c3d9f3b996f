"""Structured logs (app/logs.py): every record of a connection names its session in Serve's JSON encoding, and no
record ever holds a credential.

The JSON comes from Ray's own `JSONFormatter`, the one a Serve replica's log file uses with `encoding: JSON`; records
reach it the way they do in a replica, through `route_to`. The whole-stream tests run a real `StreamConnection` behind
uvicorn on a free loopback port, converting with an in-process identity converter.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
import websockets
from ray._common.formatters import JSONFormatter
from starlette.websockets import WebSocket

from app.auth.tokens import TokenSigner
from app.logs import PROJECT_LOGGERS, note, route_to, session_log, session_logged
from app.model.seedvc import SeedVC
from app.serving.config import ConverterConfig
from app.serving.converter import ConverterService
from app.serving.local import LocalConverterClient
from app.streaming.settings import StreamSettings
from app.transport.sessions import StreamServices
from app.transport.websocket import StreamConnection
from app.voices.store import VoiceStore
from bench.parity import ParitySet
from client.stream_client import stream_audio
from tests.fakes import websocket_server

SECRET = b"a test secret of at least 32 bytes"
transport_log = logging.getLogger("app.transport.websocket")


class JsonLog:
    """What a replica's JSON log file would hold: one JSON object per record."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def text(self) -> str:
        return self.stream.getvalue()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text().splitlines()]


@pytest.fixture
def json_log() -> Iterator[JsonLog]:
    """app/ and deployments/ records routed as a replica routes them, to a JSON handler; the loggers restored after."""
    saved = {name: logging.getLogger(name) for name in PROJECT_LOGGERS}
    state = {name: (logger.handlers[:], logger.level, logger.propagate) for name, logger in saved.items()}
    log = JsonLog()
    handler = logging.StreamHandler(log.stream)
    handler.setFormatter(JSONFormatter())
    target = logging.getLogger("tests.replica")
    target.handlers = [handler]
    target.setLevel(logging.DEBUG)
    target.propagate = False
    route_to(target)
    try:
        yield log
    finally:
        for name, (handlers, level, propagate) in state.items():
            saved[name].handlers = handlers
            saved[name].setLevel(level)
            saved[name].propagate = propagate


# -- the fields --------------------------------------------------------------------------------------------------


def test_records_in_a_session_carry_its_fields_in_the_json(json_log: JsonLog) -> None:
    async def connection() -> None:
        with session_log("websocket"):
            early = asyncio.create_task(asyncio.sleep(0.01))  # a task started before the ids were known
            note(key_id="tenant-a")
            note(session_id="0123abcd")
            await early
            await asyncio.create_task(_log_in_a_task())
            transport_log.info("stream %s: started", "0123abcd")

    asyncio.run(connection())
    [in_task, direct] = json_log.records()
    for record in (in_task, direct):
        assert record["session_id"] == "0123abcd"
        assert record["key_id"] == "tenant-a" and record["transport"] == "websocket"
    assert direct["message"] == "stream 0123abcd: started" and direct["levelname"] == "INFO"


async def _log_in_a_task() -> None:
    logging.getLogger("app.serving.live").warning("from a task")


def test_fields_are_added_once_known_and_gone_after_the_session(json_log: JsonLog) -> None:
    @session_logged("webrtc")
    async def call() -> None:
        transport_log.info("before the start message")
        note(key_id="tenant-b")
        transport_log.info("after it")

    asyncio.run(call())
    transport_log.info("outside any session")
    before, after, outside = json_log.records()
    assert before["transport"] == "webrtc" and "key_id" not in before and "session_id" not in before
    assert after["key_id"] == "tenant-b"
    assert not {"transport", "key_id", "session_id"} & outside.keys()


def test_an_explicit_extra_field_wins_and_unknown_fields_are_refused(json_log: JsonLog) -> None:
    with session_log("websocket"):
        note(session_id="mine")
        transport_log.info("about another session", extra={"session_id": "other"})
        with pytest.raises(TypeError, match="not a session log field"):
            note(token="never")  # the fields are ids only: nothing else can ride along
    assert json_log.records()[0]["session_id"] == "other"


def test_routing_twice_logs_once(json_log: JsonLog) -> None:
    route_to(logging.getLogger("tests.replica"))
    logging.getLogger("deployments.ingress").warning("once")
    assert len(json_log.records()) == 1


# -- whole streams -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services(parity: ParitySet, tmp_path_factory: pytest.TempPathFactory) -> tuple[StreamServices, str]:
    root = str(tmp_path_factory.mktemp("voices"))
    voice = VoiceStore(root).add((parity.root / parity.bundle["files"]["reference_22k"]).read_bytes(), owner="k")
    config = ConverterConfig(voice_store=root, silence_gate_dbfs=None, identity=True, replica_tag="a")
    converter = ConverterService(config, model=SeedVC.load(parity.model_dir))
    stream = StreamServices(
        client=LocalConverterClient({"a": converter}),
        tokens=TokenSigner(SECRET),
        voices=converter.store,
        defaults=StreamSettings(),
    )
    return stream, voice.voice_id


@contextlib.asynccontextmanager
async def stream_server(services: StreamServices) -> AsyncIterator[str]:
    """`StreamConnection` behind uvicorn on a free loopback port; yields the server's base URL."""

    async def endpoint(websocket: WebSocket) -> None:
        await StreamConnection(websocket, services).run()

    async with websocket_server("/v1/stream", endpoint) as port:
        yield f"http://127.0.0.1:{port}"


def test_a_stream_logs_with_its_session_id(services: tuple[StreamServices, str], json_log: JsonLog) -> None:
    stream, voice_id = services
    token = stream.tokens.issue("k").token

    async def run() -> Any:
        async with stream_server(stream) as url:
            return await stream_audio(url, token, voice_id, np.zeros(48000 // 2, np.float32), realtime=False)

    result = asyncio.run(run())
    assert result.error is None and result.ready is not None
    [started] = [r for r in json_log.records() if "started on converter" in r["message"]]
    assert started["session_id"] == result.ready["session_id"]
    assert started["key_id"] == "k" and started["transport"] == "websocket"
    assert token not in json_log.text()


@pytest.mark.parametrize("kind", ["forged", "expired", "malformed"])
def test_a_refused_token_appears_in_no_log_record(
    services: tuple[StreamServices, str],
    json_log: JsonLog,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    stream, voice_id = services
    tokens = {
        "forged": TokenSigner(b"another secret, also 32 bytes long").issue("k").token,
        "expired": TokenSigner(SECRET, ttl_seconds=1, clock=lambda: 0.0).issue("k").token,
        "malformed": "not-a-token-but-a-pasted-API-key-0123456789abcdef",
    }
    token = tokens[kind]
    caplog.set_level(logging.DEBUG)  # every logger, at every level: the root sees what is not routed
    start = {"type": "start", "version": 1, "token": token, "voice_id": voice_id}

    async def run() -> dict[str, Any]:
        async with stream_server(stream) as url, websockets.connect(url.replace("http", "ws") + "/v1/stream") as ws:
            await ws.send(json.dumps(start))
            return json.loads(await ws.recv())

    error = asyncio.run(run())
    assert error["type"] == "error" and error["code"] == "unauthorized"
    refused = [r for r in json_log.records() if "refused" in r["message"]]
    assert refused and refused[0]["transport"] == "websocket" and "session_id" not in refused[0]
    everything = json_log.text() + caplog.text + error["message"]
    for secret in (token, *token.split(".")):
        assert secret not in everything
