"""What a caller refused for capacity (`overloaded`) is told to wait: `retry_after_s`, from what the ingress can see.

The ingress cannot know when a converter slot frees: a session may end any second, or in an hour. What it can see is
whether a scale-up is under way: converter replicas that Serve has asked for and that do not serve yet, with the time
each was asked for. So:

- a replica is starting: the caller is told the time until it is expected to serve: how long the latest replica start
  took, measured here (from Serve's request to the replica seen running, which includes a node joining and the model
  loading), or before any was measured the configured estimate, less how long the oldest starting replica has been
  starting (it is the nearest to serving). An overdue replica gives the least wait.
- none is starting: the least wait (`least_s`): a slot may free at any moment, and a policy that wants a replica asks
  for it within seconds, so the next refusal tells the longer wait.

Always within [least_s, most_s]. The clients double the wait on each retry of the same start (client/stream_client.py),
so a wave of callers does not come back at once. This module reads no Ray; deployments/scale_up.py feeds it what
Serve's controller reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class CapacityOutlook(Protocol):
    async def expected_wait_s(self) -> float:
        """Seconds a caller refused for capacity now should wait before trying again."""
        ...


@dataclass(frozen=True)
class ReplicaView:
    """One converter replica as Serve's controller reports it."""

    replica_id: str
    starting: bool  # asked for, not serving yet (its node may still be joining)
    requested_at: float  # wall clock (unix seconds): when Serve asked for it


class ScaleUpWatch:
    """Replica starts seen over time: those under way now, and how long the latest finished one took."""

    def __init__(self, estimate_s: float, least_s: float, most_s: float) -> None:
        if not 0 < least_s <= most_s or estimate_s <= 0:
            raise ValueError("need 0 < least_s <= most_s and estimate_s > 0")
        self.estimate_s = estimate_s
        self.least_s = least_s
        self.most_s = most_s
        self.measured_start_s: float | None = None  # the latest replica start seen from request to running
        self._starting: dict[str, float] = {}  # replica id -> when it was asked for

    @property
    def starting(self) -> bool:
        return bool(self._starting)

    def observe(self, replicas: list[ReplicaView], now: float) -> None:
        """The converters' replicas as reported at `now`. A replica seen starting before and running now has
        started: it took at most `now` minus its request time (the error is the time between two observations)."""
        running = {replica.replica_id for replica in replicas if not replica.starting}
        for replica_id, requested_at in self._starting.items():
            if replica_id in running:
                self.measured_start_s = now - requested_at
        self._starting = {replica.replica_id: replica.requested_at for replica in replicas if replica.starting}

    def retry_after_s(self, now: float) -> float:
        """What a caller refused for capacity at `now` is told to wait (see the module's docstring)."""
        if not self._starting:
            return self.least_s
        expected_s = self.measured_start_s if self.measured_start_s is not None else self.estimate_s
        oldest_age_s = now - min(self._starting.values())
        return min(self.most_s, max(self.least_s, expected_s - oldest_age_s))


class FixedWait:
    """The same wait for every refusal: where nothing about scaling can be seen (one process, tests)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def expected_wait_s(self) -> float:
        return self.seconds
