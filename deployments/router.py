"""Session pinning for converter calls: a custom Serve request router (alpha API; Ray is pinned, and a test covers it).

A session lives on one converter replica. Calls that carry a pin (`handle.options(session_id=pin(replica))`) go to
that replica only, never spilling to another (its queue may be full: the router waits, as Serve does). If the pinned
replica is gone, the call goes to any replica, which answers SessionLost, and the transport re-opens the session with
its saved state. Calls without a pin (opening a session) go to the replica with the fewest sessions.

The base router hands a chosen replica to the pending request with the same internal request id; a session makes at
most one converter call at a time, so that id never has two pending calls.
"""

from __future__ import annotations

import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

PIN_PREFIX = "pin:"


def pin(replica: str) -> str:
    """The request-metadata session id that pins a call to `replica` (a replica's unique id)."""
    return f"{PIN_PREFIX}{replica}"


def pinned_replica(session_id: str) -> str | None:
    return session_id.removeprefix(PIN_PREFIX) if session_id.startswith(PIN_PREFIX) else None


def load(replica: RunningReplica) -> float:
    """Share of a replica's session capacity in use (from its routing stats; unknown yet = empty)."""
    stats = replica.routing_stats or {}
    return stats.get("sessions", 0) / max(1, stats.get("capacity", 1))


class SessionPinningRouter(RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        wanted = pinned_replica(pending_request.metadata.session_id) if pending_request else None
        if wanted is not None:
            owner = [r for r in candidate_replicas if r.replica_id.unique_id == wanted]
            if owner:
                return [owner]
        # Least loaded first; each rank is tried in turn, so a full replica's queue does not block the others. Ties
        # in random order: a burst of opens between two routing-stats polls must not all land on one replica.
        shuffled = random.sample(candidate_replicas, len(candidate_replicas))
        return [[replica] for replica in sorted(shuffled, key=load)]
