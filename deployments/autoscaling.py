"""Converter autoscaling on queue depth AND active sessions.

With at most one block in flight per session, ongoing requests per replica ~ sessions x (compute time / block
period): queue depth measures compute pressure. Sessions measure held state: a replica near its session capacity
must get company before admission control starts refusing calls. The policy asks for whichever needs more replicas;
Serve applies min/max replicas and the up/down-scale delays around it.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from ray.serve.config import AutoscalingContext


def replicas_for_sessions(total_sessions: float, sessions_per_replica: float) -> int:
    return math.ceil(total_sessions / sessions_per_replica) if total_sessions > 0 else 0


def replicas_for_queue(total_requests: float, target_ongoing_requests: float) -> int:
    return math.ceil(total_requests / target_ongoing_requests) if total_requests > 0 else 0


class SessionAwarePolicy:
    """`queue_signal`: "ongoing" reads the requests in flight at the converters (Serve's count: computing, batching or
    queued), "waiting" only the blocks that wait for an engine step (the converters report them). Measured under a
    step increase of load (README, "Guarantees under load"; bench/autoscaling_signal.py), "ongoing" is the default."""

    def __init__(
        self,
        sessions_per_replica: float = 12.0,
        target_ongoing_requests: float = 8.0,
        queue_signal: Literal["ongoing", "waiting"] = "ongoing",
    ) -> None:
        self.sessions_per_replica = sessions_per_replica
        self.target_ongoing_requests = target_ongoing_requests
        self.queue_signal = queue_signal

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        sessions = sum(metrics.get("sessions", {}).values())
        queue = ctx.total_num_requests if self.queue_signal == "ongoing" else sum(metrics.get("waiting", {}).values())
        wanted = max(
            replicas_for_sessions(sessions, self.sessions_per_replica),
            replicas_for_queue(queue, self.target_ongoing_requests),
            1,
        )
        return wanted, {"sessions": sessions, self.queue_signal: queue}
