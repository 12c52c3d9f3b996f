"""The local cluster's configs (deployments/local_cluster.py), checked offline: they mirror cluster.yaml and the
production Serve config, so that what scales here is what scales on the cloud. tests/serve/test_local_cluster.py
runs them."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from ray.autoscaler._private.util import validate_config
from ray.serve.schema import ServeDeploySchema

from deployments.app import AppArgs
from deployments.local_cluster import (
    FAKE_HEAD_TYPE,
    HEAD_RESOURCE,
    Sizing,
    fake_autoscaler_config,
    kill_all,
    local_serve_config,
    node_type_of,
    resource_flags,
    with_descendants,
)
from deployments.production import CLUSTER_CONFIG, deployments_of, load_yaml, production_serve_config

SIZING = Sizing(idle_timeout_minutes=0.1, max_workers={"gpu": 2}, converter_max_replicas=3, sessions_per_replica=2)


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return load_yaml(CLUSTER_CONFIG)


def test_the_autoscaler_config_passes_rays_checks_and_mirrors_the_node_types(cluster: dict[str, Any]) -> None:
    config = fake_autoscaler_config(cluster, "127.0.0.1:6390", SIZING)
    validate_config(config)
    types = config["available_node_types"]
    assert set(types) == {FAKE_HEAD_TYPE} | set(cluster["available_node_types"]) - {cluster["head_node_type"]}
    for name, node in cluster["available_node_types"].items():
        local = types[FAKE_HEAD_TYPE if name == cluster["head_node_type"] else name]
        assert {k: v for k, v in local["resources"].items() if k != "object_store_memory"} == node["resources"]
        assert local["min_workers"] == node.get("min_workers", 0)
    assert types["ingress"]["max_workers"] == cluster["available_node_types"]["ingress"]["max_workers"]
    assert types["gpu"]["max_workers"] == 2, "capped by the sizing"
    assert config["idle_timeout_minutes"] == 0.1
    assert config["max_workers"] == sum(node["max_workers"] for node in types.values())


def test_a_cap_above_the_clusters_max_does_not_raise_it(cluster: dict[str, Any]) -> None:
    config = fake_autoscaler_config(cluster, "127.0.0.1:6390", Sizing(max_workers={"gpu": 99}))
    assert config["available_node_types"]["gpu"]["max_workers"] == cluster["available_node_types"]["gpu"]["max_workers"]


def test_the_serve_config_is_productions_with_local_settings_only() -> None:
    config = local_serve_config(8301, Path("/tmp/voices"), SIZING, Path("/tmp/model"), identity=True)
    ServeDeploySchema(**config)
    [app] = config["applications"]
    args = AppArgs(**app["args"])
    assert (args.converter.device, args.converter.model, args.converter.identity) == ("cpu", "/tmp/model", True)
    assert args.ingress.voice_store == args.converter.voice_store == "/tmp/voices"
    local, production = deployments_of(config), deployments_of(production_serve_config())
    # Replicas ask for what production asks: that is what makes the autoscaler launch the same node types.
    for name in ("Ingress", "Converter"):
        assert local[name]["ray_actor_options"] == production[name]["ray_actor_options"], name
    scaling = local["Converter"]["autoscaling_config"]
    assert scaling["max_replicas"] == 3
    shipped = production["Converter"]["autoscaling_config"]["policy"]
    assert scaling["policy"]["policy_function"] == shipped["policy_function"]
    assert scaling["policy"]["policy_kwargs"] == {
        **shipped["policy_kwargs"],
        "sessions_per_replica": 2,
        "headroom_sessions": SIZING.headroom_sessions,
        "open_rate_lead_s": SIZING.open_rate_lead_s,
        "rate_window_s": SIZING.look_back_period_s,
    }
    assert config["proxy_location"] == "HeadOnly", "a load balancer never sends a call through a gpu node"


def test_nodes_are_told_apart_by_their_resources(cluster: dict[str, Any]) -> None:
    assert node_type_of({"CPU": 0.0, HEAD_RESOURCE: 1.0, "memory": 1e9}, cluster) == "head"
    assert node_type_of({"CPU": 2.0, "ingress": 1.0, "memory": 1e9}, cluster) == "ingress"
    assert node_type_of({"CPU": 4.0, "GPU": 1.0, "memory": 1e9}, cluster) == "gpu"
    assert node_type_of({"CPU": 8.0}, cluster) == "unknown"


def test_resource_flags() -> None:
    assert resource_flags({"CPU": 0}) == ["--num-cpus=0", "--num-gpus=0"]
    assert resource_flags({"CPU": 2, "ingress": 1}) == ["--num-cpus=2", "--num-gpus=0", '--resources={"ingress": 1}']


def test_a_crash_takes_a_nodes_processes_and_all_their_descendants() -> None:
    """A fake node's workers are its raylet's children: a crash must take them too, as a failing machine does."""
    parent = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    try:
        deadline = time.monotonic() + 10
        while len(with_descendants([parent.pid])) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        found = with_descendants([parent.pid])
        assert parent.pid in found and len(found) == 3
        kill_all(found, grace_s=0)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10  # orphans are reaped by init
        while any(Path(f"/proc/{pid}").exists() for pid in found) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(Path(f"/proc/{pid}").exists() for pid in found), "no child left running"
    finally:
        parent.kill()
