"""The Serve application: `serve run serve_config.yaml` imports `deployments.app:build` with the file's `args`.

Arguments are validated by pydantic (unknown keys are errors: Serve itself accepts typos silently). Two environment
variables override the converter's model and both voice stores, so the same config file runs a laptop, CI with the
tiny test bundle, or a cluster: SEEDVC_MODEL (`hub` or a bundle directory) and SEEDVC_VOICE_STORE (path or URL).
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application

from app.serving.config import ConverterConfig, IngressConfig, Strict
from deployments.converter import Converter
from deployments.ingress import Ingress
from deployments.router import SessionPinningRouter

MODEL_ENV = "SEEDVC_MODEL"
VOICE_STORE_ENV = "SEEDVC_VOICE_STORE"
ROUTING_STATS_PERIOD_S = 1.0  # how fresh the router's view of sessions per replica is


class AppArgs(Strict):
    converter: ConverterConfig = Field(default_factory=ConverterConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)


def with_environment(args: AppArgs) -> AppArgs:
    converter, ingress = args.converter, args.ingress
    if model := os.environ.get(MODEL_ENV):
        converter = converter.model_copy(update={"model": model})
    if store := os.environ.get(VOICE_STORE_ENV):
        converter = converter.model_copy(update={"voice_store": store})
        ingress = ingress.model_copy(update={"voice_store": store})
    return AppArgs(converter=converter, ingress=ingress)


def build(raw_args: dict[str, Any]) -> Application:
    """The entry point `serve_config.yaml` names; deployment options come from the file's `deployments` section."""
    return build_app(with_environment(AppArgs(**raw_args)))


def build_app(
    args: AppArgs, converter_options: dict[str, Any] | None = None, ingress_options: dict[str, Any] | None = None
) -> Application:
    """The application graph; options override Serve deployment settings (tests use this to size replicas)."""
    router = RequestRouterConfig(
        request_router_class=SessionPinningRouter, request_routing_stats_period_s=ROUTING_STATS_PERIOD_S
    )
    converter = serve.deployment(
        Converter, name="Converter", request_router_config=router, **(converter_options or {})
    ).bind(args.converter.model_dump(exclude={"replica_tag"}))
    ingress = serve.deployment(Ingress, name="Ingress", **(ingress_options or {}))
    return ingress.bind(converter, args.ingress.model_dump())
