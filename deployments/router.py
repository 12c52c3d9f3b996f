"""Session pinning for converter calls: a custom Serve request router (alpha API; Ray is pinned, and a test covers it).

A session lives on one converter replica. Calls that carry a pin (`handle.options(session_id=pin(replica))`) go to
that replica only, never spilling to another (its queue may be full: the router waits, as Serve does). If the pinned
replica is gone, the call goes to any replica, which answers SessionLost, and the transport re-opens the session with
its saved state. Calls without a pin (opening a session) go to the replica with the fewest sessions; an open that a
full replica refused is sent again with `avoiding(refused)`, which ranks the replicas that refused it last.

The base router hands a replica it chose to the pending request with the same internal request id, and indexes
pending requests by that id alone. Every converter call a WebSocket connection makes shares its parent request's id,
so a close sent right after a cancelled convert that was still waiting for its replica was never handed one (the
index skipped it as a duplicate, then the cancellation removed the id): the close hung. This router indexes pending
requests per call instead (private API: see `_CallIndex`).

A replica that a call found dead or unreachable (Serve's `on_replica_actor_died` / `on_replica_actor_unavailable`
hooks) is passed over at once: its pinned calls go to another replica (which answers SessionLost, and the session
is re-opened there) and opens never go back to it. The base router only re-probed such a replica, with back-off,
until the controller dropped it: when a node crashed, its sessions waited ~7.5 s.
"""

from __future__ import annotations

import random
import time

from ray.serve._private.common import ReplicaID, RequestMetadata
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

PIN_PREFIX = "pin:"
AVOID_PREFIX = "avoid:"


def pin(replica: str) -> str:
    """The request-metadata session id that pins a call to `replica` (a replica's unique id)."""
    return f"{PIN_PREFIX}{replica}"


def pinned_replica(session_id: str) -> str | None:
    return session_id.removeprefix(PIN_PREFIX) if session_id.startswith(PIN_PREFIX) else None


def avoiding(replicas: list[str]) -> str:
    """The request-metadata session id of an unpinned call that `replicas` should get only if no other can."""
    return AVOID_PREFIX + ",".join(replicas)


def avoided_replicas(session_id: str) -> set[str]:
    return set(session_id.removeprefix(AVOID_PREFIX).split(",")) if session_id.startswith(AVOID_PREFIX) else set()


# How long a replica found dead or unreachable is passed over. Serve's controller drops a dead replica within seconds
# (measured: ~7.5 s after its node crashed); a replica that was only briefly unreachable is chosen again after this.
UNREACHABLE_FOR_S = 30.0


def load(replica: RunningReplica) -> float:
    """Share of a replica's session capacity in use (from its routing stats; unknown yet = empty)."""
    stats = replica.routing_stats or {}
    return stats.get("sessions", 0) / max(1, stats.get("capacity", 1))


class _CallIndex:
    """Pending requests indexed per call (the metadata object each handle call makes), not per internal request id.

    Overrides of the base router's private index methods (Ray 2.60, pinned in requirements.txt): tests/serve/
    test_routing.py fails if a Ray upgrade changes what they replace.
    """

    _pending_by_call: dict[int, PendingRequest]

    def _calls(self) -> dict[int, PendingRequest]:
        if not hasattr(self, "_pending_by_call"):
            self._pending_by_call = {}
        return self._pending_by_call

    def _add_pending_request_to_indices(self, pending_request: PendingRequest) -> None:
        # The index keeps the metadata alive, so its id() cannot be reused while it is there.
        self._calls()[id(pending_request.metadata)] = pending_request

    def _remove_pending_request_from_indices(self, pending_request: PendingRequest) -> None:
        self._calls().pop(id(pending_request.metadata), None)

    def _get_pending_request_matching_internal_request_id(
        self, request_metadata: RequestMetadata | None = None
    ) -> PendingRequest | None:
        if request_metadata is None:
            return None
        pending = self._calls().get(id(request_metadata))
        return pending if pending is not None and not pending.future.done() else None


class _Unreachable:
    """Replicas a call found dead or unreachable, and since when (the router is built by Serve: no __init__ here)."""

    _since: dict[str, float]

    def _unreachable(self) -> dict[str, float]:
        if not hasattr(self, "_since"):
            self._since = {}
        now = time.monotonic()
        for replica, since in list(self._since.items()):
            if now - since > UNREACHABLE_FOR_S:
                del self._since[replica]
        return self._since

    def _mark_unreachable(self, replica_id: ReplicaID) -> None:
        self._unreachable()[replica_id.unique_id] = time.monotonic()


class SessionPinningRouter(_CallIndex, _Unreachable, RequestRouter):
    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._mark_unreachable(replica_id)

    def on_replica_actor_unavailable(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_unavailable(replica_id)
        self._mark_unreachable(replica_id)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        unreachable = self._unreachable()
        # Every replica unreachable: wait for them (with Serve's back-off) rather than fail the call.
        candidate_replicas = [
            r for r in candidate_replicas if r.replica_id.unique_id not in unreachable
        ] or candidate_replicas
        call = ""
        if pending_request is not None:
            call = pending_request.metadata.session_id
            # Every replica this call may go to is in the answer: when all are busy, wait (with Serve's back-off)
            # instead of asking again at once, which spun the ingress's CPU while a pinned replica's queue was full.
            pending_request.routing_context.should_backoff = True
        wanted = pinned_replica(call)
        if wanted is not None:
            owner = [r for r in candidate_replicas if r.replica_id.unique_id == wanted]
            if owner:
                return [owner]
        # Least loaded first, replicas that refused this open last; each rank is tried in turn, so a full replica's
        # queue does not block the others. Ties in random order: a burst of opens between two routing-stats polls
        # must not all land on one replica.
        avoided = avoided_replicas(call)
        shuffled = random.sample(candidate_replicas, len(candidate_replicas))
        ranked = sorted(shuffled, key=lambda r: (r.replica_id.unique_id in avoided, load(r)))
        return [[replica] for replica in ranked]
