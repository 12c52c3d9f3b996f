"""The local app the serving benchmarks measure: bench/harness.py's Ray Serve app (the tiny fixture bundle, replicas
at num_cpus 0 and one torch thread) with serve_config.yaml's deployment options.

Deployment options (`serve_options`): `config` uses serve_config.yaml's Converter and Ingress `max_ongoing_requests`
and the Converter's `user_config` (batching: max_batch_size, batch_wait_s), with the harness's num_cpus 0. `harness`
calls bench.harness.start_app unchanged: Serve's default max_ongoing_requests of 5 then caps the ingress at 5 open
WebSockets (and the converter's batches at 5), so that more streams wait for a slot.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from bench.fixtures import ROOT
from bench.harness import ServeApp, converter_replicas, replica_stats, start_app
from bench.parity import ParitySet

SERVE_CONFIG = ROOT / "serve_config.yaml"
SETTLE_SECONDS = 5.0


def config_options() -> tuple[dict[str, Any], dict[str, Any]]:
    """Converter and Ingress deployment options that matter here, as serve_config.yaml sets them."""
    document = yaml.safe_load(SERVE_CONFIG.read_text())
    deployments = {d["name"]: d for d in document["applications"][0]["deployments"]}
    converter = {k: deployments["Converter"][k] for k in ("max_ongoing_requests", "user_config")}
    ingress = {"max_ongoing_requests": deployments["Ingress"]["max_ongoing_requests"]}
    return converter, ingress


def deploy(
    parity: ParitySet,
    voices: Path,
    max_sessions: int,
    converters: int,
    serve_options: str,
    identity: bool,
    **converter: Any,
) -> tuple[ServeApp, dict[str, Any]]:
    """The app (re)deployed with the tiny bundle, a token and an uploaded voice; and the options it runs with
    (`serve_options`: "config" or "harness", see the module docstring). `converter` overrides ConverterConfig fields
    (bench/harness.py: app_args)."""
    if serve_options == "harness":
        options: dict[str, Any] = {"mode": "harness start_app (Serve defaults: max_ongoing_requests 5)"}
        deployment_options = None
    else:
        converter_options, ingress_options = config_options()
        options = {"mode": "serve_config.yaml options", "converter": converter_options, "ingress": ingress_options}
        deployment_options = {"Converter": converter_options, "Ingress": ingress_options}
    app = start_app(
        parity,
        voices,
        converters=converters,
        max_sessions=max_sessions,
        options=deployment_options,
        identity=identity,
        **converter,
    )
    time.sleep(SETTLE_SECONDS)  # the replicas a redeploy replaced stop, and Ray's workers settle, before measuring
    return app, options


def all_replica_stats() -> dict[str, dict[str, Any]]:
    return {replica: replica_stats(replica) for replica in converter_replicas()}
