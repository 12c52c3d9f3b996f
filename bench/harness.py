"""A real local Ray Serve running the application with the tiny fixture model (2 CPUs, loopback only): what the Serve
tests (tests/serve, tests/browser) and the serving benchmarks (bench.serving_overhead, bench.load --local) start.

Replicas get `num_cpus: 0` (a 2-CPU Ray cannot place an ingress and two 1-CPU converters) and one torch thread each
(two converters with two threads each would oversubscribe the two cores many times over).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import yaml
from ray import serve

from app.audio.files import resample
from app.environment import TOKEN_SECRET
from app.serving.config import ConverterConfig, IngressConfig
from bench.parity import ParitySet
from client.api import get_token, upload_voice
from client.stream_client import StreamResult, stream_audio
from deployments.app import RAY_WORKER_ENV, AppArgs, build_app
from deployments.router import pin

API_KEY = "test-key-0123456789abcdef"
OTHER_API_KEY = "another-key-0123456789abcdef"  # a second tenant, for isolation tests
BASE_URL = "http://127.0.0.1:8000"
APP = "seedvc"
SERVE_CONFIG = Path(__file__).resolve().parent.parent / "serve_config.yaml"
METRICS_PORT = 8085  # this node's Prometheus endpoint (ray start --metrics-export-port in production)


@dataclass
class ServeApp:
    parity: ParitySet
    token: str
    voice_id: str
    base_url: str = BASE_URL

    def stream(self, audio_48k: np.ndarray, **options: Any) -> StreamResult:
        return asyncio.run(stream_audio(self.base_url, self.token, self.voice_id, audio_48k, **options))

    def source_48k(self, seconds: float | None = None) -> np.ndarray:
        audio = resample(torch.from_numpy(self.parity.wav("source_16k")), 16000, 48000).numpy()
        return audio if seconds is None else audio[: int(48000 * seconds)]


@contextlib.contextmanager
def local_ray() -> Iterator[None]:
    # One token secret for every ingress replica, as production's env file gives them: a client that resumes on a
    # replacement ingress replica presents a token the old one issued.
    shared = {"env_vars": {TOKEN_SECRET: secrets.token_hex(32), **RAY_WORKER_ENV}}
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=METRICS_PORT, runtime_env=shared
    )
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def start_app(
    parity: ParitySet,
    voices: Path,
    converters: int = 2,
    max_sessions: int = 8,
    ingress: dict[str, Any] | None = None,
    base_url: str = BASE_URL,
    options: dict[str, dict[str, Any]] | None = None,
    **converter: Any,
) -> ServeApp:
    """Deploy the app and upload the fixture voice; `options` adds Serve deployment options by deployment name
    ("Converter", "Ingress")."""
    deploy(parity, voices, converters, max_sessions, ingress, options, **converter)
    token = get_token(base_url, API_KEY)
    voice = upload_voice(base_url, token, parity.root / parity.bundle["files"]["reference_22k"], name="fixture")
    return ServeApp(parity=parity, token=token, voice_id=voice["voice_id"], base_url=base_url)


def deploy(
    parity: ParitySet,
    voices: Path,
    converters: int = 2,
    max_sessions: int = 8,
    ingress: dict[str, Any] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    **converter: Any,
) -> None:
    """`serve.run` the app: a first deployment, or a redeploy of the running one with what changed. Deployments
    run with serve_config.yaml's admission and batching options (`shipped_deployment_options`), then `options`."""
    options = options or {}
    shipped = shipped_deployment_options()
    app = build_app(
        app_args(parity, voices, max_sessions, ingress, **converter),
        converter_options={
            "num_replicas": converters,
            **shipped["Converter"],
            **options.get("Converter", {}),
            **NO_CPU,
        },
        ingress_options={**shipped["Ingress"], **options.get("Ingress", {}), **NO_CPU},
    )
    serve.run(app, name=APP, route_prefix="/")


NO_CPU = {"ray_actor_options": {"num_cpus": 0}}


def shipped_app_config() -> dict[str, Any]:
    """The application's entry in serve_config.yaml, as production runs it."""
    config = yaml.safe_load(SERVE_CONFIG.read_text())
    [app] = [app for app in config["applications"] if app["name"] == APP]
    return dict(app)


def shipped_converter_args() -> dict[str, Any]:
    """The converter's arguments in serve_config.yaml, as production runs them."""
    return dict(shipped_app_config()["args"]["converter"])


def shipped_deployment_options() -> dict[str, dict[str, Any]]:
    """Per deployment, serve_config.yaml's options that decide admission and batching: `max_ongoing_requests`
    (Serve's default of 5 would let an ingress hold 5 open WebSockets, the 6th waiting for a slot until its
    handshake times out) and the converter's `user_config` (max_batch_size, batch_wait_s)."""
    deployments = {d["name"]: d for d in shipped_app_config()["deployments"]}
    return {
        "Converter": {k: deployments["Converter"][k] for k in ("max_ongoing_requests", "user_config")},
        "Ingress": {"max_ongoing_requests": deployments["Ingress"]["max_ongoing_requests"]},
    }


def app_args(
    parity: ParitySet, voices: Path, max_sessions: int = 8, ingress: dict[str, Any] | None = None, **converter: Any
) -> AppArgs:
    """The application's arguments: the tiny fixture model, one torch thread, the README settings (no CPU profile:
    the tests expect the settings of the fixtures), the deadline control as serve_config.yaml ships it, the test API
    keys; `converter` overrides any of them."""
    defaults = {
        "model": str(parity.model_dir),
        "torch_threads": 1,
        "precision": "fp32",
        "cpu_settings": None,
        "deadline_min_steps": shipped_converter_args()["deadline_min_steps"],
    }
    return AppArgs(
        converter=ConverterConfig(
            voice_store=str(voices),
            max_sessions=max_sessions,
            silence_gate_dbfs=None,
            **(defaults | converter),
        ),
        ingress=IngressConfig(
            voice_store=str(voices), api_keys={"test": API_KEY, "other": OTHER_API_KEY}, **(ingress or {})
        ),
    )


def autoscaled_converters(downscale_delay_s: float = 4.0, **policy_kwargs: Any) -> dict[str, Any]:
    """Converter options for `start_app`: from one replica up to two, on the session-aware policy with
    `policy_kwargs`, deciding within seconds (production waits longer: serve_config.yaml)."""
    return {
        "num_replicas": None,
        "autoscaling_config": {
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": 2,
            "upscale_delay_s": 1,
            "downscale_delay_s": downscale_delay_s,
            "look_back_period_s": 2,
            # Replicas and handles push their metrics every metrics_interval_s (Serve's default 10 s). Ray 2.60
            # deprecates the field for RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S, which nothing reads yet.
            "metrics_interval_s": 0.5,
            "policy": {"policy_function": "deployments.autoscaling:SessionAwarePolicy", "policy_kwargs": policy_kwargs},
        },
    }


def converter_replicas() -> dict[str, str]:
    """Unique id -> actor name of every live converter replica."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#Converter#" in a["name"]]
    return {name.rsplit("#", 1)[1]: name for name in names}


def replica_stats(replica: str) -> dict[str, Any]:
    handle = serve.get_deployment_handle("Converter", app_name=APP)
    return handle.options(session_id=pin(replica)).stats.remote().result(timeout_s=30)


def kill_replica(replica: str) -> None:
    ray.kill(ray.get_actor(converter_replicas()[replica], namespace="serve"), no_restart=True)
