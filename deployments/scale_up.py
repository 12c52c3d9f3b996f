"""The ingress's view of the converters' scale-up, from Serve's controller: what app/serving/retry_after.py needs to
tell a caller refused for capacity how long to wait.

The controller's instance details list every replica of a deployment with its state and the time the controller
started it (`start_time_s`: the request, before any node joins for it). They are read when a caller is refused (at
most every `refresh_s`), and every `refresh_s` while a replica is starting, so that its start is measured to within
`refresh_s` even when no one is refused meanwhile. Private API (the controller's actor and method names, Ray 2.60,
pinned): tests/serve/test_autoscaling.py fails if a Ray upgrade changes them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

from app.serving.retry_after import ReplicaView, ScaleUpWatch

log = logging.getLogger(__name__)

NOT_SERVING = ("STARTING", "UPDATING", "RECOVERING")  # Serve's replica states before a replica takes requests
READ_TIMEOUT_S = 2.0  # a controller that does not answer by then leaves the last view in place


def replica_views(details: dict[str, Any], app: str, deployment: str, now: float) -> list[ReplicaView]:
    """The deployment's replicas in the controller's instance details (those stopping left out: they serve no one)."""
    entry = details.get("applications", {}).get(app, {}).get("deployments", {}).get(deployment, {})
    return [
        ReplicaView(replica["replica_id"], replica["state"] in NOT_SERVING, replica.get("start_time_s") or now)
        for replica in entry.get("replicas", [])
        if replica["state"] in (*NOT_SERVING, "RUNNING")
    ]


class ServeScaleUpOutlook:
    """CapacityOutlook of an ingress replica: the wait that `watch` expects from the deployment's replicas."""

    def __init__(self, app: str, deployment: str, watch: ScaleUpWatch, refresh_s: float = 2.0) -> None:
        self.app = app
        self.deployment = deployment
        self.watch = watch
        self.refresh_s = refresh_s
        self._read_at = float("-inf")  # monotonic
        self._follower: asyncio.Task[None] | None = None
        self._controller: Any = None  # Serve's controller actor, looked up once (a blocking call)

    async def expected_wait_s(self) -> float:
        if time.monotonic() - self._read_at >= self.refresh_s:
            await self._read()
        return self.watch.retry_after_s(time.time())

    async def _read(self) -> None:
        self._read_at = time.monotonic()
        try:
            if self._controller is None:
                self._controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
            details: dict[str, Any] = await asyncio.wait_for(
                self._controller.get_serve_instance_details.remote(), READ_TIMEOUT_S
            )
        except Exception as error:  # no view is no reason to fail a refusal: the last one (or none) stands
            log.warning("could not read the converters' replicas from Serve's controller: %r", error)
            return
        now = time.time()
        self.watch.observe(replica_views(details, self.app, self.deployment, now), now)
        if self.watch.starting and (self._follower is None or self._follower.done()):
            self._follower = asyncio.create_task(self._follow_starts())

    async def _follow_starts(self) -> None:
        """Reads on while a replica is starting: its start is measured even if no caller is refused meanwhile."""
        while self.watch.starting:
            await asyncio.sleep(self.refresh_s)
            await self._read()
