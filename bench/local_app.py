"""The local app the serving benchmarks measure: bench/harness.py's Ray Serve app (the tiny fixture bundle, replicas
at num_cpus 0 and one torch thread, serve_config.yaml's admission and batching options), redeployed per run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.harness import ServeApp, converter_replicas, replica_stats, shipped_deployment_options, start_app
from bench.parity import ParitySet

SETTLE_SECONDS = 5.0


def deploy(
    parity: ParitySet,
    voices: Path,
    max_sessions: int,
    converters: int,
    identity: bool,
    ingress: dict[str, Any] | None = None,
    **converter: Any,
) -> tuple[ServeApp, dict[str, Any]]:
    """The app (re)deployed with the tiny bundle, a token and an uploaded voice; and the deployment options it runs
    with, for the report. `ingress` and `converter` override IngressConfig and ConverterConfig fields
    (bench/harness.py: app_args)."""
    app = start_app(
        parity,
        voices,
        converters=converters,
        max_sessions=max_sessions,
        ingress=ingress,
        identity=identity,
        **converter,
    )
    time.sleep(SETTLE_SECONDS)  # the replicas a redeploy replaced stop, and Ray's workers settle, before measuring
    return app, {"mode": "serve_config.yaml options", **shipped_deployment_options()}


def all_replica_stats() -> dict[str, dict[str, Any]]:
    return {replica: replica_stats(replica) for replica in converter_replicas()}
