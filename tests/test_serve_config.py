"""serve_config.yaml is checked the way Serve will read it, plus what Serve lets slip: unknown keys.

Serve's own schema ignores keys it does not know (`num_gpu`, `max_replica` ... pass silently), so this walks the file
against the schema's pydantic models and fails on any key that no model declares.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from deployments.app import RAY_WORKER_ENV, AppArgs
from deployments.autoscaling import SessionAwarePolicy

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [ROOT / "serve_config.yaml", ROOT / "serve_config.gpu.yaml"]
# Fields declared as plain dicts whose content a model of its own describes.
DICT_FIELDS_WITH_MODELS = {"autoscaling_config": AutoscalingConfig}


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (directly, in a list, or in a union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in {list, typing.Union, types.UnionType}:
        return [model for arg in typing.get_args(annotation) for model in models_in(arg)]
    return []


def unknown_keys(data: Any, model: type[BaseModel], where: str = "") -> list[str]:
    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    known = set(fields) | {field.alias for field in fields.values() if field.alias}
    problems = [f"{where}{key}" for key in data if key not in known]
    for key, value in data.items():
        if key not in fields:
            continue
        nested = [DICT_FIELDS_WITH_MODELS[key]] if key in DICT_FIELDS_WITH_MODELS else models_in(fields[key].annotation)
        for child in nested[:1]:
            items = value if isinstance(value, list) else [value]
            for index, item in enumerate(items):
                label = f"{where}{key}[{index}]." if isinstance(value, list) else f"{where}{key}."
                problems += unknown_keys(item, child, label)
    return problems


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda path: path.name)
def config(request: pytest.FixtureRequest) -> dict[str, Any]:
    return yaml.safe_load(request.param.read_text())


def test_serve_accepts_the_file(config: dict[str, Any]) -> None:
    ServeDeploySchema.model_validate(config)


def test_no_key_is_unknown(config: dict[str, Any]) -> None:
    assert unknown_keys(config, ServeDeploySchema) == []


def test_every_worker_of_the_app_gets_the_ray_environment_the_service_needs(config: dict[str, Any]) -> None:
    """Without it a converter that owes replies to a dead ingress replica stalls all sessions (deployments/app.py);
    the tests' Ray gets the same (bench/harness.py)."""
    [application] = config["applications"]
    assert RAY_WORKER_ENV.items() <= application["runtime_env"]["env_vars"].items()


def test_the_checker_catches_typos() -> None:
    broken = yaml.safe_load(CONFIGS[0].read_text())
    deployment = broken["applications"][0]["deployments"][0]
    deployment["max_replica"] = 3
    deployment["autoscaling_config"]["max_replica"] = 3
    deployment["ray_actor_options"]["num_gpu"] = 1
    found = unknown_keys(broken, ServeDeploySchema)
    assert any(path.endswith("deployments[0].max_replica") for path in found), found
    assert any(path.endswith("autoscaling_config.max_replica") for path in found), found
    assert any(path.endswith("ray_actor_options.num_gpu") for path in found), found


def test_application_args_are_valid_and_complete(config: dict[str, Any]) -> None:
    [application] = config["applications"]
    assert application["import_path"] == "deployments.app:build"
    AppArgs(**application["args"])  # extra="forbid": a typo in args fails here
    with pytest.raises(ValueError, match="max_session"):
        AppArgs(**{**application["args"], "converter": {**application["args"]["converter"], "max_session": 3}})


def test_deployments_and_policy_exist(config: dict[str, Any]) -> None:
    [application] = config["applications"]
    names = {deployment["name"] for deployment in application["deployments"]}
    assert names == {"Converter", "Ingress"}
    converter = next(d for d in application["deployments"] if d["name"] == "Converter")
    policy = converter["autoscaling_config"]["policy"]
    assert policy["policy_function"] == "deployments.autoscaling:SessionAwarePolicy"
    SessionAwarePolicy(**policy["policy_kwargs"])
    batch = converter["user_config"]["max_batch_size"]
    assert converter["max_ongoing_requests"] >= batch, "batches never fill if ongoing requests cap below the batch"
