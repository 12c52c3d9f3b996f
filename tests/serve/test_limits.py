"""Limits, origin checks and structured logs through the real service (Ray Serve, ingress + converter, loopback).

The ingress runs with tight limits, so that each one trips within seconds: audio at most 1.5x real time with a 1 s
burst, 5 text messages at once, sessions of at most 4 s, one listed browser origin, uploads of at most 512 KiB. Its
logs go, JSON-encoded, to a directory of the test's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from app.transport.protocol import CLOSE_POLICY_VIOLATION
from bench.harness import API_KEY, BASE_URL, ServeApp, local_ray, start_app
from bench.parity import ParitySet
from client.api import ClientError, upload_voice
from client.stream_client import encode_packets, paced_packets, start_message

pytestmark = pytest.mark.serve

WS_URL = BASE_URL.replace("http", "ws")
LISTED_ORIGIN = "https://app.example"
MAX_SESSION_S = 4.0
MAX_UPLOAD_BYTES = 512 * 1024


@pytest.fixture(scope="module")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve-logs")


@pytest.fixture(scope="module")
def limited(parity: ParitySet, tmp_path_factory: pytest.TempPathFactory, logs_dir: Path) -> Iterator[ServeApp]:
    ingress = {
        "max_audio_speed": 1.5,
        "audio_burst_s": 1.0,
        "text_burst": 5,
        "max_text_per_s": 1.0,
        "max_session_s": MAX_SESSION_S,
        "allowed_origins": [LISTED_ORIGIN],
        "max_upload_bytes": MAX_UPLOAD_BYTES,
    }
    logging_config = {"encoding": "JSON", "logs_dir": str(logs_dir)}
    with local_ray():
        yield start_app(
            parity,
            tmp_path_factory.mktemp("voices"),
            converters=1,
            ingress=ingress,
            options={"Ingress": {"logging_config": logging_config}},
        )


async def until_error(socket: websockets.ClientConnection) -> dict[str, Any]:
    """The error event the server ends the connection with (every other message skipped)."""
    async for message in socket:
        if isinstance(message, str) and (event := json.loads(message))["type"] == "error":
            return event
    raise AssertionError("the server closed without an error event")


async def send_all(socket: websockets.ClientConnection, messages: list[bytes | str]) -> None:
    """Sends until the server closes: it may stop a flood at any point."""
    with contextlib.suppress(ConnectionClosed):
        for message in messages:
            await socket.send(message)


async def ended_session(served: ServeApp, messages: list[bytes | str], paced: bool = False) -> tuple[dict, int, float]:
    """Starts a real-time stream, sends `messages` (audio at 20 ms intervals when `paced`), and returns the error
    event that ended it, the close code, and how long the session lasted."""
    loop = asyncio.get_running_loop()
    async with websockets.connect(WS_URL + "/v1/stream") as socket:
        began = loop.time()
        await socket.send(json.dumps(start_message(served.token, served.voice_id, realtime=True)))
        assert json.loads(await socket.recv())["type"] == "ready"
        if paced:
            sender = asyncio.create_task(send_all_paced(socket, messages))
        else:
            sender = asyncio.create_task(send_all(socket, messages))
        error = await until_error(socket)
        await sender
        with contextlib.suppress(ConnectionClosed):
            await socket.recv()
        assert socket.close_code is not None
        return error, socket.close_code, loop.time() - began


async def send_all_paced(socket: websockets.ClientConnection, packets: list[bytes | str]) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for packet in paced_packets([p for p in packets if isinstance(p, bytes)], realtime=True):
            await socket.send(packet)


def packets(served: ServeApp, seconds: float) -> list[bytes | str]:
    audio = np.tile(served.source_48k(), int(seconds // 3) + 1)[: int(48000 * seconds)]
    return list(encode_packets(audio))


# -- limits --------------------------------------------------------------------------------------------------------


def test_a_flood_of_audio_ends_with_too_fast(limited: ServeApp) -> None:
    error, close, lasted = asyncio.run(ended_session(limited, packets(limited, 10.0)))
    assert error["code"] == "too_fast" and "1.5 times real time" in error["message"], error
    assert close == CLOSE_POLICY_VIOLATION and lasted < MAX_SESSION_S


def test_a_flood_of_text_messages_ends_with_too_fast(limited: ServeApp) -> None:
    switch = json.dumps({"type": "set_voice", "voice_id": limited.voice_id})
    error, close, _ = asyncio.run(ended_session(limited, [switch] * 20))
    assert error["code"] == "too_fast" and "text messages" in error["message"], error
    assert close == CLOSE_POLICY_VIOLATION


def test_a_session_longer_than_max_session_s_ends_with_its_code(limited: ServeApp) -> None:
    error, close, lasted = asyncio.run(ended_session(limited, packets(limited, 3 * MAX_SESSION_S), paced=True))
    assert error["code"] == "session_too_long", error
    assert close == CLOSE_POLICY_VIOLATION and MAX_SESSION_S <= lasted < 2 * MAX_SESSION_S


def test_a_real_time_stream_within_the_limits_is_untouched(limited: ServeApp) -> None:
    result = limited.stream(limited.source_48k(2.0), realtime=True, seed=1)
    assert result.error is None and result.end is not None


async def resumed_with_a_backlog(served: ServeApp, dropped_for_s: float) -> dict[str, Any]:
    """A stream that drops after 1 s of real-time input and comes back `dropped_for_s` later with a resume, sending
    at once what a client sends then (client/stream_client.py): the input since the block its converter stands at.
    Returns the event the resumed connection ends with."""
    audio = packets(served, 4.0)
    start = start_message(served.token, served.voice_id, realtime=True)
    async with websockets.connect(WS_URL + "/v1/stream") as socket:
        await socket.send(json.dumps(start))
        ready = json.loads(await socket.recv())
        began = asyncio.get_running_loop().time()
        await send_all_paced(socket, audio[:50])
        socket.transport.abort()  # no close frame: a dropped network, which leaves the session to resume
    await asyncio.sleep(dropped_for_s)
    resume = {"session_id": ready["session_id"], "resume_token": ready["resume_token"]}
    async with websockets.connect(WS_URL + "/v1/stream") as socket:
        await socket.send(json.dumps({**start, "resume": resume}))
        resumed = json.loads(await socket.recv())
        assert resumed["type"] == "ready" and resumed["resumed_at_block"] is not None, resumed
        recorded = round((asyncio.get_running_loop().time() - began) * 1000 / 20)  # 20 ms packets since the first
        converted = resumed["resumed_at_block"] * resumed["block_ms"] // 20
        await send_all(socket, [*audio[converted:recorded], json.dumps({"type": "end"})])
        async for message in socket:
            if isinstance(message, str) and (event := json.loads(message))["type"] in ("end", "error"):
                return event
    raise AssertionError("the resumed stream closed without an end or error event")


def test_a_resumed_stream_may_send_its_backlog_at_once(limited: ServeApp) -> None:
    """The backlog after 1.5 s away is more than the 1 s burst and 1.5x real time allow: the resume allows it."""
    event = asyncio.run(resumed_with_a_backlog(limited, dropped_for_s=1.5))
    assert event["type"] == "end", event


# -- origins -------------------------------------------------------------------------------------------------------


async def first_answer(path: str, origin: str | None) -> str:
    """Opens the socket with this Origin and sends `end` first: the error code of the answer shows that the socket
    reached the protocol (`not_started`), without opening a session."""
    async with websockets.connect(WS_URL + path, origin=Origin(origin) if origin is not None else None) as socket:
        await socket.send(json.dumps({"type": "end"}))
        return (await until_error(socket))["code"]


@pytest.mark.parametrize("path", ["/v1/stream", "/v1/rtc"])
def test_a_foreign_origin_is_refused_before_the_handshake(limited: ServeApp, path: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(first_answer(path, "https://evil.example"))
    assert refused.value.response.status_code == 403


@pytest.mark.parametrize("path", ["/v1/stream", "/v1/rtc"])
@pytest.mark.parametrize("origin", [LISTED_ORIGIN, BASE_URL, None], ids=["listed", "same-origin", "no-origin"])
def test_allowed_origins_reach_the_protocol(limited: ServeApp, path: str, origin: str | None) -> None:
    assert asyncio.run(first_answer(path, origin)) == "not_started"


def preflight(origin: str) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(
        BASE_URL + "/v1/tokens",
        method="OPTIONS",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers)


def test_cors_lets_only_listed_origins_call_the_api(limited: ServeApp) -> None:
    status, headers = preflight(LISTED_ORIGIN)
    assert status == 200 and headers.get("access-control-allow-origin") == LISTED_ORIGIN
    status, headers = preflight("https://evil.example")
    assert status >= 400 and "access-control-allow-origin" not in {name.lower() for name in headers}


# -- uploads -------------------------------------------------------------------------------------------------------


def flac(seconds: float, rate: int = 8000) -> bytes:
    """A tone: FLAC packs it small, so that only its length is over a limit."""
    buffer = io.BytesIO()
    tone = 0.1 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * rate)) / rate).astype(np.float32)
    soundfile.write(buffer, tone, rate, format="FLAC")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("body", "status", "why"),
    [(b"\0" * (MAX_UPLOAD_BYTES + 1), 413, f"the limit is {MAX_UPLOAD_BYTES}"), (flac(61.0), 422, "longer than 60")],
    ids=["over max_upload_bytes", "over max_seconds"],
)
def test_uploads_over_the_limits_are_refused(
    limited: ServeApp, tmp_path: Path, body: bytes, status: int, why: str
) -> None:
    assert len(flac(61.0)) < MAX_UPLOAD_BYTES  # the long one is refused for its length, not its size
    path = tmp_path / "upload.bin"
    path.write_bytes(body)
    with pytest.raises(ClientError) as refused:
        upload_voice(BASE_URL, limited.token, path)
    assert refused.value.status == status and why in refused.value.detail


def test_a_chunked_upload_is_refused_once_it_streams_past_the_limit(limited: ServeApp) -> None:
    """No Content-Length to refuse it by: the ingress counts while the body streams in, and stops there."""
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(4 * MAX_UPLOAD_BYTES // 65536):
            sent += 65536
            yield b"\0" * 65536

    connection = http.client.HTTPConnection("127.0.0.1", 8000, timeout=60)
    try:
        headers = {"Authorization": f"Bearer {limited.token}", "Content-Type": "application/octet-stream"}
        with contextlib.suppress(ConnectionError):  # the server may answer and close before the body is all sent
            connection.request("POST", "/v1/voices", body=chunks(), headers=headers, encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413, response.read()
        assert f"over {MAX_UPLOAD_BYTES} bytes" in json.loads(response.read())["detail"]
    finally:
        connection.close()


# -- logs ----------------------------------------------------------------------------------------------------------


def test_ingress_logs_are_json_with_the_session_id_and_no_credentials(limited: ServeApp, logs_dir: Path) -> None:
    result = limited.stream(limited.source_48k(0.5), realtime=False, seed=2)
    assert result.ready is not None and result.error is None
    files = sorted(logs_dir.glob("*Ingress*.log"))
    assert files, sorted(path.name for path in logs_dir.iterdir())
    text = "".join(path.read_text() for path in files)
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    mine = [r for r in records if r.get("session_id") == result.ready["session_id"]]
    assert any("started on converter" in r["message"] for r in mine), mine
    assert all(r["transport"] == "websocket" and r["key_id"] == "test" for r in mine)
    assert limited.token not in text and API_KEY not in text
