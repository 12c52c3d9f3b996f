"""client.stream_client and client.api against fake servers on loopback: an echo converter speaking protocol v1
over a real WebSocket, and a fake HTTP API. Every client message is checked with the server's own parser."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import threading
import time
import types
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from websockets.asyncio.server import Server, ServerConnection, serve

from app.audio.opus import FRAME_SAMPLES, SAMPLE_RATE, OpusDecoder, OpusEncoder
from app.streaming.settings import StreamSettings
from app.transport.protocol import (
    BlockEvent,
    EndEvent,
    EndMessage,
    ErrorCode,
    ErrorEvent,
    LateEvent,
    ReadyEvent,
    ResumeTokenEvent,
    SetControlsMessage,
    SettingsOverrides,
    SetVoiceMessage,
    StartMessage,
    VoiceSetEvent,
    check_audio_frame,
    close_code,
    parse_client_message,
)
from client import stream_client
from client.api import ClientError, delete_voice, get_token, list_voices, upload_voice
from client.audio_devices import Microphone, sound_library
from client.stream_client import (
    Event,
    encode_packets,
    paced_packets,
    run_stream,
    run_stream_retrying,
    start_message,
    stream_audio,
    stream_url,
)

BLOCK_FRAMES = 5  # the fake converter's blocks: 100 ms of input
UNKNOWN_VOICE = "missing"


def sine(seconds: float, rate: int = SAMPLE_RATE, frequency: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def packets_for(samples: int) -> int:
    """Packets the client sends for this much input: padded by the encoder lookahead, then to a whole frame."""
    return -(-(samples + OpusEncoder.delay_samples) // FRAME_SAMPLES)


class EchoConverter:
    """Protocol v1 with an identity "conversion": each block of input comes back as a block event and the very
    packets received. Records every client message (parsed) and packet arrival time; a failed check in the handler
    is kept in `failures`, so that the test reports it rather than a confusing client-side error."""

    def __init__(
        self,
        fail_after_packets: int | None = None,
        drop_after_packets: int | None = None,
        forget: bool = False,
        refuse_starts: int = 0,
    ) -> None:
        self.refuse_starts = refuse_starts  # the first starts are refused as a full service refuses them
        self.fail_after_packets = fail_after_packets
        self.drop_after_packets = drop_after_packets  # the first connection drops there (with a new resume token)
        self.forget = forget  # answer resumes with session_expired, as when ingress and converter were both replaced
        self.messages: list[StartMessage | SetVoiceMessage | SetControlsMessage | EndMessage | bytes] = []
        self.packet_times: list[float] = []
        self.failures: list[BaseException] = []

    @property
    def starts(self) -> list[StartMessage]:
        return [message for message in self.messages if isinstance(message, StartMessage)]

    @property
    def packets(self) -> list[bytes]:
        return [message for message in self.messages if isinstance(message, bytes)]

    async def handle(self, websocket: ServerConnection) -> None:
        try:
            await self._serve(websocket)
        except Exception as error:
            self.failures.append(error)
            raise

    async def _serve(self, websocket: ServerConnection) -> None:
        start = parse_client_message(str(await websocket.recv()))
        assert isinstance(start, StartMessage)
        self.messages.append(start)
        if start.voice_id == UNKNOWN_VOICE:
            await self._fail(websocket, ErrorCode.unknown_voice)
            return
        if len(self.starts) <= self.refuse_starts:
            refusal = ErrorEvent(code=ErrorCode.overloaded, message="full", retry_after_s=REFUSED_RETRY_AFTER_S)
            await websocket.send(refusal.model_dump_json())
            await websocket.close(close_code(ErrorCode.overloaded))
            return
        resumed_at = None
        if start.resume is not None and self.forget:
            await self._fail(websocket, ErrorCode.session_expired)
            return
        if start.resume is not None:
            assert (start.resume.session_id, start.resume.resume_token) == ("s-1", "r-2"), "the latest resume token"
            resumed_at = len(self.packets) // BLOCK_FRAMES
        ready = ReadyEvent(
            session_id="s-1",
            resume_token="r-1",
            block_ms=20 * BLOCK_FRAMES,
            settings=StreamSettings(),
            resumed_at_block=resumed_at,
        )
        await websocket.send(ready.model_dump_json())
        decoder, block, index = OpusDecoder(), [], resumed_at or 0
        async for message in websocket:
            if isinstance(message, bytes):
                check_audio_frame(message)
                assert decoder.decode(message).shape == (FRAME_SAMPLES,)
                self.messages.append(message)
                self.packet_times.append(time.monotonic())
                if len(self.packets) == self.fail_after_packets:
                    await self._fail(websocket, ErrorCode.internal)
                    return
                if len(self.packets) == self.drop_after_packets and len(self.starts) == 1:
                    await websocket.send(ResumeTokenEvent(resume_token="r-2").model_dump_json())
                    await websocket.close(1012)  # "service restart", as an ingress going away
                    return
                block.append(message)
                if len(block) == BLOCK_FRAMES:
                    await self._answer(websocket, index, block)
                    index, block = index + 1, []
                continue
            parsed = parse_client_message(message)
            self.messages.append(parsed)
            if isinstance(parsed, SetVoiceMessage) and parsed.voice_id == UNKNOWN_VOICE:
                await websocket.send(
                    ErrorEvent(code=ErrorCode.unknown_voice, message="no such voice").model_dump_json()
                )
            elif isinstance(parsed, SetVoiceMessage):
                await websocket.send(VoiceSetEvent(voice_id=parsed.voice_id, from_block=index).model_dump_json())
            elif isinstance(parsed, EndMessage):
                if block:
                    await self._answer(websocket, index, block)
                    index += 1
                await websocket.send(EndEvent(blocks=index, dropped_ms=20).model_dump_json())
                await websocket.close(1000)
                return
            else:
                raise AssertionError(f"a second start message: {parsed}")

    async def _answer(self, websocket: ServerConnection, index: int, block: list[bytes]) -> None:
        # Latencies 10, 20, 30 ... ms, so that the client's percentiles are known exactly.
        event = BlockEvent(
            index=index,
            input_start_ms=index * 20 * BLOCK_FRAMES,
            latency_ms=10.0 * (index + 1),
            queue_ms=1.0,
            steps=4,
            silent=False,
        )
        await websocket.send(event.model_dump_json())
        if index == 1:
            await websocket.send(LateEvent(dropped_ms=20, total_dropped_ms=20).model_dump_json())
        for packet in block:
            await websocket.send(packet)

    async def _fail(self, websocket: ServerConnection, code: ErrorCode) -> None:
        await websocket.send(ErrorEvent(code=code, message=f"fake {code}").model_dump_json())
        await websocket.close(close_code(code))


@contextlib.contextmanager
def serving(converter: EchoConverter) -> Iterator[str]:
    """Runs the converter's WebSocket server on its own loop and thread (so that the CLI can run its own loop);
    yields the base URL."""

    async def start() -> Server:
        return await serve(converter.handle, "127.0.0.1", 0)  # serve() needs the running loop

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:

        async def shut_down() -> None:
            server.close()
            await server.wait_closed()

        # websockets waits up to its close_timeout (10 s) for a peer's close handshake: allow that on a busy machine.
        asyncio.run_coroutine_threadsafe(shut_down(), loop).result(timeout=15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
    assert not converter.failures, converter.failures


def test_stream_url_accepts_base_and_stream_urls() -> None:
    assert stream_url("http://host:8000") == "ws://host:8000/v1/stream"
    assert stream_url("https://host/api/") == "wss://host/api/v1/stream"
    assert stream_url("ws://host/v1/stream") == "ws://host/v1/stream"
    with pytest.raises(ValueError, match="expected a URL"):
        stream_url("host:8000")


def test_a_file_goes_out_as_20ms_opus_packets_and_comes_back_whole() -> None:
    converter, audio = EchoConverter(), sine(1.0)
    seen: list[Event] = []
    with serving(converter) as url:
        result = asyncio.run(
            stream_audio(
                url,
                "token-1",
                "voice-a",
                audio,
                realtime=False,
                seed=7,
                settings={"diffusion_steps": 4, "block_time": 0.2},
                on_event=seen.append,
            )
        )
    # The start message, exactly as the protocol model parses it, then every packet (decoded by the server), then end.
    assert converter.messages[0] == StartMessage(
        type="start",
        version=1,
        token="token-1",
        voice_id="voice-a",
        settings=SettingsOverrides(diffusion_steps=4, block_time=0.2),
        realtime=False,
        seed=7,
    )
    sent = packets_for(len(audio))
    assert len(converter.packets) == sent == len(converter.messages) - 2
    assert converter.messages[-1] == EndMessage(type="end")

    assert result.error is None
    assert result.output_48k.dtype == np.float32 and len(result.output_48k) == sent * FRAME_SAMPLES
    assert len(audio) <= len(result.output_48k) < len(audio) + 2 * FRAME_SAMPLES
    # One codec pass: the echo is the input delayed by the encoder lookahead.
    skip, delay = 5 * FRAME_SAMPLES, OpusEncoder.delay_samples
    assert np.corrcoef(audio[skip:], result.output_48k[skip + delay : delay + len(audio)])[0, 1] > 0.9

    blocks = -(-sent // BLOCK_FRAMES)
    assert [event["type"] for event in result.events] == ["ready", "block", "block", "late"] + ["block"] * (
        blocks - 2
    ) + ["end"]
    assert seen == result.events
    assert result.ready is not None and result.ready["session_id"] == "s-1"
    assert result.end == {"type": "end", "blocks": blocks, "dropped_ms": 20}
    stats = result.stats
    assert stats.blocks == blocks and stats.max_ms == 10.0 * blocks
    assert stats.p50_ms == pytest.approx(float(np.percentile(10.0 * np.arange(1, blocks + 1), 50)))
    assert (stats.late_events, stats.dropped_ms) == (1, 20)
    assert stats.first_audio_ms is not None and stats.first_audio_ms >= 0


def test_on_message_sees_every_server_message_raw_before_it_is_handled() -> None:
    converter, raw, handled = EchoConverter(), [], []

    def on_message(message: bytes | str) -> None:
        raw.append(message)
        handled.append(len(result_events))  # events handled so far: the raw message comes first

    result_events: list[dict[str, Any]] = []
    with serving(converter) as url:
        start = start_message("token-1", "voice-a", realtime=False)
        packets = stream_client.encode_packets(sine(0.3))
        result = asyncio.run(
            run_stream(
                url,
                start,
                stream_client.paced_packets(packets, realtime=False),
                on_event=result_events.append,
                on_message=on_message,
            )
        )
    texts = [message for message in raw if isinstance(message, str)]
    audio = [message for message in raw if isinstance(message, bytes)]
    assert [json.loads(text) for text in texts] == result.events
    assert audio == converter.packets  # the echo: the very packets sent, in order
    assert len(result.output_48k) == len(audio) * FRAME_SAMPLES
    first_text = raw.index(texts[0])
    assert handled[first_text] == 0


def test_realtime_input_is_paced_and_switches_voice_on_time() -> None:
    converter = EchoConverter()
    with serving(converter) as url:
        result = asyncio.run(
            stream_audio(url, "token-1", "voice-a", sine(0.3), realtime=True, set_voice_at=(0.1, "voice-b"))
        )
    assert converter.starts[0].realtime is True and converter.starts[0].seed is None
    sent = packets_for(len(sine(0.3)))
    # Packet i is due at i * 20 ms: the last one at (sent - 1) * 20 ms after the first, not all at once.
    elapsed = converter.packet_times[-1] - converter.packet_times[0]
    assert (sent - 1) * 0.02 - 0.05 <= elapsed < (sent - 1) * 0.02 + 0.2
    # 0.1 s of input is 5 packets: set_voice follows the fifth (after the start message).
    assert converter.messages[6] == SetVoiceMessage(type="set_voice", voice_id="voice-b")
    assert all(isinstance(message, bytes) for message in converter.messages[1:6])
    assert {"type": "voice_set", "voice_id": "voice-b", "from_block": 1} in result.events
    assert result.end is not None and result.error is None


@pytest.mark.parametrize("realtime", [True, False])
def test_a_backlog_goes_out_within_the_catch_up_allowance_when_real_time(realtime: bool) -> None:
    """Input that piled up (a drop, a stalled microphone) goes out at most CATCH_UP_SPEED times real time beyond a
    burst of CATCH_UP_BURST_S: the server's limits would end a real-time stream sent faster. A file's is not held."""
    converter = EchoConverter()
    audio = sine(4.0)
    packets = stream_client.encode_packets(audio)
    start = stream_client.start_message("token-1", "voice-a", realtime=realtime)
    with serving(converter) as url:
        result = asyncio.run(stream_client.run_stream(url, start, paced_packets(packets, realtime=False)))
    assert result.error is None and converter.packets == packets
    arrived = np.array(converter.packet_times) - converter.packet_times[0]
    # Packet k may go once (k + 1) packets' time is within the burst plus the speed times the time gone by.
    earliest = ((np.arange(len(packets)) + 1) * stream_client.FRAME_SECONDS - stream_client.CATCH_UP_BURST_S) / (
        stream_client.CATCH_UP_SPEED
    )
    if realtime:
        assert np.all(arrived >= earliest - stream_client.FRAME_SECONDS), "faster than the allowance"
        assert arrived[-1] < earliest[-1] + 1.0, "held back more than the allowance asks"
    else:
        assert arrived[-1] < earliest[-1] / 2, "a file's input is not held back"


REFUSED_RETRY_AFTER_S = 0.1


def test_a_start_refused_for_capacity_is_retried_after_retry_after_s_with_backoff() -> None:
    converter = EchoConverter(refuse_starts=2)
    waits: list[float] = []
    packets = encode_packets(sine(0.2))
    with serving(converter) as url:
        started = time.monotonic()
        result = asyncio.run(
            run_stream_retrying(
                url,
                start_message("token-1", "voice-1", realtime=False),
                lambda: paced_packets(packets, realtime=False),
                on_wait=lambda wait_s, error: waits.append(wait_s),
            )
        )
        elapsed = time.monotonic() - started
    assert waits == [REFUSED_RETRY_AFTER_S, 2 * REFUSED_RETRY_AFTER_S], "the server's wait, doubled each time"
    assert elapsed >= sum(waits)
    assert result.error is None and result.end is not None and len(converter.starts) == 3
    assert len(converter.packets) == len(packets), "the whole input went once, to the start that was admitted"


def test_retries_stop_at_their_limit_and_other_errors_are_not_retried() -> None:
    converter = EchoConverter(refuse_starts=10)
    with serving(converter) as url:
        refused = asyncio.run(
            run_stream_retrying(
                url,
                start_message("token-1", "voice-1", realtime=False),
                lambda: paced_packets(encode_packets(sine(0.1)), realtime=False),
                on_wait=lambda wait_s, error: None,
                retries=1,
            )
        )
    assert refused.error is not None and refused.error["code"] == "overloaded" and len(converter.starts) == 2
    converter = EchoConverter()
    with serving(converter) as url:
        unknown = asyncio.run(
            run_stream_retrying(
                url,
                start_message("token-1", UNKNOWN_VOICE, realtime=False),
                lambda: paced_packets(encode_packets(sine(0.1)), realtime=False),
                on_wait=lambda wait_s, error: pytest.fail("an unknown voice is not retried"),
            )
        )
    assert unknown.error is not None and unknown.error["code"] == "unknown_voice" and len(converter.starts) == 1


def test_an_unknown_voice_is_returned_as_the_error_without_raising() -> None:
    converter = EchoConverter()
    with serving(converter) as url:
        result = asyncio.run(stream_audio(url, "token-1", UNKNOWN_VOICE, sine(0.2)))
    assert result.error is not None and result.error["code"] == "unknown_voice"
    assert result.ready is None and result.end is None and result.events == [result.error]
    assert result.output_48k.size == 0
    assert converter.packets == []  # nothing is sent before the server is ready


def test_an_error_mid_stream_stops_the_sender() -> None:
    converter = EchoConverter(fail_after_packets=3)
    with serving(converter) as url:
        began = time.monotonic()
        result = asyncio.run(stream_audio(url, "token-1", "voice-a", sine(2.0), realtime=True))
        took = time.monotonic() - began
    assert result.error is not None and result.error["code"] == "internal"
    assert result.end is None
    assert took < 1.0  # not the 2 s the input would take in real time


def test_unknown_voice_in_answer_to_set_voice_lets_the_stream_go_on() -> None:
    converter = EchoConverter()
    audio = sine(0.4)
    with serving(converter) as url:
        result = asyncio.run(
            stream_audio(url, "token-1", "voice-a", audio, realtime=False, set_voice_at=(0.1, UNKNOWN_VOICE))
        )
    assert result.error is not None and result.error["code"] == "unknown_voice"
    assert result.end is not None
    assert len(result.output_48k) == packets_for(len(audio)) * FRAME_SAMPLES


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_input(tmp_path: Path, seconds: float = 0.5, rate: int = 16000) -> Path:
    path = tmp_path / "input.wav"
    soundfile.write(path, sine(seconds, rate), rate)
    return path


def test_cli_reports_a_refused_connection_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = unused_port()
    output = tmp_path / "out.wav"
    argv = [str(write_input(tmp_path)), str(output), "--url", f"http://127.0.0.1:{port}", "--api-key", "key"]
    assert stream_client.main([*argv, "--voice", "voice-a"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: cannot reach http://127.0.0.1:{port}") and "refused" in error
    assert "Traceback" not in error and not output.exists()
    # The same when the token came from elsewhere and the WebSocket is what meets the closed port.
    monkeypatch.setattr(stream_client, "get_token", lambda url, key: "token-1")
    assert stream_client.main([*argv, "--voice", "voice-a"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: stream 0: cannot open ws://127.0.0.1:{port}/v1/stream: ")
    assert "Traceback" not in error and not output.exists()


def test_cli_uploads_a_reference_and_runs_concurrent_streams(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Any, ...]] = []

    def fake_token(url: str, key: str) -> str:
        calls.append(("token", key))
        return "token-1"

    def fake_upload(url: str, token: str, path: Path, name: str | None) -> dict[str, Any]:
        calls.append(("upload", token, path.name, name))
        return {"voice_id": "voice-a", "seconds": 0.5, "name": name}

    # The HTTP side has its own tests below; here the CLI meets a real WebSocket server.
    monkeypatch.setattr(stream_client, "get_token", fake_token)
    monkeypatch.setattr(stream_client, "upload_voice", fake_upload)
    monkeypatch.setenv("SEEDVC_API_KEY", "env-key")
    reference = write_input(tmp_path).rename(tmp_path / "ref.wav")
    source = write_input(tmp_path, seconds=0.5, rate=16000)  # resampled to 48 kHz by the client
    converter = EchoConverter()
    with serving(converter) as url:
        argv = [str(source), str(tmp_path / "out.wav"), "--url", url, "--reference", str(reference), "--fast"]
        code = stream_client.main([*argv, "--concurrency", "2", "--seed", "3", "--setting", "diffusion_steps=4"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert calls == [("token", "env-key"), ("upload", "token-1", "ref.wav", "ref")]
    expected = StartMessage(
        type="start",
        version=1,
        token="token-1",
        voice_id="voice-a",
        settings=SettingsOverrides(diffusion_steps=4),
        realtime=False,
        seed=3,
    )
    assert converter.starts == [expected, expected]
    for index in range(2):
        samples, rate = soundfile.read(tmp_path / f"out-{index}.wav", dtype="float32")
        assert rate == SAMPLE_RATE and soundfile.info(tmp_path / f"out-{index}.wav").subtype == "FLOAT"
        assert len(samples) == packets_for(SAMPLE_RATE // 2) * FRAME_SAMPLES
        assert f"stream {index}: wrote" in printed.out
    assert "all 2 streams that ended: latency p50" in printed.out


def test_cli_rejects_an_unknown_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        stream_client.main(["in.wav", "out.wav", "--api-key", "k", "--voice", "v", "--setting", "steps=4"])
    assert exit_info.value.code == 2
    assert "key one of block_time" in capsys.readouterr().err


def test_cli_names_the_missing_microphone_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # makes `import sounddevice` raise ImportError
    argv = ["--mic", str(tmp_path / "out.wav"), "--api-key", "k", "--voice", "v", "--url", "http://127.0.0.1:9"]
    assert stream_client.main(argv) == 1
    error = capsys.readouterr().err
    assert "'sounddevice'" in error and "pip install sounddevice" in error and "Traceback" not in error


class FakeInputStream:
    """sounddevice.InputStream stand-in: a thread delivers 0.3 s of a 44.1 kHz sine in 10 ms callbacks, then sets
    `delivered`. One test uses it, so class attributes can hold what the test checks."""

    rate = 44100
    delivered = threading.Event()
    closed = False

    def __init__(
        self, device: int | None, samplerate: int, channels: int, dtype: str, callback: Callable[..., None]
    ) -> None:
        assert (device, samplerate, channels, dtype) == (None, self.rate, 1, "float32")
        self._callback = callback
        self._thread = threading.Thread(target=self._deliver)

    def _deliver(self) -> None:
        audio = sine(0.3, self.rate)
        for start in range(0, len(audio), self.rate // 100):
            self._callback(audio[start : start + self.rate // 100, None], self.rate // 100, None, None)
        FakeInputStream.delivered.set()

    def __enter__(self) -> FakeInputStream:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._thread.join()
        FakeInputStream.closed = True


def test_microphone_audio_is_resampled_and_streamed(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(
        PortAudioError=type("PortAudioError", (Exception,), {}),
        InputStream=FakeInputStream,
        query_devices=lambda device, kind: {"default_samplerate": float(FakeInputStream.rate)},
    )
    monkeypatch.setitem(sys.modules, "sounddevice", fake)

    async def record(url: str) -> stream_client.StreamResult:
        microphone = Microphone(sound_library("--mic"))
        recording = asyncio.create_task(run_stream(url, start_message("token-1", "voice-a"), microphone.packets()))
        # Stop once every callback has run: their audio is then queued ahead of the stop, as after a real Ctrl+C.
        assert await asyncio.to_thread(FakeInputStream.delivered.wait, 5)
        microphone.stop()
        return await recording

    converter = EchoConverter()
    with serving(converter) as url:
        result = asyncio.run(record(url))
    # 0.3 s is 15 frames at 48 kHz; the resampler holds back a few samples and the last partial frame stays.
    assert len(converter.packets) == 14
    assert result.end is not None and len(result.output_48k) == 14 * FRAME_SAMPLES
    assert FakeInputStream.closed


class FakeApi(BaseHTTPRequestHandler):
    """The HTTP API's contract: tokens for the key "good-key", one voice store for the token "token-1"."""

    server: FakeApiServer

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path)
        if path.path == "/v1/tokens":
            if self.headers["Authorization"] == "Bearer good-key":
                self._answer(200, {"token": "token-1", "expires_at": 1.0})
            else:
                self._answer(401, {"detail": "invalid API key"})
        elif self._authorized():
            body = self.rfile.read(int(self.headers["Content-Length"]))
            name = urllib.parse.parse_qs(path.query).get("name", [None])[0]
            self.server.uploads.append((self.headers["Content-Type"], body, name))
            self._answer(201, {"voice_id": "v-1", "seconds": 1.5, "name": name})

    def do_GET(self) -> None:
        if self._authorized():
            self._answer(200, {"voices": [{"voice_id": "v-1", "name": "ref", "seconds": 1.5}]})

    def do_DELETE(self) -> None:
        if not self._authorized():
            return
        if self.path == "/v1/voices/v-1":
            self.send_response(204)
            self.end_headers()
        else:
            self._answer(404, {"detail": f"no voice {self.path.rsplit('/', 1)[-1]}"})

    def _authorized(self) -> bool:
        if self.headers["Authorization"] != "Bearer token-1":
            self._answer(401, {"detail": "invalid session token"})
            return False
        return True

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


class FakeApiServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FakeApi)
        self.uploads: list[tuple[str, bytes, str | None]] = []  # content type, body, name of each upload
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_api_helpers_follow_the_http_contract(api: FakeApiServer, tmp_path: Path) -> None:
    assert get_token(api.url, "good-key") == "token-1"
    with pytest.raises(ClientError) as refused:
        get_token(api.url + "/", "bad-key")
    assert (refused.value.status, refused.value.detail) == (401, "invalid API key")
    assert str(refused.value) == "HTTP 401: invalid API key"

    reference = tmp_path / "ref.ogg"
    reference.write_bytes(b"raw file bytes")
    assert upload_voice(api.url, "token-1", reference, name="my voice") == {
        "voice_id": "v-1",
        "seconds": 1.5,
        "name": "my voice",
    }
    assert api.uploads == [("application/octet-stream", b"raw file bytes", "my voice")]
    assert list_voices(api.url, "token-1") == [{"voice_id": "v-1", "name": "ref", "seconds": 1.5}]
    delete_voice(api.url, "token-1", "v-1")
    with pytest.raises(ClientError, match="HTTP 404: no voice other") as missing:
        delete_voice(api.url, "token-1", "other")
    assert missing.value.status == 404
    with pytest.raises(ClientError, match="invalid session token"):
        list_voices(api.url, "stale-token")


def test_api_uploads_the_raw_file_and_reports_an_unreachable_server(api: FakeApiServer, tmp_path: Path) -> None:
    reference = tmp_path / "ref.wav"
    reference.write_bytes(b"\x00\x01 raw")
    assert upload_voice(api.url, "token-1", reference)["name"] is None
    assert api.uploads == [("application/octet-stream", b"\x00\x01 raw", None)]
    with pytest.raises(ClientError, match="cannot read") as unreadable:
        upload_voice(api.url, "token-1", tmp_path / "absent.wav")
    assert unreadable.value.status is None
    port = unused_port()
    with pytest.raises(ClientError, match=f"cannot reach http://127.0.0.1:{port}") as unreachable:
        get_token(f"http://127.0.0.1:{port}", "good-key")
    assert unreachable.value.status is None


def test_cli_reports_a_refused_api_key(api: FakeApiServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(write_input(tmp_path)), str(tmp_path / "out.wav"), "--url", api.url, "--api-key", "bad-key"]
    assert stream_client.main([*argv, "--voice", "v-1"]) == 1
    error = capsys.readouterr().err
    assert error == "error: the server refused the API key (HTTP 401): invalid API key\n"


def test_a_dropped_connection_resumes_the_session_and_the_input_goes_on() -> None:
    converter = EchoConverter(drop_after_packets=12)
    audio = sine(0.6)
    with serving(converter) as url:
        result = asyncio.run(stream_audio(url, "token-1", "voice-a", audio, realtime=False))
    assert result.error is None and result.end is not None and result.resumes == 1
    assert [start.resume is not None for start in converter.starts] == [False, True]
    assert [e["type"] for e in result.events].count("ready") == 2
    assert result.ready is not None and result.ready["resumed_at_block"] is None, "the first ready is the stream's"
    # Nothing is lost: after the resume the client sends again every packet from the first block the server had not
    # answered, then goes on, so the server holds the whole input once, in order, block by block.
    sent = packets_for(len(audio))
    first_connection = 12
    resumed_at = first_connection // BLOCK_FRAMES
    again = converter.packets[first_connection:]
    assert len(again) == sent - resumed_at * BLOCK_FRAMES
    assert converter.packets[:first_connection] + again[first_connection - resumed_at * BLOCK_FRAMES :] == (
        stream_client.encode_packets(audio)
    )
    indexes = [e["index"] for e in result.events if e["type"] == "block"]
    assert indexes == list(range(len(indexes))), "block numbers go on across the resume"


def test_a_drop_before_ready_is_not_resumed() -> None:
    async def refuse(websocket: ServerConnection) -> None:
        await websocket.recv()
        await websocket.close(1012)

    async def run() -> None:
        async with serve(refuse, "127.0.0.1", 0) as server:
            url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            await stream_audio(url, "token-1", "voice-a", sine(0.1), realtime=False)

    with pytest.raises(stream_client.StreamError, match=r"ready|closed"):
        asyncio.run(run())


def test_a_session_gone_on_resume_is_replaced_by_a_new_one_and_the_input_goes_on() -> None:
    converter = EchoConverter(drop_after_packets=12, forget=True)
    audio = sine(0.6)
    with serving(converter) as url:
        result = asyncio.run(stream_audio(url, "token-1", "voice-a", audio, realtime=False))
    assert result.error is None and result.end is not None
    assert (result.resumes, result.restarts) == (0, 1)
    assert [start.resume is not None for start in converter.starts] == [False, True, False]
    assert [e.get("code") for e in result.events if e["type"] == "error"] == ["session_expired"], "it is reported"
    # The new session gets the input again from the first packet whose output never arrived: nothing is lost.
    answered = 12 // BLOCK_FRAMES * BLOCK_FRAMES
    assert converter.packets[:12] + converter.packets[12 + 12 - answered :] == stream_client.encode_packets(audio)
