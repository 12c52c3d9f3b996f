"""Converter autoscaling on queue depth AND active sessions.

With at most one block in flight per session, ongoing requests per replica ~ sessions x (compute time / block
period): queue depth measures compute pressure. Sessions measure held state: a replica near its session capacity
must get company before admission control starts refusing calls. The policy asks for whichever needs more replicas;
Serve applies min/max replicas and the up/down-scale delays around it.

Sessions are read as they are now (each replica's latest report), not as Serve aggregates them (a mean over
`look_back_period_s`, which showed a burst of opens 15-28 s late), and with headroom: a replica is requested while
free slots remain, early enough that it serves before the last one is taken. The headroom is the larger of a fixed
number of sessions and what the current open rate brings in the time a new replica takes to serve
(docs/production.md, "Scale-up that keeps up", has the arithmetic).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

from ray.serve._private.common import TimeStampedValue  # the element type of AutoscalingContext.raw_metrics
from ray.serve.config import AutoscalingContext

# The controller runs the policy: its records go to Serve's controller log (what the local cluster's timeline reads).
logger = logging.getLogger("ray.serve")


def replicas_for_sessions(total_sessions: float, sessions_per_replica: float) -> int:
    return math.ceil(total_sessions / sessions_per_replica) if total_sessions > 0 else 0


def replicas_for_queue(total_requests: float, target_ongoing_requests: float) -> int:
    return math.ceil(total_requests / target_ongoing_requests) if total_requests > 0 else 0


def sessions_now(series_by_replica: dict[Any, list[TimeStampedValue]]) -> float:
    """Sessions held now: each replica's latest report."""
    return sum(series[-1].value for series in series_by_replica.values() if series)


def open_rate(series_by_replica: dict[Any, list[TimeStampedValue]], window_s: float) -> float:
    """Sessions opened per second over the last `window_s`: each replica's rise over its reports in the window (a
    replica whose sessions fell adds nothing: ends elsewhere must not hide opens here)."""
    rate = 0.0
    for series in series_by_replica.values():
        recent = [point for point in series if point.timestamp >= series[-1].timestamp - window_s] if series else []
        if len(recent) > 1 and recent[-1].timestamp > recent[0].timestamp:
            rate += max(0.0, (recent[-1].value - recent[0].value) / (recent[-1].timestamp - recent[0].timestamp))
    return rate


class SessionAwarePolicy:
    """`queue_signal`: "ongoing" reads the requests in flight at the converters (Serve's count: computing, batching or
    queued), "waiting" only the blocks that wait for an engine step (the converters report them). Measured under a
    step increase of load (README, "Guarantees under load"; bench/autoscaling_signal.py), "ongoing" is the default.

    Headroom: `headroom_sessions` free slots at least, or `open_rate_lead_s` seconds of the open rate measured over
    `rate_window_s` (at most Serve's look-back, which bounds the reports kept), whichever is more."""

    def __init__(
        self,
        sessions_per_replica: float = 12.0,
        target_ongoing_requests: float = 8.0,
        queue_signal: Literal["ongoing", "waiting"] = "ongoing",
        headroom_sessions: float = 0.0,
        open_rate_lead_s: float = 0.0,
        rate_window_s: float = 10.0,
    ) -> None:
        self.sessions_per_replica = sessions_per_replica
        self.target_ongoing_requests = target_ongoing_requests
        self.queue_signal = queue_signal
        self.headroom_sessions = headroom_sessions
        self.open_rate_lead_s = open_rate_lead_s
        self.rate_window_s = rate_window_s
        self.last_wanted: int | None = None

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        raw = (getattr(ctx, "raw_metrics", None) or {}).get("sessions")
        sessions = sessions_now(raw) if raw else sum(metrics.get("sessions", {}).values())
        rate = open_rate(raw, self.rate_window_s) if raw else 0.0
        headroom = max(self.headroom_sessions, rate * self.open_rate_lead_s)
        queue = ctx.total_num_requests if self.queue_signal == "ongoing" else sum(metrics.get("waiting", {}).values())
        wanted = max(
            replicas_for_sessions(sessions + headroom, self.sessions_per_replica),
            replicas_for_queue(queue, self.target_ongoing_requests),
            1,
        )
        if wanted != self.last_wanted:  # one line per change of mind, not one per control loop
            logger.info(
                f"SessionAwarePolicy wants {wanted} replicas: {sessions:g} sessions "
                f"({'latest reports' if raw else 'window means'}), open rate {rate:.2f}/s, headroom {headroom:.1f}, "
                f"{self.queue_signal} {queue:g}"
            )
            self.last_wanted = wanted
        return wanted, {"sessions": sessions, "open_rate": rate, "headroom": headroom, self.queue_signal: queue}
