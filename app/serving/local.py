"""A ConverterClient that calls ConverterService objects in this process (no Ray): for tests and single-process use.

Several services stand for several replicas; `lose()` makes one forget its sessions, as a crashed or replaced
replica would, so re-homing can be exercised without a cluster.
"""

from __future__ import annotations

import time
from dataclasses import replace

from app.serving.converter import ConverterService
from app.serving.wire import (
    AttachReply,
    BlockIn,
    BlockOut,
    CapacityExceeded,
    ConverterError,
    OpenReply,
    OpenRequest,
    SessionLost,
)


class LocalConverterClient:
    def __init__(self, services: dict[str, ConverterService]) -> None:
        self.services = services
        self.lost: set[str] = set()
        self.served: dict[str, list[str]] = {}  # session id -> the replica that converted each of its blocks

    def lose(self, replica: str) -> None:
        """The replica disappears: its sessions are gone and it takes no new ones."""
        self.lost.add(replica)
        self.services[replica].forget_all()

    def _live(self) -> list[tuple[str, ConverterService]]:
        return [(name, service) for name, service in self.services.items() if name not in self.lost]

    async def open(self, request: OpenRequest) -> OpenReply:
        candidates = sorted(self._live(), key=lambda item: len(item[1].sessions))
        for _, service in candidates:
            try:
                return await service.open(request)
            except CapacityExceeded:
                continue
        raise CapacityExceeded("every converter is full")

    async def attach(self, session_id: str, replica: str) -> AttachReply:
        if replica in self.lost:
            raise SessionLost(f"converter {replica} is gone")
        return await self.services[replica].attach(session_id)

    async def convert(self, block: BlockIn, replica: str) -> BlockOut:
        if replica in self.lost:
            raise SessionLost(f"converter {replica} is gone")
        [result] = await self.services[replica].convert_blocks([replace(block, received_at=time.time())])
        if isinstance(result, ConverterError):
            raise result
        self.served.setdefault(block.session_id, []).append(replica)
        return result

    async def set_voice(self, session_id: str, voice_id: str, replica: str) -> None:
        if replica in self.lost:
            raise SessionLost(f"converter {replica} is gone")
        await self.services[replica].set_voice(session_id, voice_id)

    async def close(self, session_id: str, replica: str, lease: int) -> None:
        if replica not in self.lost:
            await self.services[replica].close_session(session_id, lease)
