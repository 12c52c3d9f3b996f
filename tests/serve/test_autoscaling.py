"""Converter autoscaling under real Serve, with the session-aware policy (deployments/autoscaling.py) and up to two
converter replicas: sessions past the policy's threshold make Serve add a replica, new sessions land on it, and when
the load falls Serve removes one, whose sessions re-home with nothing lost. The timings are printed (`-s`).

Converters run in identity mode: the scaling is under test, and real-time sessions of the tiny model on two
replicas plus the ones Serve starts would not fit two cores. Metrics are pushed every 0.5 s (Serve's default: 10 s;
serve_config.gpu.yaml: 1 s). What an ingress would tell a caller refused meanwhile (deployments/scale_up.py: the added
replica seen starting, then its start measured) is read from Serve's controller as the ingress reads it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from ray import serve
from ray.serve.schema import DeploymentStatus

from app.serving.retry_after import ScaleUpWatch
from bench.harness import (
    APP,
    ServeApp,
    autoscaled_converters,
    converter_replicas,
    local_ray,
    replica_stats,
    start_app,
)
from bench.parity import ParitySet
from client.stream_client import encode_packets, run_stream, start_message
from deployments.scale_up import ServeScaleUpOutlook
from tests.serve.test_resilience import FAST_DRAIN, LiveCall, block_indexes_by_session, looped

pytestmark = pytest.mark.serve

SESSIONS_PER_REPLICA = 2
OUTLOOK_ESTIMATE_S = 120.0  # longer than a converter's start here: the measured start must be below it
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def app(parity: ParitySet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    with local_ray():
        converters = {**autoscaled_converters(sessions_per_replica=SESSIONS_PER_REPLICA), **FAST_DRAIN}
        options = {"Converter": converters, "Ingress": {"max_ongoing_requests": 32}}
        yield start_app(parity, tmp_path_factory.mktemp("voices"), converters=1, identity=True, options=options)


class Session:
    """One real-time session on a thread of its own, until `stop`."""

    def __init__(self, app: ServeApp, seed: int) -> None:
        self.call = LiveCall()
        self._stop = threading.Event()
        packets = encode_packets(app.source_48k())
        start = start_message(app.token, app.voice_id, realtime=True, seed=seed)

        async def run() -> None:
            try:
                self.call.result = await run_stream(
                    app.base_url,
                    start,
                    looped(packets, self._stop),
                    on_event=self.call.events.append,
                    on_message=self.call.on_message,
                )
            except Exception as error:  # reported by the test
                self.call.failure = error

        self._thread = threading.Thread(target=lambda: asyncio.run(run()))
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), f"{self.call.session_id} did not end"

    def went_on(self) -> None:
        call = self.call
        assert call.failure is None and call.result is not None, call.failure
        assert call.result.error is None and call.result.end is not None, call.result.error
        assert call.result.restarts == 0 and call.result.resumes == 0
        for indexes in block_indexes_by_session(call.events):
            assert indexes == sorted(set(indexes)), "blocks out of order"


def wait_for(condition: Callable[[], bool], what: str, sessions: list[Session]) -> float:
    """Seconds until `condition` held (sessions may not fail meanwhile)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < TIMEOUT_S, f"timed out waiting for {what}"
        assert all(session.call.failure is None for session in sessions), [s.call.failure for s in sessions]
        time.sleep(0.1)
    return time.monotonic() - started


def converters_running(count: int) -> bool:
    status = serve.status().applications[APP].deployments["Converter"]
    return len(converter_replicas()) == count and status.status == DeploymentStatus.HEALTHY


def holder(session: Session) -> str:
    [replica] = [r for r in converter_replicas() if session.call.session_id in replica_stats(r)["blocks_by_session"]]
    return replica


class Outlook:
    """What an ingress would tell a caller refused for capacity (deployments/scale_up.py), read from this process."""

    def __init__(self) -> None:
        self.scale_up = ServeScaleUpOutlook(APP, "Converter", ScaleUpWatch(OUTLOOK_ESTIMATE_S, 5.0, 300.0), 0.0)
        self.waits: list[float] = []

    def read(self) -> float:
        self.waits.append(asyncio.run(self.scale_up.expected_wait_s()))
        return self.waits[-1]


def test_load_past_the_threshold_adds_a_converter_and_scaling_down_rehomes_its_sessions(app: ServeApp) -> None:
    [first_replica] = converter_replicas()
    outlook = Outlook()
    outlook.read()
    assert outlook.waits == [5.0], "nothing is starting: the least wait"
    early = [Session(app, seed) for seed in range(SESSIONS_PER_REPLICA + 1)]
    wait_for(lambda: all(s.call.blocks >= 3 for s in early), "the first sessions to run", early)
    scale_up_s = wait_for(lambda: outlook.read() > 0 and converters_running(2), "a second converter", early)
    outlook.read()
    # The start was seen under way (the estimate less its age) and then measured, from Serve's request to running.
    starting = [wait for wait in outlook.waits if wait > 5.0]
    measured_s = outlook.scale_up.watch.measured_start_s
    assert starting and max(starting) <= OUTLOOK_ESTIMATE_S and outlook.waits[-1] == 5.0
    assert measured_s is not None and 0 < measured_s < OUTLOOK_ESTIMATE_S
    [added] = set(converter_replicas()) - {first_replica}
    late = [Session(app, seed) for seed in range(10, 12)]
    wait_for(lambda: all(s.call.blocks >= 3 for s in late), "the later sessions to run", early + late)
    assert {holder(session) for session in late} == {added}, "new sessions go to the new, emptier converter"

    for session in early:
        session.stop()
    scale_down_s = wait_for(lambda: converters_running(1), "the scale-down", late)
    [kept] = converter_replicas()
    time.sleep(2.0)  # the moved sessions go on on the replica that stayed
    for session in late:
        session.stop()
    for session in early + late:
        session.went_on()
    moved = [s for s in late if s.call.event_count("resume_token") == 1]
    print(
        f"\nscale-up: second converter running {scale_up_s:.1f} s after the third session started converting "
        f"(measured by the ingress's outlook: {measured_s:.1f} s from Serve's request; a refused caller would have "
        f"been told {max(starting):.0f} s at first); "
        f"scale-down: {scale_down_s:.1f} s after the early sessions ended; {len(moved)} of {len(late)} sessions "
        f"moved ({'the added replica was removed' if kept == first_replica else 'the first replica was removed'})"
    )
    if kept == first_replica:
        assert len(moved) == len(late), "the removed replica's sessions re-homed, each once"
