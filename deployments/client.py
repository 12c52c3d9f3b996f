"""How the ingress reaches converters through Serve: a ConverterClient over a DeploymentHandle with pinned calls."""

from __future__ import annotations

import contextlib

from ray import exceptions as ray_exceptions
from ray.serve.handle import DeploymentHandle

from app.serving.wire import AttachReply, BlockIn, BlockOut, OpenReply, OpenRequest, SessionLost
from deployments.router import pin

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
        return await self._handle.open.remote(request)

    async def attach(self, session_id: str, replica: str) -> AttachReply:
        # A replica that is gone cannot be reached by a pin: the call lands on another one, which answers
        # SessionLost itself. So does the replica when it dropped the session meanwhile.
        try:
            return await self._to(replica).attach.remote(session_id)
        except REPLICA_GONE as error:
            raise SessionLost(f"converter {replica} is gone") from error

    async def convert(self, block: BlockIn, replica: str) -> BlockOut:
        try:
            return await self._to(replica).convert.remote(block)
        except REPLICA_GONE as error:
            self._pinned.pop(replica, None)
            raise SessionLost(f"converter {replica} is gone: {type(error).__name__}") from error

    async def set_voice(self, session_id: str, voice_id: str, replica: str) -> None:
        try:
            await self._to(replica).set_voice.remote(session_id, voice_id)
        except REPLICA_GONE as error:
            raise SessionLost(f"converter {replica} is gone") from error

    async def close(self, session_id: str, replica: str, lease: int) -> None:
        # Closing is best effort: a replica that is gone has freed the session already.
        with contextlib.suppress(*REPLICA_GONE, SessionLost):
            await self._to(replica).close.remote(session_id, lease)
