"""The service's metrics: one table of names and meanings, and the seam a metrics backend plugs into.

app/ records through the `Metrics` protocol and never imports a backend; deployments/metrics.py exports the same
names through Ray Serve's Prometheus metrics (prefixed `ray_seedvc_`, counters suffixed `_total`). The README's
metrics list is this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

Kind = Literal["counter", "gauge", "histogram"]

SECONDS_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class MetricSpec:
    kind: Kind
    description: str
    buckets: tuple[float, ...] = ()  # histogram upper bounds; Ray requires them positive (0 steps lands in <= 0.5)
    tags: tuple[str, ...] = ()


METRICS: dict[str, MetricSpec] = {
    # Converter replicas.
    "seedvc_sessions": MetricSpec("gauge", "live sessions held by the replica"),
    "seedvc_step_seconds": MetricSpec("histogram", "one batched engine step", SECONDS_BUCKETS),
    "seedvc_queue_seconds": MetricSpec("histogram", "block wait at the converter before its step", SECONDS_BUCKETS),
    "seedvc_batch_size": MetricSpec("histogram", "blocks per engine step", (1, 2, 4, 8, 16, 32, 64)),
    "seedvc_diffusion_steps": MetricSpec("histogram", "diffusion steps spent on a block", (0.5, 1, 2, 4, 6, 8, 10, 20)),
    "seedvc_deadline_misses": MetricSpec("counter", "steps that took longer than their time budget"),
    "seedvc_silent_blocks": MetricSpec("counter", "blocks the silence gate skipped"),
    "seedvc_admission_refusals": MetricSpec("counter", "sessions refused because the replica was full"),
    "seedvc_model_load_seconds": MetricSpec("gauge", "time the replica took to load the model"),
    "seedvc_warm_up_seconds": MetricSpec("gauge", "time the replica took to warm its static shapes (CUDA graphs)"),
    "seedvc_eager_passes": MetricSpec("counter", "GPU passes of a shape that was not warmed (ran without graphs)"),
    "seedvc_memory_splits": MetricSpec("counter", "batched passes split in two after running out of GPU memory"),
    "seedvc_memory_refusals": MetricSpec("counter", "blocks refused because they did not fit in GPU memory alone"),
    "seedvc_failed_steps": MetricSpec("counter", "engine steps that failed with a device or model error"),
    "seedvc_gpu_memory_bytes": MetricSpec(
        "gauge", "GPU memory of the replica's device: allocated, reserved, peak (allocated)", tags=("kind",)
    ),
    # Ingress replicas.
    "seedvc_streams": MetricSpec("gauge", "open live streams", tags=("transport",)),
    "seedvc_block_latency_seconds": MetricSpec(
        "histogram", "last input sample of a block in -> its output ready, at the ingress", SECONDS_BUCKETS
    ),
    "seedvc_sessions_rehomed": MetricSpec("counter", "sessions re-opened on another converter"),
    "seedvc_sessions_resumed": MetricSpec("counter", "sessions a client resumed after its connection dropped"),
    "seedvc_sessions_detached": MetricSpec("counter", "connections that dropped mid-stream, leaving their session"),
    "seedvc_dropped_input_seconds": MetricSpec("counter", "input dropped because a session fell behind"),
}


class Metrics(Protocol):
    def record(self, name: str, value: float = 1.0, **tags: str) -> None:
        """Add to a counter, set a gauge, or observe into a histogram, by the metric's kind in METRICS."""


class NoMetrics:
    def record(self, name: str, value: float = 1.0, **tags: str) -> None:
        assert name in METRICS, f"undeclared metric {name}"


class RecordedMetrics:
    """Keeps every recording in memory (tests, and single-process use without a metrics backend)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, float, dict[str, str]]] = []

    def record(self, name: str, value: float = 1.0, **tags: str) -> None:
        assert name in METRICS, f"undeclared metric {name}"
        self.records.append((name, value, tags))

    def values(self, name: str) -> list[float]:
        return [value for recorded, value, _ in self.records if recorded == name]
