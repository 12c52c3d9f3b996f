"""How the ingress reaches converters through Serve: a ConverterClient over a DeploymentHandle with pinned calls."""

from __future__ import annotations

import contextlib

from ray import exceptions as ray_exceptions
from ray.serve.handle import DeploymentHandle

from app.serving.wire import (
    AttachReply,
    BlockIn,
    BlockOut,
    CapacityExceeded,
    OpenReply,
    OpenRequest,
    SessionLost,
    result_of,
)
from deployments.router import avoiding, pin

MAX_OPEN_TRIES = 4  # replicas an open tries before the client hears `overloaded`

# What a call to a replica that died, is stopping or was removed looks like from the caller's side.
REPLICA_GONE = (
    ray_exceptions.RayActorError,
    ray_exceptions.ActorUnavailableError,
    ray_exceptions.ActorDiedError,
)


class RayConverterClient:
    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle
        self._pinned: dict[str, DeploymentHandle] = {}

    def _to(self, replica: str) -> DeploymentHandle:
        if replica not in self._pinned:
            self._pinned[replica] = self._handle.options(session_id=pin(replica))
        return self._pinned[replica]

    async def open(self, request: OpenRequest) -> OpenReply:
        """On the least loaded replica; one that refuses (full: the router's view of the load is up to a routing-stats
        period old) is avoided by the next try, until every replica refused."""
        refused: list[str] = []
        for _ in range(MAX_OPEN_TRIES):
            handle = self._handle.options(session_id=avoiding(refused)) if refused else self._handle
            try:
                answer = await handle.open.remote(request)
            except REPLICA_GONE:
                continue  # it died under the call: the router stops choosing it
            if isinstance(answer, CapacityExceeded) and answer.replica is not None and answer.replica not in refused:
                refused.append(answer.replica)
                continue
            return result_of(answer)
        raise CapacityExceeded(f"no converter took the session in {MAX_OPEN_TRIES} tries ({len(refused)} were full)")

    async def attach(self, session_id: str, replica: str) -> AttachReply:
        # A replica that is gone cannot be reached by a pin: the call lands on another one, which answers
        # SessionLost itself. So does the replica when it dropped the session meanwhile.
        try:
            return result_of(await self._to(replica).attach.remote(session_id))
        except REPLICA_GONE as error:
            raise SessionLost(f"converter {replica} is gone") from error

    async def convert(self, block: BlockIn, replica: str) -> BlockOut:
        try:
            return result_of(await self._to(replica).convert.remote(block))
        except REPLICA_GONE as error:
            self._pinned.pop(replica, None)
            raise SessionLost(f"converter {replica} is gone: {type(error).__name__}") from error

    async def set_voice(self, session_id: str, voice_id: str, replica: str) -> None:
        try:
            result_of(await self._to(replica).set_voice.remote(session_id, voice_id))
        except REPLICA_GONE as error:
            raise SessionLost(f"converter {replica} is gone") from error

    async def close(self, session_id: str, replica: str, lease: int) -> None:
        # Closing is best effort: a replica that is gone has freed the session already.
        with contextlib.suppress(*REPLICA_GONE, SessionLost):
            await self._to(replica).close.remote(session_id, lease)
