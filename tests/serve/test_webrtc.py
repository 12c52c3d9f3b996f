"""WebRTC calls (`/v1/rtc`) end to end: real Ray Serve (local, 2 CPUs), the tiny model, and a real aiortc caller.

ICE offers 127.0.0.1 only: in the ingress replica through `ice_host_addresses`, and in this process (the caller)
by the same function. The media goes over loopback UDP straight to the ingress replica; signalling goes through
Serve's proxy on port 8000.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from bench.harness import BASE_URL, ServeApp, converter_replicas, local_ray, replica_stats, start_app
from bench.parity import ParitySet
from tests.test_webrtc_unit import Call, Event, delays_and_correlations, loopback_only_ice, rtc_call

pytestmark = pytest.mark.serve

RTC_URL = BASE_URL.replace("http", "ws") + "/v1/rtc"
# Few diffusion steps: the tiny model must keep up with a real-time call on two shared CPU cores.
SETTINGS = {"diffusion_steps": 3}
TEARDOWN_TIMEOUT_S = 5.0
WINDOW_S = 0.1


# Loopback on both sides: offered by the ingress, and a destination it may send ICE checks to (outbound filter).
LOOPBACK_ICE = {"ice_host_addresses": ["127.0.0.1"], "outbound_networks": ["127.0.0.0/8"]}


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    with local_ray():
        yield


@pytest.fixture(scope="module")
def served(cluster: None, parity: ParitySet, tmp_path_factory: pytest.TempPathFactory) -> ServeApp:
    return start_app(parity, tmp_path_factory.mktemp("voices"), ingress=LOOPBACK_ICE)


@pytest.fixture
def identity_served(cluster: None, parity: ParitySet, tmp_path_factory: pytest.TempPathFactory) -> ServeApp:
    """The application redeployed with converters that return their input: keep its test last in this file."""
    return start_app(parity, tmp_path_factory.mktemp("voices"), ingress=LOOPBACK_ICE, identity=True)


@pytest.fixture(autouse=True)
def loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    loopback_only_ice(monkeypatch)


def start_message(app: ServeApp, **overrides: object) -> Event:
    start = {"type": "start", "version": 1, "token": app.token, "voice_id": app.voice_id, "settings": SETTINGS}
    return {**start, **overrides}


def open_sessions() -> int:
    return sum(replica_stats(replica)["sessions"] for replica in converter_replicas())


async def sessions_closed_after(started: float) -> float:
    """Seconds from `started` until no converter holds a session (polled; fails after TEARDOWN_TIMEOUT_S)."""
    async with asyncio.timeout(TEARDOWN_TIMEOUT_S):
        while await asyncio.to_thread(open_sessions):
            await asyncio.sleep(0.1)
    return time.monotonic() - started


def audible_seconds(audio: np.ndarray, threshold: float = 0.01) -> float:
    """Total length of the 100 ms windows whose RMS is above `threshold` (-40 dBFS)."""
    size = int(48000 * WINDOW_S)
    windows = audio[: len(audio) // size * size].reshape(-1, size)
    return WINDOW_S * int(np.sum(np.sqrt(np.mean(windows**2, axis=1)) > threshold))


def test_call_converts_in_order_and_hangs_up_cleanly(served: ServeApp) -> None:
    audio = served.source_48k()

    async def run() -> tuple[Call, Event, int | None, float]:
        async with rtc_call(RTC_URL, start_message(served, seed=1), audio) as call:
            await call.connect()
            end = await call.hang_up()
            code = await call.closed_code()
            return call, end, code, await sessions_closed_after(time.monotonic())

    call, end, code, teardown_s = asyncio.run(run())
    assert [event["type"] for event in call.events[:2]] == ["ready", "answer"]
    assert code == 1000 and call.events[-1] == end
    indexes = [event["index"] for event in call.of_type("block")]
    assert indexes == list(range(len(indexes))) and end["blocks"] == len(indexes)
    assert len(indexes) * call.events[0]["block_ms"] >= 1000 * len(audio) / 48000  # every input block answered
    # Late blocks come back as silence; this machine keeps up with few steps, so most of the input is converted.
    assert audible_seconds(call.output_48k) >= 0.6 * audible_seconds(audio), (
        audible_seconds(call.output_48k),
        audible_seconds(audio),
        end,
    )
    assert teardown_s < TEARDOWN_TIMEOUT_S


@pytest.mark.parametrize(("case", "code"), [("bad_token", "unauthorized"), ("unknown_voice", "unknown_voice")])
def test_refused_start_gets_its_code_and_the_socket_closes(served: ServeApp, case: str, code: str) -> None:
    overrides = {"bad_token": {"token": "forged.token"}, "unknown_voice": {"voice_id": "AAAAAAAAAAAAAAAA"}}[case]

    async def run() -> tuple[list[Event], int | None]:
        async with websockets.connect(RTC_URL) as socket:
            await socket.send(json.dumps(start_message(served, **overrides)))
            events = []
            async with asyncio.timeout(30):
                try:
                    while True:
                        events.append(json.loads(await socket.recv()))
                except ConnectionClosed:
                    return events, socket.close_code

    events, close_code = asyncio.run(run())
    assert [event["type"] for event in events] == ["error"] and events[0]["code"] == code, events
    assert close_code == 1008


def test_ice_servers_need_a_session_token_and_default_to_none(served: ServeApp) -> None:
    request = urllib.request.Request(BASE_URL + "/v1/ice", headers={"Authorization": f"Bearer {served.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.load(response) == {"iceServers": []}
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(BASE_URL + "/v1/ice", timeout=10)
    assert refused.value.code == 401


def test_a_call_whose_signalling_dropped_is_resumed_with_a_new_offer(served: ServeApp) -> None:
    """The socket goes without `end`: the server hangs up its peer connection but keeps the session, and a new
    signalling socket with `resume` and a new offer continues the same session, block numbers going on."""
    audio = served.source_48k()

    async def run() -> tuple[Event, str, int, list[Event], Event, float]:
        async with rtc_call(RTC_URL, start_message(served), audio) as call:
            await call.connect()
            for _ in range(3):
                await call.event("block")  # the call is well under way
            ready = call.events[0]
            call.socket.transport.abort()  # no close frame, no `end`: the connection is just gone
            # The server closed its peer connection too, which this (still open) peer sees as DTLS closing.
            async with asyncio.timeout(TEARDOWN_TIMEOUT_S):
                while call.peer.connectionState not in {"closed", "failed"}:
                    await asyncio.sleep(0.05)
            held = await asyncio.to_thread(open_sessions)
        resume = {"session_id": ready["session_id"], "resume_token": ready["resume_token"]}
        async with rtc_call(RTC_URL, {**start_message(served), "resume": resume}, audio) as again:
            await again.connect()
            end = await again.hang_up()
            teardown_s = await sessions_closed_after(time.monotonic())
        return ready, call.peer.connectionState, held, again.events, end, teardown_s

    ready, peer_state, held, events, end, teardown_s = asyncio.run(run())
    assert peer_state == "closed" and held == 1, "the media went, the session stayed for a resume"
    resumed = events[0]
    assert resumed["type"] == "ready" and resumed["session_id"] == ready["session_id"]
    assert resumed["resumed_at_block"] >= 3 and resumed["resume_token"] != ready["resume_token"]
    indexes = [event["index"] for event in events if event["type"] == "block"]
    assert indexes[0] == resumed["resumed_at_block"] and indexes == list(range(indexes[0], indexes[-1] + 1))
    assert end["type"] == "end" and teardown_s < TEARDOWN_TIMEOUT_S


def test_identity_call_through_serve_returns_the_input(identity_served: ServeApp) -> None:
    audio = identity_served.source_48k()

    async def run() -> Call:
        async with rtc_call(RTC_URL, start_message(identity_served), audio) as call:
            await call.connect()
            await call.hang_up()
            return call

    call = asyncio.run(run())
    found = delays_and_correlations(audio, call.output_48k)
    # Only the codec changes the audio (see the in-process identity test); the delay is the serving path's round
    # trip: one block of input, two Ray calls, Opus and aiortc's jitter buffers.
    assert np.median([correlation for _, correlation in found]) > 0.85, found
    assert 0 < found[0][0] < 48000, found
