"""The Serve application end to end: real Ray Serve (local, 2 CPUs), real WebSockets, real libopus, tiny model.

Two converter replicas. Covers the round trip, stickiness and batching, replica loss with exact re-homing, voice
switching, late drops, and bad input (each with its documented error code, other sessions untouched).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import websockets

from app.audio.opus import OpusEncoder
from app.streaming.settings import StreamSettings
from app.transport.protocol import MAX_FRAME_BYTES
from bench.harness import (
    BASE_URL,
    METRICS_PORT,
    OTHER_API_KEY,
    ServeApp,
    converter_replicas,
    kill_replica,
    local_ray,
    replica_stats,
    start_app,
)
from bench.parity import ParitySet
from client.api import ClientError, delete_voice, get_token, list_voices, upload_voice
from client.stream_client import (
    StreamResult,
    encode_packets,
    paced_packets,
    run_stream,
    start_message,
    stream_audio,
)

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def served(parity: ParitySet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    with local_ray():
        yield start_app(parity, tmp_path_factory.mktemp("voices"), converters=2)


def blocks(result: StreamResult) -> list[dict]:
    return [event for event in result.events if event["type"] == "block"]


def test_round_trip_keeps_duration_and_order(served: ServeApp) -> None:
    audio = served.source_48k()
    result = served.stream(audio, realtime=False, seed=3)
    assert result.error is None and result.end is not None and result.ready is not None, result.error
    block_ms = result.ready["block_ms"]
    assert [b["index"] for b in blocks(result)] == list(range(len(blocks(result))))
    assert abs(len(result.output_48k) - len(audio)) <= 48 * block_ms + 960  # within one block (and one frame)
    assert np.abs(result.output_48k).max() > 0.01


def test_sessions_stick_to_one_replica_and_batch(served: ServeApp) -> None:
    audio = served.source_48k(2.0)

    async def six() -> list[StreamResult]:
        streams = [
            stream_audio(BASE_URL, served.token, served.voice_id, audio, realtime=False, seed=s) for s in range(6)
        ]
        return await asyncio.gather(*streams)

    results = asyncio.run(six())
    assert all(r.error is None and r.end is not None for r in results)
    stats = {replica: replica_stats(replica) for replica in converter_replicas()}
    for result in results:
        assert result.ready is not None
        session = result.ready["session_id"]
        holders = {
            replica: s["blocks_by_session"][session]
            for replica, s in stats.items()
            if session in s["blocks_by_session"]
        }
        assert len(holders) == 1, f"session {session} was served by {holders}"
        assert next(iter(holders.values())) == len(blocks(result))
    batch_sizes = {int(size) for s in stats.values() for size in s["batch_sizes"]}
    assert max(batch_sizes) > 1, f"no batching happened: {batch_sizes}"


def test_killing_a_replica_mid_stream_rehomes_exactly(served: ServeApp) -> None:
    audio = served.source_48k()
    undisturbed = served.stream(audio, realtime=False, seed=11)
    session: dict[str, str] = {}
    killed: list[str] = []

    def kill_when_halfway() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if "id" in session:
                for replica in converter_replicas():
                    if replica_stats(replica)["blocks_by_session"].get(session["id"], 0) >= 6:
                        kill_replica(replica)
                        killed.append(replica)
                        return
            time.sleep(0.05)

    def on_event(event: dict) -> None:
        if event["type"] == "ready":
            session["id"] = event["session_id"]

    killer = threading.Thread(target=kill_when_halfway)
    killer.start()
    disturbed = served.stream(audio, realtime=False, seed=11, on_event=on_event)
    killer.join()
    assert killed, "the replica was never killed"
    assert disturbed.error is None and disturbed.end is not None, disturbed.error
    assert [e["type"] for e in disturbed.events].count("resume_token") == 1, "the session re-homed, once"
    assert len(blocks(disturbed)) == len(blocks(undisturbed))
    # The exactness contract holds while no steps were reduced (a file has no deadline: none may be).
    assert {b["steps"] for b in blocks(disturbed) + blocks(undisturbed)} == {StreamSettings().diffusion_steps}
    # fp32 re-homes are bitwise (tests/test_exactness.py), and so is everything around them: the same Opus bytes.
    assert np.array_equal(disturbed.output_48k, undisturbed.output_48k)


def test_voice_switch_is_confirmed_and_unknown_voices_do_not_stop_the_stream(served: ServeApp) -> None:
    other = upload_voice(BASE_URL, served.token, served.parity.root / served.parity.bundle["files"]["source_16k"])
    audio = served.source_48k(2.0)
    # Paced input: the switch arrives after the first blocks were converted with the first voice.
    switched = served.stream(audio, realtime=True, seed=1, set_voice_at=(0.5, other["voice_id"]))
    assert switched.error is None and switched.end is not None
    [confirmation] = [e for e in switched.events if e["type"] == "voice_set"]
    assert confirmation["voice_id"] == other["voice_id"] and confirmation["from_block"] >= 1
    unknown = served.stream(audio, realtime=False, seed=1, set_voice_at=(0.5, "AAAAAAAAAAAAAAAA"))
    assert unknown.error is not None and unknown.error["code"] == "unknown_voice"
    assert unknown.end is not None and len(blocks(unknown)) == len(blocks(switched))


def test_input_faster_than_real_time_drops_oldest_and_says_so(served: ServeApp) -> None:
    audio = served.source_48k()
    # A live (realtime) stream whose input arrives all at once: the server must drop, not queue up latency.
    start = start_message(served.token, served.voice_id, realtime=True, seed=2)
    result = asyncio.run(run_stream(BASE_URL, start, paced_packets(encode_packets(audio), realtime=False)))
    assert result.error is None and result.end is not None
    lates = [e for e in result.events if e["type"] == "late"]
    assert lates, "no late event"
    assert result.end["dropped_ms"] == lates[-1]["total_dropped_ms"] > 0
    assert [b["index"] for b in blocks(result)] == list(range(len(blocks(result))))


async def raw_session(served: ServeApp, start: dict | None, first: bytes | str | None) -> dict:
    """Open a socket, send a start message (or not) and one message; return the error event the server answers."""
    async with websockets.connect(BASE_URL.replace("http", "ws") + "/v1/stream") as socket:
        if start is not None:
            await socket.send(json.dumps(start))
            ready = json.loads(await socket.recv())
            assert ready["type"] == "ready", ready
        if first is not None:
            await socket.send(first)
        async for message in socket:
            if isinstance(message, str) and json.loads(message)["type"] == "error":
                return json.loads(message)
    raise AssertionError("the server closed without an error event")


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("garbage_frame", "bad_audio"),
        ("oversized_frame", "frame_too_large"),
        ("unknown_voice", "unknown_voice"),
        ("bad_token", "unauthorized"),
        ("frame_before_start", "not_started"),
        ("bad_json", "bad_message"),
    ],
)
def test_bad_input_gets_its_code_and_others_are_untouched(served: ServeApp, case: str, code: str) -> None:
    good_start = {"type": "start", "version": 1, "token": served.token, "voice_id": served.voice_id}
    frame = OpusEncoder().encode(np.zeros(960, dtype=np.float32))
    cases: dict[str, tuple[dict | None, bytes | str]] = {
        "garbage_frame": (good_start, b"\xff\xff\xff\xff"),
        "oversized_frame": (good_start, b"\x00" * (MAX_FRAME_BYTES + 1)),
        "unknown_voice": (None, json.dumps({**good_start, "voice_id": "AAAAAAAAAAAAAAAA"})),
        "bad_token": (None, json.dumps({**good_start, "token": "forged.token"})),
        "frame_before_start": (None, frame),
        "bad_json": (None, "{not json"),
    }
    start, first = cases[case]

    async def bad_next_to_good() -> tuple[dict, StreamResult]:
        good = asyncio.create_task(
            stream_audio(BASE_URL, served.token, served.voice_id, served.source_48k(1.5), realtime=False, seed=5)
        )
        error = await raw_session(served, start, first)
        return error, await good

    error, good = asyncio.run(bad_next_to_good())
    assert error["code"] == code, error
    assert good.error is None and good.end is not None


def test_one_key_cannot_see_use_or_delete_another_keys_voice(served: ServeApp) -> None:
    stranger = get_token(BASE_URL, OTHER_API_KEY)
    assert served.voice_id not in [v["voice_id"] for v in list_voices(BASE_URL, stranger)]
    with pytest.raises(ClientError) as refused:
        delete_voice(BASE_URL, stranger, served.voice_id)
    assert refused.value.status == 404
    result = asyncio.run(stream_audio(BASE_URL, stranger, served.voice_id, served.source_48k(1.0), realtime=False))
    assert result.error is not None and result.error["code"] == "unknown_voice"
    assert served.voice_id in [v["voice_id"] for v in list_voices(BASE_URL, served.token)]


def test_metrics_are_exported_for_prometheus(served: ServeApp) -> None:
    """After streaming, the replicas' series show up on the node's Prometheus endpoint (pushed every few seconds)."""
    served.stream(served.source_48k(1.0), realtime=False, seed=0)
    wanted = ["ray_seedvc_step_seconds_bucket", "ray_seedvc_block_latency_seconds_bucket", "ray_seedvc_sessions"]
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as response:
            text = response.read().decode()
        if all(name in text for name in wanted):
            return
        time.sleep(2)
    raise AssertionError(f"missing from /metrics: {[name for name in wanted if name not in text]}")
