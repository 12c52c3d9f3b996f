"""Prometheus export of app/serving/metrics.py's table through Ray Serve's metrics API.

Ray tags each series with its application, deployment and replica. Metric objects are created on first use, so a
replica registers only the series it records.
"""

from __future__ import annotations

from typing import cast

from ray.serve import metrics as serve_metrics

from app.serving.metrics import METRICS

Metric = serve_metrics.Counter | serve_metrics.Gauge | serve_metrics.Histogram


class RayServeMetrics:
    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}

    def _metric(self, name: str) -> Metric:
        if name not in self._metrics:
            spec = METRICS[name]
            # Ray annotates tag_keys as Tuple[str], a tuple of exactly one key, but takes any number of them.
            tag_keys = cast("tuple[str]", spec.tags)
            if spec.kind == "counter":
                self._metrics[name] = serve_metrics.Counter(name, spec.description, tag_keys=tag_keys)
            elif spec.kind == "gauge":
                self._metrics[name] = serve_metrics.Gauge(name, spec.description, tag_keys=tag_keys)
            else:
                self._metrics[name] = serve_metrics.Histogram(
                    name, spec.description, boundaries=list(spec.buckets), tag_keys=tag_keys
                )
        return self._metrics[name]

    def record(self, name: str, value: float = 1.0, **tags: str) -> None:
        metric = self._metric(name)
        if isinstance(metric, serve_metrics.Counter):
            metric.inc(value, tags=tags)
        elif isinstance(metric, serve_metrics.Gauge):
            metric.set(value, tags=tags)
        else:
            metric.observe(value, tags=tags)
