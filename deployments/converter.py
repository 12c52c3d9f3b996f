"""The converter deployment: Ray Serve glue around app.serving.converter.ConverterService.

Blocks of many sessions meet in `@serve.batch` and go through ONE engine step. `record_routing_stats` feeds the
session-pinning router (least-loaded placement) and `record_autoscaling_stats` the session-aware autoscaling policy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from ray import serve

from app.logs import route_to
from app.serving.config import ConverterConfig
from app.serving.converter import ConverterService
from app.serving.wire import (
    AttachReply,
    BlockIn,
    BlockOut,
    ConverterError,
    OpenReply,
    OpenRequest,
    Refusal,
    answer_of,
)
from deployments.metrics import RayServeMetrics

DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_BATCH_WAIT_S = 0.005


class Converter:
    def __init__(self, config: dict[str, Any]) -> None:
        route_to(logging.getLogger("ray.serve"))  # app/ records (model load, speed check) into this replica's Serve log
        replica = serve.get_replica_context().replica_id.unique_id
        self.service = ConverterService(ConverterConfig(**config, replica_tag=replica), metrics=RayServeMetrics())
        # Blocks received and not yet answered, and those in the engine step now: the rest wait (autoscaling).
        self.blocks_in_flight = self.blocks_in_step = 0

    def __del__(self) -> None:
        """Serve calls this when it stops the replica: the engine thread and the voice purger stop with it."""
        if hasattr(self, "service"):  # absent when the constructor failed
            self.service.close()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Live batching knobs (a redeploy that changes only user_config keeps the replicas and their sessions)."""
        # serve.batch's wrapper has these setters, but Ray types what it returns as the plain async method.
        batch: Any = self._convert_batch
        batch.set_max_batch_size(int(user_config.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)))
        batch.set_batch_wait_timeout_s(float(user_config.get("batch_wait_s", DEFAULT_BATCH_WAIT_S)))

    # Refusals (a full replica, a lost session, an unknown voice) come back as values: see app/serving/wire.py.

    async def open(self, request: OpenRequest) -> OpenReply | Refusal:
        return await answer_of(self.service.open(request))

    async def attach(self, session_id: str) -> AttachReply | Refusal:
        return await answer_of(self.service.attach(session_id))

    async def convert(self, block: BlockIn) -> BlockOut | Refusal:
        self.blocks_in_flight += 1
        try:
            return await self._convert_batch(replace(block, received_at=time.time()))
        finally:
            self.blocks_in_flight -= 1

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _convert_batch(self, blocks: list[BlockIn]) -> list[BlockOut | ConverterError]:
        self.blocks_in_step = len(blocks)  # one batch at a time: entering it is starting its engine step
        try:
            return await self.service.convert_blocks(blocks)
        finally:
            self.blocks_in_step = 0

    async def set_voice(self, session_id: str, voice_id: str) -> Refusal | None:
        return await answer_of(self.service.set_voice(session_id, voice_id))

    async def close(self, session_id: str, lease: int | None = None) -> None:
        await self.service.close_session(session_id, lease)

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica (its sessions re-home)."""
        if not self.service.healthy:
            raise RuntimeError(
                f"{self.service.failed_steps_in_a_row} engine steps failed in a row on {self.service.model.device}"
            )

    async def stats(self) -> dict[str, Any]:
        return {**self.service.stats(), "replica": self.service.config.replica_tag}

    def record_routing_stats(self) -> dict[str, Any]:
        return {"sessions": len(self.service.sessions), "capacity": self.service.config.max_sessions}

    def record_autoscaling_stats(self) -> dict[str, float]:
        waiting = self.blocks_in_flight - self.blocks_in_step
        return {"sessions": float(len(self.service.sessions)), "waiting": float(waiting)}
