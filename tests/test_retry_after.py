"""What a caller refused for capacity is told to wait (app/serving/retry_after.py), and how the refusal carries it."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from app.serving.config import IngressConfig
from app.serving.retry_after import FixedWait, ReplicaView, ScaleUpWatch
from app.transport.protocol import ErrorCode
from app.transport.sessions import EVERY_CONVERTER_FULL, StreamServices
from deployments.scale_up import replica_views

ESTIMATE_S, LEAST_S, MOST_S = 60.0, 5.0, 300.0
T0 = 1_000_000.0  # wall clock


def watch() -> ScaleUpWatch:
    return ScaleUpWatch(ESTIMATE_S, LEAST_S, MOST_S)


def running(replica_id: str) -> ReplicaView:
    return ReplicaView(replica_id, starting=False, requested_at=T0 - 3600)


def starting(replica_id: str, requested_at: float) -> ReplicaView:
    return ReplicaView(replica_id, starting=True, requested_at=requested_at)


def test_with_no_replica_starting_a_refused_caller_is_told_the_least_wait() -> None:
    scale_up = watch()
    assert scale_up.retry_after_s(T0) == LEAST_S
    scale_up.observe([running("a")], T0)
    assert not scale_up.starting and scale_up.retry_after_s(T0 + 10) == LEAST_S


def test_during_a_scale_up_the_wait_is_the_estimate_less_the_oldest_start_s_age() -> None:
    scale_up = watch()
    scale_up.observe([running("a"), starting("b", T0 - 20), starting("c", T0 - 5)], T0)
    assert scale_up.starting
    assert scale_up.retry_after_s(T0) == pytest.approx(ESTIMATE_S - 20)  # b is the nearest to serving
    assert scale_up.retry_after_s(T0 + 30) == pytest.approx(ESTIMATE_S - 50)
    assert scale_up.retry_after_s(T0 + 200) == LEAST_S  # overdue: the least, never less


def test_the_wait_is_bounded_above() -> None:
    scale_up = ScaleUpWatch(estimate_s=3600, least_s=LEAST_S, most_s=MOST_S)
    scale_up.observe([starting("b", T0)], T0)
    assert scale_up.retry_after_s(T0) == MOST_S


def test_a_measured_start_replaces_the_estimate() -> None:
    scale_up = watch()
    scale_up.observe([running("a"), starting("b", T0)], T0 + 2)
    scale_up.observe([running("a"), running("b")], T0 + 14)  # b served within 14 s of its request
    assert scale_up.measured_start_s == pytest.approx(14)
    assert scale_up.retry_after_s(T0 + 20) == LEAST_S  # nothing starts now
    scale_up.observe([running("a"), running("b"), starting("c", T0 + 30)], T0 + 33)
    assert scale_up.retry_after_s(T0 + 33) == pytest.approx(14 - 3)


def test_a_start_that_never_served_is_not_measured() -> None:
    scale_up = watch()
    scale_up.observe([running("a"), starting("b", T0)], T0 + 2)
    scale_up.observe([running("a")], T0 + 14)  # b failed or was taken back
    assert scale_up.measured_start_s is None and not scale_up.starting


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        ScaleUpWatch(ESTIMATE_S, least_s=10, most_s=5)
    with pytest.raises(ValidationError, match="retry_after_max_s"):
        IngressConfig(retry_after_s=60, retry_after_max_s=30)


def services(outlook: FixedWait | None) -> StreamServices:
    return StreamServices(client=None, tokens=None, voices=None, defaults=None, capacity_outlook=outlook)  # type: ignore[arg-type]  # not used here


def test_a_refusal_for_capacity_carries_the_outlook_s_wait_and_other_refusals_the_fixed_one() -> None:
    refusal = asyncio.run(services(FixedWait(42.0)).every_converter_full())
    event = services(FixedWait(42.0)).error_event(refusal)
    assert (event.code, event.message, event.retry_after_s) == (ErrorCode.overloaded, EVERY_CONVERTER_FULL, 42.0)
    assert services(None).error_event(asyncio.run(services(None).every_converter_full())).retry_after_s == 5.0


def test_replica_views_read_the_controller_s_instance_details() -> None:
    details = {
        "applications": {
            "seedvc": {
                "deployments": {
                    "Converter": {
                        "replicas": [
                            {"replica_id": "a", "state": "RUNNING", "start_time_s": T0 - 100},
                            {"replica_id": "b", "state": "STARTING", "start_time_s": T0 - 7},
                            {"replica_id": "c", "state": "STOPPING", "start_time_s": T0 - 300},
                        ]
                    },
                    "Ingress": {"replicas": [{"replica_id": "i", "state": "STARTING", "start_time_s": T0}]},
                }
            }
        }
    }
    assert replica_views(details, "seedvc", "Converter", T0) == [
        ReplicaView("a", starting=False, requested_at=T0 - 100),
        ReplicaView("b", starting=True, requested_at=T0 - 7),
    ]
    assert replica_views(details, "other", "Converter", T0) == []
