"""The session-pinning router's choice and the autoscaling policy's arithmetic, as pure functions.

Their integration with real Serve (stickiness, re-homing, scaling) is covered in tests/serve/.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from ray.serve._private.common import TimeStampedValue

from deployments.autoscaling import SessionAwarePolicy
from deployments.router import SessionPinningRouter, avoiding, pin, pinned_replica


def replica(name: str, sessions: int, capacity: int = 10) -> Any:
    """A stand-in for Serve's RunningReplica with what choose_replicas reads (so: Any)."""
    return SimpleNamespace(
        replica_id=SimpleNamespace(unique_id=name), routing_stats={"sessions": sessions, "capacity": capacity}
    )


def choose(replicas: list[Any], session_id: str, router: SessionPinningRouter | None = None) -> list[list[str]]:
    router = router or SessionPinningRouter.__new__(SessionPinningRouter)  # Serve builds routers: no __init__ here
    request: Any = SimpleNamespace(
        metadata=SimpleNamespace(session_id=session_id), routing_context=SimpleNamespace(should_backoff=False)
    )
    ranked = asyncio.run(router.choose_replicas(replicas, request))
    return [[r.replica_id.unique_id for r in rank] for rank in ranked]


def test_pins_round_trip() -> None:
    assert pinned_replica(pin("abc")) == "abc"
    assert pinned_replica("something-else") is None


def test_pinned_calls_go_to_their_replica_only() -> None:
    replicas = [replica("a", 9), replica("b", 0)]
    assert choose(replicas, pin("a")) == [["a"]]


def test_new_sessions_go_least_loaded_first() -> None:
    replicas = [replica("a", 9), replica("b", 2), replica("c", 5)]
    assert choose(replicas, "") == [["b"], ["c"], ["a"]]


def test_equally_loaded_replicas_share_a_burst_of_new_sessions() -> None:
    """Between two routing-stats polls every replica looks as loaded as before: ties must not always pick one."""
    firsts = {choose([replica("a", 0), replica("b", 0), replica("c", 4)], "")[0][0] for _ in range(50)}
    assert firsts == {"a", "b"}


def test_an_open_a_replica_refused_goes_elsewhere_first() -> None:
    """Routing stats are a poll old: a replica that refused an open ranks last for its next try, whatever they say."""
    replicas = [replica("a", 0), replica("b", 5), replica("c", 2)]
    assert choose(replicas, avoiding(["a"])) == [["c"], ["b"], ["a"]]
    assert choose(replicas, avoiding(["a", "c"])) == [["b"], ["a"], ["c"]]


def test_a_lost_pin_falls_back_to_any_replica() -> None:
    assert choose([replica("a", 3), replica("b", 1)], pin("gone")) == [["b"], ["a"]]


def test_a_replica_found_unreachable_is_passed_over_at_once() -> None:
    """A node crash: the first call that finds its replica unreachable makes pinned calls and opens go elsewhere."""
    router = SessionPinningRouter.__new__(SessionPinningRouter)
    replicas = [replica("a", 0), replica("b", 5)]
    router._mark_unreachable(replicas[0].replica_id)
    assert choose(replicas, pin("a"), router) == [["b"]], "the pinned call re-homes (SessionLost), it does not wait"
    assert choose(replicas, "", router) == [["b"]]
    assert choose([replicas[0]], "", router) == [["a"]], "with nothing else, wait for it"
    assert choose(replicas, pin("a")) == [["a"]], "another router has not seen it fail"


def test_policy_scales_on_sessions_or_queue_whichever_needs_more() -> None:
    policy = SessionAwarePolicy(sessions_per_replica=10, target_ongoing_requests=4)

    def wanted(sessions: list[float], requests: float) -> int:
        metrics = {"sessions": {f"r{i}": value for i, value in enumerate(sessions)}}
        context: Any = SimpleNamespace(aggregated_metrics=metrics, total_num_requests=requests)  # what the policy reads
        return policy(context)[0]

    assert wanted([], 0) == 1
    assert wanted([10, 10, 5], 2) == 3
    assert wanted([3], 17) == 5
    assert wanted([30, 1], 0) == 4


def test_the_waiting_signal_counts_only_blocks_that_wait_for_a_step() -> None:
    policy = SessionAwarePolicy(sessions_per_replica=10, target_ongoing_requests=2, queue_signal="waiting")
    metrics = {"sessions": {"r0": 3.0}, "waiting": {"r0": 5.0, "r1": 0.0}}
    busy: Any = SimpleNamespace(aggregated_metrics=metrics, total_num_requests=40)  # 40 in flight, 5 of them wait
    assert policy(busy)[0] == 3
    assert SessionAwarePolicy(sessions_per_replica=10, target_ongoing_requests=2)(busy)[0] == 20


def reports(*points: tuple[float, float]) -> list[TimeStampedValue]:
    return [TimeStampedValue(timestamp, value) for timestamp, value in points]


def test_sessions_are_read_as_they_are_now_not_as_a_window_mean() -> None:
    """A burst of opens: the mean over Serve's look-back still says 1 session a replica, the latest reports say 5."""
    policy = SessionAwarePolicy(sessions_per_replica=4, target_ongoing_requests=100)
    raw = {"sessions": {"r0": reports((0, 0), (1, 0), (2, 5)), "r1": reports((0, 0), (2, 5))}}
    context: Any = SimpleNamespace(aggregated_metrics={"sessions": {"r0": 1.0, "r1": 1.0}}, raw_metrics=raw)
    context.total_num_requests = 0
    assert policy(context)[0] == 3


def test_headroom_asks_for_a_replica_before_the_last_slot_is_taken() -> None:
    def wanted(policy: SessionAwarePolicy, *series: list[TimeStampedValue]) -> int:
        raw = {"sessions": {f"r{i}": points for i, points in enumerate(series)}}
        context: Any = SimpleNamespace(aggregated_metrics={}, raw_metrics=raw, total_num_requests=0)
        return policy(context)[0]

    steady = reports((0, 7), (10, 7))
    fixed = SessionAwarePolicy(sessions_per_replica=10, headroom_sessions=4)
    assert wanted(fixed, reports((0, 6), (10, 6))) == 1
    assert wanted(fixed, steady) == 2, "7 of 10 slots taken, 4 kept free"
    # 0.5 opens/s for 20 s of lead: 10 sessions ahead; ends on another replica hide nothing.
    by_rate = SessionAwarePolicy(sessions_per_replica=10, open_rate_lead_s=20, rate_window_s=10)
    assert wanted(by_rate, steady) == 1
    assert wanted(by_rate, reports((0, 2), (10, 7))) == 2
    assert wanted(by_rate, reports((0, 2), (10, 7)), reports((0, 9), (10, 0))) == 2
    # Opens older than the rate window count as sessions, not as a rate.
    assert wanted(by_rate, reports((0, 2), (5, 7), (20, 7))) == 1


def test_histogram_buckets_are_what_ray_accepts() -> None:
    from app.serving.metrics import METRICS

    for name, spec in METRICS.items():
        if spec.kind == "histogram":
            assert spec.buckets and all(b > 0 for b in spec.buckets), name
            assert list(spec.buckets) == sorted(set(spec.buckets)), name
