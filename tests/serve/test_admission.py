"""Admission control with real Serve: two converters of one session each, placed by a router that never refreshes its
view of their load (as between two routing-stats polls), so that opens land on a full replica as often as not.

An open refused by a full replica is tried on the other before the client hears anything; when every converter is
full, a new session is refused at once with `overloaded` and a retry-after while the admitted ones keep running; a
session whose converter dies while the other is full hears the same, not `internal`. None of this is an error in the
converters' logs. And the router never hangs on a call made right after a cancelled one of the same connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from bench.harness import (
    BASE_URL,
    ServeApp,
    converter_replicas,
    kill_replica,
    local_ray,
    replica_stats,
    start_app,
)
from bench.parity import ParitySet
from client.stream_client import StreamResult, stream_audio
from deployments.app import session_pinning
from deployments.router import pin
from tests.serve.started import started_stream

pytestmark = pytest.mark.serve

STALE_ROUTING = session_pinning(routing_stats_period_s=3600)


@pytest.fixture(scope="module")
def two_of_one(parity: ParitySet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeApp]:
    with local_ray():
        yield start_app(
            parity,
            tmp_path_factory.mktemp("voices"),
            converters=2,
            max_sessions=1,
            options={"Converter": {"request_router_config": STALE_ROUTING}},
        )


def holder_of(session_id: str) -> str:
    """The converter replica that holds (or last held) a session."""
    [replica] = [r for r in converter_replicas() if session_id in replica_stats(r)["blocks_by_session"]]
    return replica


def test_an_open_refused_by_a_full_replica_goes_to_the_other(two_of_one: ServeApp) -> None:
    app = two_of_one
    audio = app.source_48k(2.0)

    async def pair() -> tuple[StreamResult, StreamResult]:
        first = await started_stream(BASE_URL, app.token, app.voice_id, audio)
        second = await stream_audio(BASE_URL, app.token, app.voice_id, app.source_48k(1.0), realtime=False)
        return await first.result, second

    # The router sees both replicas empty, so each second open has even odds of landing on the full one first.
    for _ in range(4):
        first, second = asyncio.run(pair())
        assert first.error is None and second.error is None, (first.error, second.error)
        assert first.ready is not None and second.ready is not None
        assert holder_of(first.ready["session_id"]) != holder_of(second.ready["session_id"])


def test_when_every_converter_is_full_a_new_session_is_refused_and_the_admitted_ones_continue(
    two_of_one: ServeApp,
) -> None:
    app = two_of_one
    audio = app.source_48k(3.0)

    async def three() -> tuple[list[StreamResult], StreamResult]:
        admitted = [await started_stream(BASE_URL, app.token, app.voice_id, audio) for _ in range(2)]
        refused = await stream_audio(BASE_URL, app.token, app.voice_id, audio, realtime=True)
        return [await stream.result for stream in admitted], refused

    admitted, refused = asyncio.run(three())
    assert refused.error is not None and refused.error["code"] == "overloaded"
    assert refused.error["retry_after_s"] > 0 and refused.ready is None
    for result in admitted:
        assert result.error is None and result.end is not None
        assert len(result.output_48k) >= len(audio)


def test_a_client_that_starts_again_right_after_its_end_is_not_refused_for_its_old_session(
    two_of_one: ServeApp,
) -> None:
    """The ingress frees the converter slot before it sends `end`: here one converter is left, and each stream
    starts as soon as the one before it ended."""
    app = two_of_one

    async def back_to_back() -> list[StreamResult]:
        occupant = await started_stream(BASE_URL, app.token, app.voice_id, app.source_48k(6.0))
        results = [
            await stream_audio(BASE_URL, app.token, app.voice_id, app.source_48k(0.5), realtime=False) for _ in range(5)
        ]
        await occupant.result
        return results

    for result in asyncio.run(back_to_back()):
        assert result.error is None and result.end is not None, result.error


def test_a_session_whose_converter_dies_while_the_other_is_full_is_told_overloaded(two_of_one: ServeApp) -> None:
    app = two_of_one
    audio = app.source_48k(4.0)

    async def scenario() -> tuple[StreamResult, StreamResult]:
        victim = await started_stream(BASE_URL, app.token, app.voice_id, audio)
        bystander = await started_stream(BASE_URL, app.token, app.voice_id, audio)
        await asyncio.to_thread(lambda: kill_replica(holder_of(victim.session_id)))
        return await victim.result, await bystander.result

    victim, bystander = asyncio.run(scenario())
    assert victim.error is not None and victim.error["code"] == "overloaded", victim.error
    assert victim.error["retry_after_s"] > 0
    assert bystander.error is None and bystander.end is not None
    wait_for_converters(2)


def wait_for_converters(count: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while len(converter_replicas()) < count or serve.status().applications["seedvc"].status != "RUNNING":
        assert time.monotonic() < deadline, "the killed converter was not replaced"
        time.sleep(0.5)


def serve_logs() -> Path:
    """Serve's log files of this test run's Ray (replicas log there, one file each)."""
    return Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"


def test_refusals_are_not_errors_in_the_converters_logs(two_of_one: ServeApp) -> None:
    """Runs after the tests above, which made converters refuse opens and blocks."""
    converter_logs = list(serve_logs().glob("replica_seedvc_Converter_*.log"))
    assert converter_logs
    for log_file in converter_logs:
        errors = [line for line in log_file.read_text().splitlines() if line.startswith("ERROR") or "Traceback" in line]
        assert not errors, f"{log_file.name}: {errors[:3]}"


class Holder:
    """A stand-in deployment with one request slot, routed by the session-pinning router."""

    async def hold(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def ping(self) -> str:
        return "pong"

    def replica(self) -> str:
        return serve.get_replica_context().replica_id.unique_id


class Connection:
    """Makes its calls as one ingress request does: they share their parent request's internal id."""

    def __init__(self, holder: DeploymentHandle) -> None:
        self.holder = holder

    async def cancel_then_call(self) -> float:
        pinned = self.holder.options(session_id=pin(await self.holder.replica.remote()))
        busy = pinned.hold.remote(2.0)  # takes the replica's only slot
        await asyncio.sleep(0.3)
        waiting = asyncio.ensure_future(awaited(pinned.hold.remote(0.0)))  # waits in the router for the slot
        await asyncio.sleep(0.3)
        waiting.cancel()  # a connection that ends while its convert waits for its replica...
        started = time.monotonic()
        await asyncio.wait_for(awaited(pinned.ping.remote()), timeout=30)  # ...and closes its session at once
        await busy
        return time.monotonic() - started


async def awaited(response: Any) -> object:
    """A handle call as a coroutine (Ray types `.remote()` as a response or a generator: unary calls here)."""
    return await response


def test_a_call_right_after_a_cancelled_one_of_the_same_request_is_routed(two_of_one: ServeApp) -> None:
    """Ray's base router indexed pending calls by their parent's request id: this one waited forever (timed out)."""
    no_cpu = {"num_cpus": 0}
    holder = serve.deployment(max_ongoing_requests=1, request_router_config=STALE_ROUTING, ray_actor_options=no_cpu)(
        Holder
    ).bind()
    connection = serve.run(
        serve.deployment(ray_actor_options=no_cpu)(Connection).bind(holder), name="router", route_prefix=None
    )
    try:
        for _ in range(3):
            assert connection.cancel_then_call.remote().result(timeout_s=60) < 10
        # While the pinned replica was busy, the router waited with back-off instead of asking again at once.
        [log_file] = serve_logs().glob("replica_router_Connection_*.log")
        assert "Failed to route request after" not in log_file.read_text()
    finally:
        serve.delete("router")
