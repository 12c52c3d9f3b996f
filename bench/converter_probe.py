"""The direct converter probe: blocks sent straight to a converter replica from this process through a Serve
DeploymentHandle (no WebSocket, no ingress), one in flight at real-time pace, like one stream.

Each reply's BlockOut gives the replica's queue_seconds (the `@serve.batch` wait, since nothing else is in flight)
and compute_seconds (the engine step, or the identity work); with the round trip measured here, it splits a single
stream's serving overhead into the Ray handle hop + batching wait vs what the WebSocket path and the ingress add.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from ray import serve

from app.audio.files import resample
from app.audio.opus import SAMPLE_RATE
from app.serving.wire import BlockIn, OpenRequest
from app.streaming.settings import CONTENT_RATE, StreamSettings
from bench.common import distribution
from bench.harness import APP
from deployments.router import pin

PROBE_BLOCKS = 24
PROBE_WARMUP = 2


def probe_converter(voice_id: str, blocks: Sequence[np.ndarray], block_s: float) -> list[dict[str, float]]:
    """Blocks sent straight to the converter from this process through a DeploymentHandle (no WebSocket, no ingress),
    one at a time at real-time pace, like one stream: per block the round trip here, and the replica's own queue and
    compute time (BlockOut: compute = the engine step). The first PROBE_WARMUP blocks are left out."""
    handle = serve.get_deployment_handle("Converter", app_name=APP)
    session = f"probe-{uuid.uuid4().hex[:8]}"
    opened = handle.open.remote(OpenRequest(session, voice_id, StreamSettings(), seed=0)).result(timeout_s=60)
    pinned = handle.options(session_id=pin(opened.replica))
    rows = []
    start = time.monotonic()
    try:
        for index, block in enumerate(blocks):
            time.sleep(max(0.0, start + index * block_s - time.monotonic()))
            sent = time.perf_counter()
            out = pinned.convert.remote(BlockIn(session, index, block, lease=opened.lease)).result(timeout_s=60)
            rows.append(
                {
                    "round_trip_ms": 1000 * (time.perf_counter() - sent),
                    "queue_ms": 1000 * out.queue_seconds,
                    "compute_ms": 1000 * out.compute_seconds,
                }
            )
    finally:
        pinned.close.remote(session).result(timeout_s=60)
    return rows[PROBE_WARMUP:]


def probe_blocks(audio_48k: np.ndarray, block_16k: int, count: int) -> list[np.ndarray]:
    """`count` consecutive 16 kHz blocks of the (looped) source."""
    samples = resample(torch.from_numpy(audio_48k), SAMPLE_RATE, CONTENT_RATE).numpy()
    samples = np.tile(samples, -(-count * block_16k // samples.size))
    return [np.ascontiguousarray(samples[i * block_16k : (i + 1) * block_16k]) for i in range(count)]


def describe_probe(rows: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float | None]]:
    return {key: distribution([row[key] for row in rows]) for key in ("round_trip_ms", "queue_ms", "compute_ms")}
