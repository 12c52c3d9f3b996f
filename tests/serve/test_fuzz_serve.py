"""Junk on live connections of the real Serve app, next to a good stream (real Ray Serve, WebSockets, libopus).

While one good session converts, other connections send random junk: random packets as audio after a valid start,
random text, oversized frames, junk before the start message, settings the model cannot stream. Each junk
connection gets an `error` event with the code the protocol documents for it, then the close code that goes with
that code; the good session converts every block, exactly as it does alone.

The junk is random but seeded (`JUNK_SEED`), and what each connection must be answered is worked out here with the
same checks the server runs (`parse_client_message`, `check_audio_frame`, a fresh `OpusDecoder`).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from app.audio.opus import OpusDecoder, OpusError
from app.transport.protocol import (
    MAX_FRAME_BYTES,
    MAX_TEXT_BYTES,
    ErrorCode,
    ProtocolError,
    StartMessage,
    check_audio_frame,
    close_code,
    parse_client_message,
)
from bench.harness import BASE_URL, ServeApp, local_ray, start_app
from bench.parity import ParitySet
from client.stream_client import StreamResult, stream_audio, stream_url

pytestmark = pytest.mark.serve

JUNK_SEED = 20_240_611
CASES_PER_KIND = 2
GOOD_SECONDS = 1.5
EVENT_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def served(parity: ParitySet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    with local_ray():
        yield start_app(parity, tmp_path_factory.mktemp("voices"), converters=1)


@dataclass
class Junk:
    """One junk connection: what it sends, in order, and the error code it must get."""

    name: str
    messages: list[str | bytes]
    code: ErrorCode


def random_text(rng: random.Random) -> str:
    alphabet = '{}[]":,\\ abcdefghijklmnopqrstuvwxyz0123456789.-éß€😀\x00\n'
    size = rng.choice([0, 1, 2, 10, 100, 1000, MAX_TEXT_BYTES + rng.randrange(1, 1000)])
    return "".join(rng.choice(alphabet) for _ in range(size))


def parse_code(text: str, *, started: bool) -> ErrorCode:
    """The code the server answers this text with (as the first message, or during a session)."""
    try:
        message = parse_client_message(text)
    except ProtocolError as error:
        return error.code
    if not started:
        code = None if isinstance(message, StartMessage) else ErrorCode.not_started
    else:
        code = ErrorCode.bad_message if isinstance(message, StartMessage) else None
    assert code is not None, "a random message turned out valid: change JUNK_SEED"
    return code


def random_audio_until_refused(rng: random.Random) -> tuple[list[bytes], ErrorCode]:
    """Random packets up to the first one the server refuses (many random packets decode: Opus has no checksum)."""
    decoder = OpusDecoder()  # decoding is deterministic, so the server's decoder refuses the same packet
    packets: list[bytes] = []
    while True:
        if rng.random() < 0.8:
            # A table-of-contents byte of a one-frame 20 ms packet (SILK, hybrid or CELT; RFC 6716, 3.1) with a random
            # payload: junk that decodes, and reaches the session as noise.
            toc = rng.choice([1, 5, 9, 13, 15, 19, 23, 27, 31]) << 3 | rng.randrange(2) << 2
            packet = bytes([toc]) + rng.randbytes(rng.randrange(0, 400))
        else:
            packet = rng.randbytes(rng.randrange(1, MAX_FRAME_BYTES + 1))
        packets.append(packet)
        try:
            check_audio_frame(packet)
            decoder.decode(packet)
        except ProtocolError as error:
            return packets, error.code
        except OpusError:
            return packets, ErrorCode.bad_audio


def junk_cases(start: Callable[..., str]) -> list[Junk]:
    rng = random.Random(JUNK_SEED)
    cases = []
    for index in range(CASES_PER_KIND):
        packets, code = random_audio_until_refused(rng)
        cases.append(Junk(f"random_audio_{index}", [start(), *packets], code))
        text = random_text(rng)
        cases.append(Junk(f"random_text_after_start_{index}", [start(), text], parse_code(text, started=True)))
        text = random_text(rng)
        cases.append(Junk(f"random_text_first_{index}", [text], parse_code(text, started=False)))
        first = rng.randbytes(rng.randrange(1, 4 * MAX_FRAME_BYTES))
        cases.append(Junk(f"random_bytes_first_{index}", [first], ErrorCode.not_started))
    oversized = rng.randbytes(rng.randrange(MAX_FRAME_BYTES + 1, 64 * 1024))
    cases.append(Junk("oversized_frame", [start(), oversized], ErrorCode.frame_too_large))
    cases.append(Junk("oversized_text", [start(), "x" * (MAX_TEXT_BYTES + 1)], ErrorCode.frame_too_large))
    # dit_context 0 is within the live range; the model's vocoder then falls short of a block (app/transport/sessions).
    cases.append(Junk("unstreamable_settings", [start(settings={"dit_context": 0})], ErrorCode.bad_settings))
    cases.append(Junk("end_first", [json.dumps({"type": "end"})], ErrorCode.not_started))
    return cases


async def error_and_close(url: str, junk: Junk) -> tuple[dict, int | None]:
    """Sends the junk; returns the error event the server answers and the code it closes with."""
    error = None
    async with asyncio.timeout(EVENT_TIMEOUT_S), websockets.connect(url, max_size=None) as socket:
        try:
            for message in junk.messages:
                await socket.send(message)
        except ConnectionClosed:
            pass  # the server may refuse before the last packet; its answer is still there to read
        try:
            async for message in socket:
                if isinstance(message, str) and json.loads(message)["type"] == "error":
                    error = json.loads(message)
        except ConnectionClosed:
            pass
    assert error is not None, f"{junk.name}: closed ({socket.close_code}) without an error event"
    return error, socket.close_code


def blocks(result: StreamResult) -> list[dict]:
    return [event for event in result.events if event["type"] == "block"]


def test_junk_connections_get_their_codes_and_the_good_stream_is_untouched(served: ServeApp) -> None:
    audio = served.source_48k(GOOD_SECONDS)
    url = stream_url(BASE_URL)

    def start(**fields: object) -> str:
        message = {"type": "start", "version": 1, "token": served.token, "voice_id": served.voice_id, "realtime": False}
        return json.dumps(message | fields)

    cases = junk_cases(start)
    alone = served.stream(audio, realtime=False, seed=7)
    assert alone.error is None and alone.end is not None, alone.error

    async def junk_next_to_good() -> tuple[StreamResult, list[tuple[dict, int | None]]]:
        started = asyncio.Event()

        def on_event(event: dict) -> None:
            if event["type"] == "ready":
                started.set()

        good = asyncio.create_task(
            stream_audio(BASE_URL, served.token, served.voice_id, audio, realtime=False, seed=7, on_event=on_event)
        )
        async with asyncio.timeout(EVENT_TIMEOUT_S):
            await started.wait()  # the junk arrives while the good session streams
        answers = await asyncio.gather(*(error_and_close(url, case) for case in cases))
        return await good, answers

    good, answers = asyncio.run(junk_next_to_good())
    for case, (error, code) in zip(cases, answers, strict=True):
        assert error["code"] == case.code, (case.name, error)
        assert error["message"] and "Traceback" not in error["message"], (case.name, error)  # no server internals
        assert code == close_code(case.code), (case.name, code)
    assert good.error is None and good.end is not None, good.error
    assert [block["index"] for block in blocks(good)] == list(range(len(blocks(alone))))
    assert good.output_48k.shape == alone.output_48k.shape
    tolerance = served.parity.tolerance("output_stream", "e2e")
    assert abs(good.output_48k - alone.output_48k).max() <= tolerance
