"""The Serve application: `serve run serve_config.yaml` imports `deployments.app:build` with the file's `args`.

Arguments are validated by pydantic (unknown keys are errors: Serve itself accepts typos silently). Two environment
variables override the converter's model and both voice stores, so the same config file runs a laptop, CI with the
tiny test bundle, or a cluster: SEEDVC_MODEL (`hub` or a bundle directory) and SEEDVC_VOICE_STORE (path or URL).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application

from app.environment import ServiceEnvironment
from app.serving.config import ConverterConfig, IngressConfig, Strict
from deployments.converter import Converter
from deployments.ingress import Ingress
from deployments.model_check import check_model_source
from deployments.router import SessionPinningRouter

ROUTING_STATS_PERIOD_S = 1.0  # how fresh the router's view of sessions per replica is
# Failed converter starts before Serve marks a deploy DEPLOY_FAILED instead of starting another (a model that cannot
# be found fails every time). Serve's own bound grows with the replica count, up to 20. It holds until a converter
# of the deploy has started; Serve replaces converters that fail later (a scale-up onto a bad node) without a bound.
CONVERTER_START_RETRIES = 3
# Environment of every Ray worker of the application (serve_config*.yaml's runtime_env; bench/harness.py passes it to
# ray.init). Serve sends each handle call as a streaming generator, and a replica waits on its event loop until the
# generator's items are reported to the caller. When the caller died (an ingress replica), Ray's RPC client noticed
# only at its next connection check (every second) and then waited a reconnect timeout (1 s) before asking whether
# that worker was dead, for each reply in turn, while the converter answered nobody: sessions of the other ingress
# replica stalled 2-3.6 s. With these, a reply to a dead caller fails 0.2-0.4 s after the death (measured, tiny model,
# 2 cores; it was 1.1-2.2 s, then 1 s more per reply). A live peer that is briefly unreachable is still retried.
RAY_WORKER_ENV = {
    "RAY_grpc_client_check_connection_status_interval_milliseconds": "100",
    "RAY_core_worker_rpc_server_reconnect_timeout_base_s": "0",
}


class AppArgs(Strict):
    converter: ConverterConfig = Field(default_factory=ConverterConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)


def with_environment(args: AppArgs) -> AppArgs:
    """The arguments with what the environment overrides (app/environment.py: SEEDVC_MODEL, SEEDVC_VOICE_STORE)."""
    environment = ServiceEnvironment.read()
    converter, ingress = args.converter, args.ingress
    if model := environment.model:
        converter = converter.model_copy(update={"model": model})
    if store := environment.voice_store:
        converter = converter.model_copy(update={"voice_store": store})
        ingress = ingress.model_copy(update={"voice_store": store})
    return AppArgs(converter=converter, ingress=ingress)


def build(raw_args: dict[str, Any]) -> Application:
    """The entry point `serve_config.yaml` names; deployment options come from the file's `deployments` section.

    The model is checked first, so that a machine without the weights fails at once with what to do
    (deployments/model_check.py) instead of in every converter's traceback.
    """
    args = with_environment(AppArgs(**raw_args))
    check_model_source(args.converter.model)
    return build_app(args)


def session_pinning(routing_stats_period_s: float) -> RequestRouterConfig:
    """The converters' router, reading each replica's sessions this often."""
    # (Ray annotates RequestRouterConfig's **kwargs as dict[str, Any] each, which no setting is.)
    return RequestRouterConfig(
        request_router_class=SessionPinningRouter,  # type: ignore[arg-type]  # Ray's annotation, above
        request_routing_stats_period_s=routing_stats_period_s,  # type: ignore[arg-type]  # Ray's annotation, above
    )


def build_app(
    args: AppArgs, converter_options: dict[str, Any] | None = None, ingress_options: dict[str, Any] | None = None
) -> Application:
    """The application graph; options override Serve deployment settings (tests use this to size replicas)."""
    router = session_pinning(ROUTING_STATS_PERIOD_S)
    # serve.deployment(options)(cls): with the options as **kwargs, serve.deployment(cls, ...) types as a decorator.
    options = {
        "max_constructor_retry_count": CONVERTER_START_RETRIES,
        "request_router_config": router,  # a test may give one with another routing-stats period
        **(converter_options or {}),
    }
    converter = serve.deployment(name="Converter", **options)(Converter).bind(
        args.converter.model_dump(exclude={"replica_tag"})
    )
    ingress = serve.deployment(name="Ingress", **(ingress_options or {}))(Ingress)
    return ingress.bind(converter, args.ingress.model_dump())
