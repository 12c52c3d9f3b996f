"""The production Serve config: serve_config.gpu.yaml with the overrides a cluster from cluster.yaml needs
(docs/production.md, "Deploy the application"). One function makes it for the operator's private copy
(`python -m deployments.production --turn-host <head address> > serve_config.prod.yaml`), for the offline checks
(tests/test_cluster_config.py) and for the local cluster that mirrors the real one (deployments/local_cluster.py).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
GPU_SERVE_CONFIG = ROOT / "serve_config.gpu.yaml"
CLUSTER_CONFIG = ROOT / "cluster.yaml"
APP = "seedvc"
# The custom resource that only ingress nodes offer (cluster.yaml): an Ingress replica asking for one unit lands on an
# ingress node, one per node, and never takes the CPUs of a GPU node whose Converter is not placed yet.
INGRESS_RESOURCE = "ingress"
TURN_PORT = 3478  # coturn on the head (cluster.yaml, deploy/turnserver.conf)


def load_yaml(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def deployments_of(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The application's deployment entries by name (the same dicts: editing one edits `config`)."""
    [app] = [app for app in config["applications"] if app["name"] == APP]
    return {deployment["name"]: deployment for deployment in app["deployments"]}


def production_serve_config(turn_host: str | None = None) -> dict[str, Any]:
    """serve_config.gpu.yaml with the Ingress pinned to ingress nodes and, given the head's address, the TURN URLs of
    its coturn (the TURN secret stays in the env file: SEEDVC_TURN_SECRET)."""
    config = copy.deepcopy(load_yaml(GPU_SERVE_CONFIG))
    ingress = deployments_of(config)["Ingress"]
    ingress.setdefault("ray_actor_options", {})["resources"] = {INGRESS_RESOURCE: 1}
    if turn_host is not None:
        [app] = [app for app in config["applications"] if app["name"] == APP]
        app["args"]["ingress"]["turn_urls"] = [
            f"turn:{turn_host}:{TURN_PORT}?transport={transport}" for transport in ("udp", "tcp")
        ]
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the production Serve config (docs/production.md, section 6).")
    parser.add_argument("--turn-host", help="the head's address as browsers reach it (omit: no TURN)")
    args = parser.parse_args()
    yaml.safe_dump(production_serve_config(args.turn_host), sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
